"""Side by side: every workload of the speed issue against zarrfs, its peers and two floors, with ratios.

One local S3 (`LocalS3`, moto in its own process) with latency added to every response, and every
response body paced to 100 MB/s as one S3 connection is (`--stream-bandwidth`; 0 leaves it unpaced),
holds one published dandiset version: a Zarr (a uint8 array `0` of 256 KiB chunks, plus tiny chunks
in `1` up to the entry count), a blob, and a 2 GiB blob for random preads (made of random blocks,
never held whole in memory). The clients:

- zarrfs, mounted as a user would (`python -m zarrfs mount -f ... --cache-dir <fresh>`);
- raw: aiobotocore on trio (httpx, as zarrfs), at most 32 requests in flight (zarrfs's limit),
  reading exactly what each workload asks for: the floor for a remote reader (for the sequential
  blob read, the faster of one streamed GET and 8 MiB ranged GETs 16 at a time);
- rclone mount with its defaults, and with `--vfs-cache-mode full`; s3fs (peers read the live
  keys; every key is written once, so they are the versions zarrfs pins);
- tmpfs: a copy of the files on /dev/shm: the floor for local reads.

Workload by workload, each client runs it on a fresh mount (fresh caches) after `drop_caches` (cold),
then again on the same mount (warm); zarrfs with a disk cache option and rclone's full cache mode are also remounted over
their disk cache after another `drop_caches` (remount). Every byte read is compared with what was
written, for every client. For each cell: seconds, the S3 requests the server answered and the body
bytes it sent (counted by the local S3 itself; for data reads also over the bytes asked), and CPU
seconds (user + system): the daemon's for a mount, the benchmark process's own for raw and tmpfs,
the reader's (this process) and the local S3 server's beside them.

The first entry into the Zarr (`first`: listing its root on a fresh mount, against raw's GET and
JSON parse of the manifest) is its own row; the walk row includes it, then stats every entry.

Never does: write into the repository (it prints the table; `--json OUT` writes where asked), or end
a process it did not start (mounts are ended by `harness.Mount.stop`, also on SIGTERM and Ctrl-C).
One client runs at a time, workload by workload (a row's cells are measured close together in time,
which keeps its ratios meaningful on a shared machine); the raw client is the only concurrent reader
(trio, 32 requests at most).

    python benchmarks/compare.py --quick           # the issue's sizes, paced at 100 MB/s
    python benchmarks/compare.py --quick --stream-bandwidth 0   # unpaced
    python benchmarks/compare.py --full --json full.json
    python benchmarks/compare.py --only zarrfs,raw,tmpfs --workloads seq,preads,preads-big
    python benchmarks/compare.py --only zarrfs,raw --workloads first,seq --repeat 5   # medians

See benchmarks/README.md ("Side by side: compare.py").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import trio
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    PEERS,
    ZARRFS,
    BlobAsset,
    Mount,
    Target,
    cpu_seconds,
    drop_caches,
    machine_info,
    missing_tools,
    publish,
    put_zarr,
    say,
    start_mount,
    upload_blob,
    upload_blob_parts,
    zarrfs_help,
)

from zarrfs import config as zarrfs_config
from zarrfs.demo.locals3 import FAST_PATH_MEMORY, LocalS3, RequestStats
from zarrfs.demo.sample import manifest_key
from zarrfs.faces import runtime as zarrfs_runtime

DANDISET = "000961"
VERSION = "0.251130.1200"
ZARR_PATH = "sub-01/bench.zarr"
BLOB_PATH = "sub-01/bench.nwb"

BIG_PATH = "sub-01/big.nwb"

CLIENTS = ("zarrfs", "raw", "rclone", "rclone-full", "s3fs", "tmpfs")
#: Column headings, as in the issue.
HEADING = {"raw": "raw aiobotocore", "rclone-full": "rclone vfs full"}
MOUNT_CLIENTS = (ZARRFS, *PEERS)
WORKLOADS = ("first", "walk", "array", "chunks", "seq", "preads", "preads-big", "mount", "serve")
#: Workloads measured by mounting alone (both in one run: `run_mount_ready`).
MOUNTING = ("mount", "serve")
DATA_WORKLOADS = WORKLOADS[:-1]
PHASES = ("cold", "warm", "remount")

KiB, MiB = 1 << 10, 1 << 20
#: Array `0`: uint8 chunks of 512 x 512 (256 KiB); array `1`: 64 x 64 (4 KiB), 64 per row.
CHUNK = 512
SMALL_CHUNK = 64
SMALL_COLUMNS = 64
#: Zarr metadata files: .zgroup, .zattrs, 0/.zarray, 1/.zarray.
METADATA_FILES = 4
READ_SIZE = MiB
PREAD_SIZE = 256 * KiB
#: The raw client's concurrency: zarrfs's limit.
RAW_CONCURRENCY = zarrfs_config.MAX_CONCURRENT_REQUESTS
#: The raw client's other sequential read: ranged GETs of this size, this many at a time.
RAW_PART = 8 * MiB
RAW_PARTS_IN_FLIGHT = 16
#: MB/s each response body is paced to by default: about what one S3 connection carries.
STREAM_BANDWIDTH = 100.0
#: The local S3 serves GETs of objects this big from memory (see `zarrfs.demo.locals3`).
FAST_RANGE_MIN_SIZE = 8 * MiB
#: The big blob: as big as the local S3's in-memory copies may be (a bigger one would be copied
#: whole by moto for every GET), 1 MiB blocks drawn from a pool of this many random ones.
BIG_BLOB = FAST_PATH_MEMORY
BIG_BLOCK = MiB
BIG_POOL = 64
PAGE = 4 * KiB
#: Seconds the request counters must stay still before a workload's requests are read.
SETTLE = 0.2
SETTLE_LIMIT = 5.0
MOUNT_REPEATS = 3

#: Targets, each a ratio from one run (see the README).
RAW_LIMIT = {
    "first": 1.5,
    "walk": 1.5,
    "array": 1.2,
    "chunks": 1.1,
    "seq": 1.3,
    "preads": 1.2,
    "preads-big": 1.2,
}
#: Random preads may move at most this many times the bytes they ask for.
PREAD_BYTES_LIMIT = 2.0
#: Workloads that read data: bytes moved are held against bytes asked.
DATA_READS = ("array", "chunks", "seq", "preads", "preads-big")
WARM_TMPFS_LIMIT = 1.5
REMOUNT_TMPFS_LIMIT = 2.0
MOUNT_READY_LIMIT = 0.5
RSS_HEADROOM = 150 * MiB


@dataclass(frozen=True, slots=True)
class Sizes:
    name: str
    files: int  # files in the Zarr
    shape: tuple[int, int]  # of array `0`, whole chunks
    random_chunks: int
    blob: int
    preads: int
    big_blob: int = BIG_BLOB

    @property
    def array_bytes(self) -> int:
        return self.shape[0] * self.shape[1]


QUICK = Sizes("quick", 5_118, (8192, 8192), 50, 128 * MiB, 50)
FULL = Sizes("full", 20_000, (12800, 20480), 200, 512 * MiB, 200)


def label(workload: str, sizes: Sizes) -> str:
    return {
        "first": f"first entry into a {sizes.files:,}-entry Zarr (list its root)",
        "walk": f"walk + stat a {sizes.files:,}-entry Zarr",
        "array": f"zarr-python reads a {sizes.array_bytes // MiB} MiB array",
        "chunks": f"{sizes.random_chunks} random chunks",
        "seq": f"sequential read of a {sizes.blob // MiB} MiB blob, 1 MiB reads",
        "preads": f"{sizes.preads} random 256 KiB preads of the {sizes.blob // MiB} MiB blob",
        "preads-big": f"{sizes.preads} random 256 KiB preads of a {sizes.big_blob // MiB:,} MiB blob",
        "mount": "mount until the mountpoint is live",
        "serve": "mount until a listing of its root is answered",
    }[workload]


# --- the data -----------------------------------------------------------------------------------


class PatternBlob:
    """A blob too big to hold, made cheaply: 1 MiB blocks, each a copy of one of `BIG_POOL` random
    blocks with the first 8 bytes of every 4 KiB page replaced by the page's number, so that no two
    pages are alike and a read at a wrong offset differs. Any range is made again on demand."""

    def __init__(self, size: int, seed: int) -> None:
        if size % BIG_BLOCK:
            raise ValueError(f"{size} is not a whole number of {BIG_BLOCK}-byte blocks")
        rng = np.random.default_rng(seed)
        self.size = size
        self.pool = rng.integers(0, 256, size=(BIG_POOL, BIG_BLOCK), dtype=np.uint8)
        self.picks = rng.integers(0, BIG_POOL, size=size // BIG_BLOCK)

    def block(self, i: int) -> np.ndarray:
        out: np.ndarray = self.pool[int(self.picks[i])].copy()
        pages = BIG_BLOCK // PAGE
        out.view("<u8")[:: PAGE // 8] = np.arange(i * pages, (i + 1) * pages, dtype="<u8")
        return out

    def read(self, offset: int, length: int) -> bytes:
        end = min(self.size, offset + length)
        if end <= offset:
            return b""
        first, last = offset // BIG_BLOCK, (end - 1) // BIG_BLOCK
        data = np.concatenate([self.block(i) for i in range(first, last + 1)])
        return data[offset - first * BIG_BLOCK : end - first * BIG_BLOCK].tobytes()


@dataclass
class Bench:
    sizes: Sizes
    files: dict[str, bytes]  # Zarr path -> bytes
    expected_tree: dict[str, int | None]  # Zarr path -> size (None: a directory)
    array: np.ndarray  # array `0`
    chunk_keys: list[str]  # the random chunks, in reading order
    blob: bytes
    offsets: list[int]  # of the random preads
    big: PatternBlob | None = None  # when preads-big runs
    big_offsets: list[int] = field(default_factory=list)
    target: Target | None = None
    versions: dict[str, str] = field(default_factory=dict)  # Zarr path -> VersionId
    manifest: str = ""  # its key

    @property
    def root_names(self) -> list[str]:
        """What a listing of the Zarr's root shows."""
        return sorted({path.split("/")[0] for path in self.files})

    def asked(self, workload: str) -> int:
        """Bytes a data workload asks for."""
        if workload == "array":
            return self.sizes.array_bytes
        if workload == "chunks":
            return sum(len(self.files[k]) for k in self.chunk_keys)
        if workload == "seq":
            return len(self.blob)
        if workload == "preads":
            return len(self.offsets) * PREAD_SIZE
        if workload == "preads-big":
            return len(self.big_offsets) * PREAD_SIZE
        raise ValueError(workload)


def zarray_document(shape: tuple[int, int], chunk: int) -> bytes:
    """`.zarray` of a 2-D uint8 array, uncompressed, nested chunk keys (as DANDI Zarrs have)."""
    meta = {
        "zarr_format": 2,
        "shape": list(shape),
        "chunks": [chunk, chunk],
        "dtype": "|u1",
        "compressor": None,
        "filters": None,
        "fill_value": 0,
        "order": "C",
        "dimension_separator": "/",
    }
    return json.dumps(meta, indent=2).encode()


def make_bench(sizes: Sizes, seed: int, big: bool) -> Bench:
    rows, cols = sizes.shape[0] // CHUNK, sizes.shape[1] // CHUNK
    array = np.frombuffer(os.urandom(sizes.array_bytes), dtype=np.uint8).reshape(sizes.shape)
    small = sizes.files - METADATA_FILES - rows * cols
    if small < 0:
        raise SystemExit(f"{sizes.files} files cannot hold {rows * cols} chunks")
    small_rows = max(1, math.ceil(small / SMALL_COLUMNS))

    files = {
        ".zgroup": b'{\n  "zarr_format": 2\n}',
        ".zattrs": json.dumps({"benchmark": "compare"}).encode(),
        "0/.zarray": zarray_document(sizes.shape, CHUNK),
        "1/.zarray": zarray_document(
            (small_rows * SMALL_CHUNK, SMALL_COLUMNS * SMALL_CHUNK), SMALL_CHUNK
        ),
    }
    for i in range(rows):
        for j in range(cols):
            block = array[i * CHUNK : (i + 1) * CHUNK, j * CHUNK : (j + 1) * CHUNK]
            files[f"0/{i}/{j}"] = block.tobytes()
    for k in range(small):
        files[f"1/{k // SMALL_COLUMNS}/{k % SMALL_COLUMNS}"] = os.urandom(SMALL_CHUNK**2)
    tree: dict[str, int | None] = {}
    for path, body in files.items():
        tree[path] = len(body)
        parts = path.split("/")
        for n in range(1, len(parts)):
            tree["/".join(parts[:n])] = None
    rng = random.Random(seed)
    chunk_keys = rng.sample(sorted(k for k in files if k.startswith("0/") and "." not in k),
                            sizes.random_chunks)  # fmt: skip
    offsets = [rng.randrange(0, sizes.blob - PREAD_SIZE + 1) for _ in range(sizes.preads)]
    bench = Bench(sizes, files, tree, array, chunk_keys, os.urandom(sizes.blob), offsets)
    if big:
        bench.big = PatternBlob(sizes.big_blob, seed)
        bench.big_offsets = [
            rng.randrange(0, sizes.big_blob - PREAD_SIZE + 1) for _ in range(sizes.preads)
        ]
    return bench


def write_bench(s3: LocalS3, bench: Bench) -> None:
    """Put the Zarr (once) and the blobs, publish the version, and prime the local S3's fast path
    with the (small) blob."""
    zarr = put_zarr(s3, ZARR_PATH, bench.files, threads=32)
    blob = upload_blob(s3, BLOB_PATH, bench.blob)
    big = None
    if bench.big is not None:
        big = upload_blob_parts(s3, BIG_PATH, bench.big.size, bench.big.read)
    publish(s3, DANDISET, VERSION, [zarr], [blob] + ([big] if big else []))
    bench.target = Target(DANDISET, VERSION, zarr, blob, big)
    bench.versions = {leaf.path: leaf.version_id for leaf in zarr.leaves}
    bench.manifest = manifest_key(zarr.zarr_id, zarr.checksum)
    prime(s3, blob.key)


def prime(s3: LocalS3, key: str) -> None:
    """One GET of a large object, so that no client pays for the fast path's copy of it. The copies
    share 2 GiB: the big blob's displaces the small one's, so it is primed once the small blob's
    workloads are done (the workloads run in the order of WORKLOADS)."""
    s3.client.head_object(Bucket=s3.bucket, Key=key)
    s3.client.get_object(Bucket=s3.bucket, Key=key, Range="bytes=0-0")["Body"].read()


def warm_up(work: Path, s3: LocalS3, bench: Bench) -> None:
    """Read a tiny array and make one raw GET, so that no first measurement pays for lazy set-up."""
    root = work / "warm-up.zarr"
    (root / "0" / "0").mkdir(parents=True)
    (root / "0" / ".zarray").write_bytes(zarray_document((CHUNK, CHUNK), CHUNK))
    (root / "0" / "0" / "0").write_bytes(bytes(CHUNK * CHUNK))
    if read_array(root).any():
        raise SystemExit("FAIL: the warm-up array is not zeros")
    shutil.rmtree(root)

    async def one_get() -> bytes:
        async with raw_client(s3.endpoint_url) as client:
            return await RawReader(client, s3.bucket, bench).get(
                *RawReader.zarr_key_of(bench, ".zgroup")
            )

    if trio.run(one_get) != bench.files[".zgroup"]:
        raise SystemExit("FAIL: the raw client read a wrong .zgroup")


def copy_to_tmpfs(bench: Bench, root: Path) -> tuple[Path, Path, Path]:
    zarr_root, blob, big = root / "bench.zarr", root / "bench.nwb", root / "big.nwb"
    for path, body in bench.files.items():
        dest = zarr_root / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(body)
    blob.write_bytes(bench.blob)
    if bench.big is not None:
        with big.open("wb") as f:
            for offset in range(0, bench.big.size, 64 * MiB):
                f.write(bench.big.read(offset, 64 * MiB))
    return zarr_root, blob, big


# --- workloads on a file system -----------------------------------------------------------------


def walk_tree(root: Path) -> dict[str, int | None]:
    """lstat every entry under `root`: path -> size for files, None for directories."""
    found: dict[str, int | None] = {}
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                name = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    found[name] = None
                    stack.append((Path(entry.path), name + "/"))
                else:
                    found[name] = st.st_size
    return found


def read_array(root: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        array = zarr.open_array(str(root / "0"), mode="r")
        return np.asarray(array[...])


def read_files(root: Path, names: Sequence[str]) -> list[bytes]:
    out = []
    for name in names:
        with open(root / name, "rb") as f:
            out.append(f.read())
    return out


def read_sequential(path: Path) -> list[bytes]:
    pieces = []
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(READ_SIZE):
            pieces.append(piece)
    return pieces


def read_preads(path: Path, offsets: Sequence[int]) -> list[bytes]:
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in offsets:
            parts, done = [], 0
            while done < PREAD_SIZE:
                piece = os.pread(fd, PREAD_SIZE - done, offset + done)
                if not piece:
                    break
                parts.append(piece)
                done += len(piece)
            out.append(b"".join(parts))
    finally:
        os.close(fd)
    return out


def fs_workload(
    workload: str, bench: Bench, zarr_root: Path, blob: Path, big: Path
) -> Callable[[], Any]:
    return {
        "first": lambda: sorted(os.listdir(zarr_root)),
        "walk": lambda: walk_tree(zarr_root),
        "array": lambda: read_array(zarr_root),
        "chunks": lambda: read_files(zarr_root, bench.chunk_keys),
        "seq": lambda: read_sequential(blob),
        "preads": lambda: read_preads(blob, bench.offsets),
        "preads-big": lambda: read_preads(big, bench.big_offsets),
    }[workload]


def verify(client: str, workload: str, bench: Bench, value: Any) -> None:
    """Stop the run unless `value` is exactly what `workload` should have read."""
    what = f"{client} {workload}"
    if workload == "first":
        if value != bench.root_names:
            raise SystemExit(f"FAIL: {what}: listed {value}, not {bench.root_names}")
    elif workload == "walk":
        ok = value == bench.expected_tree
        if not ok:
            missing = sorted(set(bench.expected_tree) - set(value))[:5]
            extra = sorted(set(value) - set(bench.expected_tree))[:5]
            wrong = [
                p for p in bench.expected_tree if p in value and value[p] != bench.expected_tree[p]
            ]
            raise SystemExit(f"FAIL: {what}: missing {missing}, extra {extra}, wrong {wrong[:5]}")
    elif workload == "array":
        if value.shape != bench.array.shape or not np.array_equal(value, bench.array):
            raise SystemExit(f"FAIL: {what}: the array differs from the one written")
    elif workload == "chunks":
        for key, body in zip(bench.chunk_keys, value, strict=True):
            if body != bench.files[key]:
                raise SystemExit(
                    f"FAIL: {what}: {key}: {len(body)} bytes differ from those written"
                )
    elif workload == "seq":
        if b"".join(value) != bench.blob:
            raise SystemExit(f"FAIL: {what}: the blob read differs from the one written")
    elif workload == "preads":
        for offset, body in zip(bench.offsets, value, strict=True):
            if body != bench.blob[offset : offset + PREAD_SIZE]:
                raise SystemExit(f"FAIL: {what}: pread at {offset} differs from the blob")
    elif workload == "preads-big":
        assert bench.big is not None
        for offset, body in zip(bench.big_offsets, value, strict=True):
            if body != bench.big.read(offset, PREAD_SIZE):
                raise SystemExit(f"FAIL: {what}: pread at {offset} differs from the big blob")


# --- the raw client -----------------------------------------------------------------------------


@asynccontextmanager
async def raw_client(endpoint_url: str) -> AsyncIterator[Any]:
    """aiobotocore on trio through httpx, anonymous, no retries, 32 connections at most."""
    import botocore
    from aiobotocore.config import AioConfig
    from aiobotocore.httpxsession import HttpxSession
    from aiobotocore.session import get_session

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "prefers httpx2"
        config = AioConfig(
            http_session_cls=HttpxSession,
            signature_version=botocore.UNSIGNED,
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=RAW_CONCURRENCY,
            # zarrfs does not ask for CRC32s either; asking makes the local S3 bypass its fast path
            response_checksum_validation="when_required",
        )
        async with get_session().create_client(
            "s3", endpoint_url=endpoint_url, region_name="us-east-1", config=config
        ) as client:
            yield client


class RawReader:
    """The workloads done directly against S3, each reading exactly what it asks for. The sequential
    blob read has two ways (`seq_stream`, `seq_ranged`); its figure is the faster."""

    def __init__(self, client: Any, bucket: str, bench: Bench) -> None:
        self.client = client
        self.bucket = bucket
        self.bench = bench
        self.limiter = trio.CapacityLimiter(RAW_CONCURRENCY)

    async def get(self, key: str, version_id: str | None, rng: str | None = None) -> bytes:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id is not None:
            params["VersionId"] = version_id
        if rng is not None:
            params["Range"] = rng
        async with self.limiter:
            response = await self.client.get_object(**params)
            async with response["Body"] as body:
                data: bytes = await body.read()
                return data

    @staticmethod
    def zarr_key_of(bench: Bench, path: str) -> tuple[str, str]:
        assert bench.target is not None
        return f"zarr/{bench.target.zarr.zarr_id}/{path}", bench.versions[path]

    def zarr_key(self, path: str) -> tuple[str, str]:
        return self.zarr_key_of(self.bench, path)

    async def first(self) -> list[str]:
        """The first entry into the Zarr: its manifest, one GET, parsed (the root's names are then a
        dict's keys; nothing is checked against the Zarr's checksum)."""
        manifest = json.loads(await self.get(self.bench.manifest, None))
        return sorted(manifest["entries"])

    async def walk(self) -> dict[str, int | None]:
        """The pinned listing is the manifest: one GET, parsed, and every entry enumerated."""
        manifest = json.loads(await self.get(self.bench.manifest, None))
        found: dict[str, int | None] = {}
        stack: list[tuple[dict[str, Any], str]] = [(manifest["entries"], "")]
        while stack:
            node, prefix = stack.pop()
            for name, value in node.items():
                if isinstance(value, dict):
                    found[prefix + name] = None
                    stack.append((value, f"{prefix}{name}/"))
                else:
                    found[prefix + name] = int(value[2])
        return found

    async def array(self) -> np.ndarray:
        meta = json.loads(await self.get(*self.zarr_key("0/.zarray")))
        (height, width), (ch, cw) = meta["shape"], meta["chunks"]
        out = np.empty((height, width), dtype=np.uint8)

        async def one(i: int, j: int) -> None:
            body = await self.get(*self.zarr_key(f"0/{i}/{j}"))
            out[i * ch : (i + 1) * ch, j * cw : (j + 1) * cw] = np.frombuffer(
                body, dtype=np.uint8
            ).reshape(ch, cw)

        async with trio.open_nursery() as nursery:
            for i in range(height // ch):
                for j in range(width // cw):
                    nursery.start_soon(one, i, j)
        return out

    async def chunks(self) -> list[bytes]:
        return [await self.get(*self.zarr_key(k)) for k in self.bench.chunk_keys]

    async def seq_stream(self) -> list[bytes]:
        """The blob in one streamed GET, read 1 MiB at a time."""
        assert self.bench.target is not None
        blob = self.bench.target.blob
        pieces = []
        async with self.limiter:
            response = await self.client.get_object(
                Bucket=self.bucket, Key=blob.key, VersionId=blob.version_id
            )
            async with response["Body"] as body:
                while piece := await body.read(READ_SIZE):
                    pieces.append(piece)
        return pieces

    async def seq_ranged(self) -> list[bytes]:
        """The blob in ranged GETs of `RAW_PART` bytes, `RAW_PARTS_IN_FLIGHT` at a time (the size
        is the asset record's, as a mount knows it)."""
        assert self.bench.target is not None
        blob = self.bench.target.blob
        starts = list(range(0, blob.size, RAW_PART))
        pieces: list[bytes] = [b""] * len(starts)
        limiter = trio.CapacityLimiter(RAW_PARTS_IN_FLIGHT)

        async def one(n: int, start: int) -> None:
            end = min(blob.size, start + RAW_PART) - 1
            async with limiter:
                pieces[n] = await self.get(blob.key, blob.version_id, f"bytes={start}-{end}")

        async with trio.open_nursery() as nursery:
            for n, start in enumerate(starts):
                nursery.start_soon(one, n, start)
        return pieces

    async def preads(self) -> list[bytes]:
        assert self.bench.target is not None
        return await self._preads(self.bench.target.blob, self.bench.offsets)

    async def preads_big(self) -> list[bytes]:
        assert self.bench.target is not None and self.bench.target.big is not None
        return await self._preads(self.bench.target.big, self.bench.big_offsets)

    async def _preads(self, blob: BlobAsset, offsets: Sequence[int]) -> list[bytes]:
        return [
            await self.get(blob.key, blob.version_id, f"bytes={o}-{o + PREAD_SIZE - 1}")
            for o in offsets
        ]


# --- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cpu:
    """CPU seconds (user + system) spent during one cell, None where unreadable."""

    #: The client's own: a mount's daemon (all its threads), or this process for raw and tmpfs.
    client: float | None
    #: This process, which makes the reads through a mount (the kernel's side of each FUSE read is
    #: charged to it); the same as `client` for raw and tmpfs.
    reader: float | None
    #: The local S3 server (moto, in its own process).
    s3: float | None

    def to_json(self) -> dict[str, float | None]:
        return {"client": self.client, "reader": self.reader, "s3": self.s3}


NO_CPU = Cpu(None, None, None)


def _minus(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


@dataclass(frozen=True, slots=True)
class Cell:
    client: str
    workload: str
    phase: str
    seconds: float
    requests: RequestStats | None  # None for tmpfs
    cpu: Cpu = NO_CPU
    #: How raw read the blob in the sequential row ("one streamed GET", "8 MiB ranged GETs ...").
    variant: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "workload": self.workload,
            "phase": self.phase,
            "seconds": self.seconds,
            "s3": None if self.requests is None else self.requests.to_json(),
            "cpu_s": self.cpu.to_json(),
            "variant": self.variant,
        }


def settled(s3: LocalS3) -> RequestStats:
    """The counters once no request has arrived for SETTLE seconds (late readahead counts too)."""
    deadline = time.monotonic() + SETTLE_LIMIT
    last = s3.stats()
    while time.monotonic() < deadline:
        time.sleep(SETTLE)
        now = s3.stats()
        if now == last:
            break
        last = now
    return last


class Runner:
    """Runs the workloads of each client in turn and keeps the cells and the daemons' peak RSS."""

    def __init__(self, args: argparse.Namespace, s3: LocalS3, bench: Bench, work: Path) -> None:
        self.args = args
        self.s3 = s3
        self.bench = bench
        self.work = work
        self.cells: list[Cell] = []
        self.rss: dict[str, int] = {}
        #: workload -> (bodies verified, bytes hashed, seconds hashing, workload seconds), cold
        self.md5: dict[str, tuple[int, int, float, float]] = {}
        self.live: list[Mount] = []
        self.dropped = True
        self.zarrfs_options: list[str] = []
        self.zarrfs_disk_cache = False
        self.tmpfs: tuple[Path, Path, Path] | None = None  # the copy's Zarr root and blobs
        #: The raw client's two sequential reads (the faster is its `seq` cell).
        self.raw_seq: list[Cell] = []

    # bookkeeping -------------------------------------------------------------------------------

    def cold(self) -> None:
        if not drop_caches():
            if self.dropped:
                say("note: not allowed to drop the page cache (run as root): cold is not cold")
            self.dropped = False

    def record(
        self,
        client: str,
        workload: str,
        phase: str,
        seconds: float,
        stats: RequestStats | None,
        cpu: Cpu = NO_CPU,
        variant: str | None = None,
        *,
        keep: bool = True,
    ) -> Cell:
        cell = Cell(client, workload, phase, seconds, stats, cpu, variant)
        if keep:
            self.cells.append(cell)
        extra = ""
        if stats is not None:
            extra = f"  {stats.requests:6} req  {stats.bytes_sent / 1e6:9.1f} MB"
        extra += "  CPU " + ", ".join(
            f"{name} {value:.2f} s"
            for name, value in (("client", cpu.client), ("reader", cpu.reader), ("S3", cpu.s3))
            if value is not None and (name != "reader" or cpu.reader != cpu.client)
        )
        if variant:
            extra += f"  ({variant})"
        say(f"  {client:11} {workload:10} {phase:7} {seconds:9.3f} s{extra}")
        return cell

    def s3_cpu(self) -> float | None:
        return None if self.s3.pid is None else cpu_seconds(self.s3.pid)

    def measure(
        self,
        client: str,
        workload: str,
        phase: str,
        fn: Callable[[], Any],
        mount: Mount | None = None,
    ) -> float:
        """Time `fn` (reading through `mount`, or tmpfs); CPU and requests are read once the
        requests have settled, so late readahead counts for the workload that caused it."""
        before = self.s3.stats()
        s3_before = self.s3_cpu()
        daemon_before = mount.cpu_seconds() if mount is not None else None
        reader_before = time.process_time()
        start = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - start
        reader = time.process_time() - reader_before
        stats = settled(self.s3) - before if client != "tmpfs" else None
        if mount is not None:
            cpu = Cpu(_minus(mount.cpu_seconds(), daemon_before), reader, None)
        else:
            cpu = Cpu(reader, reader, None)
        cpu = Cpu(cpu.client, cpu.reader, _minus(self.s3_cpu(), s3_before))
        verify(client, workload, self.bench, value)
        self.record(client, workload, phase, seconds, stats, cpu)
        return seconds

    def note_remount_requests(self, mount: Mount) -> None:
        """A remount over a warm disk cache went to S3: print the daemon's disk cache counters
        (from its next stats file) and, from the log both mounts wrote, the warnings and what the
        first mount's close says it left on disk, so that the cause can be told."""
        ended = time.time()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            snap = zarrfs_runtime.read_stats(mount.mnt)
            if snap is not None and snap.get("time", 0) >= ended:
                counters = {
                    f"{part}.{key}": value
                    for part in ("disk_cache", "cache_dir", "memory_cache")
                    for key, value in (snap.get(part) or {}).items()
                    if isinstance(value, int) and value
                }
                say(f"    remount went to S3; the daemon's counters: {counters}")
                break
            time.sleep(0.2)
        log = mount.mnt.parent / f"{ZARRFS}.log"
        with contextlib.suppress(OSError):
            for line in log.read_text(errors="replace").splitlines():
                if " WARNING " in line or " ERROR " in line or "disk block cache at close" in line:
                    say(f"    log: {line}")

    def note_md5(self, workload: str, mnt: Path, seconds: float) -> None:
        """What verifying bodies by MD5 cost zarrfs in a cold workload (its daemon's counters, from
        the stats file it rewrites every 2 s: read once it is newer than the workload's end)."""
        ended = time.time()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            snap = zarrfs_runtime.read_stats(mnt)
            if snap is not None and snap.get("time", 0) >= ended:
                s3 = snap["s3"]
                self.md5[workload] = (
                    s3["md5_verified"],
                    s3["md5_bytes"],
                    s3["md5_ns"] / 1e9,
                    seconds,
                )
                return
            time.sleep(0.2)

    def note_rss(self, mount: Mount) -> None:
        rss = mount.peak_rss()
        if rss is not None:
            self.rss[mount.tool] = max(self.rss.get(mount.tool, 0), rss)

    @contextmanager
    def mounted(self, tool: str, scratch: Path, *, foreground: bool = True) -> Iterator[Mount]:
        options = self.zarrfs_options if tool == ZARRFS else []
        mount = start_mount(
            tool,
            self.s3,
            self.target,
            scratch / "mnt",
            scratch / "cache",
            foreground=foreground,
            zarrfs_options=options,
        )
        self.live.append(mount)
        try:
            yield mount
        finally:
            self.note_rss(mount)
            mount.stop()
            self.live.remove(mount)

    def stop_all(self) -> None:
        for mount in list(self.live):
            mount.stop()
            self.live.remove(mount)

    @property
    def target(self) -> Target:
        assert self.bench.target is not None
        return self.bench.target

    def scratch(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work))

    def done_with(self, scratch: Path) -> None:
        if not self.args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    # clients ------------------------------------------------------------------------------------

    def run(self, client: str, workload: str) -> None:
        """One workload with one client: cold, warm and (with a disk cache) remount."""
        if workload == "serve":
            return  # measured with "mount"
        if client == "tmpfs":
            if workload != "mount":
                assert self.tmpfs is not None
                fn = fs_workload(workload, self.bench, *self.tmpfs)
                self.cold()
                self.measure("tmpfs", workload, "cold", fn)
                self.measure("tmpfs", workload, "warm", fn)
        elif client == "raw":
            if workload != "mount":
                self.run_raw(workload)
        elif workload == "mount":
            self.run_mount_ready(client)
        else:
            self.run_mounted(client, workload)

    def run_raw(self, workload: str) -> None:
        """The raw client, cold; the sequential read both ways, the faster being raw's figure."""
        if workload != "seq":
            self.raw_once(workload, workload.replace("-", "_"))
            return
        ways = [
            self.raw_once("seq", "seq_stream", "one streamed GET", keep=False),
            self.raw_once(
                "seq",
                "seq_ranged",
                f"{RAW_PART // MiB} MiB ranged GETs, {RAW_PARTS_IN_FLIGHT} at a time",
                keep=False,
            ),
        ]
        self.raw_seq = ways
        faster = min(ways, key=lambda cell: cell.seconds)
        self.cells.append(faster)
        say(f"  raw seq: the faster is {faster.variant}")

    def raw_once(
        self, workload: str, method: str, variant: str | None = None, *, keep: bool = True
    ) -> Cell:
        self.cold()

        async def run() -> tuple[float, float, float | None, RequestStats, Any]:
            async with raw_client(self.s3.endpoint_url) as client:
                reader = RawReader(client, self.s3.bucket, self.bench)
                before = self.s3.stats()
                s3_before = self.s3_cpu()
                cpu_before = time.process_time()
                start = time.perf_counter()
                value = await getattr(reader, method)()
                seconds = time.perf_counter() - start
                cpu = time.process_time() - cpu_before
            stats = settled(self.s3) - before
            return seconds, cpu, _minus(self.s3_cpu(), s3_before), stats, value

        seconds, cpu, s3_cpu, stats, value = trio.run(run)
        verify("raw", workload, self.bench, value)
        return self.record(
            "raw", workload, "cold", seconds, stats, Cpu(cpu, cpu, s3_cpu), variant, keep=keep
        )

    def has_disk_cache(self, tool: str) -> bool:
        return tool == "rclone-full" or (tool == ZARRFS and self.zarrfs_disk_cache)

    def mounted_workload(self, tool: str, workload: str, mnt: Path) -> Callable[[], Any]:
        target = self.target
        big = target.blob_path(tool, mnt, target.big) if target.big else mnt / "no-big-blob"
        return fs_workload(
            workload, self.bench, target.zarr_root(tool, mnt), target.blob_path(tool, mnt), big
        )

    def run_mounted(self, tool: str, workload: str) -> None:
        scratch = self.scratch(f"{tool}-{workload}")
        with self.mounted(tool, scratch) as mount:
            fn = self.mounted_workload(tool, workload, mount.mnt)
            self.cold()
            cold = self.measure(tool, workload, "cold", fn, mount)
            if tool == ZARRFS:
                self.note_md5(workload, mount.mnt, cold)
            self.measure(tool, workload, "warm", fn, mount)
        if self.has_disk_cache(tool):
            self.cold()
            with self.mounted(tool, scratch) as mount:
                fn = self.mounted_workload(tool, workload, mount.mnt)
                self.measure(tool, workload, "remount", fn, mount)
                moved = self.cells[-1].requests
                if tool == ZARRFS and moved is not None and moved.requests:
                    self.note_remount_requests(mount)
        self.done_with(scratch)

    def run_mount_ready(self, tool: str) -> None:
        """Spawn the mount command in the background (as a user would) until the mount is live."""
        for phase in ("cold", "warm"):
            runs: list[tuple[float, float, RequestStats, Cpu]] = []
            for _ in range(MOUNT_REPEATS if phase == "warm" else 1):
                scratch = self.scratch(f"{tool}-mount")
                if phase == "cold":
                    self.cold()
                before = self.s3.stats()
                s3_before = self.s3_cpu()
                with self.mounted(tool, scratch, foreground=False) as mount:
                    stats = settled(self.s3) - before
                    cpu = Cpu(mount.cpu_to_serve, None, _minus(self.s3_cpu(), s3_before))
                    runs.append((mount.ready_after, mount.serving_after, stats, cpu))
                self.done_with(scratch)
            for workload, pick in (("mount", _ready_after), ("serve", _serving_after)):
                median = sorted(runs, key=pick)[len(runs) // 2]
                self.record(tool, workload, phase, pick(median), median[2], median[3])


def _ready_after(run: tuple[float, float, RequestStats, Cpu]) -> float:
    return run[0]


def _serving_after(run: tuple[float, float, RequestStats, Cpu]) -> float:
    return run[1]


# --- the report ---------------------------------------------------------------------------------


def fmt_seconds(s: float) -> str:
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 10:
        return f"{s:.1f} s"
    if s >= 0.1:
        return f"{s:.2f} s"
    return f"{s:.3f} s"


def fmt_cell(cell: Cell | None) -> str:
    """`time (requests, MB sent; CPU s)`: the CPU is the client's own (see `Cpu.client`)."""
    if cell is None:
        return "–"
    text = fmt_seconds(cell.seconds)
    details = []
    if cell.requests is not None:
        details.append(f"{cell.requests.requests} req, {fmt_mb(cell.requests.bytes_sent)}")
    if cell.cpu.client is not None:
        details.append(f"CPU {cell.cpu.client:.2f} s")
    if details:
        text += f" ({'; '.join(details)})"
    if cell.variant:
        text += f" [{cell.variant}]"
    return text


def fmt_cpu(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def fmt_mb(n: int) -> str:
    if n < 100_000:
        return f"{n / 1000:.0f} kB" if n else "0 MB"
    mb = n / 1e6
    return f"{mb:.0f} MB" if mb >= 100 else f"{mb:.1f} MB" if mb >= 0.1 else f"{mb:.2f} MB"


@dataclass(frozen=True, slots=True)
class Verdict:
    workload: str
    phase: str
    vs_raw: float | None
    vs_peer: float | None
    target: str
    result: str  # PASS, MISS (...), n/a

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "phase": self.phase,
            "zarrfs_over_raw": self.vs_raw,
            "zarrfs_over_best_peer": self.vs_peer,
            "target": self.target,
            "result": self.result,
        }


def judge(
    workload: str,
    phase: str,
    cells: Mapping[str, Cell],
    tmpfs_cold: Cell | None = None,
    asked: int | None = None,
) -> Verdict:
    """Ratios and targets of one row; a remount is held against tmpfs's cold cell, the random
    preads' bytes moved against the bytes `asked`."""
    z = cells.get(ZARRFS)
    peers = [cells[p].seconds for p in PEERS if p in cells]
    best_peer = min(peers) if peers else None
    raw = cells.get("raw")
    tmpfs = tmpfs_cold if phase == "remount" else cells.get("tmpfs")
    vs_raw = z.seconds / raw.seconds if z and raw and phase == "cold" else None
    vs_peer = z.seconds / best_peer if z and best_peer else None
    checks: list[tuple[str, bool]] = []
    if best_peer is not None and z is not None:
        checks.append(("≤ best peer", z.seconds <= best_peer))
    if z is not None:
        if phase == "cold" and workload in RAW_LIMIT and raw is not None:
            limit = RAW_LIMIT[workload]
            checks.append((f"≤ {limit:g}× raw", z.seconds <= limit * raw.seconds))
        if (
            phase == "cold"
            and workload in ("preads", "preads-big")
            and asked
            and z.requests is not None
        ):
            moved = z.requests.bytes_sent / asked
            checks.append((f"≤ {PREAD_BYTES_LIMIT:g}× bytes asked", moved <= PREAD_BYTES_LIMIT))
        if phase == "warm" and workload not in (*MOUNTING, "first") and tmpfs is not None:
            checks.append(
                (f"≤ {WARM_TMPFS_LIMIT:g}× tmpfs", z.seconds <= WARM_TMPFS_LIMIT * tmpfs.seconds)
            )
        if phase == "remount":
            if tmpfs is not None and workload != "first":  # tmpfs lists a directory in µs
                limit = REMOUNT_TMPFS_LIMIT * tmpfs.seconds
                checks.append((f"≤ {REMOUNT_TMPFS_LIMIT:g}× tmpfs", z.seconds <= limit))
            if z.requests is not None:
                checks.append(("0 S3 requests", z.requests.requests == 0))
        if workload == "mount":
            checks.append((f"≤ {MOUNT_READY_LIMIT:g} s", z.seconds <= MOUNT_READY_LIMIT))
    target = ", ".join(name for name, _ in checks) or "–"
    if z is None or not checks:
        result = "n/a"
    else:
        missed = [name for name, ok in checks if not ok]
        result = "PASS" if not missed else f"MISS ({'; '.join(missed)})"
    return Verdict(workload, phase, vs_raw, vs_peer, target, result)


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


CellKey = tuple[str, str, str]  # (workload, phase, client)


def runs_by_cell(cells: Sequence[Cell]) -> dict[CellKey, list[Cell]]:
    """Every run of each (workload, phase, client), fastest first."""
    groups: dict[CellKey, list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.workload, cell.phase, cell.client), []).append(cell)
    return {key: sorted(group, key=lambda c: c.seconds) for key, group in groups.items()}


def median_cells(cells: Sequence[Cell]) -> dict[CellKey, Cell]:
    """Per (workload, phase, client), the run of median time (the lower of the two middle ones
    for an even count): one run's figures, its requests and CPU with them, never a blend."""
    return {key: runs[(len(runs) - 1) // 2] for key, runs in runs_by_cell(cells).items()}


def cold_cells(cells: Sequence[Cell]) -> dict[tuple[str, str], Cell]:
    """The median cold run of each (workload, client)."""
    return {(w, c): cell for (w, p, c), cell in median_cells(cells).items() if p == "cold"}


def spread_table(cells: Sequence[Cell], clients: Sequence[str], sizes: Sizes) -> list[str]:
    """With `--repeat`: every run's seconds, sorted, for each cell measured more than once."""
    rows = [
        f"| {label(workload, sizes)}{'' if phase == 'cold' else f', {phase}'} | {client} | "
        + ", ".join(fmt_seconds(run.seconds) for run in runs)
        + " |"
        for (workload, phase, client), runs in runs_by_cell(cells).items()
        if len(runs) > 1 and client in clients
    ]
    if not rows:
        return []
    return [
        "Every run (seconds, sorted; the tables show the median run):",
        "",
        "| workload | client | runs |",
        "|---|---|---|",
        *rows,
    ]


def report(
    runner: Runner, clients: Sequence[str], workloads: Sequence[str], sizes: Sizes
) -> tuple[list[str], list[Verdict]]:
    by_key: dict[tuple[str, str], dict[str, Cell]] = {}
    for (workload, phase, client), cell in median_cells(runner.cells).items():
        by_key.setdefault((workload, phase), {})[client] = cell
    header = [
        "workload (cold unless noted)",
        *(HEADING.get(c, c) for c in clients),
        "zarrfs/raw",
        "zarrfs/best peer",
        "target",
        "result",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    kinds = [
        "| workload | " + " | ".join(HEADING.get(c, c) for c in clients) + " |",
        "|" + "---|" * (len(clients) + 1),
    ]
    verdicts = []
    for workload in workloads:
        for phase in PHASES:
            cells = by_key.get((workload, phase))
            if not cells:
                continue
            name = label(workload, sizes)
            if phase == "warm":
                name = (
                    f"same, warm ({name})"
                    if workload not in MOUNTING
                    else f"{name}, warm page cache"
                )
            elif phase == "remount":
                name = f"same, remount over a warm disk cache ({name})"
            tmpfs_cold = by_key.get((workload, "cold"), {}).get("tmpfs")
            asked = runner.bench.asked(workload) if workload in DATA_READS else None
            verdict = judge(workload, phase, cells, tmpfs_cold, asked)
            if phase == "remount" and ZARRFS not in cells and ZARRFS in clients:
                verdict = Verdict(
                    workload, phase, None, None, "–", "n/a: zarrfs has no disk cache option"
                )
            verdicts.append(verdict)
            row = [name, *(fmt_cell(cells.get(c)) for c in clients)]
            row += [
                fmt_ratio(verdict.vs_raw),
                fmt_ratio(verdict.vs_peer),
                verdict.target,
                verdict.result,
            ]
            lines.append("| " + " | ".join(row) + " |")
            kind_row = [name]
            for c in clients:
                found = cells.get(c)
                if found is None or found.requests is None:
                    kind_row.append("–")
                else:
                    by = found.requests.by_kind
                    kind_row.append(", ".join(f"{by[k]} {k}" for k in sorted(by)) or "0")
            kinds.append("| " + " | ".join(kind_row) + " |")
    if runner.rss:
        memory = zarrfs_config.DEFAULT_MEMORY_CACHE_SIZE
        limit = memory + RSS_HEADROOM
        z = runner.rss.get(ZARRFS)
        peers = [runner.rss[p] for p in PEERS if p in runner.rss]
        row = ["daemon peak RSS (VmHWM, max over its mounts)"]
        row += [f"{runner.rss[c] / MiB:.0f} MiB" if c in runner.rss else "–" for c in clients]
        vs_peer = z / min(peers) if z is not None and peers else None
        target = f"≤ {memory // MiB} MiB memory cache + {RSS_HEADROOM // MiB} MiB"
        result = "n/a" if z is None else "PASS" if z <= limit else "MISS"
        row += ["–", fmt_ratio(vs_peer), target, result]
        lines.append("| " + " | ".join(row) + " |")
        verdicts.append(Verdict("rss", "peak", None, vs_peer, target, result))
    md5 = [
        "| workload | bodies verified | MiB hashed | time hashing | share of the workload |",
        "|---|---|---|---|---|",
    ]
    for workload, (bodies, hashed, hashing, seconds) in runner.md5.items():
        md5.append(
            f"| {label(workload, sizes)} | {bodies} | {hashed / MiB:.1f} | {hashing * 1e3:.0f} ms "
            f"| {hashing / seconds:.1%} |"
        )
    extra = ["", "MD5 verification of whole-object GETs (zarrfs, cold; hashing time summed):", ""]
    return [
        *lines,
        "",
        "S3 requests by kind:",
        "",
        *kinds,
        "",
        *cpu_table(runner, clients, workloads, sizes),
        "",
        *bytes_table(runner, clients, workloads, sizes),
        *(extra + md5 if runner.md5 else []),
        *(["", *spread] if (spread := spread_table(runner.cells, clients, sizes)) else []),
    ], verdicts


def cpu_table(
    runner: Runner, clients: Sequence[str], workloads: Sequence[str], sizes: Sizes
) -> list[str]:
    """CPU seconds of every cold cell (the client's, the reader's, the local S3's), then the
    sequential read's per GiB, with raw's two ways."""
    cold = cold_cells(runner.cells)
    lines = [
        "CPU seconds, cold (client: the daemon of a mount, this process for raw and tmpfs; "
        "reader: this process reading through a mount; S3: the local S3 server):",
        "",
        "| workload | " + " | ".join(HEADING.get(c, c) for c in clients) + " |",
        "|" + "---|" * (len(clients) + 1),
    ]
    for workload in workloads:
        if workload == "serve":
            continue
        row = [label(workload, sizes)]
        for client in clients:
            cell = cold.get((workload, client))
            if cell is None:
                row.append("–")
                continue
            parts = [f"client {fmt_cpu(cell.cpu.client)}"]
            if cell.cpu.reader is not None and cell.cpu.reader != cell.cpu.client:
                parts.append(f"reader {fmt_cpu(cell.cpu.reader)}")
            parts.append(f"S3 {fmt_cpu(cell.cpu.s3)}")
            row.append(", ".join(parts))
        lines.append("| " + " | ".join(row) + " |")
    seq = [cold[("seq", c)] for c in clients if ("seq", c) in cold]
    if not seq:
        return lines
    gib = sizes.blob / (1 << 30)
    lines += [
        "",
        f"Sequential read of the {sizes.blob // MiB} MiB blob, cold, CPU seconds per GiB read:",
        "",
        "| client | seconds | MB/s | client CPU s/GiB | reader CPU s/GiB | S3 CPU s/GiB | requests |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [(c.client, c) for c in seq]
    rows += [(f"raw, {c.variant}", c) for c in runner.raw_seq]
    for name, cell in rows:
        per = [
            None if v is None else v / gib for v in (cell.cpu.client, cell.cpu.reader, cell.cpu.s3)
        ]
        reader = "–" if cell.cpu.reader == cell.cpu.client else fmt_cpu(per[1])
        requests = "–" if cell.requests is None else str(cell.requests.requests)
        lines.append(
            f"| {HEADING.get(name, name)} | {fmt_seconds(cell.seconds)} "
            f"| {sizes.blob / 1e6 / cell.seconds:.0f} | {fmt_cpu(per[0])} | {reader} "
            f"| {fmt_cpu(per[2])} | {requests} |"
        )
    return lines


def bytes_table(
    runner: Runner, clients: Sequence[str], workloads: Sequence[str], sizes: Sizes
) -> list[str]:
    """Bytes the S3 server sent over bytes the workload asked for, cold."""
    cold = cold_cells(runner.cells)
    remote = [c for c in clients if c != "tmpfs"]
    lines = [
        "Bytes moved (body bytes the S3 server sent) over bytes asked, cold:",
        "",
        "| workload | bytes asked | " + " | ".join(HEADING.get(c, c) for c in remote) + " |",
        "|" + "---|" * (len(remote) + 2),
    ]
    for workload in workloads:
        if workload not in DATA_READS:
            continue
        asked = runner.bench.asked(workload)
        row = [label(workload, sizes), fmt_mb(asked)]
        for client in remote:
            cell = cold.get((workload, client))
            if cell is None or cell.requests is None:
                row.append("–")
            else:
                sent = cell.requests.bytes_sent
                row.append(f"{sent / asked:.2f}× ({fmt_mb(sent)})")
        lines.append("| " + " | ".join(row) + " |")
    return lines


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the issue's sizes (the default)")
    size.add_argument(
        "--full", action="store_true", help="20k-entry Zarr, 250 MiB array, 512 MiB blob"
    )
    parser.add_argument("--latency", type=float, default=0.02, help="seconds per S3 response")
    parser.add_argument(
        "--stream-bandwidth",
        type=float,
        default=STREAM_BANDWIDTH,
        metavar="MB_PER_S",
        help=f"pace every S3 response body to this many MB/s, as one S3 connection is "
        f"(default {STREAM_BANDWIDTH:g}; 0: unpaced)",
    )
    parser.add_argument("--only", default=",".join(CLIENTS), help="comma-separated clients")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run every client N times per workload, in rounds (each row's clients alternate); "
        "the tables show each cell's median run, and a last table every run",
    )
    parser.add_argument("--keep", action="store_true", help="keep scratch dirs and the tmpfs copy")
    parser.add_argument("--seed", type=int, default=20251130)
    parser.add_argument(
        "--zarrfs-option",
        action="append",
        default=[],
        metavar="ARG",
        help="pass ARG to zarrfs mount (repeatable; e.g. --zarrfs-option=--read-ahead=0)",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "zarrfs-bench-compare"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    for option, allowed in (("only", CLIENTS), ("workloads", WORKLOADS)):
        chosen = [x for x in getattr(args, option).split(",") if x]
        if unknown := [x for x in chosen if x not in allowed]:
            parser.error(f"--{option}: unknown {unknown}; choose from {', '.join(allowed)}")
        setattr(args, option, [x for x in allowed if x in chosen])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = FULL if args.full else QUICK
    clients: list[str] = list(args.only)
    for tool, install in missing_tools(clients).items():
        say(f"note: {tool} skipped: not installed ({install})")
        clients.remove(tool)
    if shutil.which("fusermount3") is None and any(c in MOUNT_CLIENTS for c in clients):
        say("note: mounts skipped: fusermount3 not installed (apt-get install -y fuse3)")
        clients = [c for c in clients if c not in MOUNT_CLIENTS]

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwinds through every finally: mounts are unmounted

    signal.signal(signal.SIGTERM, on_term)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{sizes.name}-", dir=args.work_dir))
    shm = Path(tempfile.mkdtemp(prefix="zarrfs-bench-compare-", dir="/dev/shm"))
    # keep every object but the big blob in moto's memory (it spills bigger ones to temp files)
    os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(sizes.blob + MiB)
    info = machine_info(args.latency * 1000, args.stream_bandwidth)
    say("\n".join(info))
    if args.zarrfs_option:
        say(f"zarrfs mount options: {' '.join(args.zarrfs_option)}")
    runner: Runner | None = None
    try:
        with LocalS3(
            latency=args.latency,
            fast_range_min_size=FAST_RANGE_MIN_SIZE,
            stream_bandwidth=args.stream_bandwidth * 1e6,
        ) as s3:
            start = time.perf_counter()
            bench = make_bench(sizes, args.seed, big="preads-big" in args.workloads)
            write_bench(s3, bench)
            big = f" and a {sizes.big_blob // MiB:,} MiB one" if bench.big is not None else ""
            say(f"wrote a {sizes.files:,}-file Zarr ({sum(map(len, bench.files.values())) / MiB:.0f} "
                f"MiB) and a {sizes.blob // MiB} MiB blob{big} in {time.perf_counter() - start:.0f} s")  # fmt: skip
            warm_up(work, s3, bench)
            runner = Runner(args, s3, bench, work)
            runner.zarrfs_options = list(args.zarrfs_option)
            if ZARRFS in clients:
                if "--cache-size" in zarrfs_help():
                    runner.zarrfs_disk_cache = True
                    budget = math.ceil((sizes.blob + sizes.array_bytes) * 2 / MiB)
                    runner.zarrfs_options += ["--cache-size", f"{budget}M"]
                else:
                    say("n/a: zarrfs has no disk cache option: no remount row for zarrfs")
            if "tmpfs" in clients:
                runner.tmpfs = copy_to_tmpfs(bench, shm)
            # workload by workload, so that the clients of one row run close together in time
            for workload in args.workloads:
                if workload == "serve":
                    continue  # measured with "mount"
                say(f"{workload}:")
                if workload == "preads-big":
                    assert bench.target is not None and bench.target.big is not None
                    prime(s3, bench.target.big.key)  # displaces the small blob's copy
                for round_ in range(1, args.repeat + 1):
                    if args.repeat > 1:
                        say(f"  round {round_} of {args.repeat}")
                    for client in clients:
                        runner.run(client, workload)
    finally:
        if runner is not None:
            runner.stop_all()
        if not args.keep:
            shutil.rmtree(shm, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    assert runner is not None
    table, verdicts = report(runner, clients, args.workloads, sizes)
    say()
    say("\n".join(info))
    say(f"sizes: {sizes.name}; cells: time (S3 requests, MB the S3 server sent; CPU seconds of "
        "the client: a mount's daemon, or this process for raw and tmpfs); every byte read by every "
        "client matched what was written")  # fmt: skip
    say()
    say("\n".join(table))
    if args.json is not None:
        document = {
            "machine": info,
            "sizes": {
                "name": sizes.name,
                "zarr_files": sizes.files,
                "array_bytes": sizes.array_bytes,
                "random_chunks": sizes.random_chunks,
                "blob_bytes": sizes.blob,
                "big_blob_bytes": sizes.big_blob if runner.bench.big is not None else None,
                "preads": sizes.preads,
            },
            "latency_s": args.latency,
            "repeat": args.repeat,
            "stream_bandwidth_mb_s": args.stream_bandwidth,
            "bytes_asked": {w: runner.bench.asked(w) for w in args.workloads if w in DATA_READS},
            "raw_seq_ways": [c.to_json() for c in runner.raw_seq],
            "clients": clients,
            "zarrfs_disk_cache": runner.zarrfs_disk_cache,
            "cells": [c.to_json() for c in runner.cells],
            "peak_rss_bytes": runner.rss,
            "md5_cold": {
                w: dict(zip(("bodies", "bytes", "hash_s", "workload_s"), v, strict=True))
                for w, v in runner.md5.items()
            },
            "verdicts": [v.to_json() for v in verdicts],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        say(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted: every mount was unmounted")
        sys.exit(130)
