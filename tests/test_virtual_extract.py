"""HDF5 files written with h5py -> virtual Zarr views read with zarr-python 3, compared with h5py.

Every dataset of each file is either an array of the view whose values, dtype and shape equal
h5py's read, or listed in the root's `zarrfs_skipped` with a reason; attributes likewise. The
extraction runs in the real worker process, over its pipe protocol.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import trio
import zarr
import zarr.core.buffer
from zarr.storage import MemoryStore

from zarrfs.virtual import (
    Budget,
    ChunkRef,
    ExtractionError,
    ExtractionLimitError,
    ExtractionTimeoutError,
    NotHdf5Error,
    VirtualZarr,
    WorkerCrashedError,
    WorkerProtocolError,
    extract,
    extract_local,
)
from zarrfs.virtual.protocol import FAULT_ENV

# -- helpers shared by the checks -------------------------------------------------------------------


def memory_store(view: VirtualZarr, blob: bytes) -> MemoryStore:
    """A zarr store holding the view: inline bytes, and each reference's bytes read from `blob`."""
    proto = zarr.core.buffer.default_buffer_prototype()
    files: dict[str, Any] = {}
    for path, entry in view.iter_files():
        data = (
            blob[entry.offset : entry.offset + entry.length]
            if isinstance(entry, ChunkRef)
            else entry
        )
        files[path] = proto.buffer.from_bytes(data)
    return MemoryStore(files, read_only=True)


def skipped_of(view: VirtualZarr | Callable[[str], bytes | Any]) -> dict[str, str]:
    root = view.get(".zattrs") if isinstance(view, VirtualZarr) else view(".zattrs")
    assert isinstance(root, bytes)
    entries = json.loads(root)["zarrfs_skipped"]
    for entry in entries:
        assert set(entry) == {"path", "reason"} and entry["reason"], entry
    return {e["path"]: e["reason"] for e in entries}


def norm_attr(value: Any, f: h5py.File) -> Any:
    """An independent spelling of the attribute rules: what `.zattrs` must hold for `value`."""
    if isinstance(value, np.ndarray):
        return [norm_attr(v, f) for v in value.tolist()] if value.ndim else norm_attr(value[()], f)
    if isinstance(value, list):
        return [norm_attr(v, f) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, h5py.Reference):
        return {"path": f[value].name}
    if isinstance(value, np.generic):
        return value.item()
    return value


def same_json(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def strip_reference(value: Any) -> Any:
    if isinstance(value, dict) and "_REFERENCE" in value:
        return {"path": value["_REFERENCE"]["path"]}
    if isinstance(value, list):
        return [strip_reference(v) for v in value]
    return value


def walk(
    group: h5py.Group, prefix: str = "", seen: set[int] | None = None
) -> list[tuple[str, Any]]:
    """(path, link or object) for every link below `group`, not following soft/external links nor
    entering a group twice."""
    seen = {h5py.h5o.get_info(group.id).addr} if seen is None else seen
    out: list[tuple[str, Any]] = []
    for name in group:
        path = f"{prefix}{name}"
        link = group.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            out.append((path, link))
            continue
        obj = group[name]
        out.append((path, obj))
        if isinstance(obj, h5py.Group):
            addr = h5py.h5o.get_info(obj.id).addr
            if addr not in seen:
                seen.add(addr)
                out.extend(walk(obj, path + "/", seen))
    return out


def check_view(h5path: Path, view: VirtualZarr) -> tuple[set[str], dict[str, str]]:
    """Assert the view equals the file; return the arrays compared and the skipped items."""
    blob = h5path.read_bytes()
    assert view.blob_size == len(blob)
    return check_store(h5path, memory_store(view, blob), view.get)


def check_store(
    h5path: Path, store: Any, meta: Callable[[str], bytes | Any]
) -> tuple[set[str], dict[str, str]]:
    """Assert the Zarr hierarchy in `store` (whose metadata files `meta(path)` reads) equals the
    HDF5 file at `h5path`; return the arrays compared and the skipped items."""
    skipped = skipped_of(meta)
    root = zarr.open_group(store, mode="r", zarr_format=2)
    compared: set[str] = set()
    with h5py.File(h5path, "r") as f:
        items: list[tuple[str, Any]] = [("", f), *walk(f)]
        for path, obj in items:
            parts = path.split("/")
            if any("/".join(parts[:i]) in skipped for i in range(1, len(parts) + 1)):
                continue
            if isinstance(obj, h5py.SoftLink):
                assert json.loads(meta(f"{path}/.zattrs")) == {"_SOFT_LINK": {"path": obj.path}}
                continue
            assert not isinstance(obj, h5py.ExternalLink), (
                f"{path}: external link neither shown nor skipped"
            )
            node = root[path] if path else root
            attrs = dict(node.attrs)
            added = set(attrs) - set(obj.attrs)
            assert added <= {"_ARRAY_DIMENSIONS", "zarrfs_skipped"}, (path, added)
            for name, value in obj.attrs.items():
                if f"{path}@{name}" in skipped:
                    assert name not in attrs
                    continue
                expected = norm_attr(value, f)
                assert same_json(strip_reference(attrs[name]), expected), (path, name)
            if isinstance(obj, h5py.Dataset):
                assert isinstance(node, zarr.Array), path
                expected = obj[()]
                got = np.asarray(node[...])
                assert got.shape == obj.shape, path
                if h5py.check_string_dtype(obj.dtype) and obj.dtype.kind == "O":
                    want = np.array(expected, dtype=object).reshape(obj.shape)
                    want = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(want)
                    assert np.asarray(got, dtype=object).tolist() == want.tolist(), path
                else:
                    assert got.dtype == obj.dtype, (path, got.dtype, obj.dtype)
                    np.testing.assert_array_equal(got, expected, err_msg=path)
                compared.add(path)
    return compared, skipped


# -- files ------------------------------------------------------------------------------------------


def write_compact(f: h5py.File, name: str, values: np.ndarray[Any, Any]) -> None:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.COMPACT)
    space = h5py.h5s.create_simple(values.shape)
    h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(values.dtype), space, dcpl=dcpl)
    f[name][...] = values


def write_kitchen_sink(path: Path) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["object_id"] = "root-object-id"
        f.attrs["title"] = "kitchen sink"
        f.attrs["bytes"] = b"caf\xc3\xa9"
        f.attrs["not_utf8"] = np.bytes_(b"\xff\xfe")
        f.attrs["int"] = np.int64(-3)
        f.attrs["u64"] = np.uint64(2**63 + 5)
        f.attrs["float"] = 0.1
        f.attrs["nan"] = np.float32("nan")
        f.attrs["flag"] = np.bool_(True)
        f.attrs["ints"] = np.arange(6, dtype="i2").reshape(2, 3)
        f.attrs["one"] = np.array([7])
        f.attrs["strs"] = np.array(["a", "bé"], dtype=h5py.string_dtype())
        f.attrs["fixed"] = np.array([b"xy", b"z"], dtype="S2")
        f.attrs["empty"] = h5py.Empty("f4")
        f.attrs["complex"] = np.complex64(1 + 2j)

        # chunked, gzip+shuffle, partial edge chunks, some chunks never written, a user fill value
        d = f.create_dataset(
            "chunked", shape=(100, 70), chunks=(16, 32), dtype="<i2", compression="gzip",
            shuffle=True, fillvalue=-7,
        )  # fmt: skip
        d[:40, :] = rng.integers(-1000, 1000, size=(40, 70))
        d[90:, 60:] = 5  # the corner: chunks (5|6, 1|2)
        d.attrs["unit"] = "mV"
        n = f.create_dataset("nan_fill", shape=(50,), chunks=(10,), dtype="<f4", fillvalue=np.nan)
        n[:10] = np.arange(10)
        f.create_dataset("unwritten", shape=(8, 8), chunks=(4, 4), dtype="<f8", fillvalue=2.5)
        f.create_dataset("contig_unwritten", shape=(9, 3), dtype="<u2", fillvalue=9)
        f.create_dataset(
            "fletcher", data=np.arange(500.0), chunks=(64,), compression="gzip", fletcher32=True
        )
        f.create_dataset(
            "fletcher_only", data=np.arange(100, dtype="<u4"), chunks=(30,), fletcher32=True
        )
        f.create_dataset(
            "cube",
            data=rng.integers(0, 255, (20, 30, 40), dtype="u1"),
            chunks=(8, 8, 8),
            compression="gzip",
        )
        f.create_dataset("mask", data=rng.random((33, 17)) > 0.5, chunks=(10, 10))
        f.create_dataset(
            "be_chunked",
            data=np.arange(1000, dtype=">i4"),
            chunks=(300,),
            compression="gzip",
            shuffle=True,
        )
        f.create_dataset("be_contig", data=np.linspace(0, 1, 999, dtype=">f8").reshape(333, 3))
        f.create_dataset("f16", data=np.arange(10, dtype="<f2"))
        f.create_dataset("complex", data=(np.arange(6) + 1j).astype("c8"), chunks=(4,))
        f.create_dataset(
            "compound", data=np.array([(1, 2.5), (3, 4.5)], dtype=[("a", "<i4"), ("b", "<f8")])
        )
        f.create_dataset(
            "enum",
            data=np.array([0, 2, 1], "i1"),
            dtype=h5py.enum_dtype({"x": 0, "y": 1, "z": 2}, basetype="i1"),
        )
        f.create_dataset("zero", shape=(0, 5), chunks=(4, 5), dtype="<i8", maxshape=(None, 5))
        f.create_dataset("zero_contig", shape=(0,), dtype="<i8")
        write_compact(f, "compact", np.arange(1000, dtype="<i4"))
        write_compact(f, "compact_be", np.arange(12, dtype=">u2").reshape(3, 4))
        f.create_dataset("scalar_f", data=np.float64(3.25))
        f.create_dataset("scalar_i", data=np.int8(-4))
        f.create_dataset("scalar_b", data=np.bool_(True))
        f.create_dataset("scalar_str", data="session start", dtype=h5py.string_dtype())
        f.create_dataset("vlen", data=["alpha", "", "gamma é"], dtype=h5py.string_dtype())
        f.create_dataset("vlen_ascii", data=[b"x", b"yz"], dtype=h5py.string_dtype("ascii"))
        f.create_dataset(
            "vlen_2d",
            data=np.array([["a", "b"], ["c", "d"]], dtype=object),
            dtype=h5py.string_dtype(),
        )
        f.create_dataset("fixed", data=np.array([b"abc", b"d", b""], dtype="S4"))
        f.create_dataset(
            "fixed_utf8", data=np.array(["é".encode(), b"x"], dtype=h5py.string_dtype("utf-8", 4))
        )
        f.create_dataset("empty_ds", data=h5py.Empty("i4"))

        g = f.create_group("group/nested")
        g.attrs["ref"] = f["cube"].ref
        g.attrs["refs"] = np.array([f["cube"].ref, f["group"].ref], dtype=h5py.ref_dtype)
        g.attrs["regionref"] = f["cube"].regionref[0:1, 0:1, 0:1]
        g.create_dataset("inner", data=np.arange(5))
        f["group"].attrs["neurodata_type"] = "Group"
        # Not representable: each is listed with a reason.
        f.create_dataset("refs", data=[f["cube"].ref, f["group"].ref], dtype=h5py.ref_dtype)
        f.create_dataset("lzf", data=np.arange(1000), chunks=(100,), compression="lzf")
        f.create_dataset("vlen_ints", shape=(2,), dtype=h5py.vlen_dtype("i4"))
        never = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        never.set_chunk((4,))
        never.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        h5py.h5d.create(
            f.id, b"fill_never", h5py.h5t.STD_I32LE, h5py.h5s.create_simple((12,)), dcpl=never
        )
        f["fill_never"][:4] = 1
        masked = f.create_dataset(
            "filter_mask", shape=(20,), chunks=(10,), dtype="<i4", compression="gzip"
        )
        masked.id.write_direct_chunk((0,), np.arange(10, dtype="<i4").tobytes(), filter_mask=1)
        masked[10:] = 3
        # links
        f["soft_to_cube"] = h5py.SoftLink("/cube")
        f["group/soft_to_group"] = h5py.SoftLink("/group/nested")
        f["dangling"] = h5py.SoftLink("/nowhere")
        f["external"] = h5py.ExternalLink("other.h5", "/data")
        f["hard_again"] = f["group/nested"]  # second hard link to a group
        f["group/loop"] = f["/"]  # a cycle back to the root
        f["cube_again"] = f["cube"]  # second hard link to a dataset: shown twice


@pytest.fixture(scope="module")
def kitchen_sink(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VirtualZarr]:
    path = tmp_path_factory.mktemp("virtual") / "sink.h5"
    write_kitchen_sink(path)
    return path, extract_local(path, timeout=60)


def test_kitchen_sink_equals_h5py(kitchen_sink: tuple[Path, VirtualZarr]) -> None:
    path, view = kitchen_sink
    compared, skipped = check_view(path, view)
    for name in [
        "chunked", "nan_fill", "unwritten", "contig_unwritten", "fletcher", "fletcher_only", "cube",
        "mask", "be_chunked", "be_contig", "f16", "complex", "compound", "enum", "zero",
        "zero_contig", "compact", "compact_be", "scalar_f", "scalar_i", "scalar_b", "scalar_str",
        "vlen", "vlen_ascii", "vlen_2d", "fixed", "fixed_utf8", "group/nested/inner", "cube_again",
    ]:  # fmt: skip
        assert name in compared, (name, skipped.get(name))
    assert set(skipped) == {
        "@not_utf8", "@empty", "@complex", "group/nested@regionref", "empty_ds", "refs", "lzf",
        "vlen_ints", "fill_never", "filter_mask", "external", "hard_again", "group/loop",
    }, skipped  # fmt: skip
    assert "lzf" in skipped["lzf"] and "filter_mask" in skipped["filter_mask"]
    assert "never-written" in skipped["fill_never"] and "external link" in skipped["external"]


def test_kitchen_sink_mapping(kitchen_sink: tuple[Path, VirtualZarr]) -> None:
    """What the view says about each array, beyond its values."""
    _, view = kitchen_sink

    def zarray(path: str) -> dict[str, Any]:
        data = view.get(f"{path}/.zarray")
        assert isinstance(data, bytes)
        meta: dict[str, Any] = json.loads(data)
        return meta

    chunked = zarray("chunked")
    assert chunked["chunks"] == [16, 32] and chunked["fill_value"] == -7
    assert chunked["filters"] == [{"id": "shuffle", "elementsize": 2}]
    assert chunked["compressor"] == {"id": "zlib", "level": 4}
    written = {p for p in view.listdir("chunked") or [] if not p.startswith(".")}
    assert written == {f"{i}.{j}" for i in range(3) for j in range(3)} | {
        "5.1",
        "5.2",
        "6.1",
        "6.2",
    }
    assert zarray("nan_fill")["fill_value"] == "NaN"
    assert zarray("fletcher")["filters"] == [{"id": "zlib", "level": 4}, {"id": "fletcher32"}]
    assert zarray("be_contig")["dtype"] == ">f8"
    assert isinstance(view.get("compact/0"), bytes)  # inlined: HDF5 keeps it in the object header
    assert isinstance(view.get("cube/0.0.0"), ChunkRef)
    nested = json.loads(view.get("group/nested/.zattrs"))
    ref = nested["ref"]["_REFERENCE"]
    assert ref.pop("path") in ("/cube", "/cube_again")  # one object, two hard links: HDF5 picks
    assert ref == {"object_id": None, "source": ".", "source_object_id": "root-object-id"}
    soft = json.loads(view.get("group/soft_to_group/.zattrs"))
    assert soft == {"_SOFT_LINK": {"path": "/group/nested"}}
    assert view.get("group/soft_to_group/.zgroup") is not None
    dims = json.loads(view.get("chunked/.zattrs"))["_ARRAY_DIMENSIONS"]
    assert len(dims) == 2 and len(set(dims)) == 2


def test_kerchunk_export_reads_the_same(kitchen_sink: tuple[Path, VirtualZarr]) -> None:
    fsspec = pytest.importorskip("fsspec")
    path, view = kitchen_sink
    refs = view.to_kerchunk(path.resolve().as_uri())
    fs = fsspec.filesystem("reference", fo=refs, remote_protocol="file", asynchronous=True)
    group = zarr.open_group(zarr.storage.FsspecStore(fs, read_only=True), mode="r", zarr_format=2)
    direct = zarr.open_group(memory_store(view, path.read_bytes()), mode="r", zarr_format=2)
    for name in (
        "chunked",
        "cube",
        "be_contig",
        "compact",
        "fletcher",
        "vlen",
        "scalar_f",
        "nan_fill",
    ):
        a, b = group[name], direct[name]
        assert isinstance(a, zarr.Array) and isinstance(b, zarr.Array)
        np.testing.assert_array_equal(a[...], b[...])
        assert a.dtype == b.dtype


def test_blosc_and_zstd_through_hdf5plugin(tmp_path: Path) -> None:
    hdf5plugin = pytest.importorskip("hdf5plugin")
    path = tmp_path / "plugins.h5"
    data = np.arange(30_000, dtype="<i4").reshape(300, 100) % 97
    with h5py.File(path, "w") as f:
        for cname in ("lz4", "zstd", "blosclz"):
            f.create_dataset(
                f"blosc_{cname}", data=data, chunks=(64, 50),
                **hdf5plugin.Blosc(cname=cname, clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE),
            )  # fmt: skip
        f.create_dataset("zstd", data=data, chunks=(64, 50), **hdf5plugin.Zstd(clevel=3))
        f.create_dataset("lz4", data=data, chunks=(64, 50), **hdf5plugin.LZ4())
        f.create_dataset("bitshuffle", data=data, chunks=(64, 50), **hdf5plugin.Bitshuffle())
    view = extract_local(path, timeout=60)
    compared, skipped = check_view(path, view)
    assert compared == {"blosc_lz4", "blosc_zstd", "blosc_blosclz", "zstd"}
    assert set(skipped) == {"lz4", "bitshuffle"}  # HDF5's framing of these differs from numcodecs'


@pytest.fixture(scope="module")
def big_contiguous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("virtual") / "contiguous.h5"
    write_big_contiguous(path)
    return path


def write_big_contiguous(path: Path) -> None:
    """Tens of MB of contiguous datasets: one whose rows divide evenly into virtual chunks, one
    whose last chunk runs past its end, and one at the very end of the file."""
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        f.create_dataset("even", data=rng.random((4096, 1024)))  # 32 MiB, 8 chunks of 4 MiB
        f.create_dataset("ragged", data=rng.integers(0, 1 << 30, (3001, 700), dtype="<i4"))
        f.create_dataset("zz_last", data=rng.integers(0, 1 << 15, (5_000_011,), dtype="<i2"))


def test_contiguous_datasets_become_row_chunks(big_contiguous: Path) -> None:
    view = extract_local(big_contiguous, timeout=60)
    compared, skipped = check_view(big_contiguous, view)
    assert compared == {"even", "ragged", "zz_last"} and not skipped
    even = json.loads(view.get("even/.zarray"))
    assert even["chunks"] == [512, 1024]
    assert view.listdir("even") == [".zarray", ".zattrs", *(f"{i}.0" for i in range(8))]
    with h5py.File(big_contiguous, "r") as f:
        base = f["even"].id.get_offset()
        row_bytes = 700 * 4
        assert view.get("even/3.0") == ChunkRef(base + 3 * 512 * 1024 * 8, 512 * 1024 * 8)
        ragged = json.loads(view.get("ragged/.zarray"))
        rows = ragged["chunks"][0]
        target = (4 << 20) // row_bytes
        assert target // 4 <= rows <= target and 3001 % rows != 0  # 3001 is prime
        last = view.get(f"ragged/{3001 // rows}.0")
        assert isinstance(last, ChunkRef) and last.length == rows * row_bytes  # runs past the end
        end = f["zz_last"].id.get_offset() + f["zz_last"].id.get_storage_size()
        n_last = f["zz_last"].shape[0]
    tail = json.loads(view.get("zz_last/.zarray"))
    if end == view.blob_size:  # nothing after it to run into: rows divide evenly, or one chunk
        assert n_last % tail["chunks"][0] == 0
    for path, entry in view.iter_files():
        if isinstance(entry, ChunkRef):
            assert entry.offset + entry.length <= view.blob_size, path


def test_userblock(tmp_path: Path) -> None:
    path = tmp_path / "userblock.h5"
    with h5py.File(path, "w", userblock_size=1024) as f:
        f.create_dataset("x", data=np.arange(5000, dtype="<i8"), chunks=(700,), compression="gzip")
        f.create_dataset("y", data=np.arange(100, dtype="<f4"))
    with open(path, "r+b") as raw:
        raw.write(b"not the HDF5 signature")
    compared, skipped = check_view(path, extract_local(path, timeout=60))
    assert compared == {"x", "y"} and not skipped


# -- failures ---------------------------------------------------------------------------------------


def children_of_this_process() -> list[int]:
    """Extraction workers this process started that still exist, or any child left unreaped
    (other live children, such as the session's local S3 server, are not counted)."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            state, parent = stat.rpartition(")")[2].split()[:2]
            if parent == me and (b"zarrfs.virtual.worker" in argv or state == "Z"):
                found.append(int(entry))
    return found


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "x.nwb"
    path.write_bytes(os.urandom(5000))
    with pytest.raises(NotHdf5Error, match="no HDF5 signature"):
        extract_local(path)
    path.write_bytes(b"")
    with pytest.raises(NotHdf5Error):
        extract_local(path)


def test_damaged_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "damaged.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x07" * 4000)
    with pytest.raises(ExtractionError, match="HDF5 cannot open the file"):
        extract_local(path, timeout=60)
    assert children_of_this_process() == []


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "small.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(10))
    return path


def test_worker_crash(small_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "abort")
    with pytest.raises(WorkerCrashedError, match="SIGABRT"):
        extract_local(small_file, timeout=60)
    assert children_of_this_process() == []


def test_worker_hang(small_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "hang")
    t0 = time.monotonic()
    with pytest.raises(ExtractionTimeoutError):
        extract_local(small_file, timeout=1.5)
    assert time.monotonic() - t0 < 4
    assert children_of_this_process() == []


def test_worker_garbage(small_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "garbage")
    with pytest.raises(WorkerProtocolError, match="unknown frame"):
        extract_local(small_file, timeout=60)
    assert children_of_this_process() == []


def test_worker_that_does_not_start(small_file: Path) -> None:
    with pytest.raises(ExtractionError, match="cannot start"):
        extract_local(small_file, python="/nonexistent/python")


def test_budget_is_enforced(small_file: Path) -> None:
    with pytest.raises(ExtractionLimitError, match="more than"):
        extract_local(small_file, budget=Budget(max_bytes=1000, max_requests=100))
    assert children_of_this_process() == []


@pytest.mark.trio
async def test_cancellation_kills_the_worker(
    small_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "hang")
    blob = small_file.read_bytes()

    async def read(offset: int, length: int) -> bytes:
        return blob[offset : offset + length]

    with trio.move_on_after(1) as scope:
        await extract(read, len(blob), deadline=trio.current_time() + 60)
    assert scope.cancelled_caught
    assert children_of_this_process() == []


@pytest.mark.trio
async def test_read_errors_pass_through(small_file: Path) -> None:
    blob = small_file.read_bytes()
    calls = 0

    class Unavailable(Exception):
        pass

    async def read(offset: int, length: int) -> bytes:
        nonlocal calls
        calls += 1
        if calls > 1:  # the signature check passes, the worker's first read fails
            raise Unavailable("S3 is down")
        return blob[offset : offset + length]

    with pytest.raises(Unavailable):
        await extract(read, len(blob), deadline=trio.current_time() + 60)
    assert children_of_this_process() == []

    calls = 0

    async def short_read(offset: int, length: int) -> bytes:
        nonlocal calls
        calls += 1  # the first read is the signature check's, the second the worker's
        return blob[offset : offset + length][: length - (calls > 1)]

    with pytest.raises(ExtractionError, match="returned"):
        await extract(short_read, len(blob), deadline=trio.current_time() + 60)


def test_view_round_trips(kitchen_sink: tuple[Path, VirtualZarr]) -> None:
    _, view = kitchen_sink
    data = view.to_bytes()
    again = VirtualZarr.from_bytes(data, blob_size=view.blob_size)
    assert dict(again.iter_files()) == dict(view.iter_files())
    assert math.isclose(len(data), len(view.to_bytes()))


def test_truncated_file(kitchen_sink: tuple[Path, VirtualZarr], tmp_path: Path) -> None:
    """A cut blob gives a typed error or a view whose references all lie inside what is left."""
    path, _ = kitchen_sink
    data = path.read_bytes()
    for fraction in (0.3, 0.6, 0.9):
        cut = tmp_path / f"cut{fraction}.h5"
        cut.write_bytes(data[: int(len(data) * fraction)])
        try:
            view = extract_local(cut, timeout=30)
        except ExtractionError:
            continue
        for _, entry in view.iter_files():
            if isinstance(entry, ChunkRef):
                assert entry.offset + entry.length <= view.blob_size
    assert children_of_this_process() == []


def test_damaged_metadata_gives_typed_errors(
    kitchen_sink: tuple[Path, VirtualZarr], tmp_path: Path
) -> None:
    """Flipped bytes in the metadata: the worker may fail any way it likes; the caller sees a typed
    error or a view, within the deadline, and no process is left behind."""
    path, _ = kitchen_sink
    data = path.read_bytes()
    rng = np.random.default_rng(4)
    for i in range(6):
        damaged = bytearray(data)
        for at in rng.integers(0, min(len(data), 8192), size=8):
            damaged[int(at)] ^= int(rng.integers(1, 256))
        damaged[:8] = data[:8]
        target = tmp_path / f"damaged{i}.h5"
        target.write_bytes(bytes(damaged))
        t0 = time.monotonic()
        with contextlib.suppress(ExtractionError):
            extract_local(target, timeout=10)
        assert time.monotonic() - t0 < 15
    assert children_of_this_process() == []
