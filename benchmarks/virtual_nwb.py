"""An NWB file as a virtual Zarr (`--virtual-zarr`, issue 17) against reading it with h5py.

    python benchmarks/virtual_nwb.py              # 1 GiB ElectricalSeries, 20 ms + 100 MB/s, 1/2/4 workers
    python benchmarks/virtual_nwb.py --quick      # 96 MiB, the same cells, one run
    python benchmarks/virtual_nwb.py --series-mib 256 --runs 3 --json out.json

Writes one ElectricalSeries (int16, 384 channels, HDF5 chunks of 32,768 samples x 64 channels =
4 MiB raw, gzip level 4, as pynwb's H5DataIO writes it) into an NWB file with pynwb, uploads it as
DANDI uploads a blob into a `LocalS3` (moto in its own process) that adds 20 ms to every response and
paces every response body to 100 MB/s (one S3 connection), publishes it as `000917@0.251210.1200`,
then reads the series

  (a) whole, in one process, and
  (b) as a Dask reduction (the mean over time of every channel, computed as exact int64 sums) on a
      `distributed.LocalCluster` of 1, 2 and 4 worker processes (`--threads` threads each),

through five ways:

  h5py, mount     h5py on `MNT/sub-01/..._ecephys.nwb` of a zarrfs mount;
  h5py, HTTP      h5py on `fsspec.filesystem("http").open(url)` (its defaults), no mount;
  h5py, remfile   h5py on `remfile.File(url)` (its defaults), no mount;
  zarr, mount     zarr-python on `MNT/.../x.nwb.zarr/acquisition/ElectricalSeries/data` of a
                  mount started with `--virtual-zarr`; Dask: `da.from_zarr(that path)`;
  zarr, zarrfs:// the same array through the fsspec face, `zarrfs://000917@.../x.nwb.zarr/...`
                  with `virtual_zarr=True` and one cache dir shared by the client and the workers.

For Dask over h5py, each worker process opens the file itself, once, and keeps it open
(`H5Dataset`, a picklable handle that carries only where the file is, as xarray's file manager does),
and `da.from_array(..., lock=True)` serializes the reads of the threads of one process (h5py runs
one call at a time in a process anyway); the Dask chunks are the HDF5 chunks, as `da.from_zarr`'s
are the Zarr chunks.

Every cell runs in a fresh process (this script with `--probe`), on a fresh mount with a fresh cache
dir (cold), then once more in the same state (warm: same open file or array, same mount, same
cluster). Every result is checked against what was written: the whole read element by element, the
sums exactly. Requests and bytes are counted by the local S3 itself (`LocalS3.stats()`, body bytes
written to its sockets) once they have been still for 0.3 s. Also measured: building the virtual
view on first entry (fresh cache dir), loading it from the cache dir on a second mount, and the same
first entry through the fsspec face. Prints Markdown tables; `--json FILE` writes the raw figures.
See benchmarks/README.md ("NWB as a virtual Zarr").
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

MiB = 1 << 20
DANDISET = "000917"
VERSION = "0.251210.1200"
SOURCE = f"{DANDISET}@{VERSION}"
NWB_PATH = "sub-01/sub-01_ses-1_ecephys.nwb"
ZARR_PATH = NWB_PATH + ".zarr"
DATASET = "acquisition/ElectricalSeries/data"
CHANNELS = 384
RATE = 30_000.0
CHUNK_SAMPLES = 32_768
CHUNK_CHANNELS = 64
GZIP_LEVEL = 4
#: Objects at least this big are served by the local S3's fast path (see compare.py).
FAST_RANGE_MIN_SIZE = 8 * MiB
#: Seconds the S3 counters must stay still before a phase's figures are read.
SETTLE = 0.3
PROBE_TIMEOUT = 3600.0
WAYS = ("h5py-mount", "h5py-http", "h5py-remfile", "zarr-mount", "zarr-fsspec")
LABELS = {
    "h5py-mount": "h5py, zarrfs mount (x.nwb)",
    "h5py-http": "h5py, fsspec HTTP",
    "h5py-remfile": "h5py, remfile",
    "zarr-mount": "zarr-python, zarrfs mount (x.nwb.zarr)",
    "zarr-fsspec": "zarr-python, zarrfs:// (x.nwb.zarr)",
}
DASK_LABELS = {
    "h5py-mount": "from_array(h5py), zarrfs mount (x.nwb)",
    "h5py-http": "from_array(h5py), fsspec HTTP",
    "h5py-remfile": "from_array(h5py), remfile",
    "zarr-mount": "from_zarr, zarrfs mount (x.nwb.zarr)",
    "zarr-fsspec": "from_zarr, zarrfs:// (x.nwb.zarr)",
}
MOUNTED = ("h5py-mount", "zarr-mount")


def say(*args: object) -> None:
    print(*args, flush=True)


# --- the S3's counters ----------------------------------------------------------------------------


class Counter:
    """The local S3's request and byte counters (its statistics document), read from any process."""

    def __init__(self, endpoint: str) -> None:
        from zarrfs.demo.locals3 import STATS_PATH

        self.url = endpoint + STATS_PATH
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def now(self) -> dict[str, Any]:
        with self.opener.open(self.url, timeout=30) as response:
            doc: dict[str, Any] = json.loads(response.read())
            return doc

    def settled(self, quiet: float = SETTLE, limit: float = 30.0) -> dict[str, Any]:
        """The counters once they have not moved for `quiet` seconds (late readahead counts for
        what caused it), or after `limit` seconds."""
        last = self.now()
        still_since = time.monotonic()
        deadline = still_since + limit
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.now()
            if (now["requests"], now["bytes_sent"]) != (last["requests"], last["bytes_sent"]):
                last, still_since = now, time.monotonic()
            elif time.monotonic() - still_since >= quiet:
                break
        return last


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    return {
        "requests": after["requests"] - before["requests"],
        "bytes": after["bytes_sent"] - before["bytes_sent"],
        "gets": after["by_kind"].get("GET", 0) - before["by_kind"].get("GET", 0),
    }


# --- data -----------------------------------------------------------------------------------------


def make_voltage(samples: int, seed: int = 917) -> np.ndarray:
    """Something like a raw extracellular recording: a slow wave per channel plus noise (gzip
    keeps about 70 % of it, as it does of real raw ephys)."""
    rng = np.random.default_rng(seed)
    out = np.empty((samples, CHANNELS), np.int16)
    phase = (np.arange(CHANNELS) / 7.0).astype(np.float32)
    for start in range(0, samples, CHUNK_SAMPLES):
        stop = min(samples, start + CHUNK_SAMPLES)
        t = np.arange(start, stop, dtype=np.float32)[:, None]
        wave = 300 * np.sin(t / 600.0 + phase[None, :])
        noise = rng.standard_normal((stop - start, CHANNELS), dtype=np.float32) * 25
        out[start:stop] = (wave + noise).astype(np.int16)
    return out


def write_nwb(path: Path, voltage: np.ndarray) -> None:
    """The session file: 384 electrodes on 4 shanks and the ElectricalSeries, written by pynwb."""
    from hdmf.backends.hdf5 import H5DataIO
    from nwb_clients import add_probe
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.ecephys import ElectricalSeries

    nwb = NWBFile(
        session_description="virtual Zarr benchmark",
        identifier="zarrfs-virtual-nwb-bench",
        session_start_time=datetime(2025, 12, 10, 12, 0, tzinfo=UTC),
    )
    region = add_probe(nwb, CHANNELS, "384-channel probe", shank_pitch=250.0, depth=-1500.0)
    nwb.add_acquisition(
        ElectricalSeries(
            name="ElectricalSeries",
            description="raw voltage",
            data=H5DataIO(
                voltage,
                chunks=(min(CHUNK_SAMPLES, len(voltage)), CHUNK_CHANNELS),
                compression="gzip",
                compression_opts=GZIP_LEVEL,
            ),
            electrodes=region,
            rate=RATE,
            starting_time=0.0,
            conversion=1.95e-7,
        )
    )
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)


def stored_bytes(path: Path) -> tuple[int, int]:
    """(number of chunks, their stored bytes) of the series, from h5py's chunk index."""
    import h5py

    with h5py.File(path, "r") as f:
        dset = f[DATASET]
        n = dset.id.get_num_chunks()
        return n, sum(dset.id.get_chunk_info(i).size for i in range(n))


# --- reading (in the probe processes and the Dask workers) ---------------------------------------

#: Open HDF5 files of this process: (how, where) -> (h5py.File, the file object under it).
_OPEN: dict[tuple[str, str], tuple[Any, Any]] = {}


def open_h5(how: str, where: str) -> Any:
    """The h5py.File at `where` read `how` (a path on a mount, or a URL with fsspec or remfile),
    opened once per process."""
    import h5py

    key = (how, where)
    if key not in _OPEN:
        if how == "h5py-mount":
            handle: Any = None
            f = h5py.File(where, "r")
        elif how == "h5py-http":
            import fsspec

            handle = fsspec.filesystem("http").open(where, "rb")
            f = h5py.File(handle, "r")
        elif how == "h5py-remfile":
            import remfile

            handle = remfile.File(where)
            f = h5py.File(handle, "r")
        else:
            raise ValueError(how)
        _OPEN[key] = (f, handle)
    return _OPEN[key][0]


def close_h5() -> None:
    for f, handle in _OPEN.values():
        f.close()
        if handle is not None:
            handle.close()
    _OPEN.clear()


class H5Dataset:
    """A picklable handle on one HDF5 dataset: it carries where the file is, and each process that
    reads it opens the file once (`open_h5`), as xarray's CachingFileManager does."""

    def __init__(self, how: str, where: str, name: str) -> None:
        self.how, self.where, self.name = how, where, name
        dset = self.dataset()
        self.shape: tuple[int, ...] = dset.shape
        self.dtype = dset.dtype
        self.chunks: tuple[int, ...] = dset.chunks
        self.ndim = len(self.shape)

    def dataset(self) -> Any:
        return open_h5(self.how, self.where)[self.name]

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.dataset()[key])

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def preimport() -> None:
    """What a long-lived worker has imported before the job (not a cost of the job)."""
    import dask.array  # noqa: F401
    import fsspec.implementations.http  # noqa: F401
    import h5py  # noqa: F401
    import remfile  # noqa: F401
    import zarr  # noqa: F401

    import zarrfs.faces.fsspec  # noqa: F401


def open_array(way: str, where: str, options: dict[str, Any] | None) -> Any:
    """The series as the way's reader opens it: an h5py Dataset or a zarr Array."""
    if way.startswith("h5py"):
        return open_h5(way, where)[DATASET]
    import zarr

    return zarr.open_array(where, mode="r", storage_options=options)


def dask_array(way: str, where: str, options: dict[str, Any] | None) -> Any:
    import dask.array as da

    if way.startswith("h5py"):
        source = H5Dataset(way, where, DATASET)
        return da.from_array(source, chunks=source.chunks, lock=True, name=f"series-{way}")  # type: ignore[no-untyped-call]
    return da.from_zarr(where, storage_options=options)  # type: ignore[no-untyped-call,unused-ignore]


@dataclass
class Phase:
    """One timed step of a probe: seconds, of which opening, and what reached S3."""

    seconds: float
    opening: float
    requests: int
    bytes: int
    gets: int
    load: float


def run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """One cell, in this (fresh) process: cold, then warm in the same state."""
    import fsspec

    from zarrfs.faces.fsspec import ZarrfsFileSystem

    fsspec.register_implementation("zarrfs", ZarrfsFileSystem, clobber=True)
    counter = Counter(spec["endpoint"])
    way, where, options = spec["way"], spec.get("where", ""), spec.get("options")
    preimport()
    # first-use costs of the readers (numcodecs, zarr's codec pipeline, h5py's filters) on a
    # local copy, not measured
    if spec["task"] != "view-fsspec":
        import zarr

        warm = zarr.create_array(
            zarr.storage.MemoryStore(), shape=(64, 8), chunks=(32, 8), dtype="i2", zarr_format=2,
            compressors=None, filters=None,
        )  # fmt: skip
        warm[:] = 1
        np.asarray(warm[:])
        import h5py

        with h5py.File(spec["local_nwb"], "r") as f:
            f[DATASET][:8, :8]
    phases: dict[str, Phase] = {}
    if spec["task"] == "view-fsspec":
        fs = fsspec.filesystem("zarrfs", skip_instance_cache=True, **(options or {}))
        fs.ls(f"{SOURCE}/sub-01")  # the version resolved: not part of the view's cost
        before = counter.settled()
        start = time.perf_counter()
        names = fs.ls(f"{SOURCE}/{ZARR_PATH}", detail=False)
        seconds = time.perf_counter() - start
        d = delta(before, counter.settled())
        if not any(n.endswith("/acquisition") for n in names):
            raise AssertionError(f"the view's root lists {names}")
        phases["cold"] = Phase(seconds, seconds, **d, load=os.getloadavg()[0])
        return {"phases": {k: asdict(v) for k, v in phases.items()}}

    expected_sums = np.load(spec["sums"])
    voltage = np.load(spec["voltage"], mmap_mode="r")
    if spec["task"] == "whole":
        array: Any = None
        for phase in ("cold", "warm"):
            load = os.getloadavg()[0]
            before = counter.settled()
            start = time.perf_counter()
            if array is None:
                array = open_array(way, where, options)
            opened = time.perf_counter() - start
            got = np.asarray(array[:])
            seconds = time.perf_counter() - start
            d = delta(before, counter.settled())
            if got.shape != voltage.shape or not np.array_equal(got, voltage):
                raise AssertionError(f"{way}: the series read differs from what was written")
            del got
            phases[phase] = Phase(seconds, opened, **d, load=load)
        close_h5()
        return {"phases": {k: asdict(v) for k, v in phases.items()}}

    from distributed import Client, LocalCluster

    with (
        LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=spec["workers"],
            threads_per_worker=spec["threads"],
            processes=True,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,  # type: ignore[no-untyped-call]
    ):
        client.run(preimport)
        for phase in ("cold", "warm"):
            load = os.getloadavg()[0]
            before = counter.settled()
            start = time.perf_counter()
            x = dask_array(way, where, options)
            opened = time.perf_counter() - start
            sums = np.asarray(x.sum(axis=0, dtype=np.int64).compute())
            seconds = time.perf_counter() - start
            d = delta(before, counter.settled())
            if not np.array_equal(sums, expected_sums):
                raise AssertionError(f"{way}: per-channel sums differ from what was written")
            phases[phase] = Phase(seconds, opened, **d, load=load)
    close_h5()
    return {"phases": {k: asdict(v) for k, v in phases.items()}}


# --- the parent: mounts, probes, figures ------------------------------------------------------------


@dataclass
class Setup:
    s3: Any
    target: Any
    url: str
    work: Path
    local_nwb: Path
    voltage: Path
    sums: Path


@contextmanager
def mount(setup: Setup, base: Path, cache: Path | None = None) -> Iterator[Any]:
    """A zarrfs mount (`--virtual-zarr`) of the version at `base/mnt`, unmounted at the end."""
    from harness import ZARRFS, start_mount

    m = start_mount(
        ZARRFS, setup.s3, setup.target, base / "mnt", cache or base / "cache",
        zarrfs_options=["--virtual-zarr"],
    )  # fmt: skip
    try:
        yield m
    finally:
        m.stop()


def fsspec_options(setup: Setup, cache: Path) -> dict[str, Any]:
    return {
        "endpoint_url": setup.s3.endpoint_url,
        "manifest_root": f"s3://{setup.s3.bucket}/zarr-manifest/",
        "api_url": "http://127.0.0.1:9/api",
        "cache_dir": str(cache),
        "virtual_zarr": True,
    }


def probe(setup: Setup, spec: dict[str, Any]) -> dict[str, Any]:
    spec = {
        **spec,
        "endpoint": setup.s3.endpoint_url,
        "local_nwb": str(setup.local_nwb),
        "voltage": str(setup.voltage),
        "sums": str(setup.sums),
    }
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--probe", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(
            f"FAIL: probe {spec['task']} {spec['way']} exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    out: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return out


def run_cell(
    setup: Setup, task: str, way: str, workers: int = 0, threads: int = 0
) -> dict[str, Any]:
    """One cell on fresh state: a fresh mount and cache dir (mount ways), a fresh cache dir
    (zarrfs://), nothing to prepare (HTTP, remfile)."""
    base = Path(tempfile.mkdtemp(prefix=f"{task}-{way}-", dir=setup.work))
    spec: dict[str, Any] = {"task": task, "way": way, "workers": workers, "threads": threads}
    try:
        if way in MOUNTED:
            with mount(setup, base) as m:
                path = NWB_PATH if way == "h5py-mount" else f"{ZARR_PATH}/{DATASET}"
                out = probe(setup, {**spec, "where": str(m.mnt / path)})
                out["daemon_peak_rss"] = m.peak_rss()
                out["daemon_cpu"] = m.cpu_seconds()
        elif way == "zarr-fsspec":
            where = f"zarrfs://{SOURCE}/{ZARR_PATH}/{DATASET}"
            out = probe(
                setup, {**spec, "where": where, "options": fsspec_options(setup, base / "cache")}
            )
        else:
            out = probe(setup, {**spec, "where": setup.url})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


BUILT = re.compile(
    r"built the virtual Zarr view of (?P<what>\S+): (?P<chunks>\d+) chunks, (?P<inline>\d+) "
    r"inline files, (?P<mib>[\d.]+) MiB of the blob read by the extractor in (?P<s>[\d.]+) s"
)


def view_build(setup: Setup) -> dict[str, Any]:
    """The first entry into x.nwb.zarr on a fresh mount, then on a second mount over the same
    cache dir (the stored view), then through the fsspec face with a fresh cache dir."""
    counter = Counter(setup.s3.endpoint_url)
    base = Path(tempfile.mkdtemp(prefix="view-", dir=setup.work))
    cache = base / "cache"
    out: dict[str, Any] = {}
    try:
        for name in ("fresh cache dir", "view stored in the cache dir"):
            with mount(setup, base / name.replace(" ", "-"), cache) as m:
                os.listdir(m.mnt / "sub-01")  # the version resolved: not part of the view's cost
                load = os.getloadavg()[0]
                before = counter.settled()
                start = time.perf_counter()
                names = os.listdir(m.mnt / ZARR_PATH)
                seconds = time.perf_counter() - start
                d = delta(before, counter.settled())
                if "acquisition" not in names:
                    raise SystemExit(f"FAIL: the view's root lists {names}")
                built = BUILT.search(m.log.read_text(errors="replace"))
                stored = sorted((cache / "virtual").glob("*/*.vzarr"))
                out[f"mount, {name}"] = {
                    "seconds": seconds, **d, "load": load,
                    "extractor_mib": float(built["mib"]) if built else None,
                    "extractor_seconds": float(built["s"]) if built else None,
                    "chunks": int(built["chunks"]) if built else None,
                    "inline_files": int(built["inline"]) if built else None,
                    "stored_view_bytes": stored[0].stat().st_size if stored else None,
                }  # fmt: skip
        face = probe(
            setup,
            {
                "task": "view-fsspec",
                "way": "zarr-fsspec",
                "options": fsspec_options(setup, base / "face"),
            },
        )["phases"]["cold"]
        out["zarrfs://, fresh cache dir"] = {
            "seconds": face["seconds"], "requests": face["requests"], "bytes": face["bytes"],
            "gets": face["gets"], "load": face["load"],
        }  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def s3_floor(url: str) -> dict[str, float]:
    """What one GET costs: 1 byte (latency + moto), and 16 MiB (latency + pacing)."""
    import requests

    session = requests.Session()
    session.trust_env = False
    out: dict[str, float] = {}
    for name, size, n in (("1 byte", 1, 10), ("16 MiB", 16 * MiB, 3)):
        times = []
        for _ in range(n):
            start = time.perf_counter()
            r = session.get(url, headers={"Range": f"bytes=0-{size - 1}"}, timeout=60)
            times.append(time.perf_counter() - start)
            assert r.status_code == 206 and len(r.content) == size, r.status_code
        out[name] = statistics.median(times)
    session.close()
    return out


def wait_for_load(limit: float, max_wait: float = 1200.0, poll: float = 30.0) -> float:
    """Wait (at most `max_wait` s) until the 1-minute load average is below `limit`."""
    waited = 0.0
    while os.getloadavg()[0] > limit and waited < max_wait:
        say(f"  load {os.getloadavg()[0]:.2f} > {limit:g}: waiting {poll:g} s")
        time.sleep(poll)
        waited += poll
    return os.getloadavg()[0]


# --- report ---------------------------------------------------------------------------------------


@dataclass
class Results:
    machine: list[str]
    settings: dict[str, Any]
    floor: dict[str, float] = field(default_factory=dict)
    view: list[dict[str, Any]] = field(default_factory=list)
    #: way -> the runs' probe results
    whole: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: "way|workers" -> the runs' probe results
    dask: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)
    duration: float = 0.0


def med(runs: list[dict[str, Any]], phase: str, key: str) -> float:
    return float(statistics.median(r["phases"][phase][key] for r in runs))


def report(r: Results) -> str:
    s = r.settings
    stored = s["stored_bytes"]
    lines = [f"- {line}" for line in r.machine]
    lines += [
        f"- `python benchmarks/virtual_nwb.py{s['argv']}`; {s['runs']} run(s) per cell (medians); "
        f"1-minute load {min(r.loads):.2f}-{max(r.loads):.2f} during the cells; the run took "
        f"{r.duration / 60:.0f} min",
        f"- series {s['samples']:,} x {CHANNELS} int16 = {s['raw_bytes'] / MiB:,.0f} MiB raw, "
        f"{s['n_chunks']} HDF5 chunks of {CHUNK_SAMPLES:,} x {CHUNK_CHANNELS} (gzip {GZIP_LEVEL}), "
        f"{stored / MiB:,.0f} MiB stored; NWB blob {s['blob_bytes'] / MiB:,.0f} MiB",
        f"- one GET from the local S3: {r.floor['1 byte'] * 1000:.0f} ms for 1 byte, "
        f"{r.floor['16 MiB'] * 1000:.0f} ms for 16 MiB",
    ]
    if r.view:
        lines += view_table(r)
    if r.whole:
        lines += whole_table(r)
    if r.dask:
        lines += dask_table(r)
    return "\n".join(lines)


def view_table(r: Results) -> list[str]:
    s = r.settings
    lines = [
        "",
        "Building the view (first `os.listdir(x.nwb.zarr)`; medians):",
        "",
        "| how | s | S3 requests | MiB from S3 | % of the blob | extractor read (MiB, s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for how in r.view[0]:
        rows = [v[how] for v in r.view]
        sec = statistics.median(x["seconds"] for x in rows)
        req = statistics.median(x["requests"] for x in rows)
        moved = statistics.median(x["bytes"] for x in rows)
        ex = rows[0].get("extractor_mib")
        ext = (
            f"{ex:.2f}, {statistics.median(x['extractor_seconds'] for x in rows):.2f}"
            if ex is not None
            else "-"
        )
        lines.append(
            f"| {how} | {sec:.2f} | {req:.0f} | {moved / MiB:.2f} "
            f"| {100 * moved / s['blob_bytes']:.2f} % | {ext} |"
        )
    first = r.view[0]["mount, fresh cache dir"]
    lines += [
        "",
        f"The view: {first['chunks']} chunk files, {first['inline_files']} inline files, "
        f"{(first['stored_view_bytes'] or 0) / 1024:.0f} KiB stored in the cache dir.",
    ]
    return lines


def whole_table(r: Results) -> list[str]:
    s = r.settings
    stored = s["stored_bytes"]
    lines = [
        "",
        "(a) The whole series in one process (`data[:]`; cold: fresh mount, cache dir or file "
        "object, including the first entry into the view; warm: the same open file or array "
        "again):",
        "",
        "| way | cold s | MB/s (raw) | S3 requests | MiB from S3 | from S3 / stored | warm s "
        "| warm MiB from S3 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for way, runs in r.whole.items():
        cold = med(runs, "cold", "seconds")
        moved = med(runs, "cold", "bytes")
        lines.append(
            f"| {LABELS[way]} | {cold:.2f} | {s['raw_bytes'] / cold / 1e6:.0f} "
            f"| {med(runs, 'cold', 'requests'):.0f} | {moved / MiB:.0f} | {moved / stored:.2f} "
            f"| {med(runs, 'warm', 'seconds'):.2f} | {med(runs, 'warm', 'bytes') / MiB:.0f} |"
        )
    return lines


def dask_table(r: Results) -> list[str]:
    s = r.settings
    stored = s["stored_bytes"]
    lines = [
        "",
        f"(b) Dask: the mean over time of every channel (`x.sum(axis=0, dtype=int64)`), "
        f"{s['threads']} threads per worker process; cold: fresh cluster, mount, cache dir "
        "(includes opening in the client and, for x.nwb.zarr, building the view); warm: the "
        "same cluster again:",
        "",
        "| way | workers | cold s (runs) | of which opening | warm s | S3 requests cold "
        "| MiB from S3 cold | from S3 / stored | cold speed-up vs 1 worker |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for way in WAYS:
        keys = [k for k in r.dask if k.split("|")[0] == way]
        if not keys:
            continue
        base = med(r.dask[keys[0]], "cold", "seconds")
        for key in keys:
            runs = r.dask[key]
            cold = med(runs, "cold", "seconds")
            each = ", ".join(f"{x['phases']['cold']['seconds']:.1f}" for x in runs)
            moved = med(runs, "cold", "bytes")
            lines.append(
                f"| {DASK_LABELS[way]} | {key.split('|')[1]} | {cold:.2f} ({each}) "
                f"| {med(runs, 'cold', 'opening'):.2f} | {med(runs, 'warm', 'seconds'):.2f} "
                f"| {med(runs, 'cold', 'requests'):.0f} | {moved / MiB:.0f} | {moved / stored:.2f} "
                f"| {base / cold:.2f}x |"
            )
    return lines


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 96 MiB series, one run per cell")
    parser.add_argument("--series-mib", type=float, help="raw size of the series (default 1032)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds added per response")
    parser.add_argument(
        "--stream-bandwidth", type=float, default=100.0,
        help="MB/s every response body is paced to (0: unpaced)",
    )  # fmt: skip
    parser.add_argument("--workers", default="1,2,4", help="Dask worker process counts")
    parser.add_argument("--threads", type=int, default=4, help="threads per Dask worker")
    parser.add_argument("--runs", type=int, help="runs per cell (default 1)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"of {','.join(WAYS)}")
    parser.add_argument("--parts", default="view,whole,dask", help="of view,whole,dask")
    parser.add_argument("--wait-load", type=float, help="before the cells, wait (at most 20 min) "
                        "until the 1-minute load is below this")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, help="scratch (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        # through the module's importable name, so that Dask pickles H5Dataset by reference and
        # each worker keeps its open files in that module
        me = importlib.import_module("virtual_nwb")
        print("RESULT " + json.dumps(me.run_probe(json.loads(args.probe))), flush=True)
        return 0
    series_mib = args.series_mib or (96.0 if args.quick else 1032.0)
    runs = args.runs or 1
    ways = [w for w in args.ways.split(",") if w]
    parts = set(args.parts.split(","))
    worker_counts = [int(n) for n in args.workers.split(",")]
    rows = max(1, round(series_mib * MiB / (CHUNK_SAMPLES * CHANNELS * 2)))
    samples = rows * CHUNK_SAMPLES

    from harness import Target, machine_info, publish, upload_blob_parts

    from zarrfs.demo.locals3 import LocalS3

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="zarrfs-virtual-nwb-", dir=args.work_dir))
    try:
        say(
            f"writing a {samples:,} x {CHANNELS} int16 series ({samples * CHANNELS * 2 / MiB:,.0f} MiB) with pynwb ..."
        )
        voltage = make_voltage(samples)
        local_nwb = work / "bench.nwb"
        write_nwb(local_nwb, voltage)
        np.save(work / "voltage.npy", voltage)
        np.save(work / "sums.npy", voltage.sum(axis=0, dtype=np.int64))
        raw_bytes = voltage.nbytes
        del voltage
        n_chunks, stored = stored_bytes(local_nwb)
        size = local_nwb.stat().st_size
        say(f"  {size / MiB:,.0f} MiB NWB, {n_chunks} chunks, {stored / MiB:,.0f} MiB stored "
            f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
        # moto keeps objects up to this size in memory rather than in a temporary file
        os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(size + MiB)
        with (
            LocalS3(
                latency=args.latency,
                fast_range_min_size=FAST_RANGE_MIN_SIZE,
                stream_bandwidth=args.stream_bandwidth * 1e6,
            ) as s3,
            open(local_nwb, "rb") as f,
        ):
            fd = f.fileno()
            blob = upload_blob_parts(s3, NWB_PATH, size, lambda o, n: os.pread(fd, n, o))
            publish(s3, DANDISET, VERSION, [], [blob])
            target = Target(DANDISET, VERSION, None, blob)  # type: ignore[arg-type]
            url = f"{s3.endpoint_url}/{s3.bucket}/{blob.key}"
            setup = Setup(s3, target, url, work, local_nwb, work / "voltage.npy", work / "sums.npy")
            say(f"  published as {SOURCE}/{NWB_PATH} ({time.perf_counter() - started:.0f} s)")
            results = Results(
                machine=machine_info(args.latency * 1000, args.stream_bandwidth),
                settings={
                    "argv": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
                    "samples": samples, "raw_bytes": raw_bytes, "n_chunks": n_chunks,
                    "stored_bytes": stored, "blob_bytes": size, "runs": runs,
                    "threads": args.threads, "workers": worker_counts, "ways": ways,
                    "latency": args.latency, "stream_bandwidth_mb_s": args.stream_bandwidth,
                },
            )  # fmt: skip
            say("\n".join(results.machine))
            s3_floor(url)  # the fast path's copy of the blob is made here, not in a cell
            results.floor = s3_floor(url)
            if args.wait_load is not None:
                say(f"load before the cells: {wait_for_load(args.wait_load):.2f}")
            for run in range(runs):
                rotated = ways[run % len(ways) :] + ways[: run % len(ways)]
                if "view" in parts:
                    results.view.append(view_build(setup))
                    say(f"run {run + 1}: view {json.dumps(results.view[-1])}")
                    results.loads.append(os.getloadavg()[0])
                if "whole" in parts:
                    for way in rotated:
                        out = run_cell(setup, "whole", way)
                        results.whole.setdefault(way, []).append(out)
                        c, w = out["phases"]["cold"], out["phases"]["warm"]
                        results.loads.append(c["load"])
                        say(f"run {run + 1}: whole, {LABELS[way]}: cold {c['seconds']:.2f} s "
                            f"({c['requests']} requests, {c['bytes'] / MiB:.0f} MiB), warm "
                            f"{w['seconds']:.2f} s; load {c['load']:.2f}")  # fmt: skip
                if "dask" in parts:
                    for n in worker_counts:
                        for way in rotated:
                            out = run_cell(setup, "dask", way, n, args.threads)
                            results.dask.setdefault(f"{way}|{n}", []).append(out)
                            c, w = out["phases"]["cold"], out["phases"]["warm"]
                            results.loads.append(c["load"])
                            say(f"run {run + 1}: dask x{n}, {DASK_LABELS[way]}: cold "
                                f"{c['seconds']:.2f} s (opening {c['opening']:.2f}; "
                                f"{c['requests']} requests, {c['bytes'] / MiB:.0f} MiB), warm "
                                f"{w['seconds']:.2f} s; load {c['load']:.2f}")  # fmt: skip
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    # the dask cells are kept in worker-count order for the table
    results.dask = dict(
        sorted(results.dask.items(), key=lambda kv: (kv[0].split("|")[0], int(kv[0].split("|")[1])))
    )
    results.duration = time.perf_counter() - started
    say()
    say(report(results))
    if args.json:
        args.json.write_text(json.dumps(asdict(results), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
