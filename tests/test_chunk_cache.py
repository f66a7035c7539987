"""BlockCache: slicing, LRU byte bound, single-flight, error delivery, cancellation, readahead."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from zarrfs.base.refs import ObjectRef
from zarrfs.errors import IntegrityError, RemoteError
from zarrfs.io.blocks import BlockCache
from zarrfs.io.scheduler import Priority, Ticket

pytestmark = pytest.mark.trio


def Ref(key: str, version_id: str | None, size: int, etag: str | None = None) -> ObjectRef:
    return ObjectRef(key, version_id, size, etag)


def content(ref: ObjectRef) -> bytes:
    """Deterministic, position-dependent bytes so a wrong slice cannot pass."""
    seed = f"{ref.key}@{ref.version_id}:".encode()
    out = bytearray()
    i = 0
    while len(out) < ref.size:
        out += seed + str(i).encode() + b";"
        i += 1
    return bytes(out[: ref.size])


@dataclass
class FakeFetch:
    """Records every fetch; can delay, fail or return short data."""

    delay: float = 0.0
    fail_with: list[Exception] = field(default_factory=list)
    short: bool = False
    calls: list[tuple[str, str | None, int, int]] = field(default_factory=list)
    tickets: list[Ticket] = field(default_factory=list)

    async def __call__(self, ref: ObjectRef, start: int, end: int, ticket: Ticket) -> bytes:
        self.calls.append((ref.key, ref.version_id, start, end))
        self.tickets.append(ticket)
        if self.delay:
            await trio.sleep(self.delay)
        else:
            await trio.sleep(0)
        if self.fail_with:
            raise self.fail_with.pop(0)
        data = content(ref)[start:end]
        return data[:-1] if self.short else data


class FetchLower:
    """The backing of these tests: no disk; the remote is whichever fetch the test reads with."""

    def __init__(self) -> None:
        self.remote: FakeFetch | None = None

    async def from_disk(self, ref: ObjectRef, indexes: list[int], unit: int) -> dict[int, bytes]:
        return {}

    async def fetch(self, ref: ObjectRef, start: int, end: int, ticket: Ticket) -> bytes:
        assert self.remote is not None
        return await self.remote(ref, start, end, ticket)

    async def stream(self, *args: Any) -> None:
        raise AssertionError("the block cache never streams")

    def keep(self, ref: ObjectRef, index: int, unit: int, data: bytes) -> None:
        return None


async def read(
    cache: BlockCache,
    ref: ObjectRef,
    offset: int,
    size: int,
    fetch: FakeFetch,
    priority: Priority = Priority.DEMAND,
) -> bytes:
    """`cache.read` with `fetch` as the remote end of its backing."""
    assert isinstance(cache.lower, FetchLower)
    cache.lower.remote = fetch
    return await cache.read(ref, offset, size, priority)


REF = Ref("zarr/abc/0/0", "v1", 10_000)


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (0, 10_000),
        (0, 1),
        (999, 2),
        (1000, 1000),
        (1500, 3000),
        (9_990, 100),
        (123, 0),
        (0, 20_000),
    ],
)
async def test_read_returns_exact_slice(offset: int, size: int) -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000, lower=FetchLower())
    fetch = FakeFetch()
    assert await read(cache, REF, offset, size, fetch) == content(REF)[offset : offset + size]
    # one fetch of whole aligned blocks: the contiguous missing ones in one request
    assert len(fetch.calls) <= 1
    for _, _, start, end in fetch.calls:
        assert start % 1000 == 0 and start <= offset
        assert end == min(-(-(offset + size) // 1000) * 1000, REF.size)


async def test_past_end_and_empty_object_fetch_nothing() -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000, lower=FetchLower())
    fetch = FakeFetch()
    assert await read(cache, REF, REF.size, 10, fetch) == b""
    assert await read(cache, REF, REF.size + 5000, 10, fetch) == b""
    assert await read(cache, Ref("empty", "v", 0), 0, 4096, fetch) == b""
    assert fetch.calls == []


async def test_versions_are_separate_cache_entries() -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000, lower=FetchLower())
    fetch = FakeFetch()
    old, new = Ref("k", "v1", 3000), Ref("k", "v2", 3000)
    assert await read(cache, old, 0, 3000, fetch) == content(old)
    assert await read(cache, new, 0, 3000, fetch) == content(new)
    assert content(old) != content(new)
    assert len(fetch.calls) == 2
    assert await read(cache, old, 0, 3000, fetch) == content(old)
    assert len(fetch.calls) == 2


async def test_second_read_is_a_hit() -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000, lower=FetchLower())
    fetch = FakeFetch()
    await read(cache, REF, 0, 2500, fetch)
    assert cache.stats() == {
        "hits": 0, "misses": 3, "disk_hits": 0, "fetches": 1, "bytes": 3000, "items": 3
    }  # fmt: skip
    assert await read(cache, REF, 500, 1000, fetch) == content(REF)[500:1500]
    assert len(fetch.calls) == 1
    assert cache.stats()["hits"] == 2


async def test_a_block_changed_in_memory_is_dropped_and_fetched_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000, lower=FetchLower())
    fetch = FakeFetch()
    await read(cache, REF, 0, 2500, fetch)
    cache.recheck_age = 0.0  # every hit is checked again
    assert await read(cache, REF, 0, 2500, fetch) == content(REF)[:2500]
    assert cache.recheck_stats() == {"rechecked": 3, "failed": 0} and len(fetch.calls) == 1
    block = cache._lru[(REF.key, REF.version_id, 1)]
    flipped = bytearray(block.data)
    flipped[7] ^= 0x10  # a bit flipped in RAM
    block.data = bytes(flipped)
    assert await read(cache, REF, 0, 2500, fetch) == content(REF)[:2500]  # never the flipped bytes
    assert cache.recheck_stats()["failed"] == 1
    assert fetch.calls[-1] == (REF.key, REF.version_id, 1000, 2000)  # that block fetched again
    assert "changed in memory" in caplog.text and REF.key in caplog.text


async def test_single_flight_concurrent_readers(autojump_clock: trio.abc.Clock) -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000, lower=FetchLower())
    fetch = FakeFetch(delay=1.0)
    results: list[bytes] = []

    async def reader(offset: int) -> None:
        results.append(await read(cache, REF, offset, 10, fetch))

    async with trio.open_nursery() as nursery:
        for i in range(25):
            nursery.start_soon(reader, 2000 + i * 10)
    assert len(fetch.calls) == 1
    assert sorted(results) == sorted(content(REF)[2000 + i * 10 : 2010 + i * 10] for i in range(25))
    assert cache.stats()["misses"] == 1
    assert cache.stats()["hits"] == 24
    assert fetch.tickets[0].priority == Priority.DEMAND


async def test_lru_respects_byte_bound_and_evicts_oldest() -> None:
    cache = BlockCache(max_bytes=3000, block_size=1000, lower=FetchLower())
    fetch = FakeFetch()
    for block in range(10):
        await read(cache, REF, block * 1000, 1000, fetch)
        assert cache.stats()["bytes"] <= 3000
    assert cache.stats()["items"] == 3
    assert len(fetch.calls) == 10
    await read(cache, REF, 9000, 1000, fetch)  # most recent: still cached
    assert len(fetch.calls) == 10
    await read(cache, REF, 0, 1000, fetch)  # oldest: evicted, fetched again
    assert len(fetch.calls) == 11


async def test_block_larger_than_cache_is_returned_not_kept() -> None:
    cache = BlockCache(max_bytes=500, block_size=1000, lower=FetchLower())
    fetch = FakeFetch()
    assert await read(cache, REF, 100, 800, fetch) == content(REF)[100:900]
    assert cache.stats()["bytes"] == 0
    assert cache.stats()["items"] == 0
    # a short tail block (400 bytes) fits
    ref = Ref("k", "v", 9_400)
    assert await read(cache, ref, 9_100, 1000, fetch) == content(ref)[9_100:]
    assert cache.stats()["items"] == 1
    assert cache.stats()["bytes"] == 400


async def test_error_reaches_every_waiter_and_is_not_cached(
    autojump_clock: trio.abc.Clock,
) -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000, lower=FetchLower())
    boom = RemoteError("S3 down")
    fetch = FakeFetch(delay=1.0, fail_with=[boom])
    errors: list[BaseException] = []

    async def reader() -> None:
        try:
            await read(cache, REF, 0, 100, fetch)
        except RemoteError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(reader)
    assert len(fetch.calls) == 1
    assert len(errors) == 10
    assert all(e is boom for e in errors)
    assert cache.stats()["items"] == 0
    # not cached: the next read fetches again and succeeds
    assert await read(cache, REF, 0, 100, fetch) == content(REF)[:100]
    assert len(fetch.calls) == 2


async def test_multi_block_error_is_the_domain_error_not_a_group() -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000, lower=FetchLower())
    fetch = FakeFetch(fail_with=[RemoteError("one block failed")])
    with pytest.raises(RemoteError, match="one block failed"):
        await read(cache, REF, 0, 5000, fetch)
    assert await read(cache, REF, 0, 5000, fetch) == content(REF)[:5000]


async def test_cancelled_fetcher_does_not_strand_waiters(autojump_clock: trio.abc.Clock) -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000, lower=FetchLower())
    fetch = FakeFetch(delay=10.0)
    got: list[bytes] = []

    async def waiter() -> None:
        got.append(await read(cache, REF, 0, 10, fetch))

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(1) as fetcher_scope:
            nursery.start_soon(waiter)  # starts after the fetcher below, so it waits
            await read(cache, REF, 0, 10, fetch)  # the fetcher, cancelled after 1 s
        assert fetcher_scope.cancelled_caught
    assert got == [content(REF)[:10]]
    assert len(fetch.calls) == 2  # the waiter took over the fetch
    assert cache._inflight == {}


async def test_short_fetch_is_an_integrity_error() -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000, lower=FetchLower())
    with pytest.raises(IntegrityError):
        await read(cache, REF, 0, 10, FakeFetch(short=True))
    assert cache.stats()["items"] == 0


async def test_a_blocked_reader_promotes_the_claim_it_waits_for(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A block claimed by a background producer (prefetch) is waited for, not fetched twice, and
    the waiting reader raises its request to demand."""
    cache = BlockCache(max_bytes=1 << 20, block_size=1000, lower=FetchLower())
    fetch = FakeFetch()
    background = Ticket(Priority.PREFETCH, flow=REF.key)
    assert cache.claim(REF, 3, 4, background) == [3, 4]
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await read(cache, REF, 3500, 1000, fetch))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(1)
        assert background.priority == Priority.DEMAND and got == []
        cache.fulfil(REF, 3, content(REF)[3000:4000])
        cache.abandon(REF, [4], None, background)  # the producer gave up on block 4
    assert got == [content(REF)[3500:4500]]
    assert [c[2:] for c in fetch.calls] == [(4000, 5000)]  # only the abandoned block was fetched
    assert cache.claim(REF, 3, 4, background) == []  # both cached now


async def test_abandon_with_a_ticket_leaves_later_claims_alone() -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000, lower=FetchLower())
    first, second = Ticket(Priority.PREFETCH), Ticket(Priority.DEMAND)
    assert cache.claim(REF, 0, 0, first) == [0]
    cache.abandon(REF, [0], None, first)
    assert cache.claim(REF, 0, 0, second) == [0]
    cache.abandon(REF, [0], None, first)  # stale: not its claim any more
    assert cache._inflight[(REF.key, REF.version_id, 0)].ticket is second


async def test_verifiable_objects_are_fetched_only_whole_and_one_unit_within_an_eighth() -> None:
    """An object whose MD5 can be checked is fetched only whole, so the S3 seam checks its body
    before a byte is served, whatever the memory budget: one unit while it fits an eighth of the
    budget, else kept by blocks, all of them from that one fetch (the next block's reader does not
    fetch the whole object again)."""
    md5 = "0" * 32
    small = Ref("zarr/z/c", "v", 3000, md5)
    cache = BlockCache(max_bytes=8 * 3000, block_size=1000, lower=FetchLower())
    fetch = FakeFetch()
    await read(cache, small, 1500, 10, fetch)
    assert [c[2:] for c in fetch.calls] == [(0, 3000)]  # the whole object: its MD5 is checkable
    assert cache.unit(small) == 3000
    tight = BlockCache(max_bytes=8 * 3000 - 1, block_size=1000, lower=FetchLower())
    fetch = FakeFetch()
    assert await read(tight, small, 1500, 10, fetch) == content(small)[1500:1510]
    assert tight.unit(small) == 1000  # kept by blocks
    assert [c[2:] for c in fetch.calls] == [(0, 3000)]  # but fetched whole: checked, not by range
    assert await read(tight, small, 0, 3000, fetch) == content(small)
    assert len(fetch.calls) == 1  # every block came with the first fetch
    multipart = Ref("zarr/z/d", "v", 3000, md5 + "-2")
    fetch = FakeFetch()
    await read(cache, multipart, 1500, 10, fetch)
    assert [c[2:] for c in fetch.calls] == [(1000, 2000)]  # not verifiable: by blocks


async def test_concurrent_reads_of_an_object_kept_by_blocks_share_one_whole_fetch() -> None:
    """Reads of different blocks of an object fetched only whole but kept by blocks, at the same
    time (the kernel sends a file's read requests concurrently), and a read whose missing blocks
    are not contiguous, each make no fetch beyond the one whole fetch that produces every block."""
    small = Ref("zarr/z/e", "v", 3000, "0" * 32)
    tight = BlockCache(max_bytes=8 * 3000 - 1, block_size=1000, lower=FetchLower())
    fetch = FakeFetch(delay=0.01)
    assert isinstance(tight.lower, FetchLower)
    tight.lower.remote = fetch
    got: dict[int, bytes] = {}

    async def one(offset: int) -> None:
        got[offset] = await tight.read(small, offset, 10)

    async with trio.open_nursery() as nursery:
        for offset in (0, 1500, 2500):
            nursery.start_soon(one, offset)
    assert got == {offset: content(small)[offset : offset + 10] for offset in (0, 1500, 2500)}
    assert [c[2:] for c in fetch.calls] == [(0, 3000)]
    other = BlockCache(max_bytes=8 * 3000 - 1, block_size=1000, lower=FetchLower())
    other.fulfil(small, 1, content(small)[1000:2000])  # the middle block cached, its ends not
    fetch = FakeFetch()
    assert await read(other, small, 0, 3000, fetch) == content(small)
    assert [c[2:] for c in fetch.calls] == [(0, 3000)]


async def test_blocks_of_a_whole_fetch_not_asked_for_count_as_fetched_ahead() -> None:
    """Reading an object kept by blocks one block at a time makes one fetch and one miss; the
    other blocks came with it, as a prefetch's do, and are hits when read (not misses, then hits)."""
    obj = Ref("zarr/z/g", "v", 3000, "0" * 32)
    cache = BlockCache(max_bytes=8 * 3000 - 1, block_size=100, lower=FetchLower())
    fetch = FakeFetch()
    for offset in range(0, 3000, 100):
        await read(cache, obj, offset, 100, fetch)
    assert len(fetch.calls) == 1
    assert (cache.stats()["misses"], cache.stats()["hits"]) == (1, 29), cache.stats()


async def test_a_failed_whole_fetch_fails_every_concurrent_reader_of_the_object() -> None:
    """Readers of different blocks of an object kept by blocks wait for the one whole fetch; when
    it fails, each gets its error (none hangs, none fetches a range), and a later read fetches the
    object whole again."""
    obj = Ref("zarr/z/h", "v", 3000, "0" * 32)
    cache = BlockCache(max_bytes=8 * 3000 - 1, block_size=1000, lower=FetchLower())
    fetch = FakeFetch(delay=0.01, fail_with=[RemoteError("S3 is down")])
    assert isinstance(cache.lower, FetchLower)
    cache.lower.remote = fetch
    failed: list[str] = []

    async def one(offset: int) -> None:
        try:
            await cache.read(obj, offset, 10)
        except RemoteError as e:
            failed.append(str(e))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for offset in (0, 1500, 2500):
                nursery.start_soon(one, offset)
    assert failed == ["S3 is down"] * 3
    assert await cache.read(obj, 1500, 10) == content(obj)[1500:1510]
    assert [c[2:] for c in fetch.calls] == [(0, 3000), (0, 3000)]


async def test_a_sequential_reader_of_an_object_bigger_than_memory_fetches_it_a_few_times() -> None:
    """An object fetched only whole, three times the memory cache: each whole fetch leaves in
    memory the blocks the reader reads next (kept last, so the LRU drops the others first), so a
    sequential reader fetches it about three times, not once per read request (30 here)."""
    big = Ref("zarr/z/f", "v", 3000, "0" * 32)
    cache = BlockCache(max_bytes=1000, block_size=100, lower=FetchLower())
    fetch = FakeFetch()
    out = b""
    while len(out) < big.size:
        out += await read(cache, big, len(out), 100, fetch)
    assert out == content(big)
    assert 3 <= len(fetch.calls) <= 4, fetch.calls
    assert all(c[2:] == (0, 3000) for c in fetch.calls)
