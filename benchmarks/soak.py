"""Soak: a real zarrfs mount under 32 concurrent random readers, with S3 faults injected part of the time.

    python benchmarks/soak.py                  # 5,000 files, 10 minutes
    python benchmarks/soak.py --quick          # 1,000 files, about 50 s (CI)
    python benchmarks/soak.py --duration 120 --json soak.json
    python benchmarks/soak.py --archive        # 1,500 Zarrs, ulimit -n 1024, a 30 s cache-dir stall
    python benchmarks/soak.py --archive --quick    # the same cold, a 12 s stall: about 85 s (CI)

Writes a dandiset holding one Zarr (thousands of chunks of 4-256 KiB and a few multi-MB entries, all
single-part uploads so each ETag is the object's MD5) into a local S3 (moto, its own process), puts
`faultproxy.py` (its own process) between it and a zarrfs mount, and runs reader threads for the
set time. Each read opens a random file, `pread`s a random range (sometimes the whole file), compares
every byte with what was written, and drops the file's pages from the kernel page cache so the next
read reaches the daemon again. A schedule alternates clean windows and fault windows (503 SlowDown,
connection resets, truncated bodies, slow responses, flipped bytes, then all of them at once). A
sampler records the daemon's RSS, open fds and TCP connections every second.

`--archive` runs another scenario: an archive mount (`zarrfs mount dandi`) whose daemon runs under
`ulimit -n 1024`, with its cache dir on `stallfs.py` (a passthrough FUSE filesystem, its own process),
walked by 16 threads through 1,500 published Zarrs (each its own Zarr id and manifest), every name
and byte checked, while the cache dir stops answering for 30 s (every request to it waits, as with a
hung NFS server). It checks that no read fails or returns a wrong byte, that reads go on during the
stall, slowed by the daemon's stall timeout once at most, that the daemon bypasses the cache dir and
uses it again afterwards, and counts the daemon's descriptors against the limit and its budget.

Either prints a table of figures with a PASS/FAIL line per criterion and exits 1 on any FAIL. See
benchmarks/README.md ("Soak" and "Soak: the archive"). Everything it makes lives in one scratch
directory under the system temp dir, removed at the end (unless --keep); every process it starts is
stopped by its PID, and every mount is always unmounted.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from zarrfs import config as zarrfs_config
from zarrfs.config import parse_size
from zarrfs.demo.fake_api import FakeDandiAPI
from zarrfs.demo.locals3 import LocalS3
from zarrfs.demo.sample import (
    ManifestLeaf,
    build_manifest,
    format_manifest,
    manifest_key,
    to_yaml,
    zarr_checksum_of,
)
from zarrfs.errors import INTERNAL_ERROR

DANDISET = "000970"
VERSION = "0.251130.1200"
ZARR_PATH = "sub-01/soak.zarr"
MOUNT_DEADLINE = 60.0
EXIT_DEADLINE = 20.0
KiB, MiB = 1 << 10, 1 << 20
#: Largest range a partial read asks for.
MAX_READ = 1 * MiB
#: Share of reads that go to the multi-MB entries, and to a hot set that fits the memory cache.
BIG_SHARE, HOT_SHARE = 0.03, 0.2
#: Share of reads that read the whole file (the rest read a random range).
WHOLE_SHARE = 0.25
#: Daemon RSS allowed above its cache budgets (see benchmarks/README.md, "Soak"): about 160 MiB at
#: ready with the manifest loaded (interpreter, pyfuse3, trio, aiobotocore, httpx, pyarrow, numpy),
#: plus 128 MiB for bodies in flight and memory the allocator keeps (measured: up to 116 MiB).
RSS_CONSTANT = 288 * MiB
#: Most the daemon's RSS may grow from the first third of the run (after the first window) to the
#: last third (medians): a leak of a few KiB per read or per fault shows up far above this.
RSS_GROWTH = 64 * MiB
#: Sockets the daemon may hold: its S3 connection pool (MAX_CONCURRENT_REQUESTS) plus a few others.
SOCKET_SLACK = 8
#: Open fds the daemon may gain from start to end: a full connection pool plus a few more.
FD_SLACK = zarrfs_config.MAX_CONCURRENT_REQUESTS + 16
#: A read that takes longer than this is a hang: the daemon promises EIO within READ_DEADLINE.
HANG = zarrfs_config.READ_DEADLINE + 10.0
FAULT_KINDS = ("slowdown", "reset", "truncate", "slow", "flip")
TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


# --- parameters -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one soak run does (derived from the command line)."""

    files: int
    big_files: int
    big_min: int
    big_max: int
    readers: int
    duration: float
    first_clean: float
    fault_window: float
    clean_window: float
    probability: float
    slow_probability: float
    slow_delay: float
    memory_cache: int
    manifest_memory: int
    disk_cache: str | None
    seed: int

    @property
    def margin(self) -> float:
        """Seconds after a fault window during which failures may still surface: the longest fault
        (a slow response) plus time for the answer to reach the reader."""
        return self.slow_delay + 2.0

    def fault_settings(self, mode: str) -> dict[str, float]:
        p, slow = self.probability, self.slow_probability
        if mode == "mixed":
            quarter = {k: p / 4 for k in ("slowdown", "reset", "truncate", "flip")}
            return {**quarter, "slow": slow / 4, "slow_delay": self.slow_delay}
        if mode == "slow":
            return {"slow": slow, "slow_delay": self.slow_delay}
        return {mode: p}


def make_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    return Plan(
        files=args.files or (1000 if quick else 5000),
        big_files=4 if quick else 8,
        big_min=2 * MiB,
        big_max=(6 if quick else 12) * MiB,
        readers=args.readers or 32,
        duration=args.duration or (48.0 if quick else 600.0),
        first_clean=5.0 if quick else 30.0,
        fault_window=3.0 if quick else 25.0,
        clean_window=4.0 if quick else 25.0,
        probability=args.probability,
        slow_probability=args.slow_probability,
        slow_delay=args.slow_delay if args.slow_delay is not None else (1.0 if quick else 3.0),
        memory_cache=parse_size(args.memory_cache_size or "64M"),
        manifest_memory=parse_size(args.manifest_memory or "32M"),
        disk_cache=args.disk_cache,
        seed=args.seed,
    )


@dataclass
class Window:
    mode: str  # "clean" or a fault mode
    planned: float  # seconds
    start: float = 0.0  # monotonic, when the proxy took the setting
    end: float = 0.0
    wall_start: float = 0.0  # the same as time.time(), to place the daemon's log lines
    wall_end: float = 0.0
    faults: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    rss_end: int = 0
    fds_end: int = 0


def make_schedule(plan: Plan) -> list[Window]:
    """Clean, then (fault, clean) pairs cycling through the modes; the last clean window takes
    whatever time is left."""
    modes = [*FAULT_KINDS, "mixed"]
    windows = [Window("clean", plan.first_clean)]
    t = plan.first_clean
    i = 0
    while t + plan.fault_window + plan.clean_window <= plan.duration + 1e-9:
        windows += [Window(modes[i % len(modes)], plan.fault_window)]
        windows += [Window("clean", plan.clean_window)]
        t += plan.fault_window + plan.clean_window
        i += 1
    windows[-1].planned += plan.duration - t
    return windows


# --- the dandiset ---------------------------------------------------------------------------------


@dataclass
class Dataset:
    paths: list[str]  # relative to the Zarr root; big entries last
    data: dict[str, bytes]
    big: list[str]
    hot: list[str]
    small: list[str]
    total_bytes: int


def make_dataset(plan: Plan) -> Dataset:
    rng = random.Random(plan.seed)
    side = max(1, int(plan.files**0.5))
    data: dict[str, bytes] = {}
    small = [f"0/{i // side}/{i % side}" for i in range(plan.files)]
    for path in small:
        data[path] = os.urandom(rng.randint(4 * KiB, 256 * KiB))
    big = [f"1/{i}" for i in range(plan.big_files)]
    for path in big:
        data[path] = os.urandom(rng.randint(plan.big_min, plan.big_max))
    # a hot set of about half the memory cache: some reads hit the daemon's cache
    hot, size = [], 0
    for path in small:
        if size + len(data[path]) > plan.memory_cache // 2:
            break
        hot.append(path)
        size += len(data[path])
    return Dataset([*small, *big], data, big, hot, small, sum(len(b) for b in data.values()))


def write_dandiset(s3: LocalS3, dataset: Dataset) -> str:
    """Objects, the schema-2 manifest and the version's metadata; returns the Zarr id."""
    client, bucket = s3.client, s3.bucket
    zarr_id = str(uuid.uuid4())
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    meta = {
        ".zattrs": json.dumps({"soak": True}).encode(),
        ".zgroup": b'{"zarr_format": 2}',
        "0/.zarray": json.dumps({"zarr_format": 2, "shape": [len(dataset.small)]}).encode(),
        "1/.zarray": json.dumps({"zarr_format": 2, "shape": [len(dataset.big)]}).encode(),
    }

    def put(item: tuple[str, bytes]) -> ManifestLeaf:
        path, body = item
        r = client.put_object(Bucket=bucket, Key=f"zarr/{zarr_id}/{path}", Body=body)
        etag = r["ETag"].strip('"')
        return ManifestLeaf(path, r["VersionId"], now, len(body), etag)

    with ThreadPoolExecutor(16) as pool:
        leaves = list(pool.map(put, [*meta.items(), *dataset.data.items()]))
    for leaf in leaves:  # single-part uploads: the ETag is the MD5, so zarrfs can verify bodies
        if not re.fullmatch(r"[0-9a-f]{32}", leaf.etag):
            raise RuntimeError(f"{leaf.path}: ETag {leaf.etag} is not a plain MD5")
    checksum = zarr_checksum_of(leaves)
    client.put_object(
        Bucket=bucket,
        Key=manifest_key(zarr_id, checksum),
        Body=format_manifest(build_manifest(leaves)).encode(),
    )
    record = {
        "identifier": str(uuid.uuid4()),
        "path": ZARR_PATH,
        "contentSize": sum(x.size for x in leaves),
        "encodingFormat": "application/x-zarr",
        "contentUrl": [f"https://dandiarchive.s3.amazonaws.com/zarr/{zarr_id}/"],
        "digest": {"dandi:dandi-zarr-checksum": checksum},
        "dateModified": now,
    }
    prefix = f"dandisets/{DANDISET}/{VERSION}/"
    client.put_object(Bucket=bucket, Key=prefix + "assets.jsonld", Body=json.dumps([record]))
    metadata = {"identifier": f"DANDI:{DANDISET}", "name": "soak", "version": VERSION}
    client.put_object(Bucket=bucket, Key=prefix + "dandiset.yaml", Body=to_yaml(metadata))
    return zarr_id


# --- processes ------------------------------------------------------------------------------------


class Proxy:
    """`faultproxy.py` in its own process (without faults until `set_faults`; it counts what it
    forwards: `stats()`)."""

    def __init__(self, upstream: str, seed: int | None = None) -> None:
        script = Path(__file__).with_name("faultproxy.py")
        seeded = [] if seed is None else ["--seed", str(seed)]
        self.process = subprocess.Popen(
            [sys.executable, str(script), "--upstream", upstream, *seeded],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"fault proxy did not start (said {line!r})")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def set_faults(self, settings: dict[str, float]) -> None:
        request = urllib.request.Request(
            f"{self.url}/__faults", data=json.dumps(settings).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/__stats", timeout=10) as response:
            doc: dict[str, Any] = json.loads(response.read())
            return doc

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()  # the proxy exits when its stdin closes
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.terminate()  # its own PID
            self.process.wait(timeout=10)


def disk_cache_args(disk_cache: str | None) -> list[str]:
    """`--cache-size` for the daemon: 0 (S3 only) unless `--disk-cache` was given; nothing when
    this zarrfs has no disk cache (feature-detected from `zarrfs mount --help`)."""
    help_text = subprocess.run(
        [sys.executable, "-m", "zarrfs", "mount", "--help"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    if "--cache-size" not in help_text:
        if disk_cache is not None:
            raise SystemExit("--disk-cache: this zarrfs has no --cache-size option")
        return []
    return ["--cache-size", disk_cache or "0"]


class Daemon:
    """`zarrfs mount -f` in a subprocess, logging to a file."""

    def __init__(
        self, command: list[str], mnt: Path, log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.mnt = mnt
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.pid = self.process.pid
        self.exit_code: int | None = None
        deadline = time.monotonic() + MOUNT_DEADLINE
        while not os.path.ismount(mnt):
            if self.process.poll() is not None:
                raise RuntimeError(f"zarrfs exited {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{mnt} not mounted after {MOUNT_DEADLINE} s")
            time.sleep(0.01)
        os.listdir(mnt)  # answered once the core is ready (it starts after the mount is live)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        """Unmount lazily; the daemon then exits by itself, else it is terminated, then killed."""
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        for action in (None, self.process.terminate, self.process.kill):
            if self.process.poll() is not None:
                break
            if action is not None:
                action()  # this daemon's own PID
            try:
                self.process.wait(timeout=EXIT_DEADLINE)
            except subprocess.TimeoutExpired:
                continue
        if self.exit_code is None:
            self.exit_code = self.process.returncode


# --- sampling -------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the readers started
    rss: int
    hwm: int
    anon: int
    fds: int
    sockets: int
    tcp: dict[str, int]  # TCP sockets of the daemon by state
    to_proxy: int  # established TCP connections to the proxy


def sample_process(pid: int, proxy_port: int, t0: float) -> Sample | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        links = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue  # closed meanwhile
        tables = [Path(f"/proc/{pid}/net/{name}").read_text() for name in ("tcp", "tcp6")]
    except OSError:
        return None  # the daemon is gone
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    inodes = {link[8:-1] for link in links if link.startswith("socket:[")}
    tcp: Counter[str] = Counter()
    to_proxy = 0
    for table in tables:
        for row in table.splitlines()[1:]:
            cols = row.split()
            if len(cols) < 10 or cols[9] not in inodes:
                continue
            state = TCP_STATES.get(cols[3], cols[3])
            tcp[state] += 1
            if state == "ESTABLISHED" and int(cols[2].rsplit(":", 1)[1], 16) == proxy_port:
                to_proxy += 1
    return Sample(
        t=time.monotonic() - t0,
        rss=int(fields["VmRSS"].split()[0]) * KiB,
        hwm=int(fields["VmHWM"].split()[0]) * KiB,
        anon=int(fields["RssAnon"].split()[0]) * KiB,
        fds=len(links),
        sockets=len(inodes),
        tcp=dict(tcp),
        to_proxy=to_proxy,
    )


class Sampler(threading.Thread):
    def __init__(self, pid: int, proxy_port: int, t0: float, interval: float = 1.0) -> None:
        super().__init__(daemon=True, name="sampler")
        self.pid, self.proxy_port, self.t0, self.interval = pid, proxy_port, t0, interval
        self.samples: list[Sample] = []
        self.done = threading.Event()

    def take(self) -> Sample | None:
        s = sample_process(self.pid, self.proxy_port, self.t0)
        if s is not None:
            self.samples.append(s)
        return s

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.take()


# --- readers --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Read:
    path: str
    start: float  # monotonic
    end: float
    size: int  # bytes asked for
    got: int  # bytes returned
    wrong: int  # bytes that differ from what was written (missing bytes count too)
    error: int  # errno, 0 for success, -1 for an exception without errno


@dataclass
class Wrong:
    path: str
    offset: int
    size: int
    got: int
    wrong: int
    first_bad: int


class Readers:
    """Reader threads: each picks a file, opens it, preads a random range and checks it."""

    def __init__(self, root: Path, dataset: Dataset, n: int, seed: int) -> None:
        self.root = root
        self.dataset = dataset
        self.stop = threading.Event()
        self.results: list[list[Read]] = [[] for _ in range(n)]
        self.in_flight: list[float | None] = [None] * n
        self.wrong: list[Wrong] = []
        self.unexpected: list[str] = []
        self.threads = [
            threading.Thread(target=self.run, args=(i, seed + i), daemon=True, name=f"reader-{i}")
            for i in range(n)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self, timeout: float) -> list[float]:
        """Stop the readers; the ages of reads still in flight after `timeout` (hung reads)."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        now = time.monotonic()
        return [now - t for t in self.in_flight if t is not None]

    def pick(self, rng: random.Random) -> str:
        u = rng.random()
        if u < BIG_SHARE and self.dataset.big:
            return rng.choice(self.dataset.big)
        if u < BIG_SHARE + HOT_SHARE and self.dataset.hot:
            return rng.choice(self.dataset.hot)
        return rng.choice(self.dataset.small)

    def run(self, index: int, seed: int) -> None:
        rng = random.Random(seed)
        out = self.results[index]
        while not self.stop.is_set():
            path = self.pick(rng)
            expected = self.dataset.data[path]
            size = len(expected)
            if rng.random() < WHOLE_SHARE:
                offset, length = 0, size
            else:
                offset = rng.randrange(size)
                length = rng.randint(1, min(size - offset, MAX_READ))
            start = time.monotonic()
            self.in_flight[index] = start
            got = b""
            error = 0
            try:
                fd = os.open(self.root / path, os.O_RDONLY)
                try:
                    got = os.pread(fd, length, offset)
                    # drop this file's pages so the next read of it reaches the daemon again
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except OSError as e:
                error = e.errno or -1
            except Exception as e:  # a bug in this script: counted, never silent
                error = -1
                self.unexpected.append(f"{path}: {type(e).__name__}: {e}")
            end = time.monotonic()
            self.in_flight[index] = None
            wrong = 0
            if error == 0:
                want = memoryview(expected)[offset : offset + length]
                if got != want:
                    wrong = count_wrong(got, want)
                    a = np.frombuffer(got, np.uint8)
                    b = np.frombuffer(want[: len(got)], np.uint8)
                    bad = np.flatnonzero(a != b)
                    first = int(bad[0]) if bad.size else len(got)
                    self.wrong.append(Wrong(path, offset, length, len(got), wrong, offset + first))
            out.append(Read(path, start, end, length, len(got), wrong, error))


def count_wrong(got: bytes, want: memoryview) -> int:
    n = min(len(got), len(want))
    a = np.frombuffer(got, np.uint8, count=n)
    b = np.frombuffer(want, np.uint8, count=n)
    return int(np.count_nonzero(a != b)) + abs(len(want) - len(got))


# --- figures --------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_figures(reads: list[Read]) -> dict[str, float]:
    lat = [r.end - r.start for r in reads]
    return {
        "n": len(lat),
        "p50_ms": percentile(lat, 0.50) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
        "max_ms": max(lat, default=float("nan")) * 1000,
    }


def window_of(read: Read, windows: list[Window]) -> int:
    """The index of the window the read started in."""
    return max((i for i, w in enumerate(windows) if w.start <= read.start), default=0)


def rss_growth(samples: list[Sample], warmup: float) -> int:
    """Median RSS of the last third of the samples taken after `warmup` seconds, minus that of the
    first third."""
    after = [s.rss for s in samples if s.t >= warmup]
    n = len(after) // 3
    if n == 0:
        return 0
    return int(statistics.median(after[-n:]) - statistics.median(after[:n]))


def overlaps(read: Read, spans: list[tuple[float, float]]) -> bool:
    return any(read.start <= end and read.end >= start for start, end in spans)


def log_time(line: str) -> float | None:
    """When a daemon log line was written (its timestamp is local time, to the millisecond)."""
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
    if m is None:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000


def scan_log(text: str, fault_spans: list[tuple[float, float]]) -> dict[str, Any]:
    """Counts of the daemon's log lines that matter; its failed reads split by whether they were
    logged inside a fault window (plus the margin), by wall-clock time."""
    lines = text.splitlines()

    def matching(pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in lines if rx.search(line)]

    failed = matching(r"read of .* failed")
    outside = []
    for line in failed:
        t = log_time(line)
        if t is None or not any(start <= t <= end for start, end in fault_spans):
            outside.append(line)
    integrity = matching(r"integrity check failed")
    return {
        "retries": len(matching(r"attempt \d+/\d+ failed")),
        "damaged_in_transit": len(matching(r"damaged in transit")),
        "integrity_failures": len(integrity),
        "read_failures": len(failed),
        "read_failures_outside": len(outside),
        "internal_errors": len(matching(INTERNAL_ERROR)),
        "tracebacks": len(matching(r"^Traceback")),
        "examples": (outside[:3] + integrity[:2] + failed[:2])[:5],
    }


def machine_info() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        check=False,
    ).stdout.strip()
    try:
        import moto

        moto_version = str(moto.__version__)
    except ImportError:  # pragma: no cover
        moto_version = "?"
    return {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "commit": commit or "?",
        "host": f"{platform.node()}: {platform.system()} {platform.release()}",
        "cpus": os.cpu_count(),
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "moto": moto_version,
    }


def mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


@dataclass
class Criterion:
    name: str
    measured: str
    limit: str
    ok: bool


def evaluate(
    plan: Plan,
    dataset: Dataset,
    windows: list[Window],
    reads: list[Read],
    readers: Readers,
    hung: list[float],
    samples: list[Sample],
    proxy_stats: dict[str, Any],
    log: dict[str, Any],
    daemon_alive: bool,
    daemon_exit: int | None,
) -> dict[str, Any]:
    spans = [(w.start, w.end + plan.margin) for w in windows if w.mode != "clean"]
    inside = [r for r in reads if overlaps(r, spans)]
    outside = [r for r in reads if not overlaps(r, spans)]
    errors = [r for r in reads if r.error != 0]
    errno_names = Counter(errno.errorcode.get(r.error, str(r.error)) for r in errors)
    wrong_bytes = sum(r.wrong for r in reads)
    short = sum(1 for r in reads if r.error == 0 and r.got != r.size)
    errors_inside = sum(1 for r in inside if r.error != 0)
    errors_outside = sum(1 for r in outside if r.error != 0)
    budget = plan.memory_cache + plan.manifest_memory + RSS_CONSTANT
    first, last = samples[0], samples[-1]
    rss_max = max(s.rss for s in samples)
    growth = rss_growth(samples, windows[0].end - windows[0].start)
    fds_max = max(s.fds for s in samples)
    sockets_max = max(s.sockets for s in samples)
    close_wait_max = max(s.tcp.get("CLOSE_WAIT", 0) for s in samples)
    faults = proxy_stats["faults"]
    scheduled = {k for w in windows if w.mode != "clean" for k in plan.fault_settings(w.mode)}
    scheduled.discard("slow_delay")
    per_window: list[dict[str, Any]] = []
    window_reads: list[int] = []
    for w in windows:
        mine = [r for r in reads if w.start <= r.start < w.end]
        window_reads.append(len(mine))
        per_window.append(
            {
                "mode": w.mode,
                "seconds": round(w.end - w.start, 1),
                "reads": len(mine),
                "errors": sum(1 for r in mine if r.error != 0),
                "p99_ms": round(percentile([r.end - r.start for r in mine], 0.99) * 1000, 1),
                "requests": w.requests,
                "faults": w.faults,
                "rss_end": w.rss_end,
                "fds_end": w.fds_end,
            }
        )
    slowest = max((r.end - r.start for r in reads), default=0.0)
    criteria = [
        Criterion("wrong bytes", f"{wrong_bytes} ({short} short reads)", "0", wrong_bytes == 0),
        Criterion(
            "errors outside fault windows",
            f"{errors_outside} seen by readers, {log['read_failures_outside']} logged by the daemon",
            "0",
            errors_outside == 0 and log["read_failures_outside"] == 0,
        ),
        Criterion(
            "fault kinds injected",
            ", ".join(f"{k} {faults.get(k, 0)}" for k in FAULT_KINDS),
            "each > 0",
            all(faults.get(k, 0) > 0 for k in scheduled),
        ),
        Criterion(
            "reads in every window",
            f"min {min(window_reads)}",
            "> 0 (no stall)",
            min(window_reads) > 0,
        ),
        Criterion(
            "no hung read",
            f"slowest {slowest:.1f} s, {len(hung)} still in flight at the end",
            f"< {HANG:.0f} s, 0",
            not hung and slowest < HANG,
        ),
        Criterion("daemon RSS max", mib(rss_max), f"≤ {mib(budget)}", rss_max <= budget),
        Criterion(
            "daemon RSS growth (first third → last third)",
            f"{growth / MiB:+.0f} MiB",
            f"≤ {mib(RSS_GROWTH)}",
            growth <= RSS_GROWTH,
        ),
        Criterion(
            "daemon open fds",
            f"{first.fds} → max {fds_max} → {last.fds}",
            f"end ≤ start + {FD_SLACK}",
            last.fds <= first.fds + FD_SLACK,
        ),
        Criterion(
            "daemon sockets",
            f"{first.sockets} → max {sockets_max} → {last.sockets} (CLOSE_WAIT max {close_wait_max})",
            f"≤ {zarrfs_config.MAX_CONCURRENT_REQUESTS + SOCKET_SLACK}",
            sockets_max <= zarrfs_config.MAX_CONCURRENT_REQUESTS + SOCKET_SLACK,
        ),
        Criterion(
            "daemon alive to the end, clean exit",
            f"alive {daemon_alive}, exit {daemon_exit}",
            "alive, exit 0",
            daemon_alive and daemon_exit == 0,
        ),
        Criterion(
            "no internal error in the daemon log",
            f"{log['internal_errors']} INTERNAL_ERROR, {log['tracebacks']} tracebacks",
            "0",
            log["internal_errors"] == 0 and log["tracebacks"] == 0,
        ),
        Criterion(
            "no unexpected exception in the readers",
            str(len(readers.unexpected)),
            "0",
            not readers.unexpected,
        ),
    ]
    return {
        "reads": len(reads),
        "bytes_read": sum(r.got for r in reads),
        "wrong_bytes": wrong_bytes,
        "short_reads": short,
        "wrong_examples": [asdict(w) for w in readers.wrong[:5]],
        "errors": len(errors),
        "errors_inside": errors_inside,
        "errors_outside": errors_outside,
        "errors_by_errno": dict(errno_names),
        "eio": errno_names.get("EIO", 0),
        "reads_inside": len(inside),
        "reads_outside": len(outside),
        "latency": {
            "all": latency_figures(reads),
            "inside": latency_figures(inside),
            "outside": latency_figures(outside),
        },
        "slowest": [
            {
                "path": r.path,
                "ms": round((r.end - r.start) * 1000),
                "size": r.size,
                "window": window_of(r, windows),
                "error": errno.errorcode.get(r.error, r.error) if r.error else None,
            }
            for r in sorted(reads, key=lambda r: r.start - r.end)[:5]
        ],
        "rss": {
            "growth": growth,
            "start": first.rss,
            "max": rss_max,
            "end": last.rss,
            "hwm_end": last.hwm,
            "budget": budget,
        },
        "fds": {"start": first.fds, "max": fds_max, "end": last.fds},
        "sockets": {
            "start": first.sockets,
            "max": sockets_max,
            "end": last.sockets,
            "close_wait_max": close_wait_max,
            "to_proxy_max": max(s.to_proxy for s in samples),
        },
        "proxy": proxy_stats,
        "faults": faults,
        "daemon_log": log,
        "windows": per_window,
        "criteria": [asdict(c) for c in criteria],
        "pass": all(c.ok for c in criteria),
        "unexpected": readers.unexpected[:5],
    }


def report(
    plan: Plan, dataset: Dataset, info: dict[str, Any], fig: dict[str, Any], wall: float
) -> list[str]:
    lat = fig["latency"]
    rss, fds, sk, px = fig["rss"], fig["fds"], fig["sockets"], fig["proxy"]
    lines = [
        f"date {info['date']}, commit {info['commit']}, wall time {wall:.0f} s",
        f"{info['host']}, {info['cpus']} CPUs, load average at start "
        f"{' '.join(map(str, info['load_start']))}, at end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (shared machine), Python "
        f"{info['python']}, moto {info['moto']}",
        f"{len(dataset.small)} chunks of 4-256 KiB + {len(dataset.big)} entries of "
        f"{plan.big_min // MiB}-{plan.big_max // MiB} MiB = {mib(dataset.total_bytes)}; "
        f"{plan.readers} readers for {plan.duration:.0f} s; memory cache "
        f"{mib(plan.memory_cache)}, manifest memory {mib(plan.manifest_memory)}, disk cache "
        f"{plan.disk_cache or 'off'}; faults p={plan.probability:g} (slow: "
        f"p={plan.slow_probability:g}, {plan.slow_delay:g} s), margin {plan.margin:g} s",
        "",
        "| figure | value |",
        "|---|---|",
        f"| reads | {fig['reads']:,} ({fig['reads_inside']:,} overlapping fault windows, "
        f"{fig['reads_outside']:,} outside) |",
        f"| bytes read | {mib(fig['bytes_read'])} ({fig['bytes_read'] / wall / MiB:.1f} MiB/s) |",
        f"| wrong bytes | {fig['wrong_bytes']} ({fig['short_reads']} short reads) |",
        f"| errors inside / outside fault windows | {fig['errors_inside']} / "
        f"{fig['errors_outside']} ({', '.join(f'{k} {v}' for k, v in fig['errors_by_errno'].items()) or 'none'}) |",
    ]
    for name in ("all", "outside", "inside"):
        f = lat[name]
        lines.append(
            f"| latency p50 / p99 / max, {name} | {f['p50_ms']:.1f} / {f['p99_ms']:.1f} / "
            f"{f['max_ms']:.0f} ms |"
        )
    lines += [
        f"| daemon RSS start / max / end (VmHWM) | {mib(rss['start'])} / {mib(rss['max'])} / "
        f"{mib(rss['end'])} ({mib(rss['hwm_end'])}); budget {mib(rss['budget'])}; growth "
        f"{rss['growth'] / MiB:+.0f} MiB |",
        f"| daemon open fds start / max / end | {fds['start']} / {fds['max']} / {fds['end']} |",
        f"| daemon sockets start / max / end | {sk['start']} / {sk['max']} / {sk['end']} "
        f"(to the proxy max {sk['to_proxy_max']}, CLOSE_WAIT max {sk['close_wait_max']}) |",
        f"| proxy requests / bytes sent | {px['requests']:,} / {mib(px['bytes_sent'])} |",
        f"| faults injected | {', '.join(f'{k} {v:,}' for k, v in px['faults'].items())} |",
        f"| daemon log | {fig['daemon_log']['retries']:,} retries, "
        f"{fig['daemon_log']['damaged_in_transit']:,} bodies damaged in transit caught, "
        f"{fig['daemon_log']['read_failures']} reads failed "
        f"({fig['daemon_log']['read_failures_outside']} outside fault windows) |",
        "",
        "| window | mode | s | reads | errors | p99 ms | requests | faults | RSS end | fds end |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for i, w in enumerate(fig["windows"]):
        faults = ", ".join(f"{k} {v}" for k, v in w["faults"].items() if v) or "-"
        lines.append(
            f"| {i} | {w['mode']} | {w['seconds']} | {w['reads']:,} | {w['errors']} | "
            f"{w['p99_ms']} | {w['requests']:,} | {faults} | {mib(w['rss_end'])} | "
            f"{w['fds_end']} |"
        )
    lines += ["", "| criterion | measured | limit | result |", "|---|---|---|---|"]
    for c in fig["criteria"]:
        verdict = "PASS" if c["ok"] else "**FAIL**"
        lines.append(f"| {c['name']} | {c['measured']} | {c['limit']} | {verdict} |")
    for c in fig["criteria"]:
        lines.append(f"{'PASS' if c['ok'] else 'FAIL'}: {c['name']}: {c['measured']}")
    for example in fig["daemon_log"]["examples"]:
        lines.append(f"log: {example}")
    for r in fig["slowest"][:3]:
        lines.append(f"slow read: {r}")
    for w in fig["wrong_examples"]:
        lines.append(f"wrong: {w}")
    for u in fig["unexpected"]:
        lines.append(f"reader exception: {u}")
    return lines


# --- the archive scenario (--archive) -------------------------------------------------------------

ARCHIVE_DANDISET = "000971"
ARCHIVE_VERSION = "0.251201.1200"
#: The daemon's descriptor limit, soft and hard (set with `prlimit` before it starts): the common
#: default soft limit, which 1,500 memory-mapped indexes used to exhaust.
NOFILE = 1024
#: Seconds between two snapshots of `zarrfs stats` (the daemon rewrites its stats every 2 s).
STATS_INTERVAL = 4.0
#: The longest a read overlapping the stall may take: the stall timeout once (the deadline of the
#: cache-dir operation it waited for), plus as much again for the rest of the read on this loaded
#: 2-core machine.
STALLED_READ_LIMIT = 2 * zarrfs_config.DISK_CACHE_STALL_TIMEOUT


@dataclass(frozen=True)
class ArchivePlan:
    """What one archive soak run does (derived from the command line)."""

    zarrs: int
    chunks: int  # per Zarr
    chunk_min: int
    chunk_max: int
    readers: int
    warm: bool  # stall once every Zarr has been walked (a warm cache dir), else from the start
    stall_at: float  # seconds after the readers start (warm: after they start their second pass)
    stall_seconds: float
    stall_pause: float | None  # the daemon's bypass pause, when not zarrfs's own
    after_bypass: float  # seconds of walking once the bypass should be over
    memory_cache: int
    manifest_memory: int
    disk_cache: str
    seed: int

    @property
    def pause(self) -> float:
        """How long the daemon bypasses a stalled cache dir."""
        if self.stall_pause is None:
            return float(zarrfs_config.DISK_CACHE_STALL_PAUSE)
        return self.stall_pause

    @property
    def bypass_after(self) -> float:
        """Seconds from the stall's start to the end of the daemon's bypass: the stall is noticed
        one stall timeout after it begins (at the latest) and bypassed for the pause from then."""
        return float(zarrfs_config.DISK_CACHE_STALL_TIMEOUT) + self.pause


def make_archive_plan(args: argparse.Namespace) -> ArchivePlan:
    quick = args.quick
    plan = ArchivePlan(
        zarrs=args.zarrs or 1500,
        chunks=3,
        chunk_min=4 * KiB,
        chunk_max=32 * KiB,
        readers=args.readers or 16,
        warm=args.warm if args.warm is not None else not quick,
        stall_at=args.stall_at if args.stall_at is not None else (10.0 if quick else 20.0),
        stall_seconds=args.stall_seconds or (12.0 if quick else 30.0),
        stall_pause=args.stall_pause if args.stall_pause is not None else (20.0 if quick else None),
        after_bypass=args.after_bypass
        if args.after_bypass is not None
        else (10.0 if quick else 40.0),
        memory_cache=parse_size(args.memory_cache_size or "16M"),
        manifest_memory=parse_size(args.manifest_memory or "1M"),
        disk_cache=args.disk_cache or "1G",
        seed=args.seed,
    )
    if plan.stall_seconds < 2 * zarrfs_config.DISK_CACHE_STALL_TIMEOUT:
        raise SystemExit(
            f"--stall-seconds: at least twice the daemon's stall timeout "
            f"({2 * zarrfs_config.DISK_CACHE_STALL_TIMEOUT:g} s)"
        )
    return plan


@dataclass(frozen=True)
class ArchiveZarr:
    path: str  # under the version's root
    files: dict[str, bytes]  # path in the Zarr -> bytes

    @property
    def listing(self) -> dict[str, list[str]]:
        """Each directory of the Zarr ("" its root) -> its sorted names."""
        out: dict[str, set[str]] = {"": set()}
        for path in self.files:
            parts = path.split("/")
            for depth in range(len(parts)):
                directory = "/".join(parts[:depth])
                out.setdefault(directory, set()).add(parts[depth])
        return {k: sorted(v) for k, v in out.items()}


def make_archive_zarrs(plan: ArchivePlan) -> list[ArchiveZarr]:
    """`plan.zarrs` small Zarr format 2 hierarchies: `.zgroup`, `a/.zarray` and `a/0`...`a/<n-1>`,
    chunks of random bytes and sizes."""
    rng = random.Random(plan.seed)
    zarrs = []
    for i in range(plan.zarrs):
        files = {
            ".zgroup": b'{"zarr_format": 2}',
            "a/.zarray": json.dumps({"zarr_format": 2, "shape": [plan.chunks], "zarr": i}).encode(),
        }
        for c in range(plan.chunks):
            files[f"a/{c}"] = rng.randbytes(rng.randint(plan.chunk_min, plan.chunk_max))
        zarrs.append(ArchiveZarr(f"sub-{i // 100:02d}/z{i:04d}.zarr", files))
    return zarrs


def publish_archive(s3: LocalS3, zarrs: list[ArchiveZarr]) -> None:
    """Each Zarr under its own Zarr id with its manifest (named by its checksum) in
    `zarr-manifest/`, and the version's asset list and metadata."""
    client, bucket = s3.client, s3.bucket
    now = datetime.now(UTC).replace(microsecond=0).isoformat()

    def publish(zarr: ArchiveZarr) -> dict[str, Any]:
        zarr_id = str(uuid.uuid4())
        leaves = []
        for path, body in zarr.files.items():
            r = client.put_object(Bucket=bucket, Key=f"zarr/{zarr_id}/{path}", Body=body)
            leaves.append(ManifestLeaf(path, r["VersionId"], now, len(body), r["ETag"].strip('"')))
        checksum = zarr_checksum_of(leaves)
        client.put_object(
            Bucket=bucket,
            Key=manifest_key(zarr_id, checksum),
            Body=format_manifest(build_manifest(leaves)).encode(),
        )
        return {
            "identifier": str(uuid.uuid4()),
            "path": zarr.path,
            "contentSize": sum(x.size for x in leaves),
            "encodingFormat": "application/x-zarr",
            "contentUrl": [f"https://dandiarchive.s3.amazonaws.com/zarr/{zarr_id}/"],
            "digest": {"dandi:dandi-zarr-checksum": checksum},
            "dateModified": now,
        }

    with ThreadPoolExecutor(16) as pool:
        records = list(pool.map(publish, zarrs))
    prefix = f"dandisets/{ARCHIVE_DANDISET}/{ARCHIVE_VERSION}/"
    client.put_object(Bucket=bucket, Key=prefix + "assets.jsonld", Body=json.dumps(records))
    client.put_object(Bucket=bucket, Key=prefix + "dandiset.yaml", Body=to_yaml(archive_metadata()))


def archive_metadata() -> dict[str, Any]:
    return {
        "identifier": f"DANDI:{ARCHIVE_DANDISET}",
        "name": "archive soak",
        "version": ARCHIVE_VERSION,
    }


def archive_api() -> FakeDandiAPI:
    """The API of an archive holding the one dandiset (it lists `dandisets/`; the version itself
    is resolved from the bucket)."""
    version = {"metadata": archive_metadata(), "assets": []}
    dandiset = {
        "most_recent_published_version": ARCHIVE_VERSION,
        "versions": {ARCHIVE_VERSION: version},
    }
    return FakeDandiAPI({ARCHIVE_DANDISET: dandiset})


def mounted(mnt: Path) -> bool:
    """Whether `mnt` is a mountpoint, from /proc/self/mounts: never touches the mount (a stalled
    one would not answer a stat)."""
    target = os.path.realpath(mnt)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts if len(line.split()) > 1)


class StallFS:
    """`stallfs.py` in its own process, serving `backing` at `mnt`; stalled and resumed through
    its standard input."""

    def __init__(self, backing: Path, mnt: Path) -> None:
        script = Path(__file__).with_name("stallfs.py")
        self.mnt = mnt
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(backing), str(mnt)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.process.pid
        self._lock = threading.Lock()
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.startswith("MOUNTED"):
            self.stop()
            raise RuntimeError(f"stallfs did not mount (said {line!r})")

    def command(self, text: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        with self._lock:
            self.process.stdin.write(text + "\n")
            self.process.stdin.flush()
            return self.process.stdout.readline().strip()

    def stall(self) -> None:
        reply = self.command("stall")
        if reply != "stalled":
            raise RuntimeError(f"stallfs: stall answered {reply!r}")

    def resume(self) -> tuple[float, int]:
        """(seconds it was stalled, requests that waited for it)."""
        reply = self.command("resume").split()
        if reply[:1] != ["resumed"]:
            raise RuntimeError(f"stallfs: resume answered {reply!r}")
        return float(reply[1]), int(reply[2])

    def stats(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.command("stats"))
        return doc

    def end_stall(self) -> None:
        """Resume if it is running and stalled; never raises."""
        if self.process.poll() is None:
            with suppress(OSError, ValueError, RuntimeError, IndexError):
                self.resume()

    def stop(self) -> None:
        """Resume, then close its stdin (it unmounts and exits); else unmount lazily, terminate,
        kill (its own PID)."""
        if self.process.poll() is None and self.process.stdin is not None:
            self.end_stall()
            with suppress(OSError):
                self.process.stdin.close()
        for action in (None, self.process.terminate, self.process.kill):
            if self.process.poll() is not None:
                break
            if action is not None:
                action()
            try:
                self.process.wait(timeout=EXIT_DEADLINE)
            except subprocess.TimeoutExpired:
                continue
        if mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)


class Walkers:
    """Reader threads walking the Zarrs: each takes the next Zarr (every Zarr once per pass, in an
    order shuffled per pass), lists each of its directories and checks the names, then opens every
    file, reads it whole (one byte more than it holds, so a long file shows), checks every byte,
    drops its pages from the page cache and closes it."""

    def __init__(self, root: Path, zarrs: list[ArchiveZarr], n: int, seed: int) -> None:
        self.root = root
        self.zarrs = zarrs
        self.seed = seed
        self.stop = threading.Event()
        self.reads: list[list[Read]] = [[] for _ in range(n)]
        self.listings: list[list[Read]] = [[] for _ in range(n)]
        self.in_flight: list[float | None] = [None] * n
        self.wrong: list[Wrong] = []
        self.unexpected: list[str] = []
        self._lock = threading.Lock()
        self._next = 0
        self._orders: dict[int, list[int]] = {}
        self.threads = [
            threading.Thread(target=self.run, args=(i,), daemon=True, name=f"walker-{i}")
            for i in range(n)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self, timeout: float) -> list[float]:
        """Stop the walkers; the ages of operations still in flight after `timeout` (hung)."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        now = time.monotonic()
        return [now - t for t in self.in_flight if t is not None]

    @property
    def walked(self) -> int:
        """Zarrs taken so far."""
        return self._next

    def take(self) -> ArchiveZarr:
        with self._lock:
            n = len(self.zarrs)
            pass_no, k = divmod(self._next, n)
            self._next += 1
            order = self._orders.get(pass_no)
            if order is None:
                order = list(range(n))
                random.Random(self.seed + pass_no).shuffle(order)
                self._orders = {pass_no: order}
            return self.zarrs[order[k]]

    def run(self, index: int) -> None:
        while not self.stop.is_set():
            zarr = self.take()
            base = self.root / zarr.path
            for directory, names in zarr.listing.items():
                self.listings[index].append(self.list_one(index, base, directory, names))
            for path, expected in zarr.files.items():
                self.reads[index].append(self.read_one(index, base, path, expected))

    def list_one(self, index: int, base: Path, directory: str, names: list[str]) -> Read:
        start = time.monotonic()
        self.in_flight[index] = start
        got: list[str] = []
        error = 0
        try:
            got = sorted(os.listdir(base / directory))
        except OSError as e:
            error = e.errno or -1
        except Exception as e:  # a bug in this script: counted, never silent
            error = -1
            self.unexpected.append(f"{base / directory}: {type(e).__name__}: {e}")
        end = time.monotonic()
        self.in_flight[index] = None
        wrong = len(set(names) ^ set(got)) if error == 0 else 0
        return Read(f"{base.name}/{directory}", start, end, len(names), len(got), wrong, error)

    def read_one(self, index: int, base: Path, path: str, expected: bytes) -> Read:
        start = time.monotonic()
        self.in_flight[index] = start
        got = b""
        error = 0
        try:
            fd = os.open(base / path, os.O_RDONLY)
            try:
                got = os.pread(fd, len(expected) + 1, 0)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError as e:
            error = e.errno or -1
        except Exception as e:  # a bug in this script: counted, never silent
            error = -1
            self.unexpected.append(f"{base / path}: {type(e).__name__}: {e}")
        end = time.monotonic()
        self.in_flight[index] = None
        wrong = 0
        if error == 0 and got != expected:
            wrong = count_wrong(got, memoryview(expected))
            n = min(len(got), len(expected))
            bad = np.flatnonzero(
                np.frombuffer(got, np.uint8, count=n) != np.frombuffer(expected, np.uint8, count=n)
            )
            first = int(bad[0]) if bad.size else n
            self.wrong.append(
                Wrong(f"{base.name}/{path}", 0, len(expected), len(got), wrong, first)
            )
        return Read(f"{base.name}/{path}", start, end, len(expected), len(got), wrong, error)


def zarrfs_stats(mnt: Path) -> dict[str, str] | None:
    """`zarrfs stats MNT` as a flat dict (`cache_dir.stalls` -> `1`); None when it fails."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "zarrfs", "stats", str(mnt)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0:
        return None
    return dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)


def number(snapshot: dict[str, str] | None, key: str) -> float:
    """A number of a `zarrfs stats` snapshot (nan when absent)."""
    try:
        return float((snapshot or {})[key])
    except (KeyError, ValueError):
        return float("nan")


@dataclass
class Tick:
    t: float  # seconds since the readers started
    zarrfs: dict[str, str] | None  # `zarrfs stats`
    stallfs_requests: int


class StatsSampler(threading.Thread):
    """`zarrfs stats` and stallfs's request count every STATS_INTERVAL seconds."""

    def __init__(self, mnt: Path, stallfs: StallFS, t0: float) -> None:
        super().__init__(daemon=True, name="stats-sampler")
        self.mnt, self.stallfs, self.t0 = mnt, stallfs, t0
        self.ticks: list[Tick] = []
        self.done = threading.Event()

    def take(self) -> Tick:
        tick = Tick(
            time.monotonic() - self.t0, zarrfs_stats(self.mnt), self.stallfs.stats()["requests"]
        )
        self.ticks.append(tick)
        return tick

    def run(self) -> None:
        while not self.done.wait(STATS_INTERVAL):
            self.take()


@dataclass
class StallRecord:
    start: float = 0.0  # monotonic
    end: float = 0.0
    wall_start: float = 0.0
    wall_end: float = 0.0
    seconds: float = 0.0  # as stallfs measured it
    waited: int = 0  # stallfs requests that waited for it


def scan_archive_log(text: str) -> dict[str, Any]:
    lines = text.splitlines()

    def matching(pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in lines if rx.search(line)]

    stalls = matching(r"did not answer within")
    failed = matching(r"read of .* failed")
    emfile = matching(r"Too many open files|EMFILE")
    return {
        "stall_warnings": len(stalls),
        "stall_noticed": [t for t in (log_time(line) for line in stalls) if t is not None],
        "read_failures": len(failed),
        "emfile": len(emfile),
        "warnings": len(matching(r" WARNING ")),
        "errors": len(matching(r" ERROR ")),
        "internal_errors": len(matching(INTERNAL_ERROR)),
        "tracebacks": len(matching(r"^Traceback")),
        "examples": (emfile[:2] + failed[:2] + stalls[:2] + matching(INTERNAL_ERROR)[:2])[:6],
    }


def cpu_seconds(pid: int | None) -> float:
    """User and system CPU time of a process so far (nan when it is gone or was never started)."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flocks_held(pid: int) -> int:
    """flock locks held by a process (/proc/locks)."""
    with open("/proc/locks") as locks:
        return sum(
            1 for line in locks if line.split()[1:2] == ["FLOCK"] and line.split()[4] == str(pid)
        )


def cache_dir_fds(pid: int, cache_dir: Path) -> list[str]:
    """The daemon's descriptors open on files under the cache dir (read from /proc: the cache dir
    itself is not touched)."""
    prefix = os.path.realpath(cache_dir) + os.sep
    out = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith(prefix):
                    out.append(link[len(prefix) :])
    except OSError:
        pass
    return out


def evaluate_archive(
    plan: ArchivePlan,
    stall: StallRecord,
    reads: list[Read],
    listings: list[Read],
    walkers: Walkers,
    hung: list[float],
    samples: list[Sample],
    ticks: list[Tick],
    final: dict[str, str] | None,
    stallfs_stats: dict[str, Any],
    log: dict[str, Any],
    limit_seen: int | None,
    end: dict[str, Any],
    daemon_alive: bool,
    daemon_exit: int | None,
    t0: float,
) -> dict[str, Any]:
    timeout = zarrfs_config.DISK_CACHE_STALL_TIMEOUT
    span = [(stall.start, stall.end)]
    during = [r for r in reads if overlaps(r, span)]
    outside = [r for r in reads if not overlaps(r, span)]
    done_in_stall = [r for r in reads if stall.start <= r.end <= stall.end and r.error == 0]
    noticed = stall.start + timeout + 1.0
    done_after_noticed = [r for r in done_in_stall if r.end >= noticed]
    everything = reads + listings
    errors = [r for r in everything if r.error != 0]
    errno_names = Counter(errno.errorcode.get(r.error, str(r.error)) for r in errors)
    wrong_bytes = sum(r.wrong for r in reads)
    wrong_names = sum(r.wrong for r in listings)
    slowest = max((r.end - r.start for r in everything), default=0.0)
    longest_during = max((r.end - r.start for r in during), default=0.0)
    longest_outside = max((r.end - r.start for r in outside), default=0.0)
    lists_during = [r for r in listings if overlaps(r, span)]
    longest_list_during = max((r.end - r.start for r in lists_during), default=0.0)
    fds_max = max(s.fds for s in samples)
    first, last = samples[0], samples[-1]
    rss_max = max(s.rss for s in samples)
    rss_budget = plan.memory_cache + plan.manifest_memory + RSS_CONSTANT
    peak = number(final, "descriptors.peak")
    budget = zarrfs_config.FD_BUDGET
    fds_under_cache, flocks = end["fds_under_cache"], end["flocks"]
    # the cache dir in use again once the bypass is over: the first snapshot taken after the
    # stall ended that no longer reports it stalled, against the last one
    stall_t = stall.start - t0
    after = [
        k for k in ticks if k.t >= stall.end - t0 and number(k.zarrfs, "cache_dir.stalled") == 0.0
    ]
    reuse: dict[str, Any] = {"observed_at_s": None}
    if after and final is not None:
        a, z = after[0], ticks[-1]
        reuse = {
            "observed_at_s": round(a.t, 1),
            "cache_dir_operations": number(final, "cache_dir.operations")
            - number(a.zarrfs, "cache_dir.operations"),
            "disk_hits": number(final, "disk_cache.hits") - number(a.zarrfs, "disk_cache.hits"),
            "blocks_written": number(final, "disk_cache.puts")
            - number(a.zarrfs, "disk_cache.puts"),
            "indexes_stored": number(final, "manifests.stored")
            - number(a.zarrfs, "manifests.stored"),
            "stallfs_requests": z.stallfs_requests - a.stallfs_requests,
        }
    used_again = reuse["observed_at_s"] is not None and (
        reuse["cache_dir_operations"] > 0 and reuse["stallfs_requests"] > 0
    )
    # stallfs requests while the daemon bypassed the cache dir (after the stall's own waiters)
    quiet = [
        k
        for k in ticks
        if stall.end - t0 + 2 <= k.t and number(k.zarrfs, "cache_dir.stalled") == 1.0
    ]
    bypass_requests = (
        quiet[-1].stallfs_requests - quiet[0].stallfs_requests if len(quiet) > 1 else None
    )
    criteria = [
        Criterion(
            "wrong bytes / names",
            f"{wrong_bytes} / {wrong_names}",
            "0",
            wrong_bytes == wrong_names == 0,
        ),
        Criterion(
            "errors (reads and listings)",
            f"{len(errors)} seen by readers, {log['read_failures']} logged by the daemon",
            "0",
            not errors and log["read_failures"] == 0,
        ),
        Criterion(
            "the stall happened",
            f"{stall.seconds:.1f} s, {stall.waited:,} stallfs requests waited; daemon stalls "
            f"{number(final, 'cache_dir.stalls'):.0f}, bypassed {number(final, 'cache_dir.bypassed'):,.0f}",
            "stalls ≥ 1",
            number(final, "cache_dir.stalls") >= 1 and stall.waited > 0,
        ),
        Criterion(
            "reads during the stall",
            f"{len(done_in_stall):,} completed in it, {len(done_after_noticed):,} after it was "
            f"noticed (+{timeout + 1:g} s)",
            "> 0",
            len(done_after_noticed) > 0,
        ),
        Criterion(
            "longest read overlapping the stall",
            f"{longest_during:.1f} s (listing {longest_list_during:.1f} s; outside: "
            f"{longest_outside:.1f} s)",
            f"≤ {STALLED_READ_LIMIT:g} s",
            longest_during <= STALLED_READ_LIMIT and longest_list_during <= STALLED_READ_LIMIT,
        ),
        Criterion(
            "no hung read",
            f"slowest {slowest:.1f} s, {len(hung)} still in flight at the end",
            f"< {HANG:.0f} s, 0",
            not hung and slowest < HANG,
        ),
        Criterion(
            "descriptor limit in force",
            f"soft/hard {limit_seen}, zarrfs stats says {number(final, 'descriptors.limit'):.0f}",
            f"{NOFILE}",
            limit_seen == NOFILE and number(final, "descriptors.limit") == NOFILE,
        ),
        Criterion(
            "daemon descriptors peak",
            f"/proc {fds_max}, zarrfs stats {peak:.0f}",
            f"≤ FD_BUDGET {budget} (limit {NOFILE})",
            fds_max <= budget and peak <= budget,
        ),
        Criterion(
            "daemon descriptors at the end",
            f"{first.fds} → max {fds_max} → {last.fds}; {len(fds_under_cache)} under the cache dir",
            f"end ≤ start + {FD_SLACK}",
            last.fds <= first.fds + FD_SLACK,
        ),
        Criterion(
            "nothing left open in the cache dir",
            f"{len(fds_under_cache)} descriptors, {flocks} flocks held at the end",
            "0",
            not fds_under_cache and flocks == 0,
        ),
        Criterion(
            "no descriptor exhaustion",
            f"{log['emfile']} 'Too many open files' in the log",
            "0",
            log["emfile"] == 0,
        ),
        Criterion(
            "cache dir used again after the bypass",
            "not observed (the run ended first)"
            if reuse["observed_at_s"] is None
            else f"from {reuse['observed_at_s']} s: {reuse['cache_dir_operations']:,.0f} operations, "
            f"{reuse['stallfs_requests']:,} stallfs requests, {reuse['disk_hits']:,.0f} disk hits, "
            f"{reuse['blocks_written']:,.0f} blocks written",
            "> 0",
            used_again,
        ),
        Criterion("daemon RSS max", mib(rss_max), f"≤ {mib(rss_budget)}", rss_max <= rss_budget),
        Criterion(
            "daemon alive to the end, clean exit",
            f"alive {daemon_alive}, exit {daemon_exit}",
            "alive, exit 0",
            daemon_alive and daemon_exit == 0,
        ),
        Criterion(
            "no internal error in the daemon log",
            f"{log['internal_errors']} INTERNAL_ERROR, {log['tracebacks']} tracebacks",
            "0",
            log["internal_errors"] == 0 and log["tracebacks"] == 0,
        ),
        Criterion(
            "no unexpected exception in the readers",
            str(len(walkers.unexpected)),
            "0",
            not walkers.unexpected,
        ),
    ]
    snapshot_keys = (
        "cache_dir.operations", "cache_dir.stalls", "cache_dir.bypassed", "cache_dir.stalled",
        "descriptors.open", "descriptors.peak", "descriptors.limit", "descriptors.budget",
        "memory.rss", "memory.held_total", "memory.budget_total", "manifests.fetches",
        "manifests.disk_loads", "manifests.stored", "manifests.not_stored", "manifests.loaded",
        "disk_cache.hits", "disk_cache.misses", "disk_cache.puts", "disk_cache.writes_dropped",
        "disk_hit_ratio", "read_latency_seconds.p99", "read_latency_seconds.max",
        "reads.count" ,
    )  # fmt: skip
    return {
        "reads": len(reads),
        "listings": len(listings),
        "zarrs_walked": walkers.walked,
        "passes": walkers.walked / plan.zarrs,
        "bytes_read": sum(r.got for r in reads),
        "wrong_bytes": wrong_bytes,
        "wrong_names": wrong_names,
        "wrong_examples": [asdict(w) for w in walkers.wrong[:5]],
        "errors": len(errors),
        "errors_by_errno": dict(errno_names),
        "stall": {
            "start_s": round(stall_t, 2),
            "end_s": round(stall.end - t0, 2),
            "seconds": stall.seconds,
            "stallfs_requests_waited": stall.waited,
            "noticed_s": [round(t - stall.wall_start + stall_t, 2) for t in log["stall_noticed"]],
            "reads_overlapping": len(during),
            "reads_completed_in_it": len(done_in_stall),
            "reads_completed_after_noticed": len(done_after_noticed),
            "longest_read_overlapping_s": longest_during,
            "longest_listing_overlapping_s": longest_list_during,
            "stallfs_requests_while_bypassed": bypass_requests,
        },
        "latency": {
            "all": latency_figures(reads),
            "during_stall": latency_figures(during),
            "outside_stall": latency_figures(outside),
            "listings": latency_figures(listings),
        },
        "slowest": [
            {
                "path": r.path,
                "ms": round((r.end - r.start) * 1000),
                "start_s": round(r.start - t0, 1),
            }
            for r in sorted(everything, key=lambda r: r.start - r.end)[:5]
        ],
        "descriptors": {
            "proc_start": first.fds,
            "proc_max": fds_max,
            "proc_end": last.fds,
            "stats_peak": peak,
            "limit": limit_seen,
            "budget": budget,
            "under_cache_dir_at_end": fds_under_cache,
            "flocks_at_end": flocks,
        },
        "rss": {"start": first.rss, "max": rss_max, "end": last.rss, "budget": rss_budget},
        "sockets_max": max(s.sockets for s in samples),
        "walked_s": end["walked_s"],
        "cpu_s": end["cpu_s"],
        "daemon_stats": {k: number(final, k) for k in snapshot_keys},
        "reuse": reuse,
        "stallfs": stallfs_stats,
        "daemon_log": log,
        "criteria": [asdict(c) for c in criteria],
        "pass": all(c.ok for c in criteria),
        "unexpected": walkers.unexpected[:5],
    }


def report_archive(
    plan: ArchivePlan, info: dict[str, Any], fig: dict[str, Any], wall: float
) -> list[str]:
    lat, st, ds, d = fig["latency"], fig["stall"], fig["descriptors"], fig["daemon_stats"]
    pause = "zarrfs's own" if plan.stall_pause is None else "shortened for this run"
    lines = [
        f"date {info['date']}, commit {info['commit']}, wall time {wall:.0f} s",
        f"{info['host']}, {info['cpus']} CPUs, load average at start "
        f"{' '.join(map(str, info['load_start']))}, at end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (shared machine), Python "
        f"{info['python']}, moto {info['moto']}",
        f"archive mount (`zarrfs mount dandi`), {plan.zarrs:,} Zarrs of {plan.chunks} chunks of "
        f"{plan.chunk_min // KiB}-{plan.chunk_max // KiB} KiB, daemon under `ulimit -n {NOFILE}` "
        f"(soft and hard); cache dir on stallfs, stalled {plan.stall_at:g} s after the walkers "
        f"{'began their second pass' if plan.warm else 'started'} ({st['start_s']:.0f} s into the "
        f"run) for {plan.stall_seconds:g} s; {plan.readers} walkers for {fig['walked_s']:.0f} s; "
        "memory cache "
        f"{mib(plan.memory_cache)}, manifest memory {plan.manifest_memory / MiB:g} MiB, disk cache "
        f"{plan.disk_cache}; stall timeout {zarrfs_config.DISK_CACHE_STALL_TIMEOUT:g} s, bypass "
        f"pause {plan.pause:g} s ({pause}); no S3 faults",
        "",
        "| figure | value |",
        "|---|---|",
        f"| Zarrs walked | {fig['zarrs_walked']:,} ({fig['passes']:.1f} passes) |",
        f"| reads / listings | {fig['reads']:,} / {fig['listings']:,} ({mib(fig['bytes_read'])}) |",
        f"| wrong bytes / wrong names | {fig['wrong_bytes']} / {fig['wrong_names']} |",
        f"| errors | {fig['errors']} "
        f"({', '.join(f'{k} {v}' for k, v in fig['errors_by_errno'].items()) or 'none'}) |",
        f"| stall | {st['start_s']:.1f}–{st['end_s']:.1f} s, {st['stallfs_requests_waited']:,} "
        f"stallfs requests waited; noticed by the daemon at "
        f"{', '.join(f'{t:.1f}' for t in st['noticed_s']) or '-'} s |",
        f"| reads overlapping the stall / completed in it / after it was noticed | "
        f"{st['reads_overlapping']:,} / {st['reads_completed_in_it']:,} / "
        f"{st['reads_completed_after_noticed']:,} |",
        f"| longest read overlapping the stall / outside it | "
        f"{st['longest_read_overlapping_s']:.2f} s / {lat['outside_stall']['max_ms'] / 1000:.2f} s |",
    ]
    for name in ("all", "outside_stall", "during_stall", "listings"):
        f = lat[name]
        lines.append(
            f"| latency p50 / p99 / max, {name.replace('_', ' ')} | {f['p50_ms']:.1f} / "
            f"{f['p99_ms']:.1f} / {f['max_ms']:.0f} ms |"
        )
    reuse = fig["reuse"]
    reuse_text = (
        "not observed (the run ended first)"
        if reuse["observed_at_s"] is None
        else f"from {reuse['observed_at_s']} s: {reuse['cache_dir_operations']:,.0f} operations, "
        f"{reuse['stallfs_requests']:,} stallfs requests, {reuse['disk_hits']:,.0f} disk hits, "
        f"{reuse['blocks_written']:,.0f} blocks written, {reuse['indexes_stored']:,.0f} indexes stored"
    )
    lines += [
        f"| daemon descriptors (/proc) start / max / end | {ds['proc_start']} / {ds['proc_max']} / "
        f"{ds['proc_end']} ({len(ds['under_cache_dir_at_end'])} under the cache dir and "
        f"{ds['flocks_at_end']} flocks held at the end) |",
        f"| `zarrfs stats` descriptors peak / limit / budget | {d['descriptors.peak']:.0f} / "
        f"{d['descriptors.limit']:.0f} / {d['descriptors.budget']:.0f} |",
        f"| `zarrfs stats` cache_dir operations / stalls / bypassed / stalled at the end | "
        f"{d['cache_dir.operations']:,.0f} / {d['cache_dir.stalls']:,.0f} / "
        f"{d['cache_dir.bypassed']:,.0f} / {d['cache_dir.stalled']:.0f} |",
        f"| stallfs requests while the daemon bypassed the cache dir | "
        f"{st['stallfs_requests_while_bypassed']} |",
        f"| cache dir used again after the bypass | {reuse_text} |",
        f"| manifests fetched / loaded from disk / stored / not stored | "
        f"{d['manifests.fetches']:,.0f} / {d['manifests.disk_loads']:,.0f} / "
        f"{d['manifests.stored']:,.0f} / {d['manifests.not_stored']:,.0f} |",
        f"| disk cache hits / misses / blocks written / writes dropped | "
        f"{d['disk_cache.hits']:,.0f} / {d['disk_cache.misses']:,.0f} / {d['disk_cache.puts']:,.0f} "
        f"/ {d['disk_cache.writes_dropped']:,.0f} |",
        f"| daemon RSS start / max / end | {mib(fig['rss']['start'])} / {mib(fig['rss']['max'])} / "
        f"{mib(fig['rss']['end'])} (`zarrfs stats` memory.rss {mib(d['memory.rss'])}, held "
        f"{mib(d['memory.held_total'])} of a budget of {mib(d['memory.budget_total'])}) |",
        f"| daemon sockets max | {fig['sockets_max']} |",
        f"| CPU seconds: daemon / stallfs / moto / soak (walkers) | "
        f"{' / '.join(f'{v:.0f}' for v in fig['cpu_s'].values())} |",
        f"| stallfs requests | {fig['stallfs']['requests']:,}: "
        f"{', '.join(f'{k} {v:,}' for k, v in fig['stallfs']['by_operation'].items())} |",
        f"| daemon log | {fig['daemon_log']['warnings']} warnings, {fig['daemon_log']['errors']} "
        f"errors, {fig['daemon_log']['internal_errors']} INTERNAL_ERROR |",
        "",
        "| criterion | measured | limit | result |",
        "|---|---|---|---|",
    ]
    for c in fig["criteria"]:
        verdict = "PASS" if c["ok"] else "**FAIL**"
        lines.append(f"| {c['name']} | {c['measured']} | {c['limit']} | {verdict} |")
    for c in fig["criteria"]:
        lines.append(f"{'PASS' if c['ok'] else 'FAIL'}: {c['name']}: {c['measured']}")
    for example in fig["daemon_log"]["examples"]:
        lines.append(f"log: {example}")
    for r in fig["slowest"][:3]:
        lines.append(f"slow: {r}")
    for w in fig["wrong_examples"]:
        lines.append(f"wrong: {w}")
    for u in fig["unexpected"]:
        lines.append(f"reader exception: {u}")
    if ds["under_cache_dir_at_end"]:
        lines.append(f"open under the cache dir at the end: {ds['under_cache_dir_at_end'][:10]}")
    return lines


def pause_override(directory: Path, seconds: float) -> dict[str, str]:
    """An environment whose Python processes bypass a stalled cache dir for `seconds` instead of
    zarrfs's DISK_CACHE_STALL_PAUSE (a `sitecustomize` on PYTHONPATH), so that a short run sees
    the bypass end."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        f"import zarrfs.config\nzarrfs.config.DISK_CACHE_STALL_PAUSE = {seconds!r}\n"
    )
    path = os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def descriptor_limit(pid: int) -> int | None:
    """The process's soft limit on open files, if soft and hard agree (else None)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft) if soft == hard else None
    return None


def run_archive(args: argparse.Namespace) -> int:
    plan = make_archive_plan(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally blocks still clean up
    info = machine_info()
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="zarrfs-soak-archive-"))
    with ExitStack() as stack:
        if args.keep:
            print(f"scratch dir: {scratch}")
        else:
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        zarrs = make_archive_zarrs(plan)
        s3 = stack.enter_context(LocalS3())
        api = stack.enter_context(archive_api())
        t = time.monotonic()
        publish_archive(s3, zarrs)
        n_files = sum(len(z.files) for z in zarrs)
        total = sum(len(b) for z in zarrs for b in z.files.values())
        print(
            f"published {plan.zarrs:,} Zarrs ({n_files:,} objects, {mib(total)}) in "
            f"{time.monotonic() - t:.1f} s",
            flush=True,
        )
        backing, stall_mnt, mnt = scratch / "backing", scratch / "stallfs", scratch / "mnt"
        for d in (backing, stall_mnt, mnt):
            d.mkdir()
        stallfs = StallFS(backing, stall_mnt)
        stack.callback(stallfs.stop)
        cache = stall_mnt / "cache"
        env = None
        if plan.stall_pause is not None:
            env = pause_override(scratch / "site", plan.stall_pause)
        command = [
            "prlimit", f"--nofile={NOFILE}:{NOFILE}", "--",
            sys.executable, "-m", "zarrfs", "mount", "-f", "dandi", str(mnt),
            "--endpoint-url", s3.endpoint_url, "--api-url", api.url, "--cache-dir", str(cache),
            "--manifest-root", f"s3://{s3.bucket}/zarr-manifest/",
            "--memory-cache-size", str(plan.memory_cache),
            "--manifest-memory", str(plan.manifest_memory),
            "--cache-size", plan.disk_cache,
        ]  # fmt: skip
        daemon = Daemon(command, mnt, scratch / "zarrfs.log", env=env)
        stack.callback(daemon.stop)
        stack.callback(stallfs.end_stall)  # before the daemon stops, should anything fail mid-stall
        limit_seen = descriptor_limit(daemon.pid)
        root = mnt / "dandisets" / ARCHIVE_DANDISET / "releases" / ARCHIVE_VERSION
        print(f"mounted; {len(os.listdir(mnt / 'dandisets'))} dandiset listed; walking", flush=True)
        t0 = time.monotonic()
        sampler = Sampler(daemon.pid, int(s3.endpoint_url.rsplit(":", 1)[1]), t0, interval=0.5)
        sampler.take()
        sampler.start()
        stack.callback(sampler.done.set)
        ticks = StatsSampler(mnt, stallfs, t0)
        ticks.take()
        ticks.start()
        stack.callback(ticks.done.set)
        walkers = Walkers(root, zarrs, plan.readers, plan.seed)
        walkers.start()
        stall = StallRecord()

        def wait_until(t: float) -> None:
            while (left := t0 + t - time.monotonic()) > 0:
                time.sleep(min(left, 0.5))
                if daemon.process.poll() is not None:
                    raise RuntimeError(f"the daemon died:\n{daemon.output()[-4000:]}")

        def say(what: str) -> None:
            n = sum(len(r) for r in walkers.reads)
            print(
                f"  {time.monotonic() - t0:6.1f} s  {what} ({n:,} reads, {walkers.walked:,} Zarrs so far)",
                flush=True,
            )

        try:
            if plan.warm:
                while walkers.walked < plan.zarrs:  # every Zarr taken once: the second pass begins
                    wait_until(time.monotonic() - t0 + 0.5)
                    if not any(thread.is_alive() for thread in walkers.threads):
                        raise RuntimeError(f"the walkers stopped: {walkers.unexpected[:3]}")
                say("second pass")
            wait_until(time.monotonic() - t0 + plan.stall_at)
            stallfs.stall()
            stall.start, stall.wall_start = time.monotonic(), time.time()
            say(f"cache dir stalled for {plan.stall_seconds:g} s")
            wait_until(stall.start - t0 + plan.stall_seconds)
            stall.seconds, stall.waited = stallfs.resume()
            stall.end, stall.wall_end = time.monotonic(), time.time()
            say(f"cache dir answering again ({stall.waited:,} requests had waited)")
            wait_until(stall.start - t0 + plan.bypass_after)
            say("the daemon's bypass should be over")
            wait_until(stall.start - t0 + plan.bypass_after + plan.after_bypass)
        finally:
            if stall.start and not stall.end:
                stallfs.end_stall()
            hung = walkers.join(timeout=HANG)
        walked_s = time.monotonic() - t0
        say("walkers stopped")
        time.sleep(STATS_INTERVAL)  # the daemon rewrites its stats every 2 s
        ticks.done.set()
        ticks.join()
        last_tick = ticks.take()
        sampler.done.set()
        final_sample = sampler.take()
        daemon_alive = daemon.process.poll() is None and final_sample is not None
        end = {
            "fds_under_cache": cache_dir_fds(daemon.pid, cache),
            "flocks": flocks_held(daemon.pid),
            "walked_s": walked_s,
            "cpu_s": {
                "daemon": cpu_seconds(daemon.pid),
                "stallfs": cpu_seconds(stallfs.pid),
                "moto": cpu_seconds(s3.pid),
                "soak": time.process_time(),
            },
        }
        stallfs_stats = stallfs.stats()
        daemon.stop()
        log = scan_archive_log(daemon.output())
        fig = evaluate_archive(
            plan, stall, [r for rs in walkers.reads for r in rs],
            [r for rs in walkers.listings for r in rs], walkers, hung, sampler.samples, ticks.ticks,
            last_tick.zarrfs, stallfs_stats, log, limit_seen, end, daemon_alive,
            daemon.exit_code, t0,
        )  # fmt: skip
    wall = time.monotonic() - started
    lines = report_archive(plan, info, fig, wall)
    print()
    print("\n".join(lines))
    if args.json:
        doc = {
            "machine": info,
            "plan": asdict(plan),
            "wall_s": wall,
            **fig,
            "samples": [asdict(s) for s in sampler.samples],
            "stats_ticks": [asdict(k) for k in ticks.ticks],
        }
        args.json.write_text(json.dumps(doc, indent=1))
    print("\nPASS" if fig["pass"] else "\nFAIL")
    return 0 if fig["pass"] else 1


# --- main -----------------------------------------------------------------------------------------


def run_schedule(
    windows: list[Window],
    plan: Plan,
    proxy: Proxy,
    sampler: Sampler,
    daemon: Daemon,
    on_window: Callable[[int, Window], None],
) -> None:
    before = proxy.stats()
    for i, w in enumerate(windows):
        settings = {} if w.mode == "clean" else plan.fault_settings(w.mode)
        proxy.set_faults(settings)
        w.start, w.wall_start = time.monotonic(), time.time()
        on_window(i, w)
        deadline = w.start + w.planned
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.5))
            if daemon.process.poll() is not None:
                raise RuntimeError(f"the daemon died:\n{daemon.output()[-4000:]}")
        if w.mode != "clean":
            proxy.set_faults({})
        w.end, w.wall_end = time.monotonic(), time.time()
        after = proxy.stats()
        w.faults = {k: after["faults"][k] - before["faults"][k] for k in FAULT_KINDS}
        w.requests = after["requests"] - before["requests"]
        before = after
        s = sampler.take()
        if s is not None:
            w.rss_end, w.fds_end = s.rss, s.fds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 files, about 50 s (CI)")
    parser.add_argument("--duration", type=float, help="seconds of reading (600; quick 48)")
    parser.add_argument("--files", type=int, help="small chunks (5000; quick 1000)")
    parser.add_argument("--readers", type=int, help="reader threads (32; --archive 16)")
    parser.add_argument("--probability", type=float, default=0.3, help="per request (0.3)")
    parser.add_argument("--slow-probability", type=float, default=0.2)
    parser.add_argument("--slow-delay", type=float, help="seconds (3; quick 1)")
    parser.add_argument("--memory-cache-size", help="the daemon's (64M; --archive 16M)")
    parser.add_argument("--manifest-memory", help="the daemon's (32M; --archive 1M)")
    parser.add_argument(
        "--disk-cache", metavar="SIZE", help="the daemon's --cache-size (0; --archive 1G)"
    )
    parser.add_argument("--seed", type=int, default=20251130)
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir (logs)")
    archive = parser.add_argument_group(
        "the archive scenario",
        "an archive mount walking many small Zarrs under `ulimit -n 1024`, its cache dir on "
        "stallfs, which stops answering mid-run (benchmarks/README.md, 'Soak: the archive')",
    )
    archive.add_argument("--archive", action="store_true", help="run it")
    archive.add_argument("--zarrs", type=int, help="Zarrs published and walked (1500)")
    archive.add_argument(
        "--warm",
        action=argparse.BooleanOptionalAction,
        help="stall once every Zarr has been walked, so that indexes and blocks are read back from "
        "the cache dir (default; quick: --no-warm, a stall while they are written)",
    )
    archive.add_argument(
        "--stall-at",
        type=float,
        help="seconds after the walkers start (quick: 10), or after their second pass begins (20)",
    )
    archive.add_argument("--stall-seconds", type=float, help="how long (30; quick 12)")
    archive.add_argument(
        "--after-bypass", type=float, help="seconds of walking after the bypass (40; quick 10)"
    )
    archive.add_argument(
        "--stall-pause",
        type=float,
        help="the daemon's bypass of a stalled cache dir, seconds (zarrfs's own, 60; quick 20)",
    )
    args = parser.parse_args()
    if args.archive:
        return run_archive(args)
    plan = make_plan(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally blocks still clean up
    info = machine_info()
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="zarrfs-soak-"))
    with ExitStack() as stack:
        if args.keep:
            print(f"scratch dir: {scratch}")
        else:
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        dataset = make_dataset(plan)
        # moto keeps objects up to this size in memory instead of temporary files
        os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(plan.big_max + MiB)
        s3 = stack.enter_context(LocalS3())
        t = time.monotonic()
        write_dandiset(s3, dataset)
        print(
            f"wrote {len(dataset.paths):,} objects ({mib(dataset.total_bytes)}) in "
            f"{time.monotonic() - t:.1f} s",
            flush=True,
        )
        proxy = Proxy(s3.endpoint_url, plan.seed)
        stack.callback(proxy.stop)
        mnt = scratch / "mnt"
        mnt.mkdir()
        command = [
            sys.executable, "-m", "zarrfs", "mount", "-f", f"{DANDISET}@{VERSION}", str(mnt),
            "--endpoint-url", proxy.url, "--cache-dir", str(scratch / "cache"),
            "--manifest-root", f"s3://{s3.bucket}/zarr-manifest/",
            "--memory-cache-size", str(plan.memory_cache),
            "--manifest-memory", str(plan.manifest_memory),
            *disk_cache_args(plan.disk_cache),
        ]  # fmt: skip
        daemon = Daemon(command, mnt, scratch / "zarrfs.log")
        stack.callback(daemon.stop)
        root = mnt / ZARR_PATH
        # the manifest is fetched and verified before any fault: a clean start
        listed = len(os.listdir(root / "0")) + len(os.listdir(root / "1"))
        print(f"mounted; {listed} directory entries listed; reading for {plan.duration:.0f} s")
        windows = make_schedule(plan)
        t0 = time.monotonic()
        sampler = Sampler(daemon.pid, proxy.port, t0)
        sampler.take()
        sampler.start()
        stack.callback(sampler.done.set)
        readers = Readers(root, dataset, plan.readers, plan.seed)
        readers.start()

        def progress(i: int, w: Window) -> None:
            n = sum(len(r) for r in readers.results)
            print(
                f"  {w.start - t0:6.1f} s  window {i:2} {w.mode:9} ({n:,} reads so far)", flush=True
            )

        try:
            run_schedule(windows, plan, proxy, sampler, daemon, progress)
        finally:
            hung = readers.join(timeout=HANG)
        time.sleep(1.0)  # let the last replies settle before the final sample
        sampler.done.set()
        final = sampler.take()
        daemon_alive = daemon.process.poll() is None and final is not None
        proxy_stats = proxy.stats()
        daemon.stop()
        log = scan_log(
            daemon.output(),
            [(w.wall_start, w.wall_end + plan.margin) for w in windows if w.mode != "clean"],
        )
        reads = [r for per_thread in readers.results for r in per_thread]
        fig = evaluate(
            plan, dataset, windows, reads, readers, hung, sampler.samples, proxy_stats, log,
            daemon_alive, daemon.exit_code,
        )  # fmt: skip
    wall = time.monotonic() - started
    lines = report(plan, dataset, info, fig, wall)
    print()
    print("\n".join(lines))
    if args.json:
        doc = {
            "machine": info,
            "plan": asdict(plan),
            "wall_s": wall,
            **fig,
            "samples": [asdict(s) for s in sampler.samples],
            "schedule": [
                {"mode": w.mode, "start": w.start - t0, "end": w.end - t0} for w in windows
            ],
        }
        args.json.write_text(json.dumps(doc, indent=1))
    print("\nPASS" if fig["pass"] else "\nFAIL")
    return 0 if fig["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
