"""A byte-bounded in-memory LRU of immutable blocks, with one fetch per block at a time.

Owns: splitting a read of an object version into aligned units (blocks of `block_size` bytes; an
object whose ETag is a plain MD5 and that is at most `whole_object_max` bytes is one unit, fetched by
one GET of the whole object so its MD5 can be checked before any byte is served), the LRU of those
blocks (cachetools `LRUCache` sized by `len`, keyed by `(key, version_id, block_index)`), single-flight
fetching (a `dict[key, _Flight]` of in-flight fetches: concurrent readers of one missing block share one
fetch and get its bytes or its error), and optional sequential readahead of the next blocks.

Never does: S3 or HTTP (the `fetch(ref, start, end, ticket)` callable is injected; in production it is
`S3Reader.read_range`), invalidation (every key carries an immutable version), or caching errors. With
a `disk` tier, a memory miss asks the disk before fetching, and a fetched block is written to disk in
the background (`disk_tier`); the disk verifies what it returns.

Scheduling: a reader's own fetches are demand requests; readahead fetches are prefetch requests, and
a reader that finds the block it needs still waiting behind other work promotes that fetch to demand
(`scheduler.Ticket.promote`), so a blocked read never waits behind background work.

Concurrency: all state is touched only from tasks of one trio run, and never across an `await`
between a check and the matching update, so no lock is needed. A fetch runs in the task of the
reader that missed; if that task is cancelled, its waiters wake up and one of them fetches the block
again (no waiter hangs).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import trio
from cachetools import LRUCache

from zarrfs import config
from zarrfs.disk_tier import DiskTier
from zarrfs.errors import DataError, IntegrityError
from zarrfs.refs import ObjectRef
from zarrfs.scheduler import Priority, Ticket

log = logging.getLogger(__name__)

#: (object key, version id, block index)
BlockKey = tuple[str, str | None, int]

#: A whole-object unit may take at most 1/WHOLE_OBJECT_SHARE of the memory budget.
WHOLE_OBJECT_SHARE = 8
#: How many readahead markers are remembered (a marker is dropped when its block is first read).
READAHEAD_MARKERS = 4096
#: How a block was obtained, which drives readahead: a miss reads one block ahead, consuming a
#: block that was itself read ahead (a sequential stream) keeps the whole window in flight.
HIT, MISS, READ_AHEAD = 0, 1, 2


class BlockSource(Protocol):
    """What the cache needs to know about an object version (`refs.ObjectRef` satisfies it)."""

    @property
    def key(self) -> str: ...
    @property
    def version_id(self) -> str | None: ...
    @property
    def size(self) -> int: ...
    def md5(self) -> str | None: ...


R = TypeVar("R", bound=BlockSource)
Fetch = Callable[[R, int, int, Ticket], Awaitable[bytes]]


@dataclass(slots=True)
class _Flight:
    """One in-flight block fetch. `done` is set on success, error or cancellation of the fetcher."""

    ticket: Ticket
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: Exception | None = None


class BlockCache:
    """Aligned, immutable blocks of object versions in a byte-bounded LRU."""

    def __init__(
        self,
        max_bytes: int,
        block_size: int,
        readahead_blocks: int = config.READAHEAD_BLOCKS,
        whole_object_max: int = config.VERIFY_WHOLE_OBJECT_MAX,
        disk: DiskTier | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, got {max_bytes}")
        self.max_bytes = max_bytes
        self.block_size = block_size
        self.whole_object_max = whole_object_max
        self.disk = disk
        self.readahead_blocks = max(1, readahead_blocks)
        self._lru: LRUCache[BlockKey, bytes] = LRUCache(maxsize=max_bytes, getsizeof=len)
        self._inflight: dict[BlockKey, _Flight] = {}
        self._readahead: LRUCache[BlockKey, bool] = LRUCache(maxsize=READAHEAD_MARKERS)
        self._hits = 0
        self._misses = 0
        self._disk_hits = 0

    async def read(
        self,
        ref: R,
        offset: int,
        size: int,
        fetch: Fetch[R],
        readahead_nursery: trio.Nursery | None = None,
    ) -> bytes:
        """Bytes [offset, min(offset + size, ref.size)) of `ref`; b"" at or past the end.

        Missing blocks are fetched concurrently with `fetch(ref, start, end)`. With
        `readahead_nursery`, a read whose last block had to be fetched starts fetching the next
        block in that nursery; a read whose last block had been read ahead (a sequential stream)
        keeps `readahead_blocks` blocks in flight after it, so a sequential reader finds them ready.
        """
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset or size: {offset}, {size}")
        end = min(offset + size, ref.size)
        if offset >= end:
            return b""
        bs = self.unit(ref)
        first, last = offset // bs, (end - 1) // bs
        if first == last:
            block, how = await self._block(ref, first, fetch)
            result = block[offset - first * bs : end - first * bs]
        else:
            blocks: list[bytes] = [b""] * (last - first + 1)
            errors: list[Exception] = []
            flags: list[int] = [HIT] * len(blocks)

            async def fill(i: int, nursery: trio.Nursery) -> None:
                try:
                    blocks[i], flags[i] = await self._block(ref, first + i, fetch)
                except Exception as exc:
                    errors.append(exc)
                    nursery.cancel_scope.cancel()

            async with trio.open_nursery() as nursery:
                for i in range(len(blocks)):
                    nursery.start_soon(fill, i, nursery)
            if errors:
                raise errors[0]
            how = flags[-1]
            data = b"".join(blocks)
            result = data[offset - first * bs : end - first * bs]
        if readahead_nursery is not None and how != HIT:
            depth = self.readahead_blocks if how == READ_AHEAD else 1
            for index in range(last + 1, last + 1 + depth):
                self._start_readahead(ref, index, fetch, readahead_nursery)
        return result

    def unit(self, ref: BlockSource) -> int:
        """The block size used for `ref`: the whole object when it is verifiable as a whole and
        small enough to stay in memory while it is read (at most an eighth of the budget: a unit
        the LRU cannot keep would be fetched again for every read request of the object)."""
        whole_max = min(self.whole_object_max, self.max_bytes // WHOLE_OBJECT_SHARE)
        if ref.md5() is not None and 0 < ref.size <= whole_max:
            return ref.size
        return self.block_size

    def stats(self) -> dict[str, int]:
        """hits (blocks served without a fetch of their own), misses (memory misses), disk_hits
        (misses the disk answered), bytes, items."""
        return {
            "hits": self._hits,
            "misses": self._misses,
            "disk_hits": self._disk_hits,
            "bytes": int(self._lru.currsize),
            "items": len(self._lru),
        }

    # --- internals --------------------------------------------------------------------------------

    async def _block(
        self,
        ref: R,
        index: int,
        fetch: Fetch[R],
        consume_marker: bool = True,
        priority: Priority = Priority.DEMAND,
    ) -> tuple[bytes, int]:
        """Block `index` of `ref`, and how it was obtained (HIT, MISS or READ_AHEAD)."""
        key: BlockKey = (ref.key, ref.version_id, index)
        read_ahead = self._readahead.pop(key, False) if consume_marker else False
        how = READ_AHEAD if read_ahead else HIT
        while True:
            cached = self._lru.get(key)
            if cached is not None:
                self._hits += 1
                return cached, how
            flight = self._inflight.get(key)
            if flight is None:
                break
            if priority == Priority.DEMAND:
                flight.ticket.promote()  # a reader is blocked on it: never behind background work
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.data is not None:
                self._hits += 1
                return flight.data, how
            # the fetcher was cancelled: try again (possibly becoming the fetcher)
        self._misses += 1
        flight = _Flight(Ticket(priority, flow=ref.key))
        self._inflight[key] = flight
        unit = self.unit(ref)
        start = index * unit
        stop = min(start + unit, ref.size)
        try:
            data = await self._disk_or_fetch(ref, index, unit, start, stop, fetch, flight.ticket)
            if len(data) != stop - start:
                raise IntegrityError(
                    f"{ref.key} (version {ref.version_id}): block {index} has {len(data)} bytes, "
                    f"expected {stop - start}"
                )
            flight.data = data
            if len(data) <= self.max_bytes:
                self._lru[key] = data
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            del self._inflight[key]
            flight.done.set()
        # a block meant to be read ahead but fetched by its reader still marks a sequential stream
        return data, READ_AHEAD if read_ahead else MISS

    async def _disk_or_fetch(
        self,
        ref: R,
        index: int,
        unit: int,
        start: int,
        stop: int,
        fetch: Fetch[R],
        ticket: Ticket,
    ) -> bytes:
        disk = self.disk
        if disk is not None and isinstance(ref, ObjectRef):
            data = await disk.get(ref, index, unit)
            if data is not None:
                self._disk_hits += 1
                return data
        data = await fetch(ref, start, stop, ticket)
        if disk is not None and isinstance(ref, ObjectRef) and len(data) == stop - start:
            disk.put_later(ref, index, unit, data)
        return data

    def _start_readahead(
        self,
        ref: R,
        index: int,
        fetch: Fetch[R],
        nursery: trio.Nursery,
    ) -> None:
        if index * self.unit(ref) >= ref.size:
            return
        key: BlockKey = (ref.key, ref.version_id, index)
        if key in self._lru or key in self._inflight:
            return
        self._readahead[key] = True
        nursery.start_soon(self._read_ahead, ref, index, fetch)

    async def _read_ahead(
        self,
        ref: R,
        index: int,
        fetch: Fetch[R],
    ) -> None:
        key: BlockKey = (ref.key, ref.version_id, index)
        if key in self._lru or key in self._inflight:
            return
        try:
            await self._block(ref, index, fetch, consume_marker=False, priority=Priority.PREFETCH)
        except DataError as exc:
            # not cached: a reader that needs this block fetches it again and sees any error itself
            log.debug("readahead of %s block %d failed: %s", ref.key, index, exc)
        except Exception:  # a bug; logged loudly rather than taking the mount's nursery down
            log.exception("readahead of %s block %d failed unexpectedly", ref.key, index)
