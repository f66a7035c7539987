"""Sequential prefetch over the real block cache and S3 reader, against a fake S3 that streams.

Counts what a mount would send to S3 for a sequential reader (a few long streamed GETs, a window
that grows with what the run has read and is topped up as it reads on), for random preads (exactly their blocks, no prefetch), and checks that closing a
file stops its prefetch, that every open file shares one budget, and that blocks on disk are read
from disk. Virtual time (trio's MockClock), so the fake S3's delays cost nothing.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest
import trio

from zarrfs import config
from zarrfs.base.refs import ObjectRef
from zarrfs.config import S3Settings
from zarrfs.io.blocks import BlockCache
from zarrfs.io.disk_store import DiskBlockCache
from zarrfs.io.disk_tier import DiskTier
from zarrfs.io.prefetch import PrefetchBudget, Prefetcher
from zarrfs.io.stack import Lower, ReadStack
from zarrfs.s3_reader import S3Reader

pytestmark = pytest.mark.trio

BLOCK = 256 << 10
SIZE = 32 << 20
DATA = random.Random(7).randbytes(SIZE)
REF = ObjectRef("blobs/abc/def/x", None, SIZE, "f" * 32 + "-1")


class StreamingBody:
    def __init__(self, data: bytes, delay: float, fake: FakeS3) -> None:
        self.data = data
        self.delay = delay
        self.fake = fake

    async def __aenter__(self) -> StreamingBody:
        self.fake.open_streams += 1
        self.fake.peak_streams = max(self.fake.peak_streams, self.fake.open_streams)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.fake.open_streams -= 1

    async def read(self, n: int = -1) -> bytes:
        """The rest, or at most 64 KiB per `delay` however much more is asked for (as a socket
        delivers)."""
        await trio.sleep(self.delay)
        n = len(self.data) if n < 0 else min(n, 64 << 10)
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


class FakeS3:
    """An aiobotocore stand-in: answers after `latency`, then streams `per_chunk`-delayed chunks."""

    def __init__(
        self,
        latency: float = 0.02,
        per_chunk: float = 0.001,
        data: bytes = DATA,
        etag: str | None = REF.etag,
    ) -> None:
        self.latency = latency
        self.per_chunk = per_chunk
        self.data = data
        self.etag = etag
        self.ranges: list[tuple[int, int]] = []
        self.sent = 0
        self.open_streams = 0
        self.peak_streams = 0

    def body(self, first: int, last: int) -> bytes:
        """What the response for bytes first..last carries."""
        return self.data[first : last + 1]

    async def get_object(self, **params: Any) -> dict[str, Any]:
        await trio.sleep(self.latency)
        first, last = (int(x) for x in params["Range"].removeprefix("bytes=").split("-"))
        self.ranges.append((first, last + 1))
        body = self.body(first, last)
        self.sent += len(body)
        return {
            "Body": StreamingBody(body, self.per_chunk, self),
            "ContentRange": f"bytes {first}-{last}/{len(self.data)}",
            "ContentLength": len(body),
            "ETag": f'"{self.etag}"',
        }


def make(
    fake: FakeS3, budget: int = 256 << 20, disk: DiskTier | None = None
) -> tuple[BlockCache, PrefetchBudget]:
    reader = S3Reader(fake, S3Settings(max_concurrency=32))
    return BlockCache(512 << 20, BLOCK, Lower(reader, disk)), PrefetchBudget(budget)


async def read_all(cache: BlockCache, prefetcher: Prefetcher | None, size: int = 1 << 20) -> bytes:
    out = bytearray()
    while len(out) < SIZE:
        if prefetcher is not None:
            prefetcher.observe(len(out), size)
        out += await cache.read(REF, len(out), size)
    return bytes(out)


async def test_a_sequential_reader_gets_a_few_long_streamed_gets_in_parallel(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeS3()
    cache, budget = make(fake)
    async with trio.open_nursery() as nursery:
        prefetcher = Prefetcher(REF, cache, budget, nursery)
        assert await read_all(cache, prefetcher) == DATA
        prefetcher.close()
    # the reader's own first 2 MiB (the first read cannot continue anything), then 8 MiB parts as
    # the window grows and is topped up: not 32 separate GETs
    assert len(fake.ranges) <= 8, fake.ranges
    assert fake.sent <= SIZE * 1.05  # nothing fetched twice, little beyond the end
    windows = sorted((b - a) for a, b in fake.ranges)
    assert windows[-1] >= 8 << 20  # the window grew
    assert windows[-1] <= config.PREFETCH_PART  # a longer window came as 8 MiB parts,
    assert fake.peak_streams >= 2  # streamed at once
    assert budget.used == 0


async def test_random_preads_fetch_exactly_their_blocks(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeS3()
    cache, budget = make(fake)
    rng = random.Random(3)
    asked = 0
    async with trio.open_nursery() as nursery:
        prefetcher = Prefetcher(REF, cache, budget, nursery)
        for _ in range(50):
            offset = rng.randrange(0, SIZE - (256 << 10))
            prefetcher.observe(offset, 256 << 10)
            assert await cache.read(REF, offset, 256 << 10) == DATA[offset : offset + (256 << 10)]
            asked += 256 << 10
        prefetcher.close()
    assert prefetcher.segments == 0  # no prefetch for random access
    assert len(fake.ranges) <= 50  # one GET per pread (its blocks are contiguous)
    assert fake.sent <= 2 * asked  # at most the two blocks a 256 KiB read can straddle


async def test_random_preads_split_by_the_kernel_start_no_prefetch(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The kernel sends a 256 KiB pread as two 128 KiB reads, sometimes the second half first: they
    continue each other, but are one random read, not a sequential reader (they used to start a
    1 MiB segment each: 50 preads moved 85 MB to serve 12.5)."""
    fake = FakeS3()
    cache, budget = make(fake)
    rng = random.Random(5)
    half = 128 << 10
    asked = 0
    async with trio.open_nursery() as nursery:
        prefetcher = Prefetcher(REF, cache, budget, nursery)
        for i in range(50):
            offset = rng.randrange(0, SIZE - 2 * half)
            halves = [offset, offset + half][:: -1 if i % 3 == 0 else 1]
            for start in halves:
                prefetcher.observe(start, half)
            got = await cache.read(REF, offset, 2 * half)
            assert got == DATA[offset : offset + 2 * half]
            asked += 2 * half
        prefetcher.close()
    assert prefetcher.segments == 0
    assert fake.sent <= 2 * asked  # at most the two blocks a 256 KiB read can straddle


async def test_prefetch_starts_once_a_run_covers_the_trigger(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeS3()
    cache, budget = make(fake)
    piece = 128 << 10
    async with trio.open_nursery() as nursery:
        prefetcher = Prefetcher(REF, cache, budget, nursery)
        offset = 3 << 20
        while offset + piece - (3 << 20) < config.PREFETCH_TRIGGER:
            prefetcher.observe(offset, piece)
            offset += piece
        assert prefetcher.segments == 0  # a run shorter than the trigger: no prefetch yet
        prefetcher.observe(offset, piece)
        assert prefetcher.segments >= 1
        prefetcher.close()


async def test_a_first_read_at_the_start_of_the_file_begins_a_run(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A reader that opens a file and reads its first MiB (cp, md5sum, numpy.fromfile) opens the
    window with that read, not one round trip later; a first read elsewhere does not."""
    fake = FakeS3()
    cache, budget = make(fake)
    async with trio.open_nursery() as nursery:
        prefetcher = Prefetcher(REF, cache, budget, nursery)
        prefetcher.observe(0, 1 << 20)
        assert prefetcher.fetched_until == (1 << 20) + (config.PREFETCH_MULTIPLIER << 20)
        prefetcher.close()
        elsewhere = Prefetcher(REF, cache, budget, nursery)
        elsewhere.observe(5 << 20, 1 << 20)
        assert elsewhere.fetched_until == 0 and elsewhere.segments == 0
        elsewhere.close()


async def test_the_window_is_topped_up_a_part_at_a_time_and_never_drains(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the window is as long as it gets, every part the reader finishes is replaced by the next
    one: what is fetched ahead never falls below a window less a part (windows that started only
    when half the last one was read left the reader waiting for each new window's first bytes), and
    every GET of the prefetch is a whole part, not a few blocks."""
    monkeypatch.setattr(config, "PREFETCH_MAX_WINDOW", 8 << 20)
    monkeypatch.setattr(config, "PREFETCH_PART", 2 << 20)
    fake = FakeS3()
    cache, budget = make(fake)
    piece = 512 << 10
    leads = []  # fetched ahead of the reader, once the window is at its longest (8 x 1 MiB read)
    async with trio.open_nursery() as nursery:
        prefetcher = Prefetcher(REF, cache, budget, nursery)
        offset = 0
        while offset < SIZE:
            prefetcher.observe(offset, piece)
            if prefetcher.fetched_until and prefetcher.fetched_until < SIZE:
                leads.append(prefetcher.fetched_until - (offset + piece))
            assert await cache.read(REF, offset, piece) == DATA[offset : offset + piece]
            offset += piece
        prefetcher.close()
    assert len(leads) > 30  # the reader was followed over most of the 32 MiB
    assert min(leads) >= (8 << 20) - (2 << 20) and max(leads) <= 8 << 20, (min(leads), max(leads))
    prefetched = sorted((a, b) for a, b in fake.ranges if a >= 1 << 20)
    assert all(b - a == 2 << 20 for a, b in prefetched[:-1]), prefetched
    assert fake.sent <= SIZE * 1.05
    assert budget.used == 0


async def test_the_window_grows_with_what_the_run_has_read(
    autojump_clock: trio.abc.Clock,
) -> None:
    """What is fetched ahead is at most `PREFETCH_MULTIPLIER` times what the run has read (a short
    run is a small bet), and reaches the longest window less a part once the run has read an
    eighth of it (a long run gets several streams early)."""
    fake = FakeS3()
    cache, budget = make(fake)
    piece = 128 << 10
    longest = config.PREFETCH_MAX_WINDOW
    async with trio.open_nursery() as nursery:
        prefetcher = Prefetcher(REF, cache, budget, nursery)
        offset = 0
        while offset < 12 << 20:
            prefetcher.observe(offset, piece)
            read = offset + piece
            ahead = prefetcher.fetched_until - read
            assert ahead <= config.PREFETCH_MULTIPLIER * read + BLOCK, (read, ahead)
            if read > (longest // config.PREFETCH_MULTIPLIER) + (1 << 20):
                reach = min(read + longest - config.PREFETCH_PART, SIZE)
                assert prefetcher.fetched_until >= reach, (read, prefetcher.fetched_until)
            assert await cache.read(REF, offset, piece) == DATA[offset:read]
            offset = read
        prefetcher.close()


async def test_a_short_sequential_run_asks_for_little_more_than_it_reads(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Prefetch is a bet that the reader goes on, sized by what the run has read: a reader that
    reads 2 MiB in order (one small HDF5 dataset) and closes the file a moment later has asked S3
    for what it read and at most `PREFETCH_MULTIPLIER` times that beyond it (mountpoint-s3 bets
    about as much: its requests grow eightfold, 1.1 MiB then 9 MiB), not for a window sized for a
    whole blob (a first window of 64 MiB asked 30 MB more)."""
    fake = FakeS3()
    cache, budget = make(fake)
    async with trio.open_nursery() as nursery:
        prefetcher = Prefetcher(REF, cache, budget, nursery)
        for offset in range(0, 2 << 20, 1 << 20):
            prefetcher.observe(offset, 1 << 20)
            assert await cache.read(REF, offset, 1 << 20) == DATA[offset : offset + (1 << 20)]
        await trio.sleep(1)  # a file is not closed the instant its last read returns
        prefetcher.close()
    assert prefetcher.segments > 0  # it did start
    # 17 MiB: its first MiB, the 8 MiB window its first read opened, and the 8 MiB that topped it up
    # to the 16 MiB window of a 2 MiB run
    assert fake.sent <= (2 << 20) * (1 + config.PREFETCH_MULTIPLIER)


async def test_closing_the_file_stops_its_prefetch(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeS3(per_chunk=0.5)  # a slow stream: 0.5 s per 256 KiB
    cache, budget = make(fake)
    async with trio.open_nursery() as nursery:
        prefetcher = Prefetcher(REF, cache, budget, nursery)
        for offset in (0, 1 << 20):
            prefetcher.observe(offset, 1 << 20)
            await cache.read(REF, offset, 1 << 20)
        assert prefetcher.segments >= 1 and budget.used > 0
        await trio.sleep(0.1)
        prefetcher.close()
        await trio.sleep(10)
        assert budget.used == 0
        assert cache._inflight == {}  # claims given back: a reader would fetch them itself
        sent = fake.sent
        await trio.sleep(60)
        assert fake.sent == sent  # nothing more streams after close


async def test_a_read_after_the_close_prefetches_nothing(autojump_clock: trio.abc.Clock) -> None:
    """A read that raced the close (a file read without being opened, whose idle stream was just
    closed) fetches its own blocks: no segment, no budget taken that nothing would give back."""
    fake = FakeS3()
    cache, budget = make(fake)
    async with trio.open_nursery() as nursery:
        prefetcher = Prefetcher(REF, cache, budget, nursery)
        prefetcher.close()
        for offset in range(0, 4 << 20, 1 << 20):
            prefetcher.observe(offset, 1 << 20)
            assert await cache.read(REF, offset, 1 << 20) == DATA[offset : offset + (1 << 20)]
        assert prefetcher.segments == 0 and budget.used == 0


async def test_every_open_file_shares_one_budget(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeS3()
    cache, budget = make(fake, budget=3 << 20)
    peak = 0

    async def sequential(nursery: trio.Nursery) -> None:
        nonlocal peak
        prefetcher = Prefetcher(REF, cache, budget, nursery)
        out = bytearray()
        while len(out) < 8 << 20:
            prefetcher.observe(len(out), 1 << 20)
            out += await cache.read(REF, len(out), 1 << 20)
            peak = max(peak, budget.used)
        prefetcher.close()
        assert bytes(out) == DATA[: 8 << 20]

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(sequential, nursery)
    assert 0 < peak <= 3 << 20
    assert budget.used == 0


async def read_with_disk(fake: FakeS3, disk: DiskTier) -> Prefetcher:
    """One sequential read of REF by a new mount (empty memory) over `disk`; its prefetcher."""
    cache, budget = make(fake, disk=disk)
    async with trio.open_nursery() as nursery:
        disk.nursery = nursery
        prefetcher = Prefetcher(REF, cache, budget, nursery)
        assert await read_all(cache, prefetcher) == DATA
        prefetcher.close()
    return prefetcher


async def test_prefetch_reads_blocks_the_disk_has(tmp_path: Path) -> None:
    # real time: the disk works in threads, and virtual time would jump past its stall timeout
    disk = DiskTier(DiskBlockCache(tmp_path, max_bytes=1 << 30, block_size=BLOCK), "bucket")
    first = FakeS3(latency=0.002, per_chunk=0.0)
    await read_with_disk(first, disk)
    assert first.sent >= SIZE
    second = FakeS3(latency=0.002, per_chunk=0.0)  # a new mount: empty memory, the same disk
    await read_with_disk(second, disk)
    assert second.ranges == []  # every block from disk, none from S3


async def test_a_reader_streaming_from_s3_stops_asking_the_disk(tmp_path: Path) -> None:
    """Once a segment's lookup found none of its blocks on disk, the reader's later segments stream
    without a trip to the disk's thread (a cold read, 7% faster in the lab); a read over a disk
    that has the blocks keeps asking, and sends nothing to S3 (the test above)."""
    disk = DiskTier(DiskBlockCache(tmp_path, max_bytes=1 << 30, block_size=BLOCK), "bucket")
    lookups: list[int] = []
    original = disk.get_many

    async def counting(ref: ObjectRef, indexes: list[int], block_size: int) -> dict[int, bytes]:
        lookups.append(len(indexes))
        return await original(ref, indexes, block_size)

    disk.get_many = counting  # type: ignore[method-assign]
    prefetcher = await read_with_disk(FakeS3(latency=0.002, per_chunk=0.0), disk)
    assert prefetcher.disk_empty and prefetcher.segments >= 4
    # the reader's own first reads and the segments already started when the first lookup came
    # back empty asked; the rest did not
    prefetch_lookups = [n for n in lookups if n > 4]  # a demand read asks for its 4 blocks
    assert len(prefetch_lookups) < prefetcher.segments, (lookups, prefetcher.segments)


class FlippingS3(FakeS3):
    """A fake S3 holding one object with a plain-MD5 ETag, whose first `flips` responses arrive
    with one byte flipped (damage in transit that only the MD5 can tell)."""

    def __init__(self, data: bytes, flips: int) -> None:
        super().__init__(
            latency=0.002, per_chunk=0.0, data=data, etag=hashlib.md5(data).hexdigest()
        )
        self.flips = flips

    def body(self, first: int, last: int) -> bytes:
        body = super().body(first, last)
        if self.flips:
            self.flips -= 1
            body = body[:5] + bytes([body[5] ^ 1]) + body[6:]
        return body


async def test_an_object_checked_whole_is_never_served_by_parts_even_in_a_small_cache(
    tmp_path: Path,
) -> None:
    """A 12 MiB object with a plain-MD5 ETag and a 64 MiB memory cache (an eighth of it is 8 MiB,
    so the object is kept in memory by blocks): it is still fetched only whole, its MD5 checked
    before a byte is served (damage in transit is caught and fetched again), with no prefetch
    stream of a part of it; a sequential reader gets every block from that one fetch, and a
    remount reads it back from the disk, where it is one unit, without a request. (Real time: the
    disk works in threads.)"""
    data = random.Random(11).randbytes(12 << 20)
    fake = FlippingS3(data, flips=1)
    disk = DiskTier(DiskBlockCache(tmp_path, max_bytes=1 << 30, block_size=BLOCK), "bucket")
    ref = ObjectRef("zarr/z/1/2", None, len(data), fake.etag)
    again = FlippingS3(data, flips=0)  # a remount's S3
    for source in (fake, again):
        stack = ReadStack(
            S3Reader(source, S3Settings()), memory_bytes=64 << 20, block_size=BLOCK, disk=disk
        )
        async with trio.open_nursery() as nursery:
            stack.nursery = disk.nursery = nursery
            reader = stack.open(ref)
            assert reader.prefetcher is None and stack.blocks.unit(ref) == BLOCK
            out = bytearray()
            while len(out) < len(data):
                out += await reader.read(len(out), 1 << 20)
            reader.close()
            await disk.flush()
        assert bytes(out) == data
    assert fake.ranges == [(0, len(data))] * 2  # whole, twice: the damaged body was refused
    assert again.ranges == []  # the remount read it from the disk
    assert stack.blocks.stats()["disk_hits"] > 0  # the second stack (a remount) read the disk
