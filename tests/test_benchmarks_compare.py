"""benchmarks/compare.py's own pieces: the big blob's pattern, the raw client's reads against a local
S3 (both ways of reading a blob, the first entry, random preads of a multipart blob), the judging of
bytes moved, and the CPU counter. The full benchmark is run by hand (benchmarks/README.md)."""

from __future__ import annotations

import importlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from zarrfs.archive.digests import EtagHasher
from zarrfs.demo.locals3 import LocalS3, RequestStats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
compare: Any = importlib.import_module("compare")
harness: Any = importlib.import_module("harness")

MiB = 1 << 20


def test_pattern_blob_reads_any_range_and_no_two_pages_alike() -> None:
    blob = compare.PatternBlob(16 * MiB, seed=3)
    whole = b"".join(blob.read(offset, 3 * MiB) for offset in range(0, 16 * MiB, 3 * MiB))
    assert len(whole) == 16 * MiB
    rng = random.Random(0)
    for _ in range(100):
        offset, length = rng.randrange(16 * MiB), rng.randrange(1, 600_000)
        assert blob.read(offset, length) == whole[offset : offset + length]
    assert blob.read(16 * MiB - 10, 100) == whole[-10:]
    pages = {whole[at : at + 4096] for at in range(0, len(whole), 4096)}
    assert len(pages) == 16 * MiB // 4096
    assert blob.read(4096, 8192) != blob.read(4096 * 5, 8192)


def small_bench(big: bool) -> Any:
    sizes = compare.Sizes("test", 10, (512, 512), 1, 20 * MiB, 3, 72 * MiB)
    return compare.make_bench(sizes, seed=5, big=big)


def test_raw_reads_the_blob_both_ways_and_a_multipart_blob(local_s3: LocalS3) -> None:
    bench = small_bench(big=True)
    compare.write_bench(local_s3, bench)
    big = bench.target.big
    hasher = EtagHasher(big.size)
    for offset in range(0, big.size, 8 * MiB):
        hasher.update(bench.big.read(offset, 8 * MiB))
    assert big.etag == hasher.etag(multipart=True) and big.etag.endswith("-2")

    async def read(method: str) -> Any:
        async with compare.raw_client(local_s3.endpoint_url) as client:
            return await getattr(compare.RawReader(client, local_s3.bucket, bench), method)()

    before = local_s3.stats()
    ranged = trio.run(read, "seq_ranged")
    requests: RequestStats = local_s3.stats() - before
    assert requests.by_kind == {"GET": 3}  # 8 + 8 + 4 MiB
    compare.verify("raw", "seq", bench, ranged)
    compare.verify("raw", "seq", bench, trio.run(read, "seq_stream"))
    compare.verify("raw", "first", bench, trio.run(read, "first"))
    compare.verify("raw", "preads-big", bench, trio.run(read, "preads_big"))


def test_random_preads_are_held_to_twice_the_bytes_asked() -> None:
    def cell(client: str, seconds: float, sent: int) -> Any:
        return compare.Cell(client, "preads-big", "cold", seconds, RequestStats(3, sent))

    asked = 3 * 256 * 1024
    cells = {"zarrfs": cell("zarrfs", 1.0, 2 * asked), "raw": cell("raw", 1.0, asked)}
    assert compare.judge("preads-big", "cold", cells, asked=asked).result == "PASS"
    cells["zarrfs"] = cell("zarrfs", 1.0, 2 * asked + 1)
    verdict = compare.judge("preads-big", "cold", cells, asked=asked)
    assert verdict.result == "MISS (≤ 2× bytes asked)"


def test_cpu_seconds_counts_every_thread_and_none_once_gone() -> None:
    before = harness.cpu_seconds(os.getpid())
    end = time.process_time() + 0.1
    while time.process_time() < end:
        pass
    assert harness.cpu_seconds(os.getpid()) - before >= 0.08
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert harness.cpu_seconds(child.pid) is None


def test_repeated_runs_are_reported_by_their_median_run() -> None:
    """With --repeat, each cell of the tables is one whole run, the median by time (the lower of
    the two middle ones for an even count), so its requests and CPU are that run's; every run's
    time is listed as well."""

    def cell(client: str, seconds: float, requests: int) -> Any:
        stats = RequestStats(requests, requests * 100, {"GET": requests})
        return compare.Cell(client, "seq", "cold", seconds, stats)

    runs = [cell("zarrfs", s, n) for s, n in ((0.5, 5), (0.9, 9), (0.4, 4))]
    runs += [cell("raw", s, n) for s, n in ((0.3, 3), (0.2, 2), (0.25, 25), (0.35, 35))]
    chosen = compare.median_cells(runs)
    assert chosen[("seq", "cold", "zarrfs")].seconds == 0.5
    assert chosen[("seq", "cold", "zarrfs")].requests.requests == 5  # that run's own counters
    assert chosen[("seq", "cold", "raw")].seconds == 0.25  # lower middle of four
    table = "\n".join(compare.spread_table(runs, ["zarrfs", "raw"], compare.QUICK))
    assert "| zarrfs | 0.40 s, 0.50 s, 0.90 s |" in table
    assert "| raw | 0.20 s, 0.25 s, 0.30 s, 0.35 s |" in table
    assert compare.spread_table(runs[:1], ["zarrfs"], compare.QUICK) == []  # one run: no table
    assert compare.parse_args(["--repeat", "3"]).repeat == 3
