"""Demand first: the slot pool, and the per-read bound under load (virtual time, no real S3).

The end-to-end case runs the real `BlockCache` and `S3Reader` (scheduling, retries, response checks)
over a fake aiobotocore client that answers every GET after one second, on trio's MockClock, so "within
2 s" is exact and not a wall-clock race.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from zarrfs.base.refs import ObjectRef
from zarrfs.config import S3Settings
from zarrfs.errors import RemoteError
from zarrfs.io.blocks import BlockCache
from zarrfs.io.prefetch import PrefetchBudget, Prefetcher
from zarrfs.io.scheduler import Priority, RequestSlots, Ticket
from zarrfs.io.stack import Lower
from zarrfs.s3_reader import S3Reader

pytestmark = pytest.mark.trio


async def hold(
    slots: RequestSlots, ticket: Ticket, release: trio.Event, log: list[str], name: str
) -> None:
    async with slots.slot(ticket):
        log.append(name)
        await release.wait()


async def test_demand_gets_the_reserved_slots_while_background_waits() -> None:
    slots = RequestSlots(4, background_max=2)
    release = trio.Event()
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(hold, slots, Ticket(Priority.PREFETCH), release, order, f"p{i}")
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hold, slots, Ticket(Priority.PREFETCH), release, order, "p3")
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["p0", "p1"]  # background is capped at 2 of 4 slots
        for i in range(2):
            nursery.start_soon(hold, slots, Ticket(Priority.DEMAND), release, order, f"d{i}")
            await trio.testing.wait_all_tasks_blocked()
        assert order == ["p0", "p1", "d0", "d1"]  # demand used the two reserved slots at once
        assert slots.in_use == 4 and slots.waiting(Priority.PREFETCH) == 2
        release.set()
    assert sorted(order) == sorted(["p0", "p1", "p2", "p3", "d0", "d1"])
    assert slots.in_use == 0


async def test_a_freed_slot_goes_to_the_most_urgent_waiter() -> None:
    slots = RequestSlots(2, background_max=2)
    gates = [trio.Event() for _ in range(2)]
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, slots, Ticket(Priority.PREFETCH), gates[0], order, "p0")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hold, slots, Ticket(Priority.DEMAND), gates[1], order, "d0")
        await trio.testing.wait_all_tasks_blocked()
        last = trio.Event()
        nursery.start_soon(hold, slots, Ticket(Priority.PREFETCH), last, order, "p1")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hold, slots, Ticket(Priority.DEMAND), last, order, "d1")
        await trio.testing.wait_all_tasks_blocked()
        gates[1].set()  # a slot frees: the demand waiter goes first, though it came last
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["p0", "d0", "d1"]
        last.set()
        gates[0].set()
    assert order.index("p1") > order.index("d1")


async def test_promotion_moves_a_waiting_prefetch_ahead_and_cancellation_frees_slots() -> None:
    slots = RequestSlots(2, background_max=1)
    release = trio.Event()
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, slots, Ticket(Priority.PREFETCH), release, order, "p0")
        await trio.testing.wait_all_tasks_blocked()
        waiting = Ticket(Priority.PREFETCH)
        nursery.start_soon(hold, slots, waiting, release, order, "p1")
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["p0"]  # p1 waits: background is capped at 1
        waiting.promote()
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["p0", "p1"]  # served as demand from the reserved slot
        with trio.CancelScope() as scope:
            scope.cancel()
            await hold(slots, Ticket(Priority.DEMAND), release, order, "cancelled")
        release.set()
    assert slots.in_use == 0 and slots.stats["promoted"] == 1


# --- the bound under load, end to end --------------------------------------------------------------

RESPONSE_DELAY = 1.0
BLOB_SIZE = 64 << 20
CHUNK = b"c" * (64 << 10)


class SlowBody:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aenter__(self) -> SlowBody:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def read(self, n: int = -1) -> bytes:
        data, self.data = self.data, b""
        return data


class SlowS3:
    """A fake aiobotocore client: every GET answers after RESPONSE_DELAY (virtual) seconds."""

    def __init__(
        self, objects: dict[str, tuple[str, Callable[[int, int], bytes], int, str]]
    ) -> None:
        self.objects = objects
        self.in_flight = 0
        self.max_in_flight = 0

    async def get_object(self, **params: Any) -> dict[str, Any]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await trio.sleep(RESPONSE_DELAY)
        finally:
            self.in_flight -= 1
        version, data, size, etag = self.objects[params["Key"]]
        first, last = (int(x) for x in params["Range"].removeprefix("bytes=").split("-"))
        body = data(first, last + 1)
        return {
            "Body": SlowBody(body),
            "ContentRange": f"bytes {first}-{last}/{size}",
            "ContentLength": len(body),
            "VersionId": version,
            "ETag": f'"{etag}"',
        }


def blob_bytes(start: int, end: int) -> bytes:
    return bytes(end - start)


async def test_a_demand_read_returns_within_2s_while_64_prefetching_readers_keep_s3_busy(
    autojump_clock: trio.abc.Clock,
) -> None:
    blobs = {f"blobs/{i}": ("b", blob_bytes, BLOB_SIZE, "f" * 32 + "-8") for i in range(64)}
    chunk_md5 = hashlib.md5(CHUNK).hexdigest()
    objects = {**blobs, "zarr/z/0/0": ("v1", lambda a, b: CHUNK[a:b], len(CHUNK), chunk_md5)}
    client = SlowS3(objects)
    reader = S3Reader(client, S3Settings(max_concurrency=32, max_attempts=5, request_timeout=30))
    cache = BlockCache(256 << 20, 256 << 10, Lower(reader))
    budget = PrefetchBudget(128 << 20)
    refs = [ObjectRef(key, "b", BLOB_SIZE, None) for key in blobs]
    chunk = ObjectRef("zarr/z/0/0", "v1", len(CHUNK), chunk_md5)
    elapsed: list[float] = []

    async def sequential(ref: ObjectRef, nursery: trio.Nursery) -> None:
        prefetcher = Prefetcher(ref, cache, budget, nursery)
        offset = 0
        while offset < ref.size:
            prefetcher.observe(offset, 1 << 20)
            offset += len(await cache.read(ref, offset, 1 << 20))

    async with trio.open_nursery() as prefetch, trio.open_nursery() as readers:
        for ref in refs:
            readers.start_soon(sequential, ref, prefetch)
        await trio.sleep(5.5 * RESPONSE_DELAY)  # every reader streaming, prefetch queued behind
        assert reader.slots.in_use == 32 and client.in_flight == 32
        started = trio.current_time()
        data = await cache.read(chunk, 0, 64 << 10)
        elapsed.append(trio.current_time() - started)
        assert data == CHUNK
        readers.cancel_scope.cancel()
        prefetch.cancel_scope.cancel()
    assert elapsed[0] <= 2.0, f"the demand read took {elapsed[0]:.2f} s"
    assert client.max_in_flight <= 32  # never more requests than connections


async def test_a_demand_read_never_outlives_its_deadline(autojump_clock: trio.abc.Clock) -> None:
    """Every attempt's deadline covers the wait for a slot: a saturated pool cannot stretch a read
    beyond attempts x timeout (+ back-off)."""
    client = SlowS3({"k": ("v", blob_bytes, 10, "0" * 32 + "-1")})
    settings = S3Settings(max_concurrency=1, max_attempts=2, request_timeout=3.0)
    reader = S3Reader(client, settings)
    ref = ObjectRef("k", "v", 10, None)
    never = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, reader.slots, Ticket(Priority.DEMAND), never, [], "hog")
        await trio.testing.wait_all_tasks_blocked()
        started = trio.current_time()
        with pytest.raises(RemoteError, match="failed after 2 attempt"):
            await reader.read_range(ref, 0, 10)
        assert trio.current_time() - started <= 2 * 3.0 + 0.1 + 0.01
        nursery.cancel_scope.cancel()
