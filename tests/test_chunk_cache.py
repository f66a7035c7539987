"""BlockCache: slicing, LRU byte bound, single-flight, error delivery, cancellation, readahead."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio

from zarrfs.chunk_cache import BlockCache
from zarrfs.errors import IntegrityError, RemoteError
from zarrfs.refs import ObjectRef
from zarrfs.scheduler import Ticket

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
    cache = BlockCache(max_bytes=1 << 20, block_size=1000)
    fetch = FakeFetch()
    assert await cache.read(REF, offset, size, fetch) == content(REF)[offset : offset + size]
    # every fetch is one aligned block
    for _, _, start, end in fetch.calls:
        assert start % 1000 == 0
        assert end == min(start + 1000, REF.size)


async def test_past_end_and_empty_object_fetch_nothing() -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000)
    fetch = FakeFetch()
    assert await cache.read(REF, REF.size, 10, fetch) == b""
    assert await cache.read(REF, REF.size + 5000, 10, fetch) == b""
    assert await cache.read(Ref("empty", "v", 0), 0, 4096, fetch) == b""
    assert fetch.calls == []


async def test_versions_are_separate_cache_entries() -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000)
    fetch = FakeFetch()
    old, new = Ref("k", "v1", 3000), Ref("k", "v2", 3000)
    assert await cache.read(old, 0, 3000, fetch) == content(old)
    assert await cache.read(new, 0, 3000, fetch) == content(new)
    assert content(old) != content(new)
    assert len(fetch.calls) == 6
    assert await cache.read(old, 0, 3000, fetch) == content(old)
    assert len(fetch.calls) == 6


async def test_second_read_is_a_hit() -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000)
    fetch = FakeFetch()
    await cache.read(REF, 0, 2500, fetch)
    assert cache.stats() == {"hits": 0, "misses": 3, "disk_hits": 0, "bytes": 3000, "items": 3}
    assert await cache.read(REF, 500, 1000, fetch) == content(REF)[500:1500]
    assert len(fetch.calls) == 3
    assert cache.stats()["hits"] == 2


async def test_single_flight_concurrent_readers(autojump_clock: trio.abc.Clock) -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000)
    fetch = FakeFetch(delay=1.0)
    results: list[bytes] = []

    async def reader(offset: int) -> None:
        results.append(await cache.read(REF, offset, 10, fetch))

    async with trio.open_nursery() as nursery:
        for i in range(25):
            nursery.start_soon(reader, 2000 + i * 10)
    assert len(fetch.calls) == 1
    assert sorted(results) == sorted(content(REF)[2000 + i * 10 : 2010 + i * 10] for i in range(25))
    assert cache.stats()["misses"] == 1
    assert cache.stats()["hits"] == 24


async def test_lru_respects_byte_bound_and_evicts_oldest() -> None:
    cache = BlockCache(max_bytes=3000, block_size=1000)
    fetch = FakeFetch()
    for block in range(10):
        await cache.read(REF, block * 1000, 1000, fetch)
        assert cache.stats()["bytes"] <= 3000
    assert cache.stats()["items"] == 3
    assert len(fetch.calls) == 10
    await cache.read(REF, 9000, 1000, fetch)  # most recent: still cached
    assert len(fetch.calls) == 10
    await cache.read(REF, 0, 1000, fetch)  # oldest: evicted, fetched again
    assert len(fetch.calls) == 11


async def test_block_larger_than_cache_is_returned_not_kept() -> None:
    cache = BlockCache(max_bytes=500, block_size=1000)
    fetch = FakeFetch()
    assert await cache.read(REF, 100, 800, fetch) == content(REF)[100:900]
    assert cache.stats()["bytes"] == 0
    assert cache.stats()["items"] == 0
    # a short tail block (400 bytes) fits
    ref = Ref("k", "v", 9_400)
    assert await cache.read(ref, 9_100, 1000, fetch) == content(ref)[9_100:]
    assert cache.stats()["items"] == 1
    assert cache.stats()["bytes"] == 400


async def test_error_reaches_every_waiter_and_is_not_cached(
    autojump_clock: trio.abc.Clock,
) -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000)
    boom = RemoteError("S3 down")
    fetch = FakeFetch(delay=1.0, fail_with=[boom])
    errors: list[BaseException] = []

    async def reader() -> None:
        try:
            await cache.read(REF, 0, 100, fetch)
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
    assert await cache.read(REF, 0, 100, fetch) == content(REF)[:100]
    assert len(fetch.calls) == 2


async def test_multi_block_error_is_the_domain_error_not_a_group() -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000)
    fetch = FakeFetch(fail_with=[RemoteError("one block failed")])
    with pytest.raises(RemoteError, match="one block failed"):
        await cache.read(REF, 0, 5000, fetch)
    assert await cache.read(REF, 0, 5000, fetch) == content(REF)[:5000]


async def test_cancelled_fetcher_does_not_strand_waiters(autojump_clock: trio.abc.Clock) -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000)
    fetch = FakeFetch(delay=10.0)
    got: list[bytes] = []

    async def waiter() -> None:
        got.append(await cache.read(REF, 0, 10, fetch))

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(1) as fetcher_scope:
            nursery.start_soon(waiter)  # starts after the fetcher below, so it waits
            await cache.read(REF, 0, 10, fetch)  # the fetcher, cancelled after 1 s
        assert fetcher_scope.cancelled_caught
    assert got == [content(REF)[:10]]
    assert len(fetch.calls) == 2  # the waiter took over the fetch
    assert cache._inflight == {}


async def test_short_fetch_is_an_integrity_error() -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000)
    with pytest.raises(IntegrityError):
        await cache.read(REF, 0, 10, FakeFetch(short=True))
    assert cache.stats()["items"] == 0


async def test_sequential_readahead(autojump_clock: trio.abc.Clock) -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000, readahead_blocks=1)
    fetch = FakeFetch(delay=1.0)
    async with trio.open_nursery() as nursery:
        data = bytearray()
        for offset in range(0, 4000, 500):
            data += await cache.read(REF, offset, 500, fetch, readahead_nursery=nursery)
        assert bytes(data) == content(REF)[:4000]
        await trio.sleep(5)
        fetched = sorted(start for _, _, start, _ in fetch.calls)
        # blocks 0-3 read, block 4 read ahead; each fetched exactly once
        assert fetched == [0, 1000, 2000, 3000, 4000]
    # a random read that hits a block (not read ahead) triggers no readahead
    await cache.read(REF, 7000, 10, fetch)
    before = len(fetch.calls)
    async with trio.open_nursery() as nursery:
        await cache.read(REF, 7000, 10, fetch, readahead_nursery=nursery)
    assert len(fetch.calls) == before
    # the last block has nothing after it
    async with trio.open_nursery() as nursery:
        await cache.read(REF, 9_500, 500, fetch, readahead_nursery=nursery)
    assert [c[2] for c in fetch.calls[before:]] == [9000]


async def test_readahead_errors_are_not_fatal(autojump_clock: trio.abc.Clock) -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000)
    fetch = FakeFetch()
    async with trio.open_nursery() as nursery:
        await cache.read(REF, 0, 1000, fetch, readahead_nursery=nursery)
        fetch.fail_with.append(RemoteError("readahead failed"))
    # block 1 was not cached; a real read fetches it again
    assert await cache.read(REF, 1000, 1000, fetch) == content(REF)[1000:2000]
    assert [c[2] for c in fetch.calls] == [0, 1000, 1000]


async def test_readahead_window_follows_a_sequential_stream(autojump_clock: trio.abc.Clock) -> None:
    cache = BlockCache(max_bytes=1 << 20, block_size=1000, readahead_blocks=3)
    fetch = FakeFetch(delay=1.0)
    async with trio.open_nursery() as nursery:
        # a lone miss reads one block ahead only (random access must not fetch a window)
        await cache.read(REF, 5000, 10, fetch, readahead_nursery=nursery)
        await trio.sleep(5)
        assert sorted(c[2] for c in fetch.calls) == [5000, 6000]
        # reading the block that was read ahead shows a stream: keep 3 blocks in flight after it
        await cache.read(REF, 6000, 1000, fetch, readahead_nursery=nursery)
        await trio.sleep(5)
        assert sorted(c[2] for c in fetch.calls) == [5000, 6000, 7000, 8000, 9000]
        # ... and never past the end of the object, nor twice for the same block
        await cache.read(REF, 7000, 3000, fetch, readahead_nursery=nursery)
        await trio.sleep(5)
    assert sorted(c[2] for c in fetch.calls) == [5000, 6000, 7000, 8000, 9000]
