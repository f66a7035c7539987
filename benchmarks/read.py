"""Read-throughput benchmark: zarrfs against rclone mount and s3fs, over a local S3 with latency.

Writes a Zarr of small chunks and one big blob into a `LocalS3` (moto) bucket, publishes a dandiset
holding both, mounts it with zarrfs (and, when installed, the same bucket with rclone and s3fs), and
times three workloads, each on a fresh mount: a cold pass, then a warm pass on the same mount.

    python benchmarks/read.py                # 400 x 256 KiB chunks + a 32 MiB blob, 20 ms latency
    python benchmarks/read.py --quick        # 100 chunks + an 8 MiB blob
    python benchmarks/read.py --latency 0

See benchmarks/README.md ("Read throughput"). Every byte read is compared with what was written.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    Target,
    check,
    machine_info,
    publish,
    put_zarr,
    start_mount,
    upload_blob,
)

from zarrfs.demo.locals3 import LocalS3

DANDISET = "000960"
VERSION = "0.251106.1200"
ZARR_PATH = "sub-01/bench.zarr"
BLOB_PATH = "sub-01/bench.nwb"
MiB = 1 << 20


@dataclass
class Data:
    target: Target
    chunks: dict[str, bytes]  # path relative to the Zarr root -> bytes
    blob: bytes


# --- setup -------------------------------------------------------------------------------------


def write_dandiset(s3: LocalS3, n_chunks: int, chunk_size: int, blob_size: int) -> Data:
    side = max(1, int(n_chunks**0.5))
    chunks = {f"0/{i // side}/{i % side}": os.urandom(chunk_size) for i in range(n_chunks)}
    zattrs = json.dumps({"bench": True}).encode()
    zarray = json.dumps({"zarr_format": 2, "shape": [n_chunks], "chunks": [1]}).encode()
    objects = {".zattrs": zattrs, ".zgroup": b'{"zarr_format": 2}', "0/.zarray": zarray, **chunks}
    zarr = put_zarr(s3, ZARR_PATH, objects, threads=16)
    blob = os.urandom(blob_size)
    blob_asset = upload_blob(s3, BLOB_PATH, blob)
    publish(s3, DANDISET, VERSION, [zarr], [blob_asset])
    return Data(Target(DANDISET, VERSION, zarr, blob_asset), chunks, blob)


# --- mounts ------------------------------------------------------------------------------------


@dataclass
class Paths:
    zarr_root: Path
    blob: Path


@contextmanager
def mounted(tool: str, s3: LocalS3, data: Data, work: Path) -> Iterator[Paths]:
    """A fresh mount (fresh cache dir for zarrfs) of `tool`; peers mount the bucket root."""
    scratch = Path(tempfile.mkdtemp(prefix=f"{tool}-", dir=work))
    mount = start_mount(tool, s3, data.target, scratch / "mnt", scratch / "cache")
    try:
        mnt = mount.mnt
        yield Paths(data.target.zarr_root(tool, mnt), data.target.blob_path(tool, mnt))
    finally:
        mount.stop()
        shutil.rmtree(scratch, ignore_errors=True)


# --- workloads ---------------------------------------------------------------------------------


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def chunks_pass(paths: Paths, data: Data, threads: int) -> int:
    names = list(data.chunks)
    if threads == 1:
        bodies = [read_file(paths.zarr_root / n) for n in names]
    else:
        with ThreadPoolExecutor(threads) as pool:
            bodies = list(pool.map(lambda n: read_file(paths.zarr_root / n), names))
    for name, body in zip(names, bodies, strict=True):
        check(f"{paths.zarr_root / name}", body, data.chunks[name])
    return sum(len(b) for b in bodies)


def blob_pass(paths: Paths, data: Data) -> int:
    parts = []
    with open(paths.blob, "rb") as f:
        while block := f.read(MiB):
            parts.append(block)
    body = b"".join(parts)
    check(str(paths.blob), body, data.blob)
    return len(body)


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    n = fn()
    return time.perf_counter() - start, n


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=20.0, help="ms per S3 response (20)")
    parser.add_argument("--quick", action="store_true", help="100 chunks and an 8 MiB blob")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--tools", default="zarrfs,rclone,s3fs", help="comma-separated")
    parser.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "zarrfs-bench-read"
    )
    args = parser.parse_args()
    n_chunks, chunk_size = (100, 256 << 10) if args.quick else (400, 256 << 10)
    blob_size = (8 if args.quick else 32) * MiB

    tools = []
    for tool in args.tools.split(","):
        if tool == "zarrfs" or shutil.which(tool):
            tools.append(tool)
        else:
            print(f"note: {tool} not installed, skipped (apt-get install rclone s3fs)")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    # keep every object in moto's memory: it copies the whole object for each ranged GET
    os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(blob_size + MiB))
    info = machine_info(args.latency)
    rows: list[tuple[str, str, float, float, float]] = []
    with LocalS3(latency=args.latency / 1000) as s3:
        start = time.perf_counter()
        data = write_dandiset(s3, n_chunks, chunk_size, blob_size)
        print(f"wrote {n_chunks} x {chunk_size >> 10} KiB chunks + {blob_size // MiB} MiB blob "
              f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
        workloads: list[tuple[str, Callable[[Paths], int]]] = [
            (f"{n_chunks} chunks, 1 reader", lambda p: chunks_pass(p, data, 1)),
            (f"{n_chunks} chunks, {args.threads} readers",
             lambda p: chunks_pass(p, data, args.threads)),
            (f"{blob_size // MiB} MiB blob, sequential", lambda p: blob_pass(p, data)),
        ]  # fmt: skip
        for tool in tools:
            for name, workload in workloads:
                with mounted(tool, s3, data, args.work_dir) as paths:
                    cold, n = timed(functools.partial(workload, paths))
                    warm, _ = timed(functools.partial(workload, paths))
                rows.append((tool, name, cold, warm, n / MiB / cold))
                print(f"  {tool:7} {name:24} cold {cold:7.2f} s  warm {warm:6.3f} s", flush=True)
    print()
    for line in info:
        print(line)
    print()
    print("| tool | workload | cold s | warm s | cold MiB/s | warm MiB/s |")
    print("|---|---|---:|---:|---:|---:|")
    total = {name: n_chunks * chunk_size for name, _ in workloads[:2]}
    total[workloads[2][0]] = blob_size
    for tool, name, cold, warm, rate in rows:
        print(f"| {tool} | {name} | {cold:.2f} | {warm:.3f} | {rate:.1f} | "
              f"{total[name] / MiB / warm:.0f} |")  # fmt: skip
    print("\nall bytes read matched what was written")


if __name__ == "__main__":
    main()
