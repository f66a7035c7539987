"""Disk block cache benchmark: `DiskBlockCache.put`/`get` throughput and per-block latency.

For 1 MiB and 16 KiB blocks, with and without fsync, on a fresh cache dir: a put pass, a cold get
pass (the files' pages written back and dropped from the page cache with posix_fadvise, so the
disk is read) and a warm get pass; then one `evict` scan over what was written. Each pass runs with 1 thread and with
`--threads` threads (the way a mount calls it from a thread limiter). Every byte read back is
compared with what was written. Prints the median of each figure over `--repeat` runs; writes
nothing else.

    python benchmarks/disk_cache.py                      # 256 MiB of 1 MiB blocks, 32 MiB of 16 KiB
    python benchmarks/disk_cache.py --quick
    python benchmarks/disk_cache.py --dir /mnt/nfs/scratch --threads 8

`--dir` picks the filesystem to measure (default: the system temp dir); a fresh directory is made
under it and deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import xxhash

from zarrfs.base.refs import ObjectRef
from zarrfs.io.disk_store import DiskBlockCache, identity_digest

BUCKET = "dandiarchive"
KiB, MiB = 1 << 10, 1 << 20


@dataclass(frozen=True, slots=True)
class Pass:
    seconds: float
    latencies: list[float]
    nbytes: int

    @property
    def figures(self) -> tuple[float, float, float, float]:
        """MiB/s, blocks/s, p50 µs, p99 µs."""
        lat = sorted(self.latencies)
        p50 = statistics.median(lat) * 1e6
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6
        return self.nbytes / self.seconds / MiB, len(lat) / self.seconds, p50, p99


def median_row(label: str, passes: list[Pass]) -> str:
    """One table row: the median of each figure over the runs."""
    figures = [
        statistics.median(column) for column in zip(*(p.figures for p in passes), strict=True)
    ]
    return "| " + label + "".join(f" | {x:,.0f}" for x in figures) + " |"


def timed(threads: int, items: list[int], op: Callable[[int], int]) -> Pass:
    """Run op(i) for every item on `threads` threads; op returns bytes moved."""
    latencies: list[float] = [0.0] * len(items)

    def one(i: int) -> int:
        started = time.perf_counter()
        n = op(i)
        latencies[i] = time.perf_counter() - started
        return n

    started = time.perf_counter()
    if threads == 1:
        nbytes = sum(one(i) for i in items)
    else:
        with ThreadPoolExecutor(threads) as pool:
            nbytes = sum(pool.map(one, items))
    return Pass(time.perf_counter() - started, latencies, nbytes)


def drop_page_cache(root: Path) -> None:
    """Write back, then drop the pages of the files under `root` (not the whole machine's)."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_case(
    base: Path, block_size: int, total: int, fsync: bool, threads: int
) -> tuple[dict[str, Pass], float]:
    """One run of every pass of one case: the passes by row label, and the evict scan's seconds."""
    passes: dict[str, Pass] = {}
    count = max(1, total // block_size)
    # distinct payloads, so nothing can be served from a previous identical write
    payloads = [os.urandom(block_size) for _ in range(min(count, 64))]
    refs = [ObjectRef(f"zarr/bench/{i}", f"v{i}", block_size, f"e{i}") for i in range(count)]
    fs = "fsync" if fsync else "no fsync"
    size = f"{block_size // KiB} KiB" if block_size < MiB else f"{block_size // MiB} MiB"
    scan = 0.0
    for n_threads in sorted({1, threads}):
        root = Path(tempfile.mkdtemp(dir=base))
        cache = DiskBlockCache(
            root, max_bytes=1 << 50, block_size=block_size, min_free_fraction=0.0, fsync=fsync
        )

        def put(i: int, cache: DiskBlockCache = cache) -> int:
            if not cache.put(BUCKET, refs[i], 0, payloads[i % len(payloads)]):
                raise SystemExit(f"FAIL: put {i} was skipped: {cache.stats()}")
            return block_size

        def get(i: int, cache: DiskBlockCache = cache) -> int:
            data = cache.get(BUCKET, refs[i], 0)
            if data != payloads[i % len(payloads)]:
                raise SystemExit(f"FAIL: get {i} returned wrong bytes or None")
            return block_size

        items = list(range(count))
        label = f"{size} | {fs} | {n_threads}"
        passes[f"{label} | put"] = timed(n_threads, items, put)
        drop_page_cache(root)
        passes[f"{label} | get cold"] = timed(n_threads, items, get)
        passes[f"{label} | get warm"] = timed(n_threads, items, get)
        if n_threads == 1:
            started = time.perf_counter()
            report = cache.evict()
            scan = time.perf_counter() - started
            assert report is not None and report.scanned_blocks == count
        shutil.rmtree(root)
    return passes, scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--big-total", type=int, default=256, help="MiB of 1 MiB blocks")
    parser.add_argument("--small-total", type=int, default=32, help="MiB of 16 KiB blocks")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="runs; medians are printed")
    parser.add_argument("--quick", action="store_true", help="64 MiB and 8 MiB, 1 run")
    args = parser.parse_args()
    if args.quick:
        args.big_total, args.small_total, args.repeat = 64, 8, 1
    base = Path(tempfile.mkdtemp(prefix="zarrfs-bench-disk-cache-", dir=args.dir))
    st = os.statvfs(base)
    print(f"# disk block cache benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(
        f"# {platform.node()}: {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {base} "
        f"({st.f_bavail * st.f_frsize / 2**30:.0f} GiB free)"
    )
    for size in (16 * KiB, MiB):
        data = os.urandom(size)
        started = time.perf_counter()
        for _ in range(1000):
            xxhash.xxh3_64_intdigest(data)
        xxh = (time.perf_counter() - started) / 1000 * 1e6
        ref = ObjectRef("zarr/bench/0", "v0", size, "e0")
        started = time.perf_counter()
        for _ in range(1000):
            identity_digest(BUCKET, ref, size)
        ident = (time.perf_counter() - started) / 1000 * 1e6
        print(f"# xxh3-64 of {size // KiB} KiB: {xxh:.1f} µs; identity digest: {ident:.1f} µs")
    print()
    print("| block | fsync | threads | op | MiB/s | blocks/s | p50 µs | p99 µs |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    scans: list[str] = []
    try:
        for block_size, total in ((MiB, args.big_total * MiB), (16 * KiB, args.small_total * MiB)):
            for fsync in (False, True):
                runs = [
                    run_case(base, block_size, total, fsync, args.threads)
                    for _ in range(args.repeat)
                ]
                for label in runs[0][0]:
                    print(median_row(label, [passes[label] for passes, _ in runs]), flush=True)
                count = total // block_size
                scan = statistics.median(seconds for _, seconds in runs)
                scans.append(
                    f"evict scan of {count:,} blocks of {block_size // KiB} KiB "
                    f"({'fsync' if fsync else 'no fsync'}): {scan:.3f} s "
                    f"({scan / count * 1e6:.1f} µs per block, page cache warm)"
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    for line in scans:
        print(f"- {line}")


if __name__ == "__main__":
    main()
