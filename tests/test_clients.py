"""The clients DANDI users run, reading the sample through real mounts.

pynwb (`NWBHDF5IO(...).read()`), zarr-python on the format 2 OME-Zarr and the format 3 array
(consolidated and not), xarray's `open_zarr`, `dask.array.from_zarr` computed on several worker
threads, and ome-zarr's reader. Two dandiset mounts serve the whole module, one plain and one with
`--consolidate`; each shows every published version as `<version>/`. Every value is compared with
what the sample wrote (`SampleDandiset.nwb`, `SampleVersion.arrays`, `SampleVersion.files`), never
with zarrfs. The local S3 runs in its own process (h5py holds the GIL while it waits on the mount).
"""

from __future__ import annotations

import errno
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import Mounted, require_fuse, start_mount, stop_mount
from zarrfs.demo.sample import (
    ARRAY_PATH,
    EPHYS_PATH,
    OME_AXES,
    OME_PATH,
    V1,
    V2,
    SampleDandiset,
)

pytestmark = pytest.mark.fuse

VERSIONS = (V1, V2)
#: The mounts of the module: "plain" shows exactly the published files, "consolidated" adds a
#: synthesized `.zmetadata` to format 2 hierarchies that have none.
KINDS = ("plain", "consolidated")
LEVELS = ("0", "1", "2")


@pytest.fixture(scope="module")
def mounts(
    tmp_path_factory: pytest.TempPathFactory, sample: SampleDandiset
) -> Iterator[dict[str, Path]]:
    """The dandiset mounted twice (separate caches): plain, and with --consolidate."""
    require_fuse()
    live: list[Mounted] = []
    try:
        for kind in KINDS:
            base = tmp_path_factory.mktemp(f"clients-{kind}")
            extra = ("--consolidate",) if kind == "consolidated" else ()
            live.append(
                start_mount(
                    base,
                    sample.dandiset_id,
                    *extra,
                    endpoint=sample.endpoint_url,
                    cache=base / "cache",
                )
            )
        yield {kind: mounted.path for kind, mounted in zip(KINDS, live, strict=True)}
    finally:
        for mounted in live:
            stop_mount(mounted)


def ome_levels(sample: SampleDandiset, version: str) -> dict[str, np.ndarray[Any, Any]]:
    arrays = sample.versions[version].arrays
    return {level: arrays[f"{OME_PATH}/{level}"] for level in LEVELS}


def recording_store(root: Path) -> Any:
    """A read-only zarr store on `root` that records every key asked for and whether it existed."""
    from zarr.storage import LocalStore, WrapperStore

    class RecordingStore(WrapperStore[LocalStore]):
        gets: list[tuple[str, bool]]

        def __init__(self, store: LocalStore) -> None:
            super().__init__(store)
            self.gets = []

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            value = await super().get(key, prototype, byte_range)
            self.gets.append((key, value is not None))
            return value

    return RecordingStore(LocalStore(str(root), read_only=True))


# --- pynwb ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_pynwb_reads_what_was_written(
    mounts: dict[str, Path], sample: SampleDandiset, version: str
) -> None:
    from pynwb import NWBHDF5IO

    assert set(sample.nwb) == set(sample.blob_paths)
    for path, written in sample.nwb.items():
        with NWBHDF5IO(str(mounts["plain"] / version / path), mode="r") as io:
            nwb = io.read()
            assert nwb.identifier == written.identifier
            assert nwb.session_description == written.session_description
            assert nwb.session_start_time == written.session_start_time
            assert len(written.series) >= 1
            for hdf5_path, series in written.series.items():
                got = nwb.objects[series.object_id]
                assert type(got).__name__ == series.neurodata_type, hdf5_path
                assert got.unit == series.unit
                assert got.conversion == series.conversion
                np.testing.assert_array_equal(got.data[:1000], series.data[:1000])
                np.testing.assert_array_equal(got.data[:], series.data, err_msg=hdf5_path)
                assert got.data.dtype == series.data.dtype
                assert got.rate == series.rate
                assert got.starting_time == series.starting_time
                if series.timestamps is None:
                    assert got.timestamps is None
                else:
                    np.testing.assert_array_equal(got.timestamps[:], series.timestamps)
            if written.electrodes:
                table = nwb.electrodes
                for column, values in written.electrodes.items():
                    got_column = np.asarray(table[column].data[:])
                    np.testing.assert_array_equal(got_column.astype(values.dtype), values)
                ephys = nwb.acquisition["ElectricalSeries"]
                assert ephys.electrodes.table is table
                np.testing.assert_array_equal(ephys.electrodes.data[:], np.arange(len(table)))
                assert {g.name for g in table["group"].data[:]} == {"shank0"}
            else:
                assert nwb.electrodes is None


def test_the_ephys_file_has_an_electrical_and_an_image_series(sample: SampleDandiset) -> None:
    kinds = {s.neurodata_type for s in sample.nwb[EPHYS_PATH].series.values()}
    assert {"ElectricalSeries", "ImageSeries"} <= kinds
    assert len(sample.nwb[EPHYS_PATH].electrodes["x"]) == 8


# --- zarr-python ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_zarr_python_format_2_unconsolidated(
    mounts: dict[str, Path], sample: SampleDandiset, version: str
) -> None:
    """Without --consolidate the mount shows only the published files: zarr-python reads every
    level's own metadata; asked for consolidated metadata it finds none."""
    import zarr

    root = mounts["plain"] / version / OME_PATH
    files = sample.versions[version].files
    store = recording_store(root)
    group = zarr.open_group(store, mode="r", use_consolidated=False)
    assert dict(group.attrs) == json.loads(files[f"{OME_PATH}/.zattrs"])
    for level, expected in ome_levels(sample, version).items():
        array = group[level]
        assert isinstance(array, zarr.Array)
        assert array.metadata.zarr_format == 2
        assert dict(array.attrs) == {"_ARRAY_DIMENSIONS": list(OME_AXES)}
        np.testing.assert_array_equal(array[...], expected, err_msg=f"{version} {level}")
    # every key that exists was served; every key that came back missing is really absent
    for key, found in store.gets:
        assert found == (f"{OME_PATH}/{key}" in files), key
    assert (".zmetadata", True) not in store.gets
    assert ("0/.zarray", True) in store.gets
    with pytest.raises(ValueError):
        zarr.open_consolidated(str(root), mode="r", zarr_format=2)
    # the default (use_consolidated=None) looks for .zmetadata, finds none, reads the rest
    np.testing.assert_array_equal(
        zarr.open_group(str(root), mode="r")["0"][...], ome_levels(sample, version)["0"]
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_zarr_python_format_2_consolidated(
    mounts: dict[str, Path], sample: SampleDandiset, version: str
) -> None:
    """With --consolidate zarr-python opens the OME-Zarr from the root's metadata and .zmetadata
    (no level's .zarray or .zattrs is read) and gets the published metadata and values."""
    import zarr

    root = mounts["consolidated"] / version / OME_PATH
    files = sample.versions[version].files
    store = recording_store(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "consolidated metadata not found" or other warning
        group = zarr.open_consolidated(store, mode="r", zarr_format=2)
    consolidated = group.metadata.consolidated_metadata
    assert consolidated is not None
    assert sorted(consolidated.metadata) == list(LEVELS)
    assert dict(group.attrs) == json.loads(files[f"{OME_PATH}/.zattrs"])
    for level, expected in ome_levels(sample, version).items():
        array = group[level]
        assert isinstance(array, zarr.Array)
        assert dict(array.attrs) == {"_ARRAY_DIMENSIONS": list(OME_AXES)}
        np.testing.assert_array_equal(array[...], expected, err_msg=f"{version} {level}")
    # the root's own .zgroup and .zattrs, then .zmetadata; nothing of the levels
    metadata_read = {key for key, _ in store.gets if key.rsplit("/", 1)[-1].startswith(".z")}
    assert metadata_read == {".zgroup", ".zattrs", ".zmetadata"}, metadata_read
    # the synthesized object is shown beside the published files, never instead of one
    assert (root / ".zmetadata").exists()
    for rel in (".zattrs", ".zgroup", "0/.zarray", "0/.zattrs"):
        assert (root / rel).read_bytes() == files[f"{OME_PATH}/{rel}"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", VERSIONS)
def test_zarr_python_format_3(
    mounts: dict[str, Path], sample: SampleDandiset, kind: str, version: str
) -> None:
    """The format 3 array reads the same on both mounts. Consolidated metadata in format 3 is a
    field of a group's own zarr.json, so there is nothing a mount could add without changing a
    published object: --consolidate leaves format 3 alone, and zarr-python asked for consolidated
    metadata says it has none (the sample's format 3 Zarr is a root array, which never has any)."""
    import zarr

    root = mounts[kind] / version / ARRAY_PATH
    files = sample.versions[version].files
    assert (root / "zarr.json").read_bytes() == files[f"{ARRAY_PATH}/zarr.json"]
    for use_consolidated in (False, None):
        array = zarr.open_array(str(root), mode="r", use_consolidated=use_consolidated)
        assert array.metadata.zarr_format == 3
        assert dict(array.attrs) == json.loads(files[f"{ARRAY_PATH}/zarr.json"])["attributes"]
        np.testing.assert_array_equal(array[...], sample.versions[version].arrays[ARRAY_PATH])
    with pytest.raises(ValueError, match="not found"):
        zarr.open_consolidated(str(root), mode="r", zarr_format=3)


def test_writing_consolidated_metadata_is_refused(mounts: dict[str, Path]) -> None:
    """A client that tries to consolidate on the mount gets EROFS (the mount is read-only)."""
    import zarr

    with pytest.raises(OSError) as info:
        zarr.consolidate_metadata(str(mounts["plain"] / V1 / OME_PATH))
    assert info.value.errno == errno.EROFS


# --- xarray ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_xarray_open_zarr(
    mounts: dict[str, Path], sample: SampleDandiset, kind: str, version: str
) -> None:
    """xarray opens one level of the OME-Zarr at a time (the levels share dimension names with
    different sizes), consolidated only where the mount shows a .zmetadata. mask_and_scale=False
    keeps the raw uint16 values (CF decoding would turn the fill value 0 into NaN)."""
    import xarray as xr

    root = str(mounts[kind] / version / OME_PATH)
    consolidated = kind == "consolidated"
    attrs = json.loads(sample.versions[version].files[f"{OME_PATH}/.zattrs"])
    for level, expected in ome_levels(sample, version).items():
        others = [other for other in LEVELS if other != level]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # e.g. "no consolidated metadata"
            ds = xr.open_zarr(
                root, consolidated=consolidated, drop_variables=others, mask_and_scale=False
            )
        assert list(ds.data_vars) == [level]
        assert ds[level].dims == OME_AXES
        assert ds[level].dtype == expected.dtype
        np.testing.assert_array_equal(ds[level].values, expected, err_msg=f"{version} {level}")
        assert ds.attrs == attrs


def test_xarray_default_probes_for_consolidated_metadata(
    mounts: dict[str, Path], sample: SampleDandiset
) -> None:
    """xarray's default (consolidated=None) asks for .zmetadata first: on the plain mount it is
    missing (ENOENT from the index, no S3 request) and xarray warns and reads the levels'
    metadata; with --consolidate it opens silently."""
    import xarray as xr

    expected = ome_levels(sample, V2)["0"]
    kwargs: dict[str, Any] = {"drop_variables": ["1", "2"], "mask_and_scale": False}
    with pytest.warns(RuntimeWarning, match="consolidated metadata"):
        ds = xr.open_zarr(str(mounts["plain"] / V2 / OME_PATH), **kwargs)
    np.testing.assert_array_equal(ds["0"].values, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. "no consolidated metadata"
        ds = xr.open_zarr(str(mounts["consolidated"] / V2 / OME_PATH), **kwargs)
    np.testing.assert_array_equal(ds["0"].values, expected)


# --- dask -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_dask_from_zarr_on_worker_threads(
    mounts: dict[str, Path], sample: SampleDandiset, kind: str
) -> None:
    """dask reads chunks on 4 threads at once (concurrent reads of the mount); every level of
    every version and the format 3 array come out as written, and so do reductions over them."""
    import dask
    import dask.array as da

    with dask.config.set(scheduler="threads", num_workers=4):
        for version in VERSIONS:
            expected_arrays = {
                f"{OME_PATH}/{level}": values
                for level, values in ome_levels(sample, version).items()
            }
            expected_arrays[ARRAY_PATH] = sample.versions[version].arrays[ARRAY_PATH]
            for path, expected in expected_arrays.items():
                array = da.from_zarr(str(mounts[kind] / version / path))
                assert array.npartitions > 1
                np.testing.assert_array_equal(array.compute(), expected, err_msg=path)
                total = array.astype(np.float64).sum(axis=0).compute()
                np.testing.assert_allclose(total, expected.astype(np.float64).sum(axis=0))


# --- ome-zarr -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", VERSIONS)
def test_ome_zarr_reader(
    mounts: dict[str, Path], sample: SampleDandiset, kind: str, version: str
) -> None:
    """ome-zarr's reader finds the image's multiscales (and, in V2, its OMERO channels) and its
    lazy levels hold the published values."""
    import dask
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    location = parse_url(str(mounts[kind] / version / OME_PATH), mode="r", fmt=FormatV04())
    assert location is not None
    nodes = list(Reader(location)())
    assert len(nodes) == 1  # no labels
    image = nodes[0]
    assert image.load(Multiscales) is not None
    attrs = json.loads(sample.versions[version].files[f"{OME_PATH}/.zattrs"])
    multiscales = attrs["multiscales"][0]
    assert [axis["name"] for axis in image.metadata["axes"]] == list(OME_AXES)
    assert image.metadata["coordinateTransformations"] == [
        d["coordinateTransformations"] for d in multiscales["datasets"]
    ]
    if "omero" in attrs:
        labels = [channel["label"] for channel in attrs["omero"]["channels"]]
        assert image.metadata["channel_names"] == labels
    else:
        assert "channel_names" not in image.metadata
    expected = ome_levels(sample, version)
    assert len(image.data) == len(expected)
    with dask.config.set(scheduler="threads", num_workers=4):
        for data, (level, values) in zip(image.data, expected.items(), strict=True):
            np.testing.assert_array_equal(data.compute(), values, err_msg=level)
