"""HDF5 -> virtual Zarr format 2: walks an open h5py file and builds its `VirtualZarr`.

Owns: the mapping rules (what each HDF5 group, dataset, link and attribute becomes), the HDF5 filter
-> numcodecs table, fill values, virtual chunks of contiguous datasets, and the `zarrfs_skipped` list.
Never does: I/O other than through the h5py file it is given, networking, or anything asynchronous.
It imports h5py, so only the worker process (`zarrfs.virtual.worker`) imports it: a crash or a hang of
the HDF5 library takes down the worker, never its caller.

Why hand-written on h5py rather than a library's output post-processed (evaluated late 2026 on Python
3.11, zarr 3.1, h5py 3.16 / HDF5 2.0):
- kerchunk 0.2.10 `SingleHdf5ToZarr` installs, but serves wrong values silently: a compact dataset
  larger than its inline threshold becomes an array with no chunks (reads as the fill value); a
  dataset with fletcher32 is dropped with only a warning (its `size -= 4` branch is unreachable);
  a first chunk with a non-zero filter mask removes that filter for the whole dataset, matched by
  position against a list whose order differs from the HDF5 pipeline; every error is quashed, so
  what it left out is not listed; attributes it cannot convert become `str(value)`.
- VirtualiZarr 2.5.1 `HDFParser` (the newest that installs) ignores `filter_mask` altogether,
  also maps compact datasets to empty arrays, emits Zarr format 3 metadata (we serve format 2 files)
  and pulls in obstore/obspec-utils for a reader we would have to replace.
- LINDI 0.4.6 pins zarr < 3 and cannot be installed beside zarr-python 3; its conventions
  (`_SOFT_LINK`, `_REFERENCE`) are followed here.
What all three share, and what this module keeps, is small: walk the file with h5py, take chunk
locations from `DatasetID.chunk_iter` (one O(n) pass; never `get_chunk_info(i)`, O(n) per call) and
map HDF5 filter ids onto numcodecs codecs. Post-processing their output would have meant redoing
every dataset, so the library would contribute nothing but risk.

Rules, in short. Everything not shown is listed in the root `.zattrs` under `zarrfs_skipped` (always
present, possibly empty): `{"path": "a/b", "reason": ...}` for a link or dataset, `"a/b@name"` for an
attribute (`"@name"` on the root), at most MAX_SKIPPED_LISTED entries plus one counting the rest.
- group -> `.zgroup` + `.zattrs`; soft link -> `.zgroup` + `.zattrs` `{"_SOFT_LINK": {"path": ...}}`;
  external links, object-reference and region-reference datasets, variable-length sequences,
  opaque/unsupported types, virtual datasets, external storage, a second hard link to a group,
  filters numcodecs cannot decode as HDF5 framed them (szip, lzf, lz4, bitshuffle, nbit,
  scaleoffset, ...) and chunks stored with some filter skipped (filter_mask != 0) -> skipped.
- dataset whose stored type is exactly what h5py returns (H5Tequal with h5py's own mapping of the
  dtype), with only deflate, shuffle, fletcher32, blosc or zstd filters -> array whose chunks are byte
  ranges of the blob (chunked: HDF5's chunks; contiguous: whole-row virtual chunks of ~4 MiB).
- compact, scalar, variable-length string (numcodecs `vlen-utf8`), and small datasets whose stored
  type needs a conversion -> array with one inline chunk holding h5py's values; these are the only
  values read, bounded by `Limits.inline_dataset_bytes` and `inline_total_bytes`.
- `fill_value` is HDF5's (exactly, or the dataset is skipped) where some chunk was never written,
  null elsewhere (no reader uses it; xarray would mask HDF5's default 0 as missing).
- attributes -> `.zattrs`: numbers as numbers (NaN/Infinity as Python's json writes them), strings
  and UTF-8 bytes as strings, arrays as nested lists, object references as LINDI's `_REFERENCE`;
  empty, complex, compound, region-reference and non-UTF-8 attributes are skipped. Arrays get
  `_ARRAY_DIMENSIONS` (phony names, unique per group and length) so xarray can open the groups.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import h5py
import numcodecs
import numpy as np

from zarrfs.virtual.model import (
    INT64_MAX,
    MAX_NDIM,
    ZARR_METADATA_NAMES,
    VirtualZarr,
    VirtualZarrBuilder,
)

SKIPPED_KEY: Final = "zarrfs_skipped"
DIMENSIONS_KEY: Final = "_ARRAY_DIMENSIONS"
# Attribute names that LINDI's readers interpret: an HDF5 attribute of that name would be misread.
LINDI_RESERVED: Final = frozenset({"_SOFT_LINK", "_REFERENCE", "_EXTERNAL_ARRAY_LINK", "_SCALAR"})
# Member names that would read as Zarr metadata (v2, consolidated, or v3, which readers probe first).
RESERVED_NAMES: Final = ZARR_METADATA_NAMES | {".zmetadata", "zarr.json"}
MAX_SKIPPED_LISTED: Final = 10_000
MAX_DEPTH: Final = 100

H5Z_DEFLATE: Final = 1
H5Z_SHUFFLE: Final = 2
H5Z_FLETCHER32: Final = 3
H5Z_BLOSC: Final = 32001
H5Z_ZSTD: Final = 32015
BLOSC_CNAMES: Final = ("blosclz", "lz4", "lz4hc", "snappy", "zlib", "zstd")
H5Z_NAMES: Final = {
    4: "szip",
    5: "nbit",
    6: "scaleoffset",
    307: "bzip2",
    32000: "lzf",
    32004: "lz4",
    32008: "bitshuffle",
    32017: "sz",
    32018: "fcidecomp",
}


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds of one translation: what a hostile or huge file can make it hold or read."""

    max_chunks: int = 20_000_000  # referenced chunks in one view (24 bytes each)
    max_objects: int = 1_000_000  # groups, datasets and links visited
    inline_dataset_bytes: int = 1 << 20  # values of one inlined dataset
    inline_total_bytes: int = 32 << 20  # values of all inlined datasets
    contiguous_chunk_bytes: int = 4 << 20  # target size of a contiguous dataset's virtual chunks
    max_contiguous_chunks: int = 1 << 16  # virtual chunks of one contiguous dataset


class Skip(Exception):
    """This object cannot be represented exactly; the message says why."""


def translate(h5file: h5py.File, blob_size: int, limits: Limits | None = None) -> VirtualZarr:
    """The virtual Zarr view of `h5file`, an open h5py file of `blob_size` bytes."""
    return _Translator(h5file, blob_size, limits or Limits()).run()


@dataclass(slots=True)
class _ArrayPlan:
    """What one dataset becomes: its `.zarray`, inline chunk files or a chunk table."""

    shape: tuple[int, ...]
    zarray: dict[str, Any]
    inline_chunks: dict[str, bytes] = field(default_factory=dict)
    grid: tuple[int, ...] = ()
    keys: Any = None
    offsets: Any = None
    lengths: Any = None


class _Translator:
    def __init__(self, h5file: h5py.File, blob_size: int, limits: Limits) -> None:
        self.f = h5file
        self.blob_size = blob_size
        self.limits = limits
        self.builder = VirtualZarrBuilder(blob_size)
        self.skipped: list[dict[str, str]] = []
        self.skipped_count = 0
        self.objects = 0
        self.inline_bytes = 0
        self.group_paths: dict[int, str] = {}  # object header address -> first path shown
        self.root_object_id: str | None = None

    # -- the walk ---------------------------------------------------------------------------------

    def run(self) -> VirtualZarr:
        try:
            root_id = self.f.attrs.get("object_id")
            if isinstance(root_id, bytes):
                root_id = root_id.decode("utf-8")
            self.root_object_id = root_id if isinstance(root_id, str) else None
        except Exception:
            self.root_object_id = None
        root_attrs = self._group("", self.f, depth=0)
        if SKIPPED_KEY in root_attrs:
            del root_attrs[SKIPPED_KEY]
            self.skip(
                f"@{SKIPPED_KEY}", "attribute name is the one zarrfs lists skipped items under"
            )
        listed = list(self.skipped)
        if self.skipped_count > len(listed):
            listed.append(
                {"path": "", "reason": f"{self.skipped_count - len(listed)} more items not listed"}
            )
        root_attrs[SKIPPED_KEY] = listed
        self.builder.add_file(".zattrs", _json(root_attrs))
        return self.builder.build()

    def skip(self, path: str, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < MAX_SKIPPED_LISTED:
            self.skipped.append({"path": path, "reason": reason})

    def _count_object(self) -> None:
        self.objects += 1
        if self.objects > self.limits.max_objects:
            raise Skip(f"more than {self.limits.max_objects} objects in the file")

    def _group(self, path: str, group: h5py.Group, depth: int) -> dict[str, Any]:
        """Add group `path` and everything below it; return its attributes (written by the caller
        for the root, here otherwise)."""
        self.group_paths[h5py.h5o.get_info(group.id).addr] = path
        self.builder.add_file(_join(path, ".zgroup"), _json({"zarr_format": 2}))
        attrs = self._attrs(path, group)
        if path:
            self.builder.add_file(_join(path, ".zattrs"), _json(attrs))
        try:
            names = list(group)
        except Exception as e:
            self.skip(path, f"cannot list the group's members: {_describe(e)}")
            return attrs
        plans: dict[str, tuple[_ArrayPlan, dict[str, Any]]] = {}
        for name in names:
            child = _join(path, name)
            try:
                self._count_object()
                _check_name(name)
                member = self._member(child, group, name, depth)
            except Skip as e:
                self.skip(child, str(e))
                continue
            if member is not None:
                plans[name] = member
        dims = _phony_dimensions({name: plan.shape for name, (plan, _) in plans.items()})
        for name, (array_plan, dataset_attrs) in plans.items():
            if DIMENSIONS_KEY not in dataset_attrs:
                dataset_attrs[DIMENSIONS_KEY] = dims[name]
            self._add_array(_join(path, name), array_plan, dataset_attrs)
        return attrs

    def _member(
        self, path: str, group: h5py.Group, name: str, depth: int
    ) -> tuple[_ArrayPlan, dict[str, Any]] | None:
        try:
            link = group.get(name, getlink=True)
        except Exception as e:
            raise Skip(f"unreadable link: {_describe(e)}") from e
        if isinstance(link, h5py.SoftLink):
            target = link.path
            if not isinstance(target, str):
                raise Skip("soft link target is not a text path")
            self.builder.add_file(_join(path, ".zgroup"), _json({"zarr_format": 2}))
            self.builder.add_file(_join(path, ".zattrs"), _json({"_SOFT_LINK": {"path": target}}))
            return None
        if isinstance(link, h5py.ExternalLink):
            raise Skip(
                f"external link to {link.filename!r}:{link.path!r} (not followed; LINDI has no "
                "convention for HDF5 external links)"
            )
        if not isinstance(link, h5py.HardLink):
            raise Skip(f"unsupported link type {type(link).__name__}")
        try:
            obj = group.get(name)
        except Exception as e:
            raise Skip(f"cannot open the object: {_describe(e)}") from e
        if isinstance(obj, h5py.Group):
            seen = self.group_paths.get(h5py.h5o.get_info(obj.id).addr)
            if seen is not None:
                raise Skip(f"another hard link to the group shown at {seen!r}")
            if depth + 1 > MAX_DEPTH:
                raise Skip(f"groups nested deeper than {MAX_DEPTH} levels")
            self._group(path, obj, depth + 1)
            return None
        if isinstance(obj, h5py.Dataset):
            try:
                plan = self._dataset(path, obj)
            except Skip:
                raise
            except (MemoryError, RecursionError):
                raise
            except Exception as e:
                raise Skip(f"HDF5 error: {_describe(e)}") from e
            return plan, self._attrs(path, obj)
        if isinstance(obj, h5py.Datatype):
            raise Skip("named datatype (no Zarr equivalent)")
        raise Skip(f"unsupported object {type(obj).__name__}")

    def _add_array(self, path: str, plan: _ArrayPlan, attrs: dict[str, Any]) -> None:
        self.builder.add_file(_join(path, ".zarray"), _json(plan.zarray))
        self.builder.add_file(_join(path, ".zattrs"), _json(attrs))
        for key, data in plan.inline_chunks.items():
            self.builder.add_file(_join(path, key), data)
        if plan.keys is not None and len(plan.keys):
            self.builder.add_chunks(path, plan.grid, plan.keys, plan.offsets, plan.lengths)

    # -- datasets ---------------------------------------------------------------------------------

    def _dataset(self, path: str, ds: h5py.Dataset) -> _ArrayPlan:
        if ds.shape is None:
            raise Skip("null dataspace (h5py.Empty): no Zarr equivalent")
        shape = tuple(int(n) for n in ds.shape)
        if len(shape) > MAX_NDIM or any(n < 0 or n > INT64_MAX for n in shape):
            raise Skip(f"shape {shape} out of range")
        if math.prod(shape) > INT64_MAX:
            raise Skip(f"shape {shape} has too many elements")
        try:
            dtype = ds.dtype
        except Exception as e:
            raise Skip(f"HDF5 type has no NumPy equivalent: {_describe(e)}") from e
        dcpl = ds.id.get_create_plist()
        layout = dcpl.get_layout()
        if layout == h5py.h5d.VIRTUAL:
            raise Skip("virtual dataset (data mapped from other datasets or files)")
        if dcpl.get_external_count() > 0:
            raise Skip("external storage (raw data in other files)")
        if h5py.check_string_dtype(dtype) is not None and dtype.kind == "O":
            return self._inline_vlen_strings(ds, shape)
        if h5py.check_ref_dtype(dtype) is h5py.RegionReference:
            raise Skip("region references (no Zarr equivalent)")
        if h5py.check_ref_dtype(dtype) is not None:
            raise Skip(
                "object references (LINDI's JSON-codec arrays of `_REFERENCE` cannot be read by "
                "zarr-python 3)"
            )
        if h5py.check_vlen_dtype(dtype) is not None or dtype.kind == "O":
            raise Skip(f"variable-length type {dtype} (no Zarr format 2 equivalent)")
        zdtype = _zarr_dtype(dtype)
        if layout == h5py.h5d.COMPACT or shape == ():
            return self._inline_raw(ds, shape, zdtype)
        if not _stored_as_returned(ds, dtype):
            if dtype.itemsize * math.prod(shape) <= self.limits.inline_dataset_bytes:
                return self._inline_raw(ds, shape, zdtype)
            raise Skip(f"stored type differs from what h5py returns ({dtype}): needs a conversion")
        filters, compressor = _codecs(dcpl, dtype)
        if layout == h5py.h5d.CHUNKED:
            plan = self._chunked(ds, shape, dtype)
        elif layout == h5py.h5d.CONTIGUOUS:
            if filters or compressor:
                raise Skip("filters on a contiguous dataset")
            plan = self._contiguous(ds, shape, dtype)
        else:
            raise Skip(f"unknown layout {layout}")
        full = plan.keys is not None and len(plan.keys) == math.prod(plan.grid)
        needed = not full and math.prod(shape) > 0
        # Only where a chunk was never written does a reader ever use the fill value; elsewhere it
        # is left null, since xarray would take HDF5's default (0) as a missing-value marker.
        fill = self._fill_value(dcpl, dtype) if needed else None
        plan.zarray = _zarray(shape, plan.zarray["chunks"], zdtype, fill, filters, compressor)
        return plan

    def _chunked(
        self, ds: h5py.Dataset, shape: tuple[int, ...], dtype: np.dtype[Any]
    ) -> _ArrayPlan:
        chunks = tuple(int(c) for c in ds.chunks)
        if len(chunks) != len(shape) or any(c < 1 for c in chunks):
            raise Skip(f"chunk shape {chunks} does not fit shape {shape}")
        grid = tuple(-(-n // c) for n, c in zip(shape, chunks, strict=True))
        plan = _ArrayPlan(shape=shape, zarray={"chunks": list(chunks)}, grid=grid)
        if math.prod(grid) == 0:
            plan.keys = np.zeros(0, np.int64)
            return plan
        dsid = ds.id
        if not callable(getattr(dsid, "chunk_iter", None)):
            raise Skip("this h5py/HDF5 has no chunk_iter (HDF5 >= 1.12.3 is needed)")
        budget = self.limits.max_chunks - self.builder.chunk_count
        coords: list[tuple[int, ...]] = []
        offsets: list[int] = []
        lengths: list[int] = []
        masked: list[int] = []

        def visit(info: Any) -> None:
            if len(offsets) >= budget:
                raise Skip(f"more than {self.limits.max_chunks} chunks in the file")
            if info.filter_mask != 0:
                masked.append(int(info.filter_mask))
            coords.append(tuple(info.chunk_offset))
            offsets.append(info.byte_offset)
            lengths.append(info.size)

        dsid.chunk_iter(visit)
        if masked:
            raise Skip(
                f"{len(masked)} chunks stored with some filters skipped (filter_mask "
                f"{masked[0]:#x}): they are not chunks of one Zarr array"
            )
        n = len(offsets)
        if n == 0:
            plan.keys = np.zeros(0, np.int64)
            return plan
        if any(o is None for o in offsets) or any(not isinstance(x, int) for x in lengths):
            raise Skip("a chunk without an address")
        where = np.array(coords, dtype=np.int64).reshape(n, len(shape))
        chunk_arr = np.array(chunks, dtype=np.int64)
        if (
            bool(np.any(where < 0))
            or bool(np.any(where % chunk_arr))
            or bool(np.any(where >= np.array(shape, dtype=np.int64)))
        ):
            raise Skip("a chunk lies outside the dataset's extent or off the chunk grid")
        off = np.array(offsets, dtype=np.int64)
        size = np.array(lengths, dtype=np.int64)
        if bool(np.any(off < 0)) or bool(np.any(size < 1)):
            raise Skip("a chunk has a negative address or no bytes")
        if bool(np.any(off > self.blob_size - size)):
            raise Skip("a chunk lies outside the file (truncated file?)")
        if ds.id.get_create_plist().get_nfilters() == 0:
            expected = math.prod(chunks) * dtype.itemsize
            if bool(np.any(size != expected)):
                raise Skip(f"an unfiltered chunk is not {expected} bytes")
        keys = np.ravel_multi_index(tuple((where // chunk_arr).T), grid).astype(np.int64)
        plan.keys, plan.offsets, plan.lengths = keys, off, size
        return plan

    def _contiguous(
        self, ds: h5py.Dataset, shape: tuple[int, ...], dtype: np.dtype[Any]
    ) -> _ArrayPlan:
        nbytes = math.prod(shape) * dtype.itemsize
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        offset = ds.id.get_offset()
        if nbytes == 0:
            chunks = [max(1, n) for n in shape]
            plan = _ArrayPlan(shape=shape, zarray={"chunks": chunks}, grid=(1,) * len(shape))
            plan.keys = np.zeros(0, np.int64)
            return plan
        rows = self._rows_per_chunk(shape[0], row_bytes, offset)
        chunks = [min(rows, shape[0]), *shape[1:]]
        grid = (-(-shape[0] // rows),) + (1,) * (len(shape) - 1)
        plan = _ArrayPlan(shape=shape, zarray={"chunks": chunks}, grid=grid)
        if offset is None:  # never written: every element reads as the fill value
            plan.keys = np.zeros(0, np.int64)
            return plan
        offset = int(offset)
        if ds.id.get_storage_size() != nbytes:
            raise Skip(f"contiguous storage of {ds.id.get_storage_size()} bytes, expected {nbytes}")
        if offset < 0 or offset > self.blob_size - nbytes:
            raise Skip("the data lies outside the file (truncated file?)")
        n = grid[0]
        chunk_bytes = rows * row_bytes
        plan.keys = np.arange(n, dtype=np.int64)
        plan.offsets = offset + plan.keys * chunk_bytes
        plan.lengths = np.full(n, chunk_bytes, dtype=np.int64)
        if n == 1:
            plan.lengths[0] = nbytes
        return plan

    def _rows_per_chunk(self, n_rows: int, row_bytes: int, offset: int | None) -> int:
        """Rows per virtual chunk of a contiguous dataset.

        Every Zarr chunk must hold a whole chunk's bytes, the last one too. So, among 1/4 to 1 times
        `contiguous_chunk_bytes` worth of rows, the largest count that divides the rows evenly or
        whose last chunk, running on past the dataset into the bytes that follow it in the file
        (Zarr drops what lies beyond the array's shape), still ends inside the file. Failing that
        (a dataset at the very end of the file), the whole dataset as one chunk if it is at most 16
        times the target, else the largest divisor giving at most `max_contiguous_chunks` chunks.
        """
        target = max(1, self.limits.contiguous_chunk_bytes // row_bytes)
        if n_rows <= target:
            return n_rows
        rows = np.arange(target, max(1, target // 4) - 1, -1, dtype=np.int64)
        spans = -(-n_rows // rows) * rows * row_bytes
        fits = n_rows % rows == 0
        if offset is not None:
            fits |= spans <= self.blob_size - int(offset)
        if bool(fits.any()):
            return int(rows[np.argmax(fits)])
        if n_rows * row_bytes <= 16 * self.limits.contiguous_chunk_bytes:
            return n_rows
        low = max(1, -(-n_rows // self.limits.max_contiguous_chunks))
        if low <= target:
            candidates = np.arange(target, low - 1, -1, dtype=np.int64)
            divisors = candidates[n_rows % candidates == 0]
            if divisors.size:
                return int(divisors[0])
        raise Skip(
            "contiguous dataset ends the file and its rows cannot be split into whole chunks"
        )

    def _fill_value(self, dcpl: Any, dtype: np.dtype[Any]) -> Any:
        """HDF5's fill value in Zarr's JSON, exactly, or Skip: the value of never-written chunks."""
        if (
            dcpl.get_fill_time() == h5py.h5d.FILL_TIME_NEVER
            or dcpl.fill_value_defined() == h5py.h5d.FILL_VALUE_UNDEFINED
        ):
            raise Skip(
                "never-written chunks have no defined value (no fill value, or fill time never)"
            )
        fill = np.zeros((), dtype=dtype)
        try:
            dcpl.get_fill_value(fill)
        except Exception as e:
            raise Skip(f"unreadable fill value: {_describe(e)}") from e
        return _encode_fill(fill)

    # -- inline datasets --------------------------------------------------------------------------

    def _reserve_inline(self, nbytes: int) -> None:
        if nbytes > self.limits.inline_dataset_bytes:
            raise Skip(f"{nbytes} bytes of values: too large to inline")
        if self.inline_bytes + nbytes > self.limits.inline_total_bytes:
            raise Skip(f"inlined values would exceed {self.limits.inline_total_bytes} bytes")
        self.inline_bytes += nbytes

    def _inline_raw(self, ds: h5py.Dataset, shape: tuple[int, ...], zdtype: Any) -> _ArrayPlan:
        dtype = ds.dtype
        self._reserve_inline(math.prod(shape) * dtype.itemsize)
        chunks = [max(1, n) for n in shape]
        plan = _ArrayPlan(shape=shape, zarray={})
        plan.zarray = _zarray(shape, chunks, zdtype, None, [], None)  # its one chunk is inline
        if math.prod(shape) > 0:
            values = np.array(ds[()], dtype=dtype, order="C")
            if values.shape != shape:
                raise Skip(f"h5py returned shape {values.shape}, expected {shape}")
            plan.inline_chunks[_chunk_key0(len(shape))] = values.tobytes()
        return plan

    def _inline_vlen_strings(self, ds: h5py.Dataset, shape: tuple[int, ...]) -> _ArrayPlan:
        count = math.prod(shape)
        self._reserve_inline(16 * count)  # the heap IDs h5py reads before the strings
        chunks = [max(1, n) for n in shape]
        plan = _ArrayPlan(shape=shape, zarray={})
        plan.zarray = _zarray(shape, chunks, "|O", None, [{"id": "vlen-utf8"}], None)
        if count == 0:
            return plan
        raw = ds[()]
        values = np.empty(count, dtype=object)
        flat = [raw] if shape == () else np.asarray(raw, dtype=object).reshape(-1).tolist()
        if len(flat) != count:
            raise Skip(f"h5py returned {len(flat)} strings, expected {count}")
        for i, value in enumerate(flat):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise Skip("a variable-length string is not valid UTF-8") from e
            if not isinstance(value, str):
                raise Skip(f"variable-length string element of type {type(value).__name__}")
            values[i] = value
        encoded = bytes(numcodecs.VLenUTF8().encode(values))
        self._reserve_inline(len(encoded))
        plan.inline_chunks[_chunk_key0(len(shape))] = encoded
        return plan

    # -- attributes -------------------------------------------------------------------------------

    def _attrs(self, path: str, obj: h5py.Group | h5py.Dataset) -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            names = list(obj.attrs)
        except Exception as e:
            self.skip(f"{path}@", f"cannot list the attributes: {_describe(e)}")
            return out
        for name in names:
            where = f"{path}@{name}"
            try:
                name.encode("utf-8")
                if name in LINDI_RESERVED:
                    raise Skip("attribute name is reserved by LINDI's conventions")
                value = obj.attrs[name]
                out[name] = self._attr_value(value)
            except Skip as e:
                self.skip(where, str(e))
            except (MemoryError, RecursionError):
                raise
            except Exception as e:
                self.skip(where, f"unreadable attribute: {_describe(e)}")
        return out

    def _attr_value(self, value: Any) -> Any:
        if isinstance(value, h5py.Empty):
            raise Skip("empty attribute (null dataspace)")
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "biu":
                return value.tolist()
            if value.dtype.kind == "f":
                if value.dtype.itemsize > 8:
                    raise Skip(f"attribute of type {value.dtype}")
                return value.astype(np.float64).tolist()
            if value.dtype.kind in "SO":
                return _map_nested(value.tolist(), self._attr_value)
            raise Skip(f"attribute of type {value.dtype}")
        if isinstance(value, bool | np.bool_):
            return bool(value)
        if isinstance(value, int | np.integer):
            return int(value)
        if isinstance(value, float | np.floating):
            if isinstance(value, np.floating) and value.dtype.itemsize > 8:
                raise Skip(f"attribute of type {value.dtype}")
            return float(value)
        if isinstance(value, str):
            value.encode("utf-8")
            return value
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise Skip("bytes that are not UTF-8") from e
        if isinstance(value, h5py.RegionReference):
            raise Skip("region reference (no equivalent in LINDI's conventions)")
        if isinstance(value, h5py.Reference):
            return self._reference(value)
        raise Skip(f"attribute of type {type(value).__name__}")

    def _reference(self, ref: h5py.Reference) -> dict[str, Any]:
        """LINDI's `_REFERENCE` form of an object reference (as hdmf-zarr stores them)."""
        if not ref:
            raise Skip("null object reference")
        try:
            target = self.f[ref]
            name = target.name
            object_id = target.attrs.get("object_id")
        except Exception as e:
            raise Skip(f"dangling object reference: {_describe(e)}") from e
        if not isinstance(name, str):
            raise Skip("object reference to an object without a path")
        if isinstance(object_id, bytes):
            object_id = object_id.decode("utf-8")
        if not isinstance(object_id, str):
            object_id = None
        return {
            "_REFERENCE": {
                "object_id": object_id,
                "path": name,
                "source": ".",
                "source_object_id": self.root_object_id,
            }
        }


# -- helpers --------------------------------------------------------------------------------------


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=True, allow_nan=True, indent=2).encode("ascii")


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _check_name(name: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Skip("name is not valid UTF-8") from e
    if name in RESERVED_NAMES:
        raise Skip("name collides with a Zarr metadata file")
    if name in ("", ".", "..") or "/" in name or "\x00" in name or not name.isprintable():
        raise Skip("name cannot be a Zarr path component")


def _chunk_key0(ndim: int) -> str:
    return ".".join(["0"] * ndim) if ndim else "0"


def _map_nested(value: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(value, list):
        return [_map_nested(v, fn) for v in value]
    return fn(value)


def _stored_as_returned(ds: h5py.Dataset, dtype: np.dtype[Any]) -> bool:
    """Whether the bytes stored in the file are exactly the bytes of h5py's returned dtype."""
    stored = ds.id.get_type()
    if isinstance(stored, h5py.h5t.TypeEnumID) and dtype.kind != "b":
        base = np.dtype(dtype.str)
        return bool(stored.get_super().equal(h5py.h5t.py_create(base)))
    return bool(stored.equal(h5py.h5t.py_create(dtype)))


def _zarr_dtype(dtype: np.dtype[Any]) -> Any:
    """The `.zarray` dtype of `dtype`, or Skip when Zarr format 2 has none that zarr-python reads."""
    if dtype.fields is not None:
        descr: list[list[str]] = []
        for name, (field_dtype, *_rest) in dtype.fields.items():
            if not name or field_dtype.shape or field_dtype.kind not in "biufS":
                raise Skip(f"compound type {dtype} has a field Zarr cannot hold")
            descr.append([name, field_dtype.str])
        if np.dtype([(n, t) for n, t in descr]) != dtype:
            raise Skip(f"compound type {dtype} has padding")
        return descr
    if dtype.kind in "biu" or (dtype.kind == "f" and dtype.itemsize in (2, 4, 8)):
        return dtype.str
    if dtype.kind == "c" and dtype.itemsize in (8, 16):
        return dtype.str
    if dtype.kind == "S" and dtype.itemsize > 0:
        return dtype.str
    raise Skip(f"type {dtype} has no Zarr format 2 equivalent")


def _encode_fill(fill: np.ndarray[Any, Any]) -> Any:
    """Zarr v2's JSON for the 0-d `fill`, checked to decode to the very same bytes (else Skip)."""
    dtype = fill.dtype
    value: Any
    if dtype.kind == "b":
        value = bool(fill)
    elif dtype.kind in "iu":
        value = int(fill)
    elif dtype.kind == "f":
        value = _float_json(float(fill))
    elif dtype.kind == "c":
        value = [_float_json(float(fill.real)), _float_json(float(fill.imag))]
    else:
        value = base64.b64encode(fill.tobytes()).decode("ascii")
    if _decode_fill(value, dtype).tobytes() != fill.tobytes():
        raise Skip(f"fill value {fill!r} has no exact Zarr JSON form")
    return value


def _float_json(x: float) -> Any:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def _decode_fill(value: Any, dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """How a Zarr v2 reader decodes `value` (mirror of `_encode_fill`, to check it round-trips)."""
    special = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    if dtype.kind in "biu":
        return np.array(value, dtype=dtype)
    if dtype.kind == "f":
        return np.array(special.get(value, value), dtype=dtype)
    if dtype.kind == "c":
        real, imag = (special.get(v, v) for v in value)
        return np.array(complex(real, imag), dtype=dtype)
    return np.frombuffer(base64.b64decode(value), dtype=dtype).reshape(())


def _codecs(dcpl: Any, dtype: np.dtype[Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The HDF5 filter pipeline as Zarr v2 `filters` and `compressor` (numcodecs configs)."""
    configs: list[dict[str, Any]] = []
    for i in range(dcpl.get_nfilters()):
        code, _flags, cd, name = dcpl.get_filter(i)
        cd = tuple(int(v) for v in cd)
        if code == H5Z_DEFLATE:
            level = cd[0] if cd and 0 <= cd[0] <= 9 else 1
            configs.append({"id": "zlib", "level": level})
        elif code == H5Z_SHUFFLE:
            if not cd or not 1 <= cd[0] <= 1 << 16:
                raise Skip(f"shuffle filter with element size {cd}")
            configs.append({"id": "shuffle", "elementsize": cd[0]})
        elif code == H5Z_FLETCHER32:
            configs.append({"id": "fletcher32"})
        elif code == H5Z_BLOSC:
            clevel = cd[4] if len(cd) > 4 and 0 <= cd[4] <= 9 else 5
            shuffle = cd[5] if len(cd) > 5 and 0 <= cd[5] <= 2 else 1
            cname = BLOSC_CNAMES[cd[6]] if len(cd) > 6 and 0 <= cd[6] < len(BLOSC_CNAMES) else None
            if len(cd) > 6 and cname is None:
                raise Skip(f"blosc filter with unknown compressor code {cd[6]}")
            configs.append(
                {
                    "id": "blosc",
                    "cname": cname or "blosclz",
                    "clevel": clevel,
                    "shuffle": shuffle,
                    "blocksize": 0,
                }
            )
        elif code == H5Z_ZSTD:
            level = cd[0] if cd and -131072 <= cd[0] <= 22 else 0
            configs.append({"id": "zstd", "level": level})
        else:
            label = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
            label = H5Z_NAMES.get(code, label) or f"id {code}"
            raise Skip(f"filter {label} (id {code}) has no numcodecs equivalent")
    for config in configs:
        numcodecs.get_codec(dict(config))  # every codec must be one numcodecs can build
    if configs and configs[-1]["id"] in ("zlib", "blosc", "zstd"):
        return configs[:-1], configs[-1]
    return configs, None


def _zarray(
    shape: tuple[int, ...],
    chunks: list[int],
    zdtype: Any,
    fill: Any,
    filters: list[dict[str, Any]],
    compressor: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "zarr_format": 2,
        "shape": list(shape),
        "chunks": list(chunks),
        "dtype": zdtype,
        "compressor": compressor,
        "fill_value": fill,
        "order": "C",
        "filters": filters or None,
        "dimension_separator": ".",
    }


def _phony_dimensions(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    """xarray's `_ARRAY_DIMENSIONS` for the arrays of one group.

    HDF5 has no dimension names, so each length gets names of its own: within a group, the j-th
    axis of length n in an array is called the j-th name given to length n, so no two arrays
    disagree on a dimension's length and no array repeats a dimension.
    """
    by_length: dict[int, list[str]] = {}
    counter = 0
    out: dict[str, list[str]] = {}
    for name in sorted(shapes):
        dims: list[str] = []
        used: dict[int, int] = {}
        for n in shapes[name]:
            j = used.get(n, 0)
            used[n] = j + 1
            names = by_length.setdefault(n, [])
            if j == len(names):
                names.append(f"phony_dim_{counter}")
                counter += 1
            dims.append(names[j])
        out[name] = dims
    return out
