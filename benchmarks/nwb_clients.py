"""NWB through a zarrfs mount vs. without it, and what Zarr clients' probes of missing keys cost.

    python benchmarks/nwb_clients.py              # a 32 MiB ElectricalSeries, 20 ms latency, 3 rounds
    python benchmarks/nwb_clients.py --quick      # 8 MiB, 1 round
    python benchmarks/nwb_clients.py --latency 0 --rounds 5 --json out.json

Writes a real NWB file with pynwb (one long ElectricalSeries on 64 electrodes, gzip-compressed in
2 MiB chunks, plus the LFP, trials and units a session file usually carries) and a small OME-Zarr
(format 2) into a `LocalS3` with latency, publishes both as a dandiset version, and puts
`faultproxy.py` (no faults: a counter of requests, bytes and statuses, in its own process) between
every client and the S3. Then, each round on fresh state:

1. NWB, three ways to read the same object: (a) pynwb on a zarrfs mount of the version (a new
   mount and cache dir per round, and once more warm on the same mount), (b) pynwb on h5py on
   `remfile.File(url)`, (c) pynwb on h5py on `fsspec.filesystem("http").open(url)` (its defaults:
   5 MiB blocks, read-ahead cache); `url` is the object's anonymous HTTP URL on the local S3. Each
   is timed and counted in phases: connect (remfile/fsspec: the size request), `h5py.File`,
   `NWBHDF5IO(file=..., load_namespaces=True)` (reads the specifications cached in the file),
   `.read()`, `data[:1000, :]` and `data[:]` of the ElectricalSeries. The same
   phases on a local copy through a counting file object show how many reads h5py itself makes.
2. Zarr clients (zarr-python, xarray's default `open_zarr`, ome-zarr's reader, dask on 4 threads)
   on the OME-Zarr, through a fresh mount each, and without a mount over fsspec HTTP and s3fs
   (anonymous): requests, how many of them were 404s (a probe of a missing key), and, through the
   mount, how many missing keys the client asked for (opens of paths that do not exist, seen by an
   audit hook).

Every value read is compared with what was written. Prints Markdown tables (copy them into
RESULTS.md yourself); `--json FILE` also writes the raw figures. Needs `/dev/fuse`, `fusermount3`
and the test extra (pynwb, remfile, fsspec[http], s3fs, xarray, dask, ome-zarr). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from soak import Proxy, machine_info

from zarrfs.demo.locals3 import LocalS3
from zarrfs.demo.sample import (
    ManifestLeaf,
    blob_key,
    build_manifest,
    dandi_etag,
    format_manifest,
    manifest_key,
    read_tree,
    to_yaml,
    upload_as_dandi,
    write_nwb,
    zarr_checksum_of,
)

DANDISET = "000980"
VERSION = "0.251201.1200"
NWB_PATH = "sub-01/sub-01_ses-1_ecephys.nwb"
ZARR_PATH = "sub-01/sub-01_sample.ome.zarr"
SERIES = "acquisition/ElectricalSeries"
CHANNELS = 64
RATE = 30_000.0
#: Samples per HDF5 chunk of the ElectricalSeries: 16,384 x 64 int16 = 2 MiB.
CHUNK_SAMPLES = 16_384
OME_AXES = ["c", "z", "y", "x"]
MOUNT_DEADLINE = 60.0
MiB = 1 << 20
T = TypeVar("T")


# --- data -----------------------------------------------------------------------------------------


@dataclass
class Written:
    nwb: bytes
    voltage: np.ndarray
    zarr_files: dict[str, bytes]
    levels: dict[str, np.ndarray]


def add_probe(
    nwb: Any, channels: int, description: str, *, shank_pitch: float, depth: float
) -> Any:
    """A probe of `channels` electrodes on 4 shanks in CA1 added to `nwb` (its electrodes table),
    and the table region of all of them, as an ElectricalSeries takes it."""
    device = nwb.create_device(name="probe0", description=description)
    for shank in range(4):
        group = nwb.create_electrode_group(
            name=f"shank{shank}", description="a shank", location="CA1", device=device
        )
        for site in range(channels // 4):
            nwb.add_electrode(
                x=shank * shank_pitch, y=float(site * 20), z=depth, location="CA1", group=group
            )
    return nwb.create_electrode_table_region(list(range(channels)), "all electrodes")


def make_nwb(samples: int, tmp: Path) -> tuple[bytes, np.ndarray]:
    """A session file as DANDI holds many: raw ephys (one long ElectricalSeries), LFP, trials, units."""
    from hdmf.backends.hdf5 import H5DataIO
    from pynwb import NWBFile
    from pynwb.ecephys import LFP, ElectricalSeries
    from pynwb.file import Subject

    rng = np.random.default_rng(970)
    nwb = NWBFile(
        session_description="benchmark session",
        identifier="zarrfs-bench-ecephys",
        session_start_time=datetime(2025, 12, 1, 10, 0, tzinfo=UTC),
        file_create_date=[datetime(2025, 12, 1, 12, 0, tzinfo=UTC)],
        experimenter=["Doe, Jane"],
        lab="zarrfs lab",
        institution="zarrfs institute",
        subject=Subject(subject_id="01", species="Mus musculus", sex="M", age="P60D"),
    )
    region = add_probe(nwb, CHANNELS, "64-channel silicon probe", shank_pitch=200.0, depth=-1200.0)
    t = np.arange(samples, dtype=np.float64)[:, None]
    wave = 600 * np.sin(t / 41.0 + np.arange(CHANNELS)[None, :] / 3.0)
    voltage = (wave + rng.normal(0, 40, size=(samples, CHANNELS))).astype(np.int16)
    nwb.add_acquisition(
        ElectricalSeries(
            name="ElectricalSeries",
            description="raw voltage",
            data=H5DataIO(
                voltage,
                chunks=(min(CHUNK_SAMPLES, samples), CHANNELS),
                compression="gzip",
                compression_opts=4,
            ),
            electrodes=region,
            rate=RATE,
            starting_time=0.0,
            conversion=1.95e-7,
        )
    )
    ecephys = nwb.create_processing_module(name="ecephys", description="processed ephys")
    lfp = LFP(name="LFP")
    ecephys.add(lfp)  # attached first, so its series' electrode region shares the file's table
    lfp.create_electrical_series(
        name="ElectricalSeries",
        data=H5DataIO(voltage[::24].copy(), compression="gzip"),
        electrodes=nwb.create_electrode_table_region(list(range(CHANNELS)), "all electrodes"),
        rate=RATE / 24,
        starting_time=0.0,
    )
    duration = samples / RATE
    nwb.add_trial_column(name="correct", description="whether the trial was correct")
    for i in range(60):
        start = duration * i / 60
        nwb.add_trial(start_time=start, stop_time=start + duration / 120, correct=bool(i % 3))
    for unit in range(30):
        spikes = np.sort(rng.uniform(0, duration, size=int(rng.integers(50, 400))))
        nwb.add_unit(spike_times=spikes, electrodes=[unit % CHANNELS])
    return write_nwb(nwb, tmp / "bench.nwb"), voltage


def make_ome_zarr(root: Path) -> dict[str, np.ndarray]:
    """Three levels of (c=2, z=8, y, x) uint16 in 64 x 64 chunks; a quarter of level 0 is fill
    value, so some chunks are absent (a reader asks for them and must get the fill value)."""
    import numcodecs
    import zarr

    rng = np.random.default_rng(971)
    y, x = np.mgrid[0:256, 0:256]
    base = 400 + 300 * np.sin(y / 17.0) * np.cos(x / 23.0)
    level0 = (base[None, None] + rng.integers(0, 60, size=(2, 8, 256, 256))).astype(np.uint16)
    level0[1, :, 128:, 128:] = 0
    levels = {"0": level0, "1": level0[..., ::2, ::2].copy(), "2": level0[..., ::4, ::4].copy()}
    multiscales: dict[str, Any] = {
        "version": "0.4",
        "name": "bench",
        "axes": [{"name": "c", "type": "channel"}]
        + [{"name": a, "type": "space", "unit": "micrometer"} for a in OME_AXES[1:]],
        "datasets": [
            {
                "path": name,
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, 1.0, 2.0**i, 2.0**i]}
                ],
            }
            for i, name in enumerate(levels)
        ],
    }
    group = zarr.open_group(
        str(root), mode="w", zarr_format=2, attributes={"multiscales": [multiscales]}
    )
    for name, values in levels.items():
        array = group.create_array(
            name,
            shape=values.shape,
            chunks=(1, 4, 64, 64),
            dtype=values.dtype,
            fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "/"},
            compressors=numcodecs.Zlib(level=5),
            attributes={"_ARRAY_DIMENSIONS": OME_AXES},
        )
        array[...] = values
    return levels


@dataclass
class Published:
    blob_key: str
    zarr_id: str


def publish(s3: LocalS3, written: Written) -> Published:
    """The NWB blob (a DANDI multipart upload) and the Zarr with its manifest, as one version."""
    client, bucket = s3.client, s3.bucket
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    blob_id, zarr_id = str(uuid.uuid4()), str(uuid.uuid4())
    key = blob_key(blob_id)
    upload_as_dandi(client, bucket, key, written.nwb)

    def put(item: tuple[str, bytes]) -> ManifestLeaf:
        path, body = item
        r = client.put_object(Bucket=bucket, Key=f"zarr/{zarr_id}/{path}", Body=body)
        return ManifestLeaf(path, r["VersionId"], now, len(body), r["ETag"].strip('"'))

    with ThreadPoolExecutor(8) as pool:
        leaves = list(pool.map(put, written.zarr_files.items()))
    checksum = zarr_checksum_of(leaves)
    client.put_object(
        Bucket=bucket,
        Key=manifest_key(zarr_id, checksum),
        Body=format_manifest(build_manifest(leaves)).encode(),
    )
    s3_url = "https://dandiarchive.s3.amazonaws.com"
    records = [
        {
            "identifier": str(uuid.uuid4()),
            "path": NWB_PATH,
            "contentSize": len(written.nwb),
            "encodingFormat": "application/x-nwb",
            "contentUrl": [f"{s3_url}/{key}"],
            "digest": {"dandi:dandi-etag": dandi_etag(written.nwb)},
            "dateModified": now,
        },
        {
            "identifier": str(uuid.uuid4()),
            "path": ZARR_PATH,
            "contentSize": sum(leaf.size for leaf in leaves),
            "encodingFormat": "application/x-zarr",
            "contentUrl": [f"{s3_url}/zarr/{zarr_id}/"],
            "digest": {"dandi:dandi-zarr-checksum": checksum},
            "dateModified": now,
        },
    ]
    prefix = f"dandisets/{DANDISET}/{VERSION}/"
    client.put_object(Bucket=bucket, Key=prefix + "assets.jsonld", Body=json.dumps(records))
    metadata = {"identifier": f"DANDI:{DANDISET}", "name": "NWB clients", "version": VERSION}
    client.put_object(Bucket=bucket, Key=prefix + "dandiset.yaml", Body=to_yaml(metadata))
    return Published(key, zarr_id)


# --- measuring ------------------------------------------------------------------------------------


@dataclass
class Phase:
    seconds: float
    requests: int
    bytes: int
    not_found: int = 0
    #: Reads the client made on a counting file object (local copy), when measured.
    client_reads: int = 0


class Meter:
    """Times a call and counts what reached the S3 meanwhile (at the proxy: a request is counted
    when it arrives, its body bytes when they have all been sent). Consecutive calls chain: each
    counts from where the previous one stopped, so a background request that arrives between two
    phases is counted in the second, never lost; `start()` begins a new chain."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.last: dict[str, Any] | None = None

    def start(self) -> None:
        self.last = self.proxy.stats()

    def __call__(self, action: Callable[[], T], settle: float = 0.0) -> tuple[T, Phase]:
        before = self.last if self.last is not None else self.proxy.stats()
        start = time.perf_counter()
        value = action()
        seconds = time.perf_counter() - start
        time.sleep(settle)  # untimed
        after = self.last = self.proxy.stats()
        return value, Phase(
            seconds=seconds,
            requests=after["requests"] - before["requests"],
            bytes=after["bytes_sent"] - before["bytes_sent"],
            not_found=after["status"].get("404", 0) - before["status"].get("404", 0),
        )


class CountingFile(io.RawIOBase):
    """A local file that counts the reads h5py makes on it (h5py's file-object driver)."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        self.reads = 0
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def readinto(self, buffer: Any) -> int:
        n = self.file.readinto(buffer) or 0
        self.reads += 1
        self.bytes_read += n
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


class MountProcess:
    """`zarrfs mount -f` of the benchmark version in a subprocess, with its own cache dir."""

    def __init__(self, endpoint: str, scratch: Path) -> None:
        scratch.mkdir(parents=True)
        self.path = scratch / "mnt"
        self.path.mkdir()
        self.log = scratch / "zarrfs.log"
        command = [
            sys.executable, "-m", "zarrfs", "mount", "-f", f"{DANDISET}@{VERSION}", str(self.path),
            "--endpoint-url", endpoint, "--cache-dir", str(scratch / "cache"),
            "--manifest-root", "s3://dandiarchive/zarr-manifest/",
        ]  # fmt: skip
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.perf_counter() + MOUNT_DEADLINE
        while not os.path.ismount(self.path):
            if self.process.poll() is not None:
                raise RuntimeError(f"zarrfs exited {self.process.returncode}:\n{self.output()}")
            if time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"{self.path} not mounted after {MOUNT_DEADLINE} s")
            time.sleep(0.005)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.terminate()  # this daemon's own PID
            self.process.wait(timeout=10)


@contextmanager
def mounted(endpoint: str, work: Path) -> Iterator[MountProcess]:
    mount = MountProcess(endpoint, Path(tempfile.mkdtemp(prefix="mount-", dir=work)) / "m")
    try:
        yield mount
    finally:
        mount.stop()


# --- 1. NWB -------------------------------------------------------------------------------------

NWB_PHASES = (
    "connect",
    "h5py.File",
    "NWBHDF5IO()",
    "pynwb read()",
    "data[:1000, :]",
    "data[:]",
    "after",
)
#: Seconds to wait, untimed, after the last read of a round or a Zarr client: requests the proxy
#: receives meanwhile (background fetches still queued, e.g. metadata nobody asked for yet) and
#: bodies whose transfer ends meanwhile are counted in the "after" row (NWB) or with the client.
SETTLE = 0.5


def read_nwb(source: Any, meter: Meter, voltage: np.ndarray) -> dict[str, Phase]:
    """Open `source` (a path or a file object) with h5py and pynwb and read the series, phase by
    phase; the values must be the ones written."""
    import h5py
    from pynwb import NWBHDF5IO

    phases: dict[str, Phase] = {}
    h5, phases["h5py.File"] = meter(lambda: h5py.File(source, "r"))
    try:
        nwb_io, phases["NWBHDF5IO()"] = meter(
            lambda: NWBHDF5IO(file=h5, mode="r", load_namespaces=True)  # the specs in the file
        )
        nwb, phases["pynwb read()"] = meter(nwb_io.read)
        data = nwb.acquisition["ElectricalSeries"].data
        first, phases["data[:1000, :]"] = meter(lambda: data[:1000, :])
        whole, phases["data[:]"] = meter(lambda: data[:])
        if not (np.array_equal(first, voltage[:1000]) and np.array_equal(whole, voltage)):
            raise AssertionError("the ElectricalSeries read back differs from what was written")
        nwb_io.close()
    finally:
        h5.close()
    _, after = meter(lambda: None, settle=SETTLE)
    phases["after"] = after
    return phases


def nwb_round(
    method: str, endpoint: str, url: str, proxy: Proxy, written: Written, work: Path
) -> dict[str, dict[str, Phase]]:
    """One cold round of `method`; for the mount also a warm pass on the same mount."""
    import fsspec
    import remfile

    meter = Meter(proxy)
    out: dict[str, dict[str, Phase]] = {}
    if method == "mount":
        mount, ready = meter(lambda: MountProcess(endpoint, Path(tempfile.mkdtemp(dir=work)) / "m"))
        try:
            phases = read_nwb(str(mount.path / NWB_PATH), meter, written.voltage)
            out["zarrfs mount"] = {"connect": ready, **phases}
            out["zarrfs mount, warm"] = read_nwb(str(mount.path / NWB_PATH), meter, written.voltage)
        finally:
            mount.stop()
    elif method == "remfile":
        handle, connect = meter(lambda: remfile.File(url))
        out["pynwb + remfile"] = {"connect": connect, **read_nwb(handle, meter, written.voltage)}
    elif method == "fsspec":
        fs = fsspec.filesystem("http", skip_instance_cache=True)
        handle, connect = meter(lambda: fs.open(url, "rb"))
        try:
            phases = read_nwb(handle, meter, written.voltage)
        finally:
            handle.close()
        out["pynwb + h5py on fsspec HTTP"] = {"connect": connect, **phases}
    return out


def client_reads(written: Written, work: Path, proxy: Proxy) -> dict[str, Phase]:
    """The same phases on a local copy through a counting file object: h5py's own reads."""
    local = work / "local.nwb"
    local.write_bytes(written.nwb)
    counting = CountingFile(local)
    meter = Meter(proxy)
    phases: dict[str, Phase] = {}
    last = (0, 0)

    class Counted(Meter):
        def __call__(self, action: Callable[[], T], settle: float = 0.0) -> tuple[T, Phase]:
            nonlocal last
            value, phase = meter(action)  # no S3 here: nothing to wait for
            phase.client_reads = counting.reads - last[0]
            phase.bytes = counting.bytes_read - last[1]
            last = (counting.reads, counting.bytes_read)
            return value, phase

    try:
        phases = read_nwb(counting, Counted(proxy), written.voltage)
    finally:
        counting.close()
    return phases


# --- 2. Zarr clients ------------------------------------------------------------------------------

ZARR_CLIENTS = ("zarr-python", "xarray", "ome-zarr", "dask, 4 threads")


def run_zarr_client(client: str, root: str, levels: dict[str, np.ndarray]) -> None:
    """Open the OME-Zarr at `root` (a path or URL) with `client` and read every level; the values
    must be the ones written."""
    import dask
    import dask.array as da
    import xarray as xr
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    got: dict[str, np.ndarray] = {}
    sep = "" if root.endswith("/") else "/"
    if client == "zarr-python":
        group = zarr.open_group(root, mode="r")
        for name in levels:
            array = group[name]
            assert isinstance(array, zarr.Array)
            got[name] = np.asarray(array[...])
    elif client == "xarray":
        import warnings

        for name in levels:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # no consolidated metadata
                others = [other for other in levels if other != name]
                ds = xr.open_zarr(root, drop_variables=others, mask_and_scale=False)
            got[name] = ds[name].values
    elif client == "ome-zarr":
        location = parse_url(root, mode="r", fmt=FormatV04())
        assert location is not None
        node = next(iter(Reader(location)()))
        with dask.config.set(scheduler="threads", num_workers=4):
            got = {name: data.compute() for name, data in zip(levels, node.data, strict=True)}
    else:
        from_zarr: Callable[[str], Any] = da.from_zarr
        with dask.config.set(scheduler="threads", num_workers=4):
            got = {name: from_zarr(f"{root}{sep}{name}").compute() for name in levels}
    for name, expected in levels.items():
        if not np.array_equal(got[name], expected):
            raise AssertionError(f"{client}: level {name} differs from what was written")


class MissingOpens:
    """Counts open() calls on paths under a root that do not exist (an audit hook: Python's own
    `open`, which zarr-python's local store uses)."""

    def __init__(self) -> None:
        self.root: str | None = None
        self.missing: list[str] = []
        sys.addaudithook(self.hook)

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event != "open" or self.root is None or not isinstance(args[0], str):
            return
        if args[0].startswith(self.root) and not os.path.exists(args[0]):
            self.missing.append(args[0][len(self.root) :])

    @contextmanager
    def watching(self, root: str) -> Iterator[list[str]]:
        self.root, self.missing = root, []
        try:
            yield self.missing
        finally:
            self.root = None


def measure_client(
    meter: Meter, client: str, root: str, levels: dict[str, np.ndarray]
) -> dict[str, Any]:
    """`run_zarr_client`, timed and counted; a client that cannot read `root` is reported."""
    error: list[str] = []

    def attempt() -> None:
        try:
            run_zarr_client(client, root, levels)
        except Exception as e:  # reported in the table, e.g. xarray finds no variables over HTTP
            error.append(f"{type(e).__name__}: {e}"[:120])

    _, phase = meter(attempt, settle=SETTLE)
    return {**asdict(phase), "error": error[0] if error else None}


# --- report ---------------------------------------------------------------------------------------


@dataclass
class Results:
    machine: dict[str, Any]
    settings: dict[str, Any]
    floor_ms: float
    nwb: dict[str, list[dict[str, Phase]]] = field(default_factory=dict)
    h5py_reads: dict[str, Phase] = field(default_factory=dict)
    zarr: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Entering the Zarr on each fresh mount (before the client runs).
    zarr_entry: list[Phase] = field(default_factory=list)


def median_phase(rounds: list[dict[str, Phase]], name: str) -> Phase | None:
    found = [r[name] for r in rounds if name in r]
    if not found:
        return None
    return Phase(
        seconds=statistics.median(p.seconds for p in found),
        requests=round(statistics.median(p.requests for p in found)),
        bytes=round(statistics.median(p.bytes for p in found)),
        not_found=max(p.not_found for p in found),
    )


def round_total(method: str, phases: dict[str, Phase]) -> Phase:
    """One round's time, requests and bytes over its phases (a mount's start is paid once per
    mount, not per file: left out)."""
    counted = [p for n, p in phases.items() if not (n == "connect" and method == "zarrfs mount")]
    return Phase(
        seconds=sum(p.seconds for p in counted),
        requests=sum(p.requests for p in counted),
        bytes=sum(p.bytes for p in counted),
    )


def report(results: Results) -> str:
    m, s = results.machine, results.settings
    lines = [
        f"## {m['date']}, commit {m['commit']}",
        "",
        f"Setup: `python benchmarks/nwb_clients.py{s['argv']}`: NWB file {s['nwb_mib']:.1f} MiB "
        f"(ElectricalSeries {s['samples']:,} x {CHANNELS} int16 = {s['series_mib']:.0f} MiB, gzip, "
        f"{CHUNK_SAMPLES:,}-sample chunks), {s['latency'] * 1000:.0f} ms added per S3 response, "
        f"median of {s['rounds']} rounds. One ranged GET of 1 byte of the blob through the proxy: "
        f"{results.floor_ms:.0f} ms (median of 10: the added latency plus moto's cost per GET). "
        f"Machine: {m['cpus']} CPUs, shared (load average {m['load_start']} at the start), "
        f"Python {m['python']}, moto {m['moto']}, {s['versions']}.",
        "",
        "| method | phase | s | S3 requests | MiB from S3 |",
        "|---|---|---:|---:|---:|",
    ]
    for method, rounds in results.nwb.items():
        for name in NWB_PHASES:
            phase = median_phase(rounds, name)
            if phase is None:
                continue
            label = name
            if name == "connect" and method == "zarrfs mount":
                label = "mount to ready (once per mount: not in the total)"
            elif name == "after":
                label = f"(arriving in the {SETTLE:g} s after the reads)"
            lines.append(
                f"| {method} | {label} | {phase.seconds:.3f} | {phase.requests} "
                f"| {phase.bytes / MiB:.2f} |"
            )
        totals = [round_total(method, r) for r in rounds]
        lines.append(
            f"| {method} | **total** | **{statistics.median(t.seconds for t in totals):.3f}** "
            f"| **{statistics.median(t.requests for t in totals):.0f}** "
            f"| **{statistics.median(t.bytes for t in totals) / MiB:.2f}** |"
        )
    lines += [
        "",
        "h5py's own reads (the same phases on a local copy through a counting file object):",
        "",
        "| phase | reads | MiB read |",
        "|---|---:|---:|",
    ]
    for name, phase in results.h5py_reads.items():
        if name == "after":
            continue
        lines.append(f"| {name} | {phase.client_reads} | {phase.bytes / MiB:.2f} |")
    lines += [
        "",
        "Zarr clients reading every level of a 3-level OME-Zarr (format 2, "
        f"{s['zarr_objects']} objects, {s['zarr_absent']} chunks absent):",
        "",
        "Through the mount, the client starts after the Zarr was entered (`os.listdir`): the "
        "manifest fetched, verified and indexed and the metadata objects fetched, "
        + ", ".join(f"{p.seconds:.2f} s / {p.requests} requests" for p in results.zarr_entry)
        + " on the fresh mounts.",
        "",
        "| client | via | s | S3 requests | of them 404 | missing keys the client asked for |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key, row in results.zarr.items():
        client, via = key.split(" | ")
        missing = row.get("missing_opens", "")
        if row["error"]:
            lines.append(f"| {client} | {via} | fails: {row['error']} | {row['requests']} | | |")
            continue
        lines.append(
            f"| {client} | {via} | {row['seconds']:.3f} | {row['requests']} "
            f"| {row['not_found']} | {missing} |"
        )
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series-mib", type=float, default=32.0, help="raw size of the series")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds per S3 response")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 MiB series, 1 round")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.series_mib, args.rounds = 8.0, 1
    samples = int(args.series_mib * MiB) // (2 * CHANNELS)
    import h5py
    import pynwb
    import remfile

    versions = f"pynwb {pynwb.__version__}, h5py {h5py.__version__}, remfile {remfile.__version__}"
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="zarrfs-nwb-clients-") as tmp:
        work = Path(tmp)
        print(f"writing the NWB file ({args.series_mib:g} MiB series) and the OME-Zarr ...")
        nwb_bytes, voltage = make_nwb(samples, work)
        levels = make_ome_zarr(work / "ome.zarr")
        zarr_files = read_tree(work / "ome.zarr")
        written = Written(nwb_bytes, voltage, zarr_files, levels)
        # keep every object in moto's memory (not a temporary file): moto copies the whole object
        # for each ranged GET
        os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(len(nwb_bytes) + MiB))
        with LocalS3(latency=args.latency) as s3:
            published = publish(s3, written)
            proxy = Proxy(s3.endpoint_url, seed=0)
            try:
                results = run(args, written, published, proxy, work, samples, versions, machine)
            finally:
                proxy.stop()
    print()
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(asdict(results), indent=2, default=str))
    return 0


def count_absent_chunks(levels: dict[str, np.ndarray], files: dict[str, bytes]) -> int:
    chunks = (1, 4, 64, 64)
    absent = 0
    for name, values in levels.items():
        grid = [range(-(-n // c)) for n, c in zip(values.shape, chunks, strict=True)]
        for index in np.ndindex(*[len(g) for g in grid]):
            if f"{name}/{'/'.join(map(str, index))}" not in files:
                absent += 1
    return absent


def run(
    args: argparse.Namespace,
    written: Written,
    published: Published,
    proxy: Proxy,
    work: Path,
    samples: int,
    versions: str,
    machine: dict[str, Any],
) -> Results:
    import requests

    url = f"{proxy.url}/dandiarchive/{published.blob_key}"
    session = requests.Session()
    floor = []
    for _ in range(10):
        start = time.perf_counter()
        response = session.get(url, headers={"Range": "bytes=0-0"}, timeout=60)
        floor.append(time.perf_counter() - start)
        assert response.status_code == 206
    session.close()
    argv = " ".join(sys.argv[1:])
    results = Results(
        machine=machine,
        settings={
            "argv": f" {argv}" if argv else "",
            "nwb_mib": len(written.nwb) / MiB,
            "samples": samples,
            "series_mib": written.voltage.nbytes / MiB,
            "latency": args.latency,
            "rounds": args.rounds,
            "versions": versions,
            "zarr_objects": len(written.zarr_files),
            "zarr_absent": count_absent_chunks(written.levels, written.zarr_files),
        },
        floor_ms=statistics.median(floor) * 1000,
    )
    # h5py's own reads, on a local copy: also pays pynwb's and h5py's first-use costs unmeasured
    results.h5py_reads = client_reads(written, work, proxy)
    for round_number in range(args.rounds):
        for method in ("mount", "remfile", "fsspec"):
            print(f"round {round_number + 1}/{args.rounds}: NWB via {method} ...", flush=True)
            for name, phases in nwb_round(method, proxy.url, url, proxy, written, work).items():
                results.nwb.setdefault(name, []).append(phases)

    missing = MissingOpens()
    meter = Meter(proxy)
    import fsspec
    import s3fs

    # s3fs (the S3 API: anonymous, at the proxy) for every s3:// URL, whoever opens it
    fsspec.config.conf["s3"] = {"anon": True, "endpoint_url": proxy.url}
    remote = {
        "fsspec HTTP": f"{proxy.url}/dandiarchive/zarr/{published.zarr_id}/",
        "s3fs": f"s3://dandiarchive/zarr/{published.zarr_id}/",
    }
    for client in ZARR_CLIENTS:  # imports and first-use costs, on the local copy: not measured
        run_zarr_client(client, str(work / "ome.zarr"), written.levels)
    for client in ZARR_CLIENTS:
        print(f"Zarr: {client} ...", flush=True)
        with mounted(proxy.url, work) as mount:
            root = str(mount.path / ZARR_PATH)
            # the first entry: the manifest is fetched, verified and indexed, and the metadata
            # objects fetched; what follows is the client's own
            meter.start()  # after the mount's own requests
            _, entry = meter(functools.partial(os.listdir, root))
            results.zarr_entry.append(entry)
            for via in ("zarrfs mount", "same mount, again"):
                if via != "zarrfs mount" and client != "zarr-python":
                    continue
                with missing.watching(root + "/") as asked:
                    row = measure_client(meter, client, root, written.levels)
                results.zarr[f"{client} | {via}"] = {
                    **row,
                    "missing_opens": len(asked),
                    "missing_keys": sorted(set(asked)),
                }
        for via, url in remote.items():
            meter.start()
            for instance in list(s3fs.S3FileSystem._cache.values()):
                instance.invalidate_cache()  # no listing kept from the last client
            results.zarr[f"{client} | {via}"] = measure_client(meter, client, url, written.levels)
    return results


if __name__ == "__main__":
    sys.exit(main())
