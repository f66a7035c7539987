"""The virtual Zarr view of one HDF5 blob: a Zarr format 2 store as inline files and byte ranges.

Owns: `VirtualZarr` (every path of the store is either inline bytes, such as `.zgroup`, `.zattrs`,
`.zarray` and the chunks of inlined arrays, or a `ChunkRef` (offset, length) into the blob), its
lookups (`get`, `is_dir`, `listdir`), its checked binary serialization (`to_bytes`/`from_bytes`,
with an xxh3_128 checksum) and its kerchunk export (`to_kerchunk`). Never does: I/O of any kind, HDF5,
or deciding what a dataset maps to (that is `translate`).

Chunk references are kept column-wise, not as a Python object per chunk: one int64 column each for
the flat chunk index (row-major over the array's chunk grid), the offset and the length, with each
referenced array owning one contiguous, key-sorted run of rows (`ChunkTable`). A lookup parses the
chunk key and binary-searches that run; memory and serialized size are 24 bytes per chunk.

Every value is validated when a `VirtualZarr` is constructed, whether by `VirtualZarrBuilder` or by
`from_bytes`: paths are relative, normalized and unambiguous (a path is a file or a directory, never
both), every chunk key lies inside its array's chunk grid, and every byte range lies inside the blob.
A `VirtualZarr` is immutable and safe to share between threads.
"""

from __future__ import annotations

import base64
import math
import struct
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import xxhash

from zarrfs.virtual.errors import IndexFormatError

# Bump whenever the translation of HDF5 to Zarr changes what a view contains: stored indexes made by
# another version are refused on load (and are keyed by this version by whoever stores them).
EXTRACTOR_VERSION: Final = "zarrfs-virtual-1"

FORMAT_MAGIC: Final = b"ZFSVZARR"
FORMAT_VERSION: Final = 1
DIGEST_SIZE: Final = 16
MAX_PATH_LENGTH: Final = 4096
MAX_NDIM: Final = 32
INT64_MAX: Final = 2**63 - 1
ZARR_METADATA_NAMES: Final = frozenset({".zarray", ".zattrs", ".zgroup"})

Int64Array = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """A chunk file whose bytes are `length` bytes of the blob starting at `offset`."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ChunkTable:
    """The referenced chunks of one array: rows `[start, stop)` of the view's chunk columns.

    `path` is the array's directory; `grid` the number of chunks along each dimension.
    """

    path: str
    grid: tuple[int, ...]
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


def check_path(path: str) -> None:
    """Refuse a store path that is not relative, normalized and printable (raises IndexFormatError)."""
    if not path or len(path) > MAX_PATH_LENGTH:
        raise IndexFormatError(f"bad path length {len(path)}: {path[:80]!r}")
    for part in path.split("/"):
        if part in ("", ".", "..") or "\x00" in part:
            raise IndexFormatError(f"bad path {path!r}")
    if not path.isprintable():
        raise IndexFormatError(f"path has unprintable characters: {path!r}")


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _name(path: str) -> str:
    return path.rpartition("/")[2]


def _parse_chunk_key(name: str, grid: tuple[int, ...]) -> tuple[int, ...] | None:
    """`"3.0.12"` -> (3, 0, 12) when it is the canonical key of a chunk inside `grid`, else None."""
    parts = name.split(".")
    if len(parts) != len(grid):
        return None
    coords: list[int] = []
    for part, n in zip(parts, grid, strict=True):
        if not (part.isascii() and part.isdigit()) or (len(part) > 1 and part[0] == "0"):
            return None
        if len(part) > 19:
            return None
        value = int(part)
        if value >= n:
            return None
        coords.append(value)
    return tuple(coords)


def _flat_index(coords: tuple[int, ...], grid: tuple[int, ...]) -> int:
    flat = 0
    for c, n in zip(coords, grid, strict=True):
        flat = flat * n + c
    return flat


def _chunk_names(keys: Int64Array, grid: tuple[int, ...]) -> list[str]:
    if keys.size == 0:
        return []
    columns = np.unravel_index(keys, grid)
    names = columns[0].astype(str).astype(object)
    for column in columns[1:]:
        names = names + "." + column.astype(str).astype(object)
    return [str(name) for name in names.tolist()]


@dataclass(frozen=True, slots=True, eq=False)
class VirtualZarr:
    """A Zarr format 2 store over one HDF5 blob of `blob_size` bytes.

    `inline` maps file paths to their bytes; `tables` maps each referenced array's directory to its
    run of rows in the `keys`/`offsets`/`lengths` columns. Construct it with `VirtualZarrBuilder` or
    `from_bytes`; the constructor validates everything (raising `IndexFormatError`).
    """

    blob_size: int
    inline: Mapping[str, bytes]
    tables: Mapping[str, ChunkTable]
    keys: Int64Array
    offsets: Int64Array
    lengths: Int64Array
    extractor_version: str = EXTRACTOR_VERSION
    _children: dict[str, tuple[str, ...]] = field(init=False, repr=False)
    _by_start: tuple[ChunkTable, ...] = field(init=False, repr=False)
    _starts: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_children", self._validate())
        by_start = sorted((t for t in self.tables.values() if t.count), key=lambda t: t.start)
        object.__setattr__(self, "_by_start", tuple(by_start))
        object.__setattr__(self, "_starts", tuple(t.start for t in by_start))

    # -- validation -------------------------------------------------------------------------------

    def _validate(self) -> dict[str, tuple[str, ...]]:
        if self.extractor_version != EXTRACTOR_VERSION:
            raise IndexFormatError(
                f"index made by extractor {self.extractor_version!r}, this is {EXTRACTOR_VERSION!r}"
            )
        if not 0 <= self.blob_size <= INT64_MAX:
            raise IndexFormatError(f"blob size out of range: {self.blob_size}")
        n = self.keys.shape[0] if self.keys.ndim == 1 else -1
        for column in (self.keys, self.offsets, self.lengths):
            if column.dtype != np.int64 or column.ndim != 1 or column.shape[0] != n:
                raise IndexFormatError("chunk columns must be three int64 vectors of one length")
        children: dict[str, set[str]] = {"": set()}
        files: set[str] = set()

        def add_dir(path: str) -> None:
            while path and path not in children:
                children[path] = set()
                parent = _parent(path)
                children.setdefault(parent, set()).add(_name(path))
                path = parent

        for path, data in self.inline.items():
            check_path(path)
            if not isinstance(data, bytes):
                raise IndexFormatError(f"inline file {path!r} is not bytes")
            files.add(path)
            add_dir(_parent(path))
            children[_parent(path)].add(_name(path))
        expected_start = 0
        for path, table in sorted(self.tables.items(), key=lambda item: item[1].start):
            check_path(path)
            if table.path != path:
                raise IndexFormatError(f"chunk table {table.path!r} filed under {path!r}")
            if f"{path}/.zarray" not in self.inline:
                raise IndexFormatError(f"chunk table {path!r} has no .zarray")
            if not 1 <= len(table.grid) <= MAX_NDIM or any(g < 1 for g in table.grid):
                raise IndexFormatError(f"chunk table {path!r} has a bad grid {table.grid}")
            if math.prod(table.grid) > INT64_MAX:
                raise IndexFormatError(f"chunk table {path!r} grid is too large")
            if table.start != expected_start or not table.start <= table.stop <= n:
                raise IndexFormatError(f"chunk table {path!r} rows out of order")
            expected_start = table.stop
            keys = self.keys[table.start : table.stop]
            if keys.size and (
                int(keys[0]) < 0
                or int(keys[-1]) >= math.prod(table.grid)
                or (keys.size > 1 and not bool(np.all(keys[1:] > keys[:-1])))
            ):
                raise IndexFormatError(f"chunk table {path!r} keys unsorted or outside its grid")
            for name in children.get(path, set()):
                if name not in ZARR_METADATA_NAMES:
                    raise IndexFormatError(f"referenced array {path!r} also has entry {name!r}")
        if expected_start != n:
            raise IndexFormatError("chunk rows not covered exactly by the tables")
        if n and (
            int(self.offsets.min()) < 0
            or int(self.lengths.min()) < 1
            or bool(np.any(self.offsets > self.blob_size - self.lengths))
        ):
            raise IndexFormatError("a chunk reference lies outside the blob")
        for path in files:
            if path in children:
                raise IndexFormatError(f"{path!r} is both a file and a directory")
        for path in self.tables:
            if path in files:
                raise IndexFormatError(f"{path!r} is both a file and an array")
        return {path: tuple(sorted(names)) for path, names in children.items()}

    # -- lookups ----------------------------------------------------------------------------------

    @property
    def chunk_count(self) -> int:
        """The number of referenced chunks."""
        return int(self.keys.shape[0])

    @property
    def approx_bytes(self) -> int:
        """Rough memory this view holds: its inline files, 24 bytes per chunk, and some per path."""
        inline = sum(len(data) + 128 for data in self.inline.values())
        return inline + 24 * self.chunk_count + 256 * len(self.tables) + 128 * len(self._children)

    def get(self, path: str) -> bytes | ChunkRef | None:
        """The file at `path`: its bytes, a `ChunkRef` into the blob, or None if there is none."""
        data = self.inline.get(path)
        if data is not None:
            return data
        row = self.chunk_row(path)
        if row is None:
            return None
        return ChunkRef(int(self.offsets[row]), int(self.lengths[row]))

    def chunk_row(self, path: str) -> int | None:
        """The row of the chunk reference at `path` (an index into `keys`/`offsets`/`lengths`), or
        None if `path` is not a referenced chunk."""
        parent, _, name = path.rpartition("/")
        table = self.tables.get(parent)
        if table is None:
            return None
        coords = _parse_chunk_key(name, table.grid)
        if coords is None:
            return None
        flat = _flat_index(coords, table.grid)
        keys = self.keys[table.start : table.stop]
        i = int(np.searchsorted(keys, flat))
        if i == keys.shape[0] or int(keys[i]) != flat:
            return None
        return table.start + i

    def chunk_at(self, row: int) -> tuple[str, ChunkRef]:
        """The path and reference of chunk row `row` (IndexError outside 0..chunk_count-1)."""
        if not 0 <= row < self.chunk_count:
            raise IndexError(f"no chunk row {row}")
        table = self.tables[self.table_of(row)]
        coords = np.unravel_index(int(self.keys[row]), table.grid)
        name = ".".join(str(int(c)) for c in coords)
        return f"{table.path}/{name}", ChunkRef(int(self.offsets[row]), int(self.lengths[row]))

    def table_of(self, row: int) -> str:
        """The path of the array chunk row `row` belongs to (IndexError outside the rows)."""
        if not 0 <= row < self.chunk_count:
            raise IndexError(f"no chunk row {row}")
        return self._by_start[bisect_right(self._starts, row) - 1].path

    def chunk_rows(self, path: str) -> range:
        """The rows of the chunks of array `path` (empty when it has none referenced)."""
        table = self.tables.get(path)
        return range(table.start, table.stop) if table is not None else range(0)

    def chunk_names(self, path: str, start: int, stop: int) -> list[str]:
        """The chunk keys of rows `[start, stop)` of array `path`'s run (positions within the run,
        clipped to it), in row-major order: a listing of a huge array a page at a time."""
        table = self.tables.get(path)
        if table is None:
            return []
        start, stop = max(0, start), min(stop, table.count)
        if start >= stop:
            return []
        return _chunk_names(self.keys[table.start + start : table.start + stop], table.grid)

    def directories(self) -> Iterator[str]:
        """Every directory of the store (`""`, the root, included), in no particular order."""
        return iter(self._children)

    def entries(self, path: str) -> tuple[str, ...] | None:
        """The metadata files and subdirectories of directory `path` (sorted; chunk keys not
        included), or None if it is not a directory."""
        return self._children.get(path)

    def is_dir(self, path: str) -> bool:
        """Whether `path` is a directory of the store (`""` is the root)."""
        return path in self._children

    def listdir(self, path: str) -> list[str] | None:
        """The names in directory `path`, or None if it is not a directory.

        Metadata files and subdirectories come first (sorted), then a referenced array's chunk keys
        in row-major order.
        """
        names = self._children.get(path)
        if names is None:
            return None
        out = list(names)
        table = self.tables.get(path)
        if table is not None:
            out.extend(_chunk_names(self.keys[table.start : table.stop], table.grid))
        return out

    def iter_files(self) -> Iterator[tuple[str, bytes | ChunkRef]]:
        """Every file of the store: inline files (sorted by path), then chunk references."""
        for path in sorted(self.inline):
            yield path, self.inline[path]
        for path in sorted(self.tables):
            table = self.tables[path]
            keys = self.keys[table.start : table.stop]
            names = _chunk_names(keys, table.grid)
            offsets = self.offsets[table.start : table.stop].tolist()
            lengths = self.lengths[table.start : table.stop].tolist()
            for name, offset, length in zip(names, offsets, lengths, strict=True):
                yield f"{path}/{name}", ChunkRef(offset, length)

    def to_kerchunk(self, url: str) -> dict[str, Any]:
        """The view as kerchunk references (format version 1), every chunk pointing into `url`.

        Inline files are strings when they are UTF-8 (and do not start with `base64:`), otherwise
        `"base64:..."`; chunks are `[url, offset, length]`.
        """
        refs: dict[str, Any] = {}
        for path, entry in self.iter_files():
            if isinstance(entry, ChunkRef):
                refs[path] = [url, entry.offset, entry.length]
                continue
            try:
                text = entry.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is None or text.startswith("base64:"):
                text = "base64:" + base64.b64encode(entry).decode("ascii")
            refs[path] = text
        return {"version": 1, "refs": refs}

    # -- serialization ----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The checked binary form that `from_bytes` reads back."""
        out = bytearray()
        out += FORMAT_MAGIC
        out += struct.pack("<IQ", FORMAT_VERSION, self.blob_size)
        _pack_str(out, self.extractor_version)
        out += struct.pack("<I", len(self.inline))
        for path in sorted(self.inline):
            data = self.inline[path]
            _pack_str(out, path)
            out += struct.pack("<Q", len(data))
            out += data
        tables = sorted(self.tables.values(), key=lambda t: t.start)
        out += struct.pack("<I", len(tables))
        for table in tables:
            _pack_str(out, table.path)
            out += struct.pack(f"<I{len(table.grid)}QQ", len(table.grid), *table.grid, table.count)
        out += struct.pack("<Q", self.chunk_count)
        for column in (self.keys, self.offsets, self.lengths):
            out += column.astype("<i8", copy=False).tobytes()
        out += xxhash.xxh3_128_digest(bytes(out))
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes, *, blob_size: int) -> VirtualZarr:
        """Load what `to_bytes` wrote for a blob of `blob_size` bytes, checking everything.

        Raises IndexFormatError on a checksum mismatch, a different format or extractor version,
        a blob size other than `blob_size`, or any malformed or out-of-range value.
        """
        if len(data) < len(FORMAT_MAGIC) + DIGEST_SIZE:
            raise IndexFormatError("index too short")
        body = memoryview(data)[:-DIGEST_SIZE]
        if xxhash.xxh3_128_digest(body) != data[-DIGEST_SIZE:]:
            raise IndexFormatError("index checksum mismatch")
        cur = _Cursor(body)
        if cur.take(len(FORMAT_MAGIC)) != FORMAT_MAGIC:
            raise IndexFormatError("not a zarrfs virtual Zarr index")
        version, stored_size = cur.unpack("<IQ")
        if version != FORMAT_VERSION:
            raise IndexFormatError(f"index format {version}, expected {FORMAT_VERSION}")
        if stored_size != blob_size:
            raise IndexFormatError(f"index is for a blob of {stored_size} bytes, not {blob_size}")
        extractor_version = cur.string()
        if extractor_version != EXTRACTOR_VERSION:
            raise IndexFormatError(
                f"index made by extractor {extractor_version!r}, this is {EXTRACTOR_VERSION!r}"
            )
        (n_inline,) = cur.unpack("<I")
        inline: dict[str, bytes] = {}
        for _ in range(n_inline):
            path = cur.string()
            (length,) = cur.unpack("<Q")
            if path in inline:
                raise IndexFormatError(f"duplicate inline path {path!r}")
            inline[path] = cur.take(length)
        (n_tables,) = cur.unpack("<I")
        tables: dict[str, ChunkTable] = {}
        start = 0
        for _ in range(n_tables):
            path = cur.string()
            (ndim,) = cur.unpack("<I")
            if not 1 <= ndim <= MAX_NDIM:
                raise IndexFormatError(f"chunk table {path!r} has {ndim} dimensions")
            *grid, count = cur.unpack(f"<{ndim}QQ")
            if path in tables:
                raise IndexFormatError(f"duplicate chunk table {path!r}")
            if count > cur.remaining:
                raise IndexFormatError(f"chunk table {path!r} count {count} out of range")
            tables[path] = ChunkTable(path, tuple(grid), start, start + count)
            start += count
        (n_chunks,) = cur.unpack("<Q")
        if n_chunks != start or cur.remaining != 24 * n_chunks:
            raise IndexFormatError("chunk columns do not match the tables")
        columns = [
            np.frombuffer(cur.take(8 * n_chunks), dtype="<i8").astype(np.int64, copy=True)
            for _ in range(3)
        ]
        return cls(
            blob_size=blob_size,
            inline=inline,
            tables=tables,
            keys=columns[0],
            offsets=columns[1],
            lengths=columns[2],
            extractor_version=extractor_version,
        )


def _pack_str(out: bytearray, text: str) -> None:
    raw = text.encode("utf-8")
    out += struct.pack("<I", len(raw))
    out += raw


class _Cursor:
    """Bounds-checked reading of the serialized form."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.remaining:
            raise IndexFormatError("index truncated")
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return out

    def unpack(self, fmt: str) -> tuple[int, ...]:
        size = struct.calcsize(fmt)
        values: tuple[int, ...] = struct.unpack(fmt, self.take(size))
        return values

    def string(self) -> str:
        (n,) = self.unpack("<I")
        if n > MAX_PATH_LENGTH:
            raise IndexFormatError(f"string of {n} bytes in index")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise IndexFormatError("string in index is not UTF-8") from e


class VirtualZarrBuilder:
    """Collects a view's files and chunk references, then `build()`s a validated `VirtualZarr`.

    Not thread-safe; used by one extraction.
    """

    def __init__(self, blob_size: int) -> None:
        self.blob_size = blob_size
        self.inline: dict[str, bytes] = {}
        self._tables: list[tuple[str, tuple[int, ...], Int64Array, Int64Array, Int64Array]] = []
        self.chunk_count = 0

    def add_file(self, path: str, data: bytes) -> None:
        check_path(path)
        if path in self.inline:
            raise IndexFormatError(f"duplicate file {path!r}")
        self.inline[path] = data

    def add_chunks(
        self,
        path: str,
        grid: tuple[int, ...],
        keys: Sequence[int] | Int64Array,
        offsets: Sequence[int] | Int64Array,
        lengths: Sequence[int] | Int64Array,
    ) -> None:
        """Add array `path`'s referenced chunks (flat row-major keys over `grid`, any order)."""
        k = np.asarray(keys, dtype=np.int64)
        order = np.argsort(k, kind="stable")
        k = k[order]
        if k.size > 1 and not bool(np.all(k[1:] > k[:-1])):
            raise IndexFormatError(f"duplicate chunk keys in {path!r}")
        o = np.asarray(offsets, dtype=np.int64)[order]
        n = np.asarray(lengths, dtype=np.int64)[order]
        self._tables.append((path, grid, k, o, n))
        self.chunk_count += int(k.size)

    def build(self) -> VirtualZarr:
        tables: dict[str, ChunkTable] = {}
        start = 0
        ordered = sorted(self._tables, key=lambda t: t[0])
        for path, grid, k, _, _ in ordered:
            if path in tables:
                raise IndexFormatError(f"duplicate chunk table {path!r}")
            tables[path] = ChunkTable(path, grid, start, start + int(k.size))
            start += int(k.size)

        def column(i: int) -> Int64Array:
            parts = [t[i] for t in ordered]
            return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

        return VirtualZarr(
            blob_size=self.blob_size,
            inline=dict(self.inline),
            tables=tables,
            keys=column(2),
            offsets=column(3),
            lengths=column(4),
        )
