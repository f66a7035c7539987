"""A Dask reduction over a published Zarr array: the zarrfs fsspec face, the zarrfs mount, and s3fs.

Publishes a dandiset holding one Zarr array (format 2, 256 x 256 uint16 chunks) into a local S3
(moto, its own process, `--latency` per response) behind a counting proxy (`faultproxy.py`, no
faults), then, for 1, 2 and 4 Dask worker processes (`distributed.LocalCluster`, `--threads` threads
each), sums the array with `dask.array.from_zarr(...).sum().compute()` through

  (a) `zarrfs://<dandiset>@<version>/<path>`: the zarrfs fsspec face, pinned to the published version,
      one cache dir shared by the workers (node-local);
  (b) a zarrfs mount of the version (`zarrfs mount`, up before the job starts), read as local files;
  (c) s3fs on `s3://<bucket>/zarr/<zarr id>/`: the live Zarr, unpinned (what people do today).

Each run starts a fresh cluster whose workers have imported zarr, Dask and the storage library (a
long-lived worker pays those imports once, not per job), and for (a) and (b) a fresh cache dir and
mount: `cold` is the first reduction (nothing cached, connections not yet open), `warm` the second on
the same cluster. Every sum is checked against the array as
written. Requests are what the proxy forwarded during the reduction.

    python benchmarks/dask_compare.py              # 400 chunks, 20 ms latency, 5 runs per cell
    python benchmarks/dask_compare.py --quick      # 100 chunks, 1 run per cell

See benchmarks/README.md ("Dask").
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from soak import Proxy

from zarrfs.demo.locals3 import LocalS3
from zarrfs.demo.publish import publish_zarrs
from zarrfs.demo.sample import read_tree

DANDISET = "000961"
VERSION = "0.251107.1200"
ZARR_PATH = "sub-01/sub-01_bench.zarr"
CHUNK = 256
MOUNT_DEADLINE = 60.0
KINDS = ("fsspec", "mount", "s3fs")
LABELS = {
    "fsspec": "(a) zarrfs fsspec",
    "mount": "(b) zarrfs mount",
    "s3fs": "(c) s3fs, live",
}


@dataclass
class Cell:
    """The runs of one kind at one worker count."""

    cold: list[float] = field(default_factory=list)
    #: Of `cold`: opening the array in the client (`from_zarr`: metadata, and for (a) starting
    #: zarrfs in the client process).
    opening: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    cold_requests: list[int] = field(default_factory=list)
    warm_requests: list[int] = field(default_factory=list)

    def median(self, what: str) -> float:
        values: list[float] = getattr(self, what)
        return statistics.median(values)


# --- setup -------------------------------------------------------------------------------------


def write_array(s3: LocalS3, n_chunks: int) -> tuple[np.ndarray, str]:
    """Publish the benchmark array; returns it and its Zarr id."""
    import zarr

    side = max(1, round(n_chunks**0.5))
    y, x = np.mgrid[0 : side * CHUNK, 0 : side * CHUNK]
    rng = np.random.default_rng(961)
    data = (1000 + 500 * np.sin(y / 50.0) * np.cos(x / 70.0)).astype(np.uint16)
    data += rng.integers(0, 200, size=data.shape, dtype=np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        array = zarr.create_array(
            Path(tmp) / "a.zarr", shape=data.shape, chunks=(CHUNK, CHUNK), dtype=data.dtype,
            zarr_format=2,
        )  # fmt: skip
        array[:] = data
        tree = read_tree(Path(tmp) / "a.zarr")
    published = publish_zarrs(s3, DANDISET, VERSION, {ZARR_PATH: tree})
    return data, published[ZARR_PATH].zarr_id


@contextmanager
def mounted(endpoint: str, cache: Path, base: Path) -> Iterator[Path]:
    """A zarrfs mount of the benchmark version (foreground daemon), unmounted at the end."""
    mnt = base / "mnt"
    mnt.mkdir()
    log = base / "zarrfs.log"
    command = [
        sys.executable, "-m", "zarrfs", "mount", "-f", f"{DANDISET}@{VERSION}", str(mnt),
        "--endpoint-url", endpoint, "--cache-dir", str(cache),
        "--manifest-root", "s3://dandiarchive/zarr-manifest/", "--api-url", "http://127.0.0.1:9/api",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.perf_counter() + MOUNT_DEADLINE
        while not os.path.ismount(mnt):
            if process.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"the mount did not come up:\n{log.read_text()}")
            time.sleep(0.01)
        yield mnt
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _preimport(kind: str) -> None:
    """What a long-lived worker has imported before the job: the reader, and the storage library
    of `kind` (its import is a cost per worker process, not per job)."""
    import dask.array  # noqa: F401
    import zarr  # noqa: F401

    if kind == "fsspec":
        import zarrfs.faces.fsspec  # noqa: F401
    elif kind == "s3fs":
        import s3fs  # noqa: F401


# --- one run -------------------------------------------------------------------------------------


def reduction(url: str, storage_options: dict[str, Any] | None, expected: int) -> float:
    """Sum the array at `url` on the cluster (checking the sum); seconds spent opening it."""
    import dask.array as da

    start = time.perf_counter()
    array = da.from_zarr(url, storage_options=storage_options)  # type: ignore[no-untyped-call]
    opened = time.perf_counter() - start
    total = int(array.sum(dtype=np.int64).compute())
    if total != expected:
        raise AssertionError(f"{url}: sum {total}, expected {expected}")
    return opened


def run_once(
    kind: str,
    workers: int,
    threads: int,
    proxy: Proxy,
    zarr_id: str,
    expected: int,
    scratch: Path,
    cell: Cell,
) -> None:
    from distributed import Client, LocalCluster

    base = Path(tempfile.mkdtemp(dir=scratch))
    cache = base / "cache"
    with (
        reading(kind, proxy, zarr_id, cache, base) as (url, options),
        LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=workers, threads_per_worker=threads, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,  # type: ignore[no-untyped-call]
    ):
        client.run(_preimport, kind)
        for times, counts in ((cell.cold, cell.cold_requests), (cell.warm, cell.warm_requests)):
            before = int(proxy.stats()["requests"])
            start = time.perf_counter()
            opened = reduction(url, options, expected)
            times.append(time.perf_counter() - start)
            counts.append(int(proxy.stats()["requests"]) - before)
            if times is cell.cold:
                cell.opening.append(opened)
    shutil.rmtree(base, ignore_errors=True)


@contextmanager
def reading(
    kind: str, proxy: Proxy, zarr_id: str, cache: Path, base: Path
) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """The URL (or path) of the array and the storage options a reader of `kind` uses."""
    if kind == "fsspec":
        yield (
            f"zarrfs://{DANDISET}@{VERSION}/{ZARR_PATH}",
            {
                "endpoint_url": proxy.url,
                "manifest_root": "s3://dandiarchive/zarr-manifest/",
                "api_url": "http://127.0.0.1:9/api",
                "cache_dir": str(cache),
            },
        )
    elif kind == "mount":
        with mounted(proxy.url, cache, base) as mnt:
            yield str(mnt / ZARR_PATH), None
    else:
        options = {"anon": True, "client_kwargs": {"endpoint_url": proxy.url}}
        yield f"s3://dandiarchive/zarr/{zarr_id}/", options


# --- CPU per chunk ---------------------------------------------------------------------------------

CPU_PROBE = f"""
import resource, sys, time
from concurrent.futures import ThreadPoolExecutor
kind, endpoint, cache, zarr_id, side, threads = sys.argv[1:7]
side, threads = int(side), int(threads)
if kind.startswith("fsspec"):
    from zarrfs.faces.fsspec import ZarrfsFileSystem
    fs = ZarrfsFileSystem(endpoint_url=endpoint, manifest_root="s3://dandiarchive/zarr-manifest/",
                          api_url="http://127.0.0.1:9/api", cache_dir=cache,
                          cache_size=0 if kind == "fsspec-no-disk-cache" else None)
    root = "{DANDISET}@{VERSION}/{ZARR_PATH}"
else:
    import s3fs
    fs = s3fs.S3FileSystem(anon=True, client_kwargs={{"endpoint_url": endpoint}})
    root = f"dandiarchive/zarr/{{zarr_id}}"
fs.cat_file(root + "/.zarray")  # started, connected
names = [f"{{root}}/{{i}}.{{j}}" for i in range(side) for j in range(side)]
before = resource.getrusage(resource.RUSAGE_SELF)
with ThreadPoolExecutor(threads) as pool:
    list(pool.map(fs.cat_file, names))
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
print(cpu / len(names) * 1000)
"""
CPU_KINDS = ("fsspec", "fsspec-no-disk-cache", "s3fs")


def cpu_per_chunk(
    endpoint: str, zarr_id: str, n_chunks: int, threads: int, scratch: Path, runs: int
) -> dict[str, list[float]]:
    """CPU ms per chunk read cold (after the first request) by one process reading every chunk with
    `threads` threads, without Dask: what each way costs a worker per chunk."""
    side = max(1, round(n_chunks**0.5))
    out: dict[str, list[float]] = {kind: [] for kind in CPU_KINDS}
    for _ in range(runs):
        for kind in CPU_KINDS:
            cache = tempfile.mkdtemp(dir=scratch)
            result = subprocess.run(
                [sys.executable, "-c", CPU_PROBE, kind, endpoint, cache, zarr_id, str(side),
                 str(threads)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            out[kind].append(float(result.stdout.strip().splitlines()[-1]))
    return out


# --- report --------------------------------------------------------------------------------------


def report(cells: dict[tuple[str, int], Cell], worker_counts: list[int]) -> int:
    print()
    print(
        "| | workers | cold (s): median (runs) | of which opening | warm (s) "
        "| requests cold / warm | cold speed-up vs 1 worker |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind in KINDS:
        base = cells[(kind, worker_counts[0])].median("cold")
        for n in worker_counts:
            cell = cells[(kind, n)]
            cold, warm = cell.median("cold"), cell.median("warm")
            requests = f"{statistics.median(cell.cold_requests):.0f} / {statistics.median(cell.warm_requests):.0f}"
            runs = ", ".join(f"{t:.2f}" for t in cell.cold)
            print(
                f"| {LABELS[kind]} | {n} | {cold:.2f} ({runs}) | {cell.median('opening'):.2f} "
                f"| {warm:.2f} | {requests} | {base / cold:.2f}x |"
            )
    print()
    failed = 0
    for n in worker_counts:
        a = cells[("fsspec", n)].median("cold")
        b = cells[("mount", n)].median("cold")
        c = cells[("s3fs", n)].median("cold")
        ok_c = a <= c
        ok_b = a <= 1.2 * b
        failed += (not ok_c) + (not ok_b)
        print(
            f"{n} worker(s): (a) {a:.2f} s vs (c) {c:.2f} s: {'PASS' if ok_c else 'MISS'} "
            f"(target: no slower); vs (b) {b:.2f} s: {a / b:.2f}x {'PASS' if ok_b else 'MISS'} "
            "(target: within 1.2x)"
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 chunks, one run per cell")
    parser.add_argument("--chunks", type=int, help="chunks of 256 x 256 uint16 (default 400)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds per S3 response")
    parser.add_argument("--workers", default="1,2,4", help="worker process counts")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker")
    parser.add_argument("--runs", type=int, help="runs per cell (default 5, --quick 1)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="which of fsspec,mount,s3fs")
    parser.add_argument(
        "--no-cpu", action="store_true", help="skip the CPU per chunk of each way (one process)"
    )
    args = parser.parse_args(argv)
    n_chunks = args.chunks or (100 if args.quick else 400)
    runs = args.runs or (1 if args.quick else 5)
    worker_counts = [int(n) for n in args.workers.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    import fsspec

    from zarrfs.faces.fsspec import ZarrfsFileSystem

    fsspec.register_implementation("zarrfs", ZarrfsFileSystem, clobber=True)
    load = os.getloadavg()
    print(
        f"# dask_compare: {n_chunks} chunks of {CHUNK}x{CHUNK} uint16, latency {args.latency * 1000:.0f} ms, "
        f"{args.threads} threads per worker, {runs} run(s) per cell; {os.cpu_count()} CPUs, "
        f"load {load[0]:.1f}; Python {platform.python_version()}"
    )
    scratch = Path(tempfile.mkdtemp(prefix="zarrfs-dask-"))
    with LocalS3(latency=args.latency) as s3:
        data, zarr_id = write_array(s3, n_chunks)
        expected = int(data.sum(dtype=np.int64))
        proxy = Proxy(s3.endpoint_url)
        try:
            cells = {(k, n): Cell() for k in KINDS for n in worker_counts}
            for run in range(runs):
                for n in worker_counts:
                    for kind in kinds[run % len(kinds) :] + kinds[: run % len(kinds)]:
                        run_once(
                            kind,
                            n,
                            args.threads,
                            proxy,
                            zarr_id,
                            expected,
                            scratch,
                            cells[(kind, n)],
                        )
                        cell = cells[(kind, n)]
                        print(
                            f"  {LABELS[kind]}, {n} worker(s): cold {cell.cold[-1]:.2f} s "
                            f"({cell.cold_requests[-1]} requests), warm {cell.warm[-1]:.2f} s "
                            f"({cell.warm_requests[-1]} requests); load {os.getloadavg()[0]:.1f}",
                            flush=True,
                        )
            cpu = (
                {}
                if args.no_cpu
                else cpu_per_chunk(s3.endpoint_url, zarr_id, n_chunks, args.threads, scratch, runs)
            )
        finally:
            proxy.stop()
            shutil.rmtree(scratch, ignore_errors=True)
    if cpu:
        print()
        print(f"CPU per chunk, one process reading every chunk with {args.threads} threads:")
        for kind, values in cpu.items():
            runs_text = ", ".join(f"{v:.2f}" for v in values)
            print(f"  {kind}: {statistics.median(values):.2f} ms ({runs_text})")
    if set(kinds) != set(KINDS):
        return 0
    return report(cells, worker_counts)


if __name__ == "__main__":
    sys.exit(main())
