"""Soak: a real zarrfs mount under 32 concurrent random readers, with S3 faults injected part of the time.

    python benchmarks/soak.py                  # 5,000 files, 10 minutes
    python benchmarks/soak.py --quick          # 1,000 files, about 50 s (CI)
    python benchmarks/soak.py --duration 120 --json soak.json

Writes a dandiset holding one Zarr (thousands of chunks of 4-256 KiB and a few multi-MB entries, all
single-part uploads so each ETag is the object's MD5) into a local S3 (moto, its own process), puts
`faultproxy.py` (its own process) between it and a zarrfs mount, and runs reader threads for the
set time. Each read opens a random file, `pread`s a random range (sometimes the whole file), compares
every byte with what was written, and drops the file's pages from the kernel page cache so the next
read reaches the daemon again. A schedule alternates clean windows and fault windows (503 SlowDown,
connection resets, truncated bodies, slow responses, flipped bytes, then all of them at once). A
sampler records the daemon's RSS, open fds and TCP connections every second.

It prints a table of figures with a PASS/FAIL line per criterion and exits 1 on any FAIL. See
benchmarks/README.md ("Soak"). Everything it makes lives in one scratch directory under the system
temp dir, removed at the end (unless --keep); every process it starts is stopped by its PID, and the
mount is always unmounted.
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
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from zarrfs import config as zarrfs_config
from zarrfs.config import parse_size
from zarrfs.demo.locals3 import LocalS3
from zarrfs.demo.sample import (
    ManifestLeaf,
    build_manifest,
    format_manifest,
    manifest_key,
    to_yaml,
    zarr_checksum_of,
)
from zarrfs.fuse_ops import INTERNAL_ERROR

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
        readers=args.readers,
        duration=args.duration or (48.0 if quick else 600.0),
        first_clean=5.0 if quick else 30.0,
        fault_window=3.0 if quick else 25.0,
        clean_window=4.0 if quick else 25.0,
        probability=args.probability,
        slow_probability=args.slow_probability,
        slow_delay=args.slow_delay if args.slow_delay is not None else (1.0 if quick else 3.0),
        memory_cache=parse_size(args.memory_cache_size),
        manifest_memory=parse_size(args.manifest_memory),
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

    def __init__(self, command: list[str], mnt: Path, log: Path) -> None:
        self.mnt = mnt
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
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
    parser.add_argument("--readers", type=int, default=32)
    parser.add_argument("--probability", type=float, default=0.3, help="per request (0.3)")
    parser.add_argument("--slow-probability", type=float, default=0.2)
    parser.add_argument("--slow-delay", type=float, help="seconds (3; quick 1)")
    parser.add_argument("--memory-cache-size", default="64M")
    parser.add_argument("--manifest-memory", default="32M")
    parser.add_argument("--disk-cache", metavar="SIZE", help="the daemon's --cache-size (0)")
    parser.add_argument("--seed", type=int, default=20251130)
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir (logs)")
    args = parser.parse_args()
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
