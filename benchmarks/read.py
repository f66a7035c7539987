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
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from zarrfs.demo.locals3 import LocalS3
from zarrfs.demo.sample import (
    ManifestLeaf,
    blob_key,
    build_manifest,
    dandi_etag,
    format_manifest,
    manifest_key,
    to_yaml,
    zarr_checksum_of,
)

DANDISET = "000960"
VERSION = "0.251106.1200"
ZARR_PATH = "sub-01/bench.zarr"
BLOB_PATH = "sub-01/bench.nwb"
MOUNT_DEADLINE = 60.0
MiB = 1 << 20


@dataclass
class Data:
    zarr_id: str
    blob_id: str
    chunks: dict[str, bytes]  # path relative to the Zarr root -> bytes
    blob: bytes


# --- setup -------------------------------------------------------------------------------------


def write_dandiset(s3: LocalS3, n_chunks: int, chunk_size: int, blob_size: int) -> Data:
    client, bucket = s3.client, s3.bucket
    zarr_id, blob_id = str(uuid.uuid4()), str(uuid.uuid4())
    side = max(1, int(n_chunks**0.5))
    chunks = {f"0/{i // side}/{i % side}": os.urandom(chunk_size) for i in range(n_chunks)}
    zattrs = json.dumps({"bench": True}).encode()
    zarray = json.dumps({"zarr_format": 2, "shape": [n_chunks], "chunks": [1]}).encode()
    objects = {".zattrs": zattrs, ".zgroup": b'{"zarr_format": 2}', "0/.zarray": zarray, **chunks}
    now = datetime.now(UTC).replace(microsecond=0).isoformat()

    def put(item: tuple[str, bytes]) -> ManifestLeaf:
        path, body = item
        r = client.put_object(Bucket=bucket, Key=f"zarr/{zarr_id}/{path}", Body=body)
        return ManifestLeaf(path, r["VersionId"], now, len(body), r["ETag"].strip('"'))

    with ThreadPoolExecutor(16) as pool:
        leaves = list(pool.map(put, objects.items()))
    checksum = zarr_checksum_of(leaves)
    client.put_object(
        Bucket=bucket,
        Key=manifest_key(zarr_id, checksum),
        Body=format_manifest(build_manifest(leaves)).encode(),
    )
    # the blob as DANDI uploads it: one multipart upload (a single part below 64 MiB)
    blob = os.urandom(blob_size)
    key = blob_key(blob_id)
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    part = client.upload_part(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=blob
    )
    done = client.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    etag = dandi_etag(blob)
    if done["ETag"].strip('"') != etag:
        raise RuntimeError(f"blob ETag {done['ETag']} != dandi-etag {etag}")
    s3_url = "https://dandiarchive.s3.amazonaws.com"
    records = [
        {
            "identifier": str(uuid.uuid4()),
            "path": BLOB_PATH,
            "contentSize": blob_size,
            "encodingFormat": "application/x-nwb",
            "contentUrl": [f"{s3_url}/{key}"],
            "digest": {"dandi:dandi-etag": etag},
            "dateModified": now,
        },
        {
            "identifier": str(uuid.uuid4()),
            "path": ZARR_PATH,
            "contentSize": sum(x.size for x in leaves),
            "encodingFormat": "application/x-zarr",
            "contentUrl": [f"{s3_url}/zarr/{zarr_id}/"],
            "digest": {"dandi:dandi-zarr-checksum": checksum},
            "dateModified": now,
        },
    ]
    prefix = f"dandisets/{DANDISET}/{VERSION}/"
    client.put_object(Bucket=bucket, Key=prefix + "assets.jsonld", Body=json.dumps(records))
    metadata = {"identifier": f"DANDI:{DANDISET}", "name": "read benchmark", "version": VERSION}
    client.put_object(Bucket=bucket, Key=prefix + "dandiset.yaml", Body=to_yaml(metadata))
    return Data(zarr_id, blob_id, chunks, blob)


# --- mounts ------------------------------------------------------------------------------------


def peer_env() -> dict[str, str]:
    """The environment without AWS_* (rclone refuses AWS_CA_BUNDLE; peers read anonymously)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def wait_mounted(mnt: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.perf_counter() + MOUNT_DEADLINE
    while not os.path.ismount(mnt):
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited {process.returncode}:\n{log.read_text()}")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{mnt} not mounted after {MOUNT_DEADLINE} s")
        time.sleep(0.005)
    os.listdir(mnt)  # zarrfs's core starts after the mount is live: measure from when it serves


def unmount(mnt: Path, process: subprocess.Popen[bytes]) -> None:
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.terminate()  # this daemon's own PID
        process.wait(timeout=10)


@dataclass
class Paths:
    zarr_root: Path
    blob: Path


@contextmanager
def mounted(tool: str, s3: LocalS3, data: Data, work: Path) -> Iterator[Paths]:
    """A fresh mount (fresh cache dir for zarrfs) of `tool`; peers mount the bucket root."""
    scratch = Path(tempfile.mkdtemp(prefix=f"{tool}-", dir=work))
    mnt = scratch / "mnt"
    mnt.mkdir()
    log = scratch / "log"
    env = peer_env()
    if tool == "zarrfs":
        command = [
            sys.executable, "-m", "zarrfs", "mount", "-f", f"{DANDISET}@{VERSION}", str(mnt),
            "--endpoint-url", s3.endpoint_url, "--cache-dir", str(scratch / "cache"),
            "--manifest-root", f"s3://{s3.bucket}/zarr-manifest/",
        ]  # fmt: skip
        env = dict(os.environ)
        paths = Paths(mnt / ZARR_PATH, mnt / BLOB_PATH)
    elif tool == "rclone":
        command = ["rclone", "mount", f"bench:{s3.bucket}", str(mnt), "--read-only"]
        env |= {
            "RCLONE_CONFIG": "/dev/null",
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ENDPOINT": s3.endpoint_url,
        }
        paths = Paths(mnt / "zarr" / data.zarr_id, mnt / blob_key(data.blob_id))
    else:
        opts = f"url={s3.endpoint_url},use_path_request_style,public_bucket=1,ro"
        command = ["s3fs", s3.bucket, str(mnt), "-f", "-o", opts]
        paths = Paths(mnt / "zarr" / data.zarr_id, mnt / blob_key(data.blob_id))
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_mounted(mnt, process, log)
        yield paths
    finally:
        unmount(mnt, process)
        shutil.rmtree(scratch, ignore_errors=True)


# --- workloads ---------------------------------------------------------------------------------


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def check(what: str, got: bytes, want: bytes) -> None:
    if got != want:
        raise SystemExit(
            f"FAIL: {what}: read {len(got)} bytes that differ from the {len(want)} written"
        )


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


def machine_info(latency_ms: float) -> list[str]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        check=False,
    ).stdout.strip()
    lines = [
        f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit or '?'}",
        f"{platform.node()}: {platform.system()} {platform.release()}, {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, Python {platform.python_version()}",
        f"local S3: moto, {latency_ms:g} ms added per response",
    ]
    for tool, arg in (("rclone", "version"), ("s3fs", "--version")):
        if shutil.which(tool):
            out = subprocess.run([tool, arg], capture_output=True, text=True, check=False)
            lines.append(f"{tool}: {(out.stdout or out.stderr).splitlines()[0]}")
    return lines


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
                    cold, n = timed(lambda w=workload, p=paths: w(p))
                    warm, _ = timed(lambda w=workload, p=paths: w(p))
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
