"""The fsspec face (`zarrfs://`) against the sample dandiset in the local S3, without FUSE.

What a mount shows, through fsspec: `ls`/`info`/`find` of the published tree, the exact published
bytes through `cat_file`, `cat_ranges` and `open` (V1's chunks that V2 overwrote or deleted
included), zarr-python, xarray, Dask, h5py and pynwb as readers, pickling (Dask ships the filesystem
to its workers), writes refused, the storage options mirroring the command line, the `fsspec.specs`
entry point, no pyfuse3, and a real Dask cluster whose workers start cold at the same moment yet
fetch each manifest once.

The sample's NWB files are HDF5 files shaped like NWB but without the cached specifications pynwb
needs, and its Zarrs carry no dimension names, so xarray and pynwb read an extra dandiset (`EXTRA`)
published here: an xarray dataset written by xarray, and an NWB file written by pynwb.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

from conftest import ForwardingProxy
from zarrfs import config as cfg
from zarrfs.demo.locals3 import LocalS3
from zarrfs.demo.publish import PublishedZarr, publish_zarrs
from zarrfs.demo.sample import (
    ARRAY_PATH,
    DRAFT,
    EPHYS_PATH,
    OME_PATH,
    OME_V2_DELETED,
    OME_V2_OVERWRITTEN,
    V1,
    V2,
    SampleDandiset,
    read_tree,
)
from zarrfs.errors import SourceError
from zarrfs.faces.cli import build_parser, config_from_args
from zarrfs.faces.fsspec import ZarrfsFile, ZarrfsFileSystem, split_path

REPO = Path(__file__).resolve().parents[1]
#: An API nobody answers: published versions need none.
NO_API = "http://127.0.0.1:9/api"
#: The extra dandiset: an xarray dataset and a pynwb-written NWB file.
EXTRA = "000124"
EXTRA_VERSION = "0.251105.1200"
DATASET_PATH = "sub-01/sub-01_dataset.zarr"
NWB_PATH = "sub-01/sub-01_real.nwb"
pytestmark = pytest.mark.s3


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    """What the `fsspec.specs` entry point does once zarrfs is installed (the shared test
    environment may hold an older install; `test_the_entry_point_registers_the_protocol` tests
    the entry point itself)."""
    fsspec.register_implementation("zarrfs", ZarrfsFileSystem, clobber=True)


def storage_options(
    sample: SampleDandiset, cache: Path, *, endpoint: str | None = None, api_url: str = NO_API
) -> dict[str, Any]:
    return {
        "endpoint_url": endpoint or sample.endpoint_url,
        "manifest_root": f"s3://{sample.bucket}/zarr-manifest/",  # no fallback to the internet
        "api_url": api_url,
        "cache_dir": str(cache),
        "memory_cache_size": "64M",
    }


@pytest.fixture
def options(sample: SampleDandiset, tmp_path: Path) -> dict[str, Any]:
    return storage_options(sample, tmp_path / "cache")


@pytest.fixture
def fs(options: dict[str, Any]) -> ZarrfsFileSystem:
    return fsspec.filesystem("zarrfs", **options)  # type: ignore[no-any-return]


def v(sample: SampleDandiset, version: str, path: str = "") -> str:
    head = f"{sample.dandiset_id}@{version}"
    return f"{head}/{path}" if path else head


# --- the extra dandiset ----------------------------------------------------------------------------


@dataclass
class Extra:
    dataset: Any  # the xarray.Dataset as written
    nwb_signal: np.ndarray
    zarr: PublishedZarr
    nwb: bytes


def real_nwb(signal: np.ndarray) -> bytes:
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries

    nwb = NWBFile(
        session_description="zarrfs fsspec test",
        identifier="zarrfs-fsspec-real-nwb",
        session_start_time=datetime(2025, 11, 5, 10, 0, tzinfo=UTC),
    )
    nwb.add_acquisition(TimeSeries(name="signal", data=signal, unit="volts", rate=1000.0))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "real.nwb"
        with NWBHDF5IO(str(path), "w") as writer:
            writer.write(nwb)
        return path.read_bytes()


@pytest.fixture(scope="module")
def extra(local_s3: LocalS3, sample: SampleDandiset) -> Extra:
    import xarray as xr

    rng = np.random.default_rng(124)
    dataset = xr.Dataset(
        {"temperature": (("time", "x"), rng.normal(15, 3, size=(40, 25)).astype(np.float32))},
        coords={"time": np.arange(40), "x": np.linspace(0.0, 1.0, 25)},
        attrs={"title": "zarrfs fsspec test"},
    )
    signal = rng.normal(0, 1, size=5000).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        dataset.chunk({"time": 10}).to_zarr(Path(tmp) / "ds.zarr", zarr_format=2, consolidated=True)
        tree = read_tree(Path(tmp) / "ds.zarr")
    nwb = real_nwb(signal)
    published = publish_zarrs(
        local_s3, EXTRA, EXTRA_VERSION, {DATASET_PATH: tree}, blobs={NWB_PATH: nwb}
    )
    return Extra(dataset, signal, published[DATASET_PATH], nwb)


# --- paths and options -------------------------------------------------------------------------------


def test_paths_name_a_source_and_a_path_in_it() -> None:
    where = split_path("000123@0.251101.1200/sub-01/x.ome.zarr/0")
    assert (where.source.dandiset_id, where.source.version) == ("000123", "0.251101.1200")
    assert where.parts == ("sub-01", "x.ome.zarr", "0") and where.head == "000123@0.251101.1200"
    assert where.name(("a", "b")) == "000123@0.251101.1200/a/b"
    assert split_path("000123@Draft").source.version == "draft"
    assert split_path("000123/0.251101.1200/sub-01").source.kind == "dandiset"
    archive = split_path("dandi/zarrs/9ee/a4d")
    assert archive.source.kind == "archive" and archive.parts == ("zarrs", "9ee", "a4d")
    for bad in ("", "123@0.251101.1200", "000123@nope", "s3:/bucket", "dandiarchive/x"):
        with pytest.raises(SourceError):
            split_path(bad)
    strip = ZarrfsFileSystem._strip_protocol
    assert strip("zarrfs://000123@draft/sub-01/") == "000123@draft/sub-01"
    assert strip("zarrfs:///dandi/zarrs") == "dandi/zarrs"
    assert strip(["zarrfs://dandi", "dandi/"]) == ["dandi", "dandi"]


def test_storage_options_are_the_command_lines_connection_options(tmp_path: Path) -> None:
    """The same names, the same defaults, the same meaning: equal options give equal configs."""
    import inspect
    from dataclasses import replace

    parameters = inspect.signature(ZarrfsFileSystem.__init__).parameters
    assert set(cfg.CONNECTION_OPTIONS) <= set(parameters)
    given: dict[str, Any] = {
        "endpoint_url": "http://127.0.0.1:1",
        "bucket": "other",
        "region": "eu-west-1",
        "manifest_root": ["file:///a/", "https://b/"],
        "api_url": "http://api.example/api/",
        "cache_dir": str(tmp_path / "c"),
        "memory_cache_size": "96M",
        "cache_size": "1G",
        "manifest_memory": "2G",
        "manifest_cache_size": "3G",
        "version_memory": "64M",
        "signed": True,
    }
    assert sorted(given) == sorted(cfg.CONNECTION_OPTIONS)
    argv: list[str] = []
    for name, value in given.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        else:
            for one in value if isinstance(value, list) else [value]:
                argv += [flag, one]
    parser = build_parser()
    for options, args in (
        ({}, ["--cache-dir", str(tmp_path / "c")]),  # the defaults
        (given, argv),
    ):
        face = ZarrfsFileSystem(
            skip_instance_cache=True, **{"cache_dir": str(tmp_path / "c"), **options}
        )
        for verb in (["ls", "dandi"], ["mount", "dandi", str(tmp_path)]):
            from_cli = config_from_args(parser.parse_args([*verb, *args]))
            assert replace(face.config, mountpoint=from_cli.mountpoint) == from_cli, verb
    # sizes as ints or strings, a root as one URL, and errors naming the option
    sized = ZarrfsFileSystem(
        memory_cache_size=1 << 20,
        cache_size=0,
        manifest_root="file:///a/",
        skip_instance_cache=True,
    ).config
    assert (sized.memory_cache_size, sized.disk_cache_size) == (1 << 20, 0)
    assert sized.manifest_roots == ("file:///a/",)
    with pytest.raises(ValueError, match="memory_cache_size"):
        ZarrfsFileSystem(memory_cache_size="lots", skip_instance_cache=True)
    with pytest.raises(ValueError, match="version_memory"):
        ZarrfsFileSystem(version_memory=-1, skip_instance_cache=True)
    with pytest.raises(ValueError, match="ftp://"):
        ZarrfsFileSystem(manifest_root="ftp://x/", skip_instance_cache=True)
    with pytest.raises(TypeError, match="no_such_option"):
        ZarrfsFileSystem(no_such_option=1, skip_instance_cache=True)
    assert ZarrfsFileSystem(signed="true", skip_instance_cache=True).config.s3.unsigned is False
    with pytest.raises(ValueError, match="signed"):
        ZarrfsFileSystem(signed="perhaps", skip_instance_cache=True)


# --- the tree ----------------------------------------------------------------------------------------


def test_ls_info_and_find_show_what_a_mount_shows(
    fs: ZarrfsFileSystem, sample: SampleDandiset
) -> None:
    for version in (V1, V2):
        expected = sample.versions[version].files
        found = fs.find(f"zarrfs://{v(sample, version)}")
        assert [name.split("/", 1)[1] for name in found] == sorted(expected)
        detailed = fs.find(v(sample, version, OME_PATH), detail=True)
        for name, info in detailed.items():
            rel = name.split("/", 1)[1]
            assert info["type"] == "file" and info["size"] == len(expected[rel]), rel
    top = fs.ls(v(sample, V1), detail=False)
    assert top == [v(sample, V1, n) for n in ("dandiset.yaml", "sub-01", "sub-02")]
    listing = {i["name"]: i for i in fs.ls(v(sample, V1, OME_PATH))}
    assert listing[v(sample, V1, f"{OME_PATH}/0")]["type"] == "directory"
    assert listing[v(sample, V1, f"{OME_PATH}/.zattrs")]["type"] == "file"
    # a file's info names its pinned object version
    chunk = f"{OME_PATH}/{OME_V2_OVERWRITTEN[0]}"
    info = fs.info(v(sample, V1, chunk))
    manifest = json.loads(sample.versions[V1].manifests[OME_PATH])
    node = manifest["entries"]
    for part in OME_V2_OVERWRITTEN[0].split("/"):
        node = node[part]
    zarr_id = sample.versions[V1].zarr_ids[OME_PATH]
    assert info["version_id"] == node[0] and info["etag"] == node[3]
    key = f"zarr/{zarr_id}/{OME_V2_OVERWRITTEN[0]}"
    assert info["s3_url"] == f"s3://{sample.bucket}/{key}?versionId={node[0]}"
    assert [i["name"] for i in fs.ls(v(sample, V1, EPHYS_PATH))] == [v(sample, V1, EPHYS_PATH)]
    assert fs.isdir(v(sample, V1, OME_PATH)) and fs.isfile(v(sample, V1, chunk))
    assert fs.find(v(sample, V1, "sub-01"), maxdepth=1, withdirs=True) == sorted(
        [v(sample, V1, "sub-01"), v(sample, V1, EPHYS_PATH), v(sample, V1, OME_PATH)]
    )
    # V2 deleted a chunk: gone from V2's tree, still in V1's
    deleted = f"{OME_PATH}/{OME_V2_DELETED[0]}"
    assert fs.exists(v(sample, V1, deleted)) and not fs.exists(v(sample, V2, deleted))


def test_missing_paths_and_bad_sources_are_file_not_found(
    fs: ZarrfsFileSystem, sample: SampleDandiset
) -> None:
    missing = [
        v(sample, V1, "sub-01/nope"),
        v(sample, V2, f"{OME_PATH}/{OME_V2_DELETED[0]}"),
        v(sample, "0.990101.0000", "sub-01"),
        "999999@0.251101.1200",
        "not-a-dandiset/x",
    ]
    for path in missing:
        for call in (fs.info, fs.ls, fs.cat_file, fs.open):
            with pytest.raises(FileNotFoundError):
                call(path)
        assert not fs.exists(path)
    with pytest.raises(IsADirectoryError):
        fs.cat_file(v(sample, V1, OME_PATH))
    with pytest.raises(NotADirectoryError):
        fs.ls(v(sample, V1, f"{EPHYS_PATH}/inside"))


# --- bytes -------------------------------------------------------------------------------------------


def test_every_byte_is_the_published_byte(
    fs: ZarrfsFileSystem, sample: SampleDandiset, local_s3: LocalS3
) -> None:
    for version in (V1, V2):
        for rel, data in sample.versions[version].files.items():
            assert fs.cat_file(v(sample, version, rel)) == data, (version, rel)
    # V1's chunk that V2 overwrote and the one V2 deleted: the live keys say otherwise
    zarr_id = sample.versions[V1].zarr_ids[OME_PATH]
    for entry in (*OME_V2_OVERWRITTEN, *OME_V2_DELETED):
        rel = f"{OME_PATH}/{entry}"
        published = sample.versions[V1].files[rel]
        try:
            live = local_s3.client.get_object(Bucket=sample.bucket, Key=f"zarr/{zarr_id}/{entry}")
            assert live["Body"].read() != published
        except local_s3.client.exceptions.NoSuchKey:
            pass
        assert fs.cat_file(v(sample, V1, rel)) == published


def test_ranges_and_open_files(fs: ZarrfsFileSystem, sample: SampleDandiset) -> None:
    path = v(sample, V1, EPHYS_PATH)
    data = sample.versions[V1].files[EPHYS_PATH]
    size = len(data)
    for start, end in ((0, 10), (100, 5000), (-16, None), (None, -size + 3), (5, 5), (10, 2)):
        assert fs.cat_file(path, start, end) == data[start:end], (start, end)
    assert fs.cat_file(path, size - 3, size + 100) == data[-3:]
    chunk = f"{OME_PATH}/{OME_V2_OVERWRITTEN[0]}"
    results = fs.cat_ranges(
        [path, path, v(sample, V1, chunk), v(sample, V1, "sub-01/missing")],
        [0, size - 100, 2, 0],
        [64, size, 30, 1],
    )
    assert results[:3] == [data[:64], data[-100:], sample.versions[V1].files[chunk][2:30]]
    assert isinstance(results[3], FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        fs.cat_ranges([v(sample, V1, "sub-01/missing")], [0], [1], on_error="raise")
    # a path no source can have is that range's error too, not the whole call's
    mixed = fs.cat_ranges(["not-a-dandiset@x/y", path], [0, 0], [1, 8])
    assert isinstance(mixed[0], OSError) and mixed[1] == data[:8]
    with fs.open(f"zarrfs://{path}") as f:
        assert isinstance(f, ZarrfsFile) and f.size == size
        assert f.read(8) == data[:8]
        f.seek(size // 2)
        assert f.read(1000) == data[size // 2 : size // 2 + 1000]
        f.seek(-10, io.SEEK_END)
        assert f.read() == data[-10:]
        f.seek(0)
        assert f.read() == data
    assert f.closed
    with fsspec.open(f"zarrfs://{v(sample, V1, 'dandiset.yaml')}", "r", **fs.storage_options) as t:
        assert t.read() == sample.versions[V1].files["dandiset.yaml"].decode()


def test_draft_latest_a_dandisets_versions_and_the_archive(
    sample: SampleDandiset, fake_api: str, tmp_path: Path
) -> None:
    fs = ZarrfsFileSystem(**storage_options(sample, tmp_path / "cache", api_url=fake_api))
    rel = f"{OME_PATH}/.zattrs"
    assert fs.cat_file(v(sample, "latest", rel)) == sample.versions[V2].files[rel]
    assert fs.cat_file(v(sample, DRAFT, rel)) == sample.versions[DRAFT].files[rel]
    dandiset = sample.dandiset_id
    assert fs.ls(dandiset, detail=False) == [
        f"{dandiset}/{V1}",
        f"{dandiset}/{V2}",
        f"{dandiset}/draft",
    ]
    assert fs.cat_file(f"{dandiset}/{V1}/{rel}") == sample.versions[V1].files[rel]
    # the archive: a Zarr by its checksum, and `latest`, a symbolic link followed
    zarr_id = sample.versions[V1].zarr_ids[OME_PATH]
    checksum = sample.versions[V1].zarr_checksums[OME_PATH]
    by_checksum = f"dandi/zarrs/{zarr_id[:3]}/{zarr_id[3:6]}/{zarr_id}/{checksum}.zarr"
    chunk = OME_V2_OVERWRITTEN[0]
    assert fs.cat_file(f"{by_checksum}/{chunk}") == sample.versions[V1].files[f"{OME_PATH}/{chunk}"]
    entries = {i["name"]: i for i in fs.ls(f"dandi/dandisets/{dandiset}")}
    latest = entries[f"dandi/dandisets/{dandiset}/latest"]
    assert latest["type"] == "directory" and latest["islink"]
    assert latest["destination"] == f"releases/{V2}"
    archive_rel = f"dandi/dandisets/{dandiset}/latest/{rel}"
    assert fs.cat_file(archive_rel) == sample.versions[V2].files[rel]
    assert fs.info(archive_rel)["size"] == len(sample.versions[V2].files[rel])


def test_many_threads_at_once(fs: ZarrfsFileSystem, sample: SampleDandiset) -> None:
    from concurrent.futures import ThreadPoolExecutor

    files = [(version, rel) for version in (V1, V2) for rel in sample.versions[version].files]
    with ThreadPoolExecutor(16) as pool:
        read = list(pool.map(lambda item: fs.cat_file(v(sample, *item)), files))
    assert read == [sample.versions[version].files[rel] for version, rel in files]


def test_sources_beyond_the_limit_are_closed_when_idle(
    fs: ZarrfsFileSystem, sample: SampleDandiset, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zarrfs.faces import fsspec as fsspec_face

    monkeypatch.setattr(cfg, "FSSPEC_MAX_SOURCES", 2)
    rel = f"{OME_PATH}/.zattrs"
    opened = fs.open(v(sample, V1, EPHYS_PATH))  # holds V1 open
    for version in (V2, "latest", V1, V2):
        assert (
            fs.cat_file(v(sample, version, rel))
            == sample.versions[V2 if version == "latest" else version].files[rel]
        )
    assert fs.cat_file(f"{sample.dandiset_id}/{V1}/{rel}") == sample.versions[V1].files[rel]
    runtime = fsspec_face.runtime()
    open_now = [str(source) for source in runtime.call(runtime.sources)]
    assert len(open_now) <= 3 and f"{sample.dandiset_id}@{V1}" in open_now  # in use: kept
    assert opened.read() == sample.versions[V1].files[EPHYS_PATH]
    opened.close()


def test_a_file_closed_on_the_loop_thread_lets_its_source_go(
    fs: ZarrfsFileSystem, sample: SampleDandiset
) -> None:
    """An unclosed file is in a reference cycle: the cycle collector may free (close) it on the
    runtime's own thread, where a blocking call into the loop is refused."""
    import trio

    from zarrfs.faces import fsspec as fsspec_face

    opened = fs.open(v(sample, V1, EPHYS_PATH))
    assert opened.read(10) == sample.versions[V1].files[EPHYS_PATH][:10]
    handle = opened._handle
    assert handle is not None and handle.served.users == 1

    async def close_on_the_loop() -> int:
        opened.close()
        for _ in range(100):
            if handle.served.users == 0:
                break
            await trio.sleep(0.01)
        return handle.served.users

    runtime = fsspec_face.runtime()
    assert runtime.call(close_on_the_loop) == 0  # released: the source may be closed when idle


def test_a_cache_dir_warmed_by_the_command_line_serves_without_s3(
    sample: SampleDandiset, tmp_path: Path
) -> None:
    """`zarrfs cache warm` on a login node, then workers without network: the cache dir has the
    same layout for both faces."""
    cache = tmp_path / "warmed"
    source = v(sample, V1)
    warm = subprocess.run(
        [sys.executable, "-m", "zarrfs", "cache", "warm", source, OME_PATH, "--data",
         "--endpoint-url", sample.endpoint_url, "--cache-dir", str(cache),
         "--manifest-root", f"s3://{sample.bucket}/zarr-manifest/", "--api-url", NO_API],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert warm.returncode == 0, warm.stderr
    offline = ZarrfsFileSystem(**storage_options(sample, cache, endpoint="http://127.0.0.1:9"))
    expected = sample.versions[V1].files
    found = offline.find(v(sample, V1, OME_PATH))
    assert [name.split("/", 1)[1] for name in found] == sorted(
        rel for rel in expected if rel.startswith(f"{OME_PATH}/")
    )
    for name in found:
        assert offline.cat_file(name) == expected[name.split("/", 1)[1]], name


# --- readers -----------------------------------------------------------------------------------------


def test_zarr_python_and_dask_read_the_published_arrays(
    options: dict[str, Any], sample: SampleDandiset
) -> None:
    import dask.array as da
    import zarr

    for version in (V1, V2):
        arrays = sample.versions[version].arrays
        group = zarr.open_group(
            f"zarrfs://{v(sample, version, OME_PATH)}", mode="r", storage_options=options
        )
        for level in ("0", "1", "2"):
            assert np.array_equal(group[level][:], arrays[f"{OME_PATH}/{level}"]), level
        array = zarr.open_array(
            f"zarrfs://{v(sample, version, ARRAY_PATH)}", mode="r", storage_options=options
        )
        assert np.array_equal(array[:], arrays[ARRAY_PATH])
        lazy = da.from_zarr(
            f"zarrfs://{v(sample, version, OME_PATH)}", component="0", storage_options=options
        )
        expected = arrays[f"{OME_PATH}/0"]
        assert int(lazy.sum(dtype=np.int64).compute()) == int(expected.sum(dtype=np.int64))
        assert np.array_equal(lazy[1, 2:4, 30:70, 10:20].compute(), expected[1, 2:4, 30:70, 10:20])
    # V1 and V2 differ where V2 edited the Zarr in place
    assert not np.array_equal(
        sample.versions[V1].arrays[f"{OME_PATH}/0"], sample.versions[V2].arrays[f"{OME_PATH}/0"]
    )


def test_xarray_opens_a_published_dataset(
    options: dict[str, Any], sample: SampleDandiset, extra: Extra
) -> None:
    import xarray as xr

    url = f"zarrfs://{EXTRA}@{EXTRA_VERSION}/{DATASET_PATH}"
    dataset = xr.open_zarr(url, storage_options=options)
    xr.testing.assert_identical(dataset.load(), extra.dataset)
    assert dataset.attrs["title"] == "zarrfs fsspec test"


def test_h5py_and_pynwb_read_through_fsspec_open(
    options: dict[str, Any], sample: SampleDandiset, extra: Extra
) -> None:
    import h5py
    from pynwb import NWBHDF5IO

    # h5py on the sample's NWB file (HDF5 shaped like NWB, not loadable by pynwb)
    url = f"zarrfs://{v(sample, V1, EPHYS_PATH)}"
    local = h5py.File(io.BytesIO(sample.versions[V1].files[EPHYS_PATH]), "r")
    with fsspec.open(url, "rb", **options) as f, h5py.File(f, "r") as remote:
        name = "acquisition/ElectricalSeries/data"
        assert np.array_equal(remote[name][:], local[name][:])
        assert remote.attrs["neurodata_type"] == "NWBFile"
    # pynwb on an NWB file pynwb wrote
    url = f"zarrfs://{EXTRA}@{EXTRA_VERSION}/{NWB_PATH}"
    with (
        fsspec.open(url, "rb", **options) as f,
        h5py.File(f, "r") as file,
        NWBHDF5IO(file=file, load_namespaces=True) as reader,
    ):
        nwb = reader.read()
        assert nwb.identifier == "zarrfs-fsspec-real-nwb"
        assert np.array_equal(nwb.acquisition["signal"].data[:], extra.nwb_signal)


# --- read-only, pickling, processes ----------------------------------------------------------------


def test_every_write_is_refused(fs: ZarrfsFileSystem, sample: SampleDandiset) -> None:
    path = v(sample, V1, EPHYS_PATH)
    calls = [
        lambda: fs.open(path, "wb"),
        lambda: fs.open(path, "ab"),
        lambda: fs.open(path, "w"),
        lambda: fs.pipe_file(path, b"x"),
        lambda: fs.pipe(path, b"x"),
        lambda: fs.write_bytes(path, b"x"),
        lambda: fs.write_text(path, "x"),
        lambda: fs.put_file(__file__, path),
        lambda: fs.put(__file__, path),
        lambda: fs.upload(__file__, path),
        lambda: fs.rm(path),
        lambda: fs.rm_file(path),
        lambda: fs.delete(path),
        lambda: fs.rmdir(v(sample, V1, "sub-01")),
        lambda: fs.mkdir(v(sample, V1, "new")),
        lambda: fs.makedirs(v(sample, V1, "new/deeper")),
        lambda: fs.mv(path, path + ".moved"),
        lambda: fs.rename(path, path + ".moved"),
        lambda: fs.copy(path, path + ".copy"),
        lambda: fs.cp_file(path, path + ".copy"),
        lambda: fs.touch(path),
    ]
    for call in calls:
        with pytest.raises(OSError, match="read-only") as e:
            call()
        assert e.value.errno == errno.EROFS
    assert fs.cat_file(path) == sample.versions[V1].files[EPHYS_PATH]


def test_it_pickles_as_its_arguments(
    fs: ZarrfsFileSystem, options: dict[str, Any], sample: SampleDandiset
) -> None:
    assert pickle.loads(pickle.dumps(fs)) is fs  # fsspec's instance cache, same arguments
    assert fs.storage_options == options
    path = v(sample, V1, EPHYS_PATH)
    data = sample.versions[V1].files[EPHYS_PATH]
    opened = fs.open(path)
    opened.seek(1000)
    # a fresh interpreter: no runtime until the first read, then the same bytes
    code = (
        "import pickle, sys\n"
        "fs, f = pickle.load(sys.stdin.buffer)\n"
        "import zarrfs.faces.fsspec as face\n"
        "assert face._runtime is None\n"
        f"data = fs.cat_file({path!r}, 0, 100)\n"
        "f = pickle.loads(f)\n"  # reopened where it was
        "sys.stdout.buffer.write(data + f.read(50))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=pickle.dumps((fs, pickle.dumps(opened))),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == data[:100] + data[1000:1050]
    opened.close()


def test_a_forked_child_starts_its_own_runtime(
    fs: ZarrfsFileSystem, sample: SampleDandiset
) -> None:
    import multiprocessing

    path = v(sample, V1, EPHYS_PATH)
    data = sample.versions[V1].files[EPHYS_PATH]
    opened = fs.open(path)
    assert opened.read(10) == data[:10]  # the parent's runtime is running
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        child = pool.apply(_read_in_child, (fs, path, opened))
    assert child == data[100:200] + data[10:20]
    assert opened.read(10) == data[10:20]
    opened.close()


def _read_in_child(fs: ZarrfsFileSystem, path: str, opened: ZarrfsFile) -> bytes:
    return fs.cat_file(path, 100, 200) + opened.read(10)  # type: ignore[no-any-return]


def test_the_face_needs_no_pyfuse3(options: dict[str, Any], sample: SampleDandiset) -> None:
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, zarrfs.faces.fsspec; print('pyfuse3' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert imported.stdout.strip() == "False"
    # on a host where pyfuse3 cannot be imported at all, the face reads as usual
    path = v(sample, V1, f"{OME_PATH}/.zattrs")
    code = (
        "import sys; sys.modules['pyfuse3'] = None\n"
        "import fsspec\n"
        "from zarrfs.faces.fsspec import ZarrfsFileSystem\n"
        f"fs = ZarrfsFileSystem(**{options!r})\n"
        f"sys.stdout.buffer.write(fs.cat_file({path!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == sample.versions[V1].files[f"{OME_PATH}/.zattrs"]


def test_the_entry_point_registers_the_protocol(
    options: dict[str, Any], sample: SampleDandiset, tmp_path: Path
) -> None:
    """pyproject.toml declares `zarrfs` under `fsspec.specs`; installed metadata saying so (written
    here from pyproject, as `pip install` would) is all fsspec needs to find the class. The storage
    options come from fsspec's own configuration (`FSSPEC_ZARRFS_<OPTION>`), as on a Dask worker
    configured by its environment."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["entry-points"]["fsspec.specs"]
    assert specs == {"zarrfs": "zarrfs.faces.fsspec:ZarrfsFileSystem"}
    dist = tmp_path / "site" / "zarrfs_entry_point_probe-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: zarrfs-entry-point-probe\nVersion: 0\n"
    )
    lines = "".join(f"{name} = {target}\n" for name, target in specs.items())
    (dist / "entry_points.txt").write_text(f"[fsspec.specs]\n{lines}")
    path = v(sample, V1, f"{OME_PATH}/.zattrs")
    code = (
        "import sys, fsspec\n"
        "cls = fsspec.get_filesystem_class('zarrfs')\n"
        "assert cls.__module__ == 'zarrfs.faces.fsspec', cls\n"
        f"with fsspec.open('zarrfs://{path}', 'rb') as f:\n"
        "    sys.stdout.buffer.write(f.read())\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *sys.path]),
        **{f"FSSPEC_ZARRFS_{k.upper()}": str(value) for k, value in options.items()},
        "FSSPEC_ZARRFS_SIGNED": "false",
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=120, check=False, env=env
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == sample.versions[V1].files[f"{OME_PATH}/.zattrs"]


# --- a Dask cluster ----------------------------------------------------------------------------------


@pytest.fixture
def counting_proxy(sample: SampleDandiset) -> Iterator[ForwardingProxy]:
    proxy = ForwardingProxy(sample.endpoint_url)
    yield proxy
    proxy.close()


def _cold_read(options: dict[str, Any], path: str) -> tuple[int, bytes]:
    """On a worker: wait until every worker is ready, then read `path` with nothing started."""
    from distributed import Event, Queue

    from zarrfs.faces.fsspec import ZarrfsFileSystem

    fs = ZarrfsFileSystem(**options)  # nothing runs until the first operation
    Queue("zarrfs-arrived").put(os.getpid())
    if not Event("zarrfs-go").wait(timeout=60):
        raise TimeoutError("never told to go")
    return os.getpid(), fs.cat_file(path)


def test_a_dask_cluster_reads_the_pinned_array_and_fetches_each_manifest_once(
    sample: SampleDandiset, counting_proxy: ForwardingProxy, tmp_path: Path
) -> None:
    import cloudpickle
    import dask.array as da
    from distributed import Client, Event, LocalCluster, Queue

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    options = storage_options(sample, tmp_path / "shared-cache", endpoint=counting_proxy.url)
    url = f"zarrfs://{v(sample, V1, OME_PATH)}"
    chunk = f"{url}/{OME_V2_OVERWRITTEN[0]}"
    manifest = sample.versions[V1].manifest_keys[OME_PATH]
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        workers = list(client.scheduler_info()["workers"])
        assert len(workers) == 2
        futures = [
            client.submit(_cold_read, options, chunk, workers=[w], pure=False) for w in workers
        ]
        arrived = Queue("zarrfs-arrived")
        pids = {arrived.get(timeout=60) for _ in workers}
        assert counting_proxy.gets(manifest) == 0
        Event("zarrfs-go").set()  # both cold, at the same moment
        reads = client.gather(futures)
        assert {pid for pid, _ in reads} == pids and len(pids) == 2
        assert all(
            data == sample.versions[V1].files[f"{OME_PATH}/{OME_V2_OVERWRITTEN[0]}"]
            for _, data in reads
        )
        # the reduction, on the cluster: V1's values, though the live Zarr was edited since
        array = da.from_zarr(url, component="0", storage_options=options)
        total = int(array.sum(dtype=np.int64).compute())
    published = sample.versions[V1].arrays[f"{OME_PATH}/0"]
    live = sample.versions[DRAFT].arrays[f"{OME_PATH}/0"]
    assert total == int(published.sum(dtype=np.int64)) != int(live.sum(dtype=np.int64))
    assert counting_proxy.gets(manifest) == 1  # one GET for the whole cluster
