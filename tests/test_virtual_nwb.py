"""NWB files written with pynwb -> virtual Zarr views: values equal h5py's, xarray opens the groups,
and building the view of a 64 MiB NWB whose data sits in large chunks reads little of it."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import xarray as xr
import zarr

from test_virtual_extract import check_view, memory_store  # the shared comparison with h5py
from zarrfs.virtual import ChunkRef, VirtualZarr, extract, extract_local

pynwb = pytest.importorskip("pynwb")
from hdmf.backends.hdf5.h5_utils import H5DataIO  # noqa: E402
from pynwb.ecephys import ElectricalSeries  # noqa: E402
from pynwb.image import ImageSeries  # noqa: E402

START = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def new_nwbfile(n_electrodes: int) -> tuple[Any, Any]:
    nwb = pynwb.NWBFile(
        session_description="virtual zarr test",
        identifier="virtual-zarr-test",
        session_start_time=START,
    )
    device = nwb.create_device(name="probe")
    group = nwb.create_electrode_group(
        name="shank0", description="a shank", location="CA1", device=device
    )
    for i in range(n_electrodes):
        nwb.add_electrode(group=group, location=f"CA{1 + i % 3}", x=float(i), y=0.0, z=-1.5)
    region = nwb.create_electrode_table_region(list(range(n_electrodes)), "all electrodes")
    return nwb, region


def write_small_nwb(path: Path) -> None:
    rng = np.random.default_rng(2)
    nwb, region = new_nwbfile(16)
    data = rng.integers(-2000, 2000, size=(30_011, 16), dtype="i2")
    nwb.add_acquisition(
        ElectricalSeries(
            name="ElectricalSeries",
            data=H5DataIO(data, compression="gzip", chunks=(4096, 16), shuffle=True),
            electrodes=region,
            rate=30_000.0,
            conversion=0.195e-6,
        )
    )
    frames = rng.integers(0, 255, size=(12, 48, 64), dtype="u1")
    nwb.add_acquisition(
        ImageSeries(
            name="ImageSeries",
            data=H5DataIO(frames, compression="gzip", chunks=(1, 48, 64)),
            unit="n.a.",
            rate=15.0,
        )
    )
    nwb.add_acquisition(
        ImageSeries(name="RawFrames", data=frames[:5], unit="n.a.", timestamps=np.arange(5) / 7.0)
    )
    with pynwb.NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)


@pytest.fixture(scope="module")
def small_nwb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VirtualZarr]:
    path = tmp_path_factory.mktemp("virtual-nwb") / "sub-01_ecephys.nwb"
    write_small_nwb(path)
    return path, extract_local(path, timeout=120)


def test_nwb_arrays_equal_h5py(small_nwb: tuple[Path, VirtualZarr]) -> None:
    path, view = small_nwb
    compared, skipped = check_view(path, view)
    for name in [
        "acquisition/ElectricalSeries/data",
        "acquisition/ElectricalSeries/electrodes",
        "acquisition/ImageSeries/data",
        "acquisition/RawFrames/data",
        "acquisition/RawFrames/timestamps",
        "general/extracellular_ephys/electrodes/id",
        "general/extracellular_ephys/electrodes/location",
        "general/extracellular_ephys/electrodes/x",
        "general/extracellular_ephys/electrodes/group_name",
        "session_start_time",
        "file_create_date",
    ]:
        assert name in compared, (name, skipped.get(name))
    # The electrodes' `group` column holds object references: listed, with the reason.
    assert "references" in skipped["general/extracellular_ephys/electrodes/group"]
    assert all("reference" in reason for reason in skipped.values()), skipped
    data = json.loads(view.get("acquisition/ElectricalSeries/data/.zarray"))
    assert data["chunks"] == [4096, 16] and data["compressor"]["id"] == "zlib"
    assert isinstance(view.get("acquisition/ElectricalSeries/data/7.0"), ChunkRef)
    # The DynamicTableRegion's `table` attribute: LINDI's reference form.
    attrs = json.loads(view.get("acquisition/ElectricalSeries/electrodes/.zattrs"))
    ref = attrs["table"]["_REFERENCE"]
    assert ref["path"] == "/general/extracellular_ephys/electrodes" and ref["object_id"]
    # The electrode group's device is a soft link in NWB.
    device = json.loads(view.get("general/extracellular_ephys/shank0/device/.zattrs"))
    assert device == {"_SOFT_LINK": {"path": "/general/devices/probe"}}


def test_xarray_opens_nwb_groups(small_nwb: tuple[Path, VirtualZarr]) -> None:
    path, view = small_nwb
    store = memory_store(view, path.read_bytes())
    es = xr.open_zarr(store, group="acquisition/ElectricalSeries", consolidated=False)
    assert es["data"].shape == (30_011, 16)
    assert es.attrs["neurodata_type"] == "ElectricalSeries"
    assert es["data"].attrs["conversion"] == pytest.approx(0.195e-6)
    direct = np.asarray(
        zarr.open_array(store, path="acquisition/ElectricalSeries/data", mode="r")[:100]
    )
    np.testing.assert_array_equal(es["data"][:100].values, direct)
    electrodes = xr.open_zarr(
        store, group="general/extracellular_ephys/electrodes", consolidated=False
    )
    assert list(electrodes["location"].values[:3]) == ["CA1", "CA2", "CA3"]
    assert electrodes["x"].values.tolist() == [float(i) for i in range(16)]


def write_large_nwb(path: Path) -> None:
    """~64 MiB: four 16 MiB ElectricalSeries in 1 MiB chunks, plus the usual metadata, interleaved
    as pynwb writes them."""
    rng = np.random.default_rng(3)
    nwb, region = new_nwbfile(64)
    for i in range(4):
        data = rng.integers(-(2**15), 2**15, size=(131_072, 64), dtype="i2")
        nwb.add_acquisition(
            ElectricalSeries(
                name=f"ElectricalSeries{i}",
                data=H5DataIO(data, chunks=(8192, 64)),
                electrodes=region,
                rate=30_000.0,
            )
        )
        nwb.add_acquisition(
            pynwb.TimeSeries(
                name=f"Sync{i}", data=np.arange(100.0), unit="s", timestamps=np.arange(100.0)
            )
        )
    with pynwb.NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)


def test_large_nwb_extraction_reads_little(tmp_path: Path) -> None:
    """The issue's bound: building the view moves at most max(4 MiB, 10%) of a 64 MiB file, and
    never a byte of chunk data."""
    path = tmp_path / "large.nwb"
    write_large_nwb(path)
    blob = path.read_bytes()
    size = len(blob)
    assert 64 << 20 <= size <= 70 << 20
    requested: list[tuple[int, int]] = []

    async def read(offset: int, length: int) -> bytes:
        requested.append((offset, length))
        return blob[offset : offset + length]

    async def run() -> VirtualZarr:
        return await extract(read, size, deadline=trio.current_time() + 120)

    t0 = time.monotonic()
    view = trio.run(run)
    elapsed = time.monotonic() - t0
    moved = sum(length for _, length in requested)
    bound = max(4 << 20, size // 10)
    print(
        f"64 MiB NWB: {len(requested)} reads, {moved} bytes ({moved / size:.2%}), {elapsed:.2f} s"
    )
    assert moved <= bound, (moved, bound)
    # Chunk data is never read: only where HDF5's speculative metadata reads (512 bytes from an
    # object header) run past a header into the chunk after it, one aligned block may overlap it.
    chunks = sorted(
        (entry.offset, entry.offset + entry.length)
        for _, entry in view.iter_files()
        if isinstance(entry, ChunkRef) and entry.length >= 1 << 20
    )
    assert len(chunks) == 4 * 16
    for start, end in chunks:
        overlap = sum(
            max(0, min(end, offset + length) - max(start, offset)) for offset, length in requested
        )
        assert overlap <= 8192, (start, end, overlap)
    compared, _ = check_view(path, view)
    assert {f"acquisition/ElectricalSeries{i}/data" for i in range(4)} <= compared
