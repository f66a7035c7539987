"""`--virtual-zarr`: each HDF5 blob of a version shown as a Zarr store, `<name>.zarr` beside it.

Through a real FUSE mount and through the fsspec face: every array zarr-python 3 reads from
`x.nwb.zarr` equals h5py's read of `x.nwb`; listing opens no HDF5; a blob that is not HDF5 fails its
view with EIO while everything else is served; the view is stored in the cache dir and loaded (not
built) by the next process, a damaged one is built again; the issue's bounds on bytes moved hold;
`zarrfs virtual-zarr` exports references that fsspec reads without zarrfs, pinned to the blob's
VersionId. The namespace and view logic is also tested directly (pure).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from conftest import Mounted, zarrfs_command
from test_virtual_extract import check_store, write_big_contiguous, write_kitchen_sink
from test_virtual_nwb import write_large_nwb, write_small_nwb
from zarrfs.archive.assets import AssetRecord
from zarrfs.archive.resolver import ResolvedVersion
from zarrfs.config import Source
from zarrfs.demo.locals3 import LocalS3
from zarrfs.demo.publish import publish_zarrs
from zarrfs.demo.sample import SampleDandiset
from zarrfs.errors import NotADirectory, NotFound
from zarrfs.fs.namespace import ZARR_SHIFT, BlobRange, InlineFile, Namespace
from zarrfs.fs.virtual_zarrs import VirtualView
from zarrfs.virtual import VirtualZarrBuilder

DANDISET, VERSION = "000777", "0.240601.0000"
SOURCE = f"{DANDISET}@{VERSION}"
SMALL, SINK, LARGE = "sub-01/sub-01_ecephys.nwb", "sub-01/sink.h5", "sub-02/large.nwb"
CONTIGUOUS = "sub-02/contiguous.h5"
BROKEN, CLASH = "sub-01/broken.nwb", "sub-03/clash.nwb"


@dataclass(frozen=True)
class Published:
    local: dict[str, Path]  # asset path -> the same bytes on local disk
    clash_zgroup: bytes


@pytest.fixture(scope="module")
def published(local_s3: LocalS3, tmp_path_factory: pytest.TempPathFactory) -> Published:
    tmp = tmp_path_factory.mktemp("virtual-files")
    local = {SMALL: tmp / "small.nwb", SINK: tmp / "sink.h5", LARGE: tmp / "large.nwb"}
    local[CONTIGUOUS] = tmp / "contiguous.h5"
    write_small_nwb(local[SMALL])
    write_kitchen_sink(local[SINK])
    write_large_nwb(local[LARGE])
    write_big_contiguous(local[CONTIGUOUS])
    local[BROKEN] = tmp / "broken.nwb"
    local[BROKEN].write_bytes(b"this is not HDF5 " * 1000)
    local[CLASH] = local[SMALL]
    zgroup = json.dumps({"zarr_format": 2}).encode()
    blobs = {path: p.read_bytes() for path, p in local.items()}
    publish_zarrs(local_s3, DANDISET, VERSION, {CLASH + ".zarr": {".zgroup": zgroup}}, blobs)
    return Published(local, zgroup)


def _meta(root: Path) -> Any:
    return lambda path: (root / path).read_bytes()


def _blob_gets(local_s3: LocalS3) -> tuple[int, int]:
    stats = local_s3.stats()
    return stats.by_kind.get("GET", 0), stats.bytes_sent


def test_mount_shows_virtual_zarrs_equal_to_h5py(
    mount: Any, published: Published, local_s3: LocalS3
) -> None:
    m: Mounted = mount(SOURCE, "--virtual-zarr", "--cache-size", "0")
    before = _blob_gets(local_s3)
    names = sorted(os.listdir(m.path / "sub-01"))
    assert names == [
        "broken.nwb", "broken.nwb.zarr", "sink.h5", "sink.h5.zarr",
        "sub-01_ecephys.nwb", "sub-01_ecephys.nwb.zarr",
    ]  # fmt: skip
    assert os.stat(m.path / "sub-01" / "sink.h5.zarr").st_mode & 0o040000
    assert _blob_gets(local_s3) == before, "listing a directory read a blob"
    assert "built the virtual Zarr view" not in m.output()

    compared = {}
    for path in (SMALL, SINK, CONTIGUOUS):
        root = m.path / (path + ".zarr")
        store = LocalStore(root, read_only=True)
        compared[path], _ = check_store(published.local[path], store, _meta(root))
    assert {"acquisition/ElectricalSeries/data", "acquisition/ImageSeries/data"} <= compared[SMALL]
    assert {"chunked", "cube", "compact", "vlen", "mask"} <= compared[SINK]
    assert compared[CONTIGUOUS] == {"even", "ragged", "zz_last"}  # 4 MiB row chunks of the blob
    small = m.path / (SMALL + ".zarr")
    data = zarr.open_array(
        LocalStore(small, read_only=True), path="acquisition/ElectricalSeries/data", mode="r"
    )
    with h5py.File(published.local[SMALL]) as f:
        np.testing.assert_array_equal(data[:], f["acquisition/ElectricalSeries/data"][:])
    import xarray as xr

    es = xr.open_zarr(small, group="acquisition/ElectricalSeries", consolidated=False)
    assert es.attrs["neurodata_type"] == "ElectricalSeries" and es["data"].shape == (30_011, 16)

    # A chunk file is a byte range of the blob: the same bytes as the blob has there.
    chunk = small / "acquisition/ElectricalSeries/data/3.0"
    blob = published.local[SMALL].read_bytes()
    with open(small / "acquisition/ElectricalSeries/data/.zarray") as f:
        assert json.load(f)["chunks"] == [4096, 16]
    got = chunk.read_bytes()
    assert got and got in blob and os.stat(chunk).st_size == len(got)

    # A blob that is not HDF5: EIO on its view, logged with the object; everything else served.
    with pytest.raises(OSError) as info:
        os.listdir(m.path / BROKEN.replace(".nwb", ".nwb.zarr"))
    assert info.value.errno == errno.EIO
    assert "NotHdf5Error" in m.output() and "broken.nwb" in m.output()
    assert (m.path / SMALL).read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    # The name of a real Zarr asset is never taken by a virtual view.
    assert (m.path / (CLASH + ".zarr") / ".zgroup").read_bytes() == published.clash_zgroup
    assert sorted(os.listdir(m.path / "sub-03")) == ["clash.nwb", "clash.nwb.zarr"]


def test_without_the_option_nothing_is_added(mount: Any, published: Published) -> None:
    m: Mounted = mount(SOURCE)
    assert sorted(os.listdir(m.path / "sub-01")) == [
        "broken.nwb", "sink.h5", "sub-01_ecephys.nwb"
    ]  # fmt: skip
    assert not (m.path / (SMALL + ".zarr")).exists()


def test_bounds_on_bytes_moved(mount: Any, published: Published, local_s3: LocalS3) -> None:
    """Building the view of a 64 MiB NWB with large chunks moves at most max(4 MiB, 10%) of it
    from S3; reading one chunk file moves at most that chunk plus 1 MiB."""
    m: Mounted = mount(SOURCE, "--virtual-zarr", "--cache-size", "0")
    size = published.local[LARGE].stat().st_size
    root = m.path / (LARGE + ".zarr")
    before = _blob_gets(local_s3)
    assert "acquisition" in os.listdir(root)
    built = _blob_gets(local_s3)[1] - before[1]
    assert built <= max(4 << 20, size // 10), (built, size)
    chunk = root / "acquisition/ElectricalSeries2/data/5.0"
    before = _blob_gets(local_s3)
    data = chunk.read_bytes()
    moved = _blob_gets(local_s3)[1] - before[1]
    assert len(data) == 8192 * 64 * 2
    assert moved <= len(data) + (1 << 20), (moved, len(data))
    with h5py.File(published.local[LARGE]) as f:
        want = f["acquisition/ElectricalSeries2/data"][5 * 8192 : 6 * 8192]
    np.testing.assert_array_equal(np.frombuffer(data, "<i2").reshape(8192, 64), want)
    print(f"{size}-byte NWB: its view moved {built} bytes; one 1 MiB chunk moved {moved} bytes")


def test_view_is_stored_and_checked_on_load(
    mount: Any, published: Published, local_s3: LocalS3, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = mount(SOURCE, "--virtual-zarr", "--cache-size", "0", cache_dir=cache)
    names = os.listdir(first.path / (SINK + ".zarr"))
    assert "built the virtual Zarr view of sub-01/sink.h5" in first.output()
    stored = list((cache / "virtual").glob("*/*.vzarr"))
    assert len(stored) == 1 and oct(stored[0].stat().st_mode & 0o777) == "0o600"
    with pytest.raises(OSError):
        os.listdir(first.path / (BROKEN + ".zarr"))
    assert len(list((cache / "virtual").glob("*/*.refused"))) == 1

    # A second process loads the stored view and the stored refusal: no extraction, no blob read.
    second = mount(SOURCE, "--virtual-zarr", "--cache-size", "0", cache_dir=cache)
    before = _blob_gets(local_s3)
    assert sorted(os.listdir(second.path / (SINK + ".zarr"))) == sorted(names)
    with pytest.raises(OSError) as info:
        os.listdir(second.path / (BROKEN + ".zarr"))
    assert info.value.errno == errno.EIO
    assert _blob_gets(local_s3)[0] == before[0]
    assert "built the virtual Zarr view" not in second.output()

    # A damaged stored view is discarded and built again; the values stay right.
    data = bytearray(stored[0].read_bytes())
    data[len(data) // 2] ^= 0x40
    stored[0].write_bytes(bytes(data))
    third = mount(SOURCE, "--virtual-zarr", "--cache-size", "0", cache_dir=cache)
    root = third.path / (SINK + ".zarr")
    check_store(published.local[SINK], LocalStore(root, read_only=True), _meta(root))
    assert "discarding the stored virtual Zarr view" in third.output()
    assert "built the virtual Zarr view of sub-01/sink.h5" in third.output()


def test_fsspec_face(published: Published, sample: SampleDandiset, tmp_path: Path) -> None:
    import fsspec
    import xarray as xr

    fs = fsspec.filesystem(
        "zarrfs",
        endpoint_url=sample.endpoint_url,
        cache_dir=str(tmp_path / "cache"),
        virtual_zarr=True,
        skip_instance_cache=True,
    )
    assert f"{SOURCE}/{SMALL}.zarr" in fs.ls(f"{SOURCE}/sub-01", detail=False)
    for path in (SMALL, SINK):
        mapper = fs.get_mapper(f"{SOURCE}/{path}.zarr")
        check_store(published.local[path], mapper, lambda p, m=mapper: m[p])
    es = xr.open_zarr(
        fs.get_mapper(f"{SOURCE}/{SMALL}.zarr/acquisition/ElectricalSeries"), consolidated=False
    )
    assert es["data"].shape == (30_011, 16)
    with pytest.raises(OSError) as info:
        fs.ls(f"{SOURCE}/{BROKEN}.zarr")
    assert info.value.errno == errno.EIO
    info_of_chunk = fs.info(f"{SOURCE}/{SMALL}.zarr/acquisition/ElectricalSeries/data/0.0")
    assert info_of_chunk["type"] == "file" and info_of_chunk["size"] > 0
    start, end = info_of_chunk["byte_range"]  # which bytes of which blob
    assert end - start == info_of_chunk["size"] and info_of_chunk["s3_url"].startswith("s3://")
    blob = published.local[SMALL].read_bytes()
    assert (
        fs.cat_file(f"{SOURCE}/{SMALL}.zarr/acquisition/ElectricalSeries/data/0.0")
        == blob[start:end]
    )


def test_export_verb_pins_the_version(
    published: Published, sample: SampleDandiset, local_s3: LocalS3, tmp_path: Path
) -> None:
    import fsspec

    out = tmp_path / "refs.json"
    result = subprocess.run(
        zarrfs_command(
            "virtual-zarr", f"{SOURCE}/{SMALL}", "-o", str(out),
            "--endpoint-url", sample.endpoint_url, "--cache-dir", str(tmp_path / "cache"),
        ),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    refs = json.loads(out.read_text())
    assert refs["version"] == 1
    urls = {v[0] for v in refs["refs"].values() if isinstance(v, list)}
    assert len(urls) == 1
    (url,) = urls
    assert url.startswith(sample.endpoint_url) and "?versionId=" in url
    assert "chunks" in result.stderr and url in result.stderr
    # Read with fsspec's reference filesystem over plain HTTP: no zarrfs involved.
    reference = fsspec.filesystem(
        "reference",
        fo=str(out),
        remote_protocol="http",
        remote_options={"asynchronous": True},
        asynchronous=True,
        skip_instance_cache=True,
    )
    store = zarr.storage.FsspecStore(reference, read_only=True)
    plain = fsspec.filesystem("reference", fo=str(out), skip_instance_cache=True)
    compared, _ = check_store(published.local[SMALL], store, plain.cat_file)
    assert "acquisition/ElectricalSeries/data" in compared
    # Not a file: a clear error.
    bad = subprocess.run(
        zarrfs_command(
            "virtual-zarr", f"{SOURCE}/sub-01", "--endpoint-url", sample.endpoint_url,
            "--cache-dir", str(tmp_path / "cache"),
        ),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "directory" in bad.stderr


# --- pure: the namespace's siblings and a view's inodes --------------------------------------------


def _blob(path: str, media_type: str | None = None, size: int = 100) -> AssetRecord:
    return AssetRecord(
        asset_id=path, path=path, size=size, mtime_ns=1, blob_key=f"blobs/{path}", blob_etag="e",
        media_type=media_type,
    )  # fmt: skip


def _zarr(path: str) -> AssetRecord:
    return AssetRecord(
        asset_id=path, path=path, size=1, mtime_ns=1, zarr_id="z" + path, zarr_checksum="c"
    )


def _resolved(*assets: AssetRecord) -> ResolvedVersion:
    return ResolvedVersion(Source("000001", "draft"), tuple(assets), None, published=True)


def test_namespace_siblings() -> None:
    assets = (
        _blob("a/x.nwb"), _blob("a/y.H5"), _blob("a/notes.txt"), _blob("a/z.dat", "application/x-nwb"),
        _blob("b/c.nwb"), _zarr("b/c.nwb.zarr"), _zarr("b/real.zarr"),
    )  # fmt: skip
    plain, virtual = Namespace(_resolved(*assets)), Namespace(_resolved(*assets), virtual_zarr=True)

    def names(ns: Namespace, directory: str) -> list[bytes]:
        ino = ns.lookup(ns.root_ino, directory.encode()).ino
        return [name for name, _, _ in ns.readdir(ino, 0)]

    assert names(virtual, "a") == [
        b"notes.txt",
        b"x.nwb",
        b"x.nwb.zarr",
        b"y.H5",
        b"y.H5.zarr",
        b"z.dat",
        b"z.dat.zarr",
    ]
    assert names(virtual, "b") == [b"c.nwb", b"c.nwb.zarr", b"real.zarr"]
    # The real Zarr keeps its name and its inodes; virtual views take slots after the real ones.
    b_plain, b_virtual = (ns.lookup(ns.root_ino, b"b").ino for ns in (plain, virtual))
    for name in (b"c.nwb.zarr", b"real.zarr"):
        assert plain.lookup(b_plain, name) == virtual.lookup(b_virtual, name)
        place = virtual.zarr_at(virtual.lookup(b_virtual, name).ino)
        assert place is not None and not place.virtual
    a = virtual.lookup(virtual.root_ino, b"a").ino
    place = virtual.zarr_at(virtual.lookup(a, b"x.nwb.zarr").ino)
    assert place is not None and place.virtual and place.asset.path == "a/x.nwb"
    assert (place.base >> ZARR_SHIFT) > plain.n_slots
    assert virtual.n_slots == plain.n_slots + 3
    assert [z.path for z in virtual.zarr_assets()] == ["b/c.nwb.zarr", "b/real.zarr"]


def _model() -> Any:
    builder = VirtualZarrBuilder(blob_size=10_000)
    builder.add_file(".zgroup", b'{"zarr_format":2}')
    builder.add_file("g/.zgroup", b'{"zarr_format":2}')
    builder.add_file("g/a/.zarray", b"{}")
    builder.add_file("g/small/.zarray", b"{}")
    builder.add_file("g/small/0", b"inline chunk")
    keys = np.arange(0, 300, 3, dtype=np.int64)  # every third chunk of a 10 x 30 grid
    builder.add_chunks(
        "g/a", (10, 30), keys, np.arange(100, dtype=np.int64) * 50, np.full(100, 40, np.int64)
    )
    return builder.build()


def test_view_inodes_lookup_and_readdir() -> None:
    from zarrfs.base.refs import ObjectRef
    from zarrfs.fs.namespace import ZarrPlace

    blob = ObjectRef("blobs/x", None, 10_000, "e")
    view = VirtualView.of(_model(), blob, mtime_ns=7)
    place = ZarrPlace(
        _blob("x.nwb"), root_ino=5, base=3 << ZARR_SHIFT, path="x.nwb.zarr", virtual=True
    )
    g = view.lookup(place, 0, b"g")
    assert g.is_dir and g.ino >> ZARR_SHIFT == 3
    a = view.lookup(place, place.node(g.ino), b"a")
    node_a = place.node(a.ino)
    listing = list(view.readdir(place, node_a, 0))
    assert [n for n, _, _ in listing[:2]] == [b".zarray", b"0.0"]
    assert len(listing) == 101 and listing[-1][0] == b"9.27"
    # Offsets resume where they left off, across the metadata files and the chunks.
    for cut in (0, 1, 2, 50, 100, 101):
        assert list(view.readdir(place, node_a, cut)) == listing[cut:]
    chunk = view.lookup(place, node_a, b"0.3")
    assert (chunk.size, chunk.mtime_ns, chunk.is_dir) == (40, 7, False)
    assert view.getattr(place, place.node(chunk.ino)) == chunk
    assert view.file_source(place, place.node(chunk.ino)) == BlobRange(blob, 50, 40)
    assert view.path(place.node(chunk.ino)) == "g/a/0.3"
    for missing in (b"0.1", b"00.3", b"0.30", b"10.0", b"x", b"\xff"):
        with pytest.raises(NotFound):
            view.lookup(place, node_a, missing)
    small = view.lookup(place, place.node(g.ino), b"small")
    zero = view.lookup(place, place.node(small.ino), b"0")
    assert view.file_source(place, place.node(zero.ino)) == InlineFile(b"inline chunk")
    with pytest.raises(NotADirectory):
        view.readdir(place, place.node(zero.ino), 0).__next__()
    with pytest.raises(NotFound):
        view.getattr(place, 10_000)


@pytest.mark.trio
async def test_a_worker_that_cannot_run_refuses_nothing_for_good(
    published: Published, sample: SampleDandiset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure that says nothing about the blob (here: the worker cannot start) fails the entry
    with EIO but is never stored as a refusal: once the worker can run, the view is built."""
    import sys
    from dataclasses import replace

    from zarrfs import config as cfg
    from zarrfs.config import MountSource, config_from_options
    from zarrfs.errors import NotVirtualizable
    from zarrfs.fs.core import open_filesystem

    cache = tmp_path / "cache"
    config = replace(
        config_from_options(
            MountSource(DANDISET, VERSION), endpoint_url=sample.endpoint_url, cache_dir=cache
        ),
        virtual_zarr=True,
    )
    async with open_filesystem(config) as fs:
        assert fs.virtual is not None
        fs.virtual.cache.python = str(tmp_path / "no-such-python")
        ino = await fs.walk(SINK + ".zarr")
        with pytest.raises(NotVirtualizable, match="cannot start"):
            await fs.opendir(ino)
        assert list(cache.glob("virtual/*/*")) == []  # nothing stored
    monkeypatch.setattr(cfg, "FAILURE_TTL", 0.0)
    async with open_filesystem(config) as fs:  # another process: the worker runs now
        assert fs.virtual is not None and fs.virtual.cache.python == sys.executable
        ino = await fs.walk(SINK + ".zarr")
        names = [n for n, _, _ in await fs.readdir(await fs.opendir(ino), 0)]
        assert b".zgroup" in names and len(list(cache.glob("virtual/*/*.vzarr"))) == 1
