"""A byte-bounded in-memory LRU of immutable blocks, with one fetch per block at a time.

Owns: splitting a read of an object version into aligned units (blocks of `block_size` bytes; an
object whose ETag is a plain MD5 and that is at most `whole_object_max` is fetched only whole, by one
GET, so that its MD5 is checked before any byte is served: one unit when it is small enough for
memory, else kept by blocks, and on disk as one unit), the LRU of those blocks
(cachetools `LRUCache` sized by `len`, keyed by `(key, version_id, block_index)`), and single-flight
fetching: a `dict[key, _Flight]` of blocks in flight, so that concurrent readers of one missing block
share one fetch and get its bytes or its error. A read's missing blocks that are contiguous are
fetched by one ranged GET. Blocks can also be *claimed* by a producer that streams them
(`prefetch`): readers then wait for `fulfil` instead of fetching.

Every block is kept with the xxh3-64 of its bytes, and a block served from memory that was last
checked more than `config.BLOCK_RECHECK_AGE` seconds ago is checked again (as mountpoint-s3's
`ChecksummedBytes` carries a checksum with data held in memory): a bit flipped in RAM during a long
stay is dropped and fetched again, never served.

Never does: S3, HTTP or disk I/O: what lies below it is one `Backing` injected at construction
(`stack.Lower`: a memory miss asks the disk tier, then S3, and a block fetched from S3 is handed back
to be written to disk in the background); deciding what to read ahead (`prefetch` does);
invalidation (every key carries an immutable version); or caching errors.

Scheduling: a reader's own fetches are demand requests; a reader that finds the block it needs still
waiting behind other work promotes that fetch to demand (`scheduler.Ticket.promote`), so a blocked read
never waits behind background work.

Concurrency: all state is touched only from tasks of one trio run, and never across an `await`
between a check and the matching update, so no lock is needed. A block claimed by a task that is then
cancelled (or a producer that gives up) is abandoned: its waiters wake up and one of them fetches it
(no waiter hangs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio
import xxhash
from cachetools import LRUCache

from zarrfs import config
from zarrfs.base.refs import ObjectRef
from zarrfs.errors import IntegrityError
from zarrfs.io.scheduler import Priority, Ticket

log = logging.getLogger(__name__)

#: (object key, version id, block index)
BlockKey = tuple[str, str | None, int]


class Backing(Protocol):
    """What lies below the cache (`stack.Lower`: the disk tier, then S3), injected once."""

    async def from_disk(
        self, ref: ObjectRef, indexes: list[int], unit: int
    ) -> dict[int, bytes]: ...

    async def fetch(self, ref: ObjectRef, start: int, end: int, ticket: Ticket) -> bytes: ...

    async def stream(
        self, ref: ObjectRef, start: int, end: int, ticket: Ticket, sink: Callable[[bytes], None]
    ) -> None: ...

    def keep(self, ref: ObjectRef, index: int, unit: int, data: bytes) -> None: ...


@dataclass(slots=True)
class _Block:
    """A block in memory: its bytes, their xxh3-64 when stored, when last checked (monotonic)."""

    data: bytes
    digest: int
    checked: float


@dataclass(slots=True)
class _Flight:
    """One block in flight. `done` is set once it is fulfilled, failed, or abandoned."""

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
        lower: Backing,
        whole_object_max: int = config.VERIFY_WHOLE_OBJECT_MAX,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, got {max_bytes}")
        self.max_bytes = max_bytes
        self.block_size = block_size
        self.whole_object_max = whole_object_max
        #: Where missing blocks come from (the disk, then S3); fetched blocks are handed back to
        #: it to keep (written to disk).
        self.lower = lower
        self._lru: LRUCache[BlockKey, _Block] = LRUCache(
            maxsize=max_bytes, getsizeof=lambda block: len(block.data)
        )
        #: A block served from memory is checked against the checksum it was stored with when it
        #: was last checked longer ago than this (seconds).
        self.recheck_age = config.BLOCK_RECHECK_AGE
        self._inflight: dict[BlockKey, _Flight] = {}
        self._hits = 0
        self._misses = 0
        self._rechecked = 0
        self._recheck_failures = 0
        self._disk_hits = 0
        self._fetches = 0

    def checked_whole(self, ref: ObjectRef) -> bool:
        """Whether `ref` is fetched only whole, so that its MD5 is checked before any byte of it is
        served: its ETag is a plain MD5 and it is at most `whole_object_max` bytes."""
        return ref.md5() is not None and 0 < ref.size <= self.whole_object_max

    def unit(self, ref: ObjectRef) -> int:
        """The block size used for `ref`: the whole object when it is fetched whole
        (`checked_whole`) and small enough to stay in memory while it is read (at most
        1/`config.WHOLE_OBJECT_SHARE` of the budget: a unit the LRU cannot keep would be fetched
        again for every read request of the object). A bigger object fetched whole is kept in
        memory by blocks (`_fill_from_whole`)."""
        whole_max = min(self.whole_object_max, self.max_bytes // config.WHOLE_OBJECT_SHARE)
        if self.checked_whole(ref) and ref.size <= whole_max:
            return ref.size
        return self.block_size

    def kept_by_blocks(self, ref: ObjectRef) -> bool:
        """Whether `ref` is fetched only whole but kept in memory by blocks (`_fill_from_whole`):
        `checked_whole`, and bigger than its unit."""
        return self.checked_whole(ref) and self.unit(ref) < ref.size

    def blocks_of(self, ref: ObjectRef) -> int:
        """How many blocks (units) `ref` has."""
        unit = self.unit(ref)
        return -(-ref.size // unit) if ref.size else 0

    def stats(self) -> dict[str, int]:
        """hits (blocks served from memory or another's fetch), misses (memory misses),
        disk_hits (misses the disk answered), fetches (remote requests made by readers), bytes,
        items."""
        return {
            "hits": self._hits,
            "misses": self._misses,
            "disk_hits": self._disk_hits,
            "fetches": self._fetches,
            "bytes": int(self._lru.currsize),
            "items": len(self._lru),
        }

    def recheck_stats(self) -> dict[str, int]:
        """Blocks checked again when served from memory, and those that failed (dropped)."""
        return {"rechecked": self._rechecked, "failed": self._recheck_failures}

    # --- reading ----------------------------------------------------------------------------------

    async def read(
        self, ref: ObjectRef, offset: int, size: int, priority: Priority = Priority.DEMAND
    ) -> bytes:
        """Bytes [offset, min(offset + size, ref.size)) of `ref`; b"" at or past the end.

        Blocks in memory are used; blocks in flight are waited for (a demand read promotes their
        fetch to demand); the missing ones are claimed and fetched, each contiguous run by one
        request of `priority` (prefetch for speculative reads that nobody waits for yet).
        """
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset or size: {offset}, {size}")
        end = min(offset + size, ref.size)
        if offset >= end:
            return b""
        unit = self.unit(ref)
        first, last = offset // unit, (end - 1) // unit
        found: dict[int, bytes] = {}
        while True:
            waiting: dict[int, _Flight] = {}
            missing: list[int] = []
            for index in range(first, last + 1):
                if index in found:
                    continue
                key = (ref.key, ref.version_id, index)
                cached = self._cached(key)
                if cached is not None:
                    self._hits += 1
                    found[index] = cached
                elif key in self._inflight:
                    waiting[index] = self._inflight[key]
                else:
                    missing.append(index)
            if not waiting and not missing:
                return _slice(found, first, last, unit, offset, end)
            if missing and self.kept_by_blocks(ref):
                # one fetch of the whole object produces every block of it: claim all that are
                # neither cached nor in flight, so that no concurrent read fetches it again
                tickets = [Ticket(priority, flow=ref.key)]
                runs = [self.claim(ref, 0, self.blocks_of(ref) - 1, tickets[0])]
            else:
                runs = runs_of(missing)
                tickets = [Ticket(priority, flow=ref.key) for _ in runs]
                for run, ticket in zip(runs, tickets, strict=True):
                    self.claim(ref, run[0], run[-1], ticket)
            errors: list[Exception] = []
            asked = (first, last)
            async with trio.open_nursery() as nursery:
                for run, ticket in zip(runs, tickets, strict=True):
                    nursery.start_soon(self._fill_into, ref, run, ticket, found, errors, asked)
                for index, flight in waiting.items():
                    nursery.start_soon(self._wait_into, index, flight, found, errors, priority)
            if errors:
                raise errors[0]

    async def _fill_into(
        self,
        ref: ObjectRef,
        run: list[int],
        ticket: Ticket,
        found: dict[int, bytes],
        errors: list[Exception],
        asked: tuple[int, int],
    ) -> None:
        """Produce the claimed blocks `run` into `found` (`_fill`, or `_fill_from_whole` for an
        object kept by blocks; `asked`: the first and last block the reader asked for). An error
        goes to `errors` and to the run's waiters; claims not fulfilled (a cancellation) are
        abandoned, and their waiters fetch them themselves."""
        try:
            if self.kept_by_blocks(ref):
                await self._fill_from_whole(ref, run, ticket, found, asked)
            else:
                await self._fill(ref, run, ticket, found)
        except Exception as exc:
            self.abandon(ref, run, exc, ticket)
            errors.append(exc)
        finally:
            self.abandon(ref, run, None, ticket)  # still claimed (cancelled): waiters take over

    async def _wait_into(
        self,
        index: int,
        flight: _Flight,
        found: dict[int, bytes],
        errors: list[Exception],
        priority: Priority,
    ) -> None:
        if priority == Priority.DEMAND:
            flight.ticket.promote()  # a reader is blocked on it: never behind background work
        await flight.done.wait()
        if flight.error is not None:
            errors.append(flight.error)
        elif flight.data is not None:
            self._hits += 1
            found[index] = flight.data
        # abandoned by its producer: the reader's next round fetches it

    async def _fill(
        self, ref: ObjectRef, run: list[int], ticket: Ticket, found: dict[int, bytes]
    ) -> None:
        """Produce the claimed blocks `run` (contiguous) into `found`: from disk where it has them,
        else by one remote request per contiguous remainder."""
        unit = self.unit(ref)
        remote: list[int] = []
        on_disk = await self.lower.from_disk(ref, run, unit)
        self._disk_hits += len(on_disk)
        for index in run:
            data = on_disk.get(index)
            if data is not None:
                found[index] = data
                self.fulfil(ref, index, data)
            else:
                remote.append(index)
        for part in runs_of(remote):
            start = part[0] * unit
            stop = min((part[-1] + 1) * unit, ref.size)
            self._misses += len(part)
            self._fetches += 1
            data = await self.lower.fetch(ref, start, stop, ticket)
            if len(data) != stop - start:
                raise IntegrityError(
                    f"{ref.key} (version {ref.version_id}): blocks {part[0]}-{part[-1]} have "
                    f"{len(data)} bytes, expected {stop - start}"
                )
            for index in part:
                piece = data[(index - part[0]) * unit : (index - part[0] + 1) * unit]
                found[index] = piece
                self.fulfil(ref, index, piece)
                self.lower.keep(ref, index, unit, piece)

    async def _fill_from_whole(
        self,
        ref: ObjectRef,
        run: list[int],
        ticket: Ticket,
        found: dict[int, bytes],
        asked: tuple[int, int],
    ) -> None:
        """`_fill` for an object kept by blocks (`kept_by_blocks`): the whole object, from the
        disk tier (where it is one unit, written only once checked) or by one GET whose body the
        S3 seam checks against the MD5, cut into blocks: those claimed (`read` claims all the object's missing ones), and any others that
        memory neither holds nor waits for (a reader of the next block must not fetch the whole
        object again). They are kept in the order that leaves the most useful ones in a memory
        cache too small for them all: those behind the reader's first block first, then the rest
        from the far end back to it, so that the blocks a reader reads next are the most recently
        used. Only the blocks the reader asked for count as misses (or disk hits): the others are
        fetched ahead, as a prefetch's are. The body goes to the disk tier once its blocks are
        kept."""
        near, last = asked
        looked_up = sum(1 for index in run if near <= index <= last)
        on_disk = await self.lower.from_disk(ref, [0], ref.size)
        data = on_disk.get(0)
        fetched = data is None
        if data is not None:
            self._disk_hits += looked_up
        else:
            self._misses += looked_up
            self._fetches += 1
            data = await self.lower.fetch(ref, 0, ref.size, ticket)
            if len(data) != ref.size:
                raise IntegrityError(
                    f"{ref.key} (version {ref.version_id}): {len(data)} bytes, expected {ref.size}"
                )
        unit = self.unit(ref)
        claimed = set(run)
        count = self.blocks_of(ref)
        for index in [*range(near), *range(count - 1, near - 1, -1)]:
            key = (ref.key, ref.version_id, index)
            if index not in claimed and (key in self._inflight or key in self._lru):
                continue
            piece = data[index * unit : (index + 1) * unit]
            if index in claimed:
                found[index] = piece
            self.fulfil(ref, index, piece)
        if fetched:
            self.lower.keep(ref, 0, ref.size, data)

    # --- producers (`read` itself, and `prefetch` streams) ---------------------------------------

    def claim(self, ref: ObjectRef, first: int, last: int, ticket: Ticket) -> list[int]:
        """Mark blocks first..last that are neither cached nor in flight as in flight, produced by
        the caller (who must `fulfil` or `abandon` each). Returns the blocks claimed."""
        claimed = []
        for index in range(first, last + 1):
            key = (ref.key, ref.version_id, index)
            if key in self._inflight or key in self._lru:
                continue
            self._inflight[key] = _Flight(ticket)
            claimed.append(index)
        return claimed

    def cached_block(self, ref: ObjectRef, index: int) -> bytes | None:
        """Block `index` of `ref` if memory holds it (checked as for a read), else None; fetches
        nothing."""
        return self._cached((ref.key, ref.version_id, index))

    def _cached(self, key: BlockKey) -> bytes | None:
        """The block in memory, checked against the checksum it was stored with if its last check
        is older than `recheck_age` (a bit flipped in memory during a long stay: dropped, logged,
        fetched again; never served)."""
        block = self._lru.get(key)
        if block is None:
            return None
        now = time.monotonic()
        if now - block.checked < self.recheck_age:
            return block.data
        self._rechecked += 1
        if xxhash.xxh3_64_intdigest(block.data) != block.digest:
            self._recheck_failures += 1
            del self._lru[key]
            log.error(
                "block %d of %s (version %s) changed in memory since it was fetched: dropped, "
                "fetched again",
                key[2],
                key[0],
                key[1],
            )
            return None
        block.checked = now
        return block.data

    def fulfil(self, ref: ObjectRef, index: int, data: bytes) -> None:
        """A claimed (or unclaimed) block arrived: keep it (with its checksum), wake its waiters."""
        key = (ref.key, ref.version_id, index)
        if len(data) <= self.max_bytes:
            self._lru[key] = _Block(data, xxhash.xxh3_64_intdigest(data), time.monotonic())
        flight = self._inflight.pop(key, None)
        if flight is not None:
            flight.data = data
            flight.done.set()

    def abandon(
        self,
        ref: ObjectRef,
        indexes: list[int],
        error: Exception | None = None,
        ticket: Ticket | None = None,
    ) -> None:
        """Give up claimed blocks: their waiters get `error`, or (None) fetch them themselves. With
        `ticket`, only blocks still claimed under that ticket (not someone's later claim)."""
        for index in indexes:
            key = (ref.key, ref.version_id, index)
            flight = self._inflight.get(key)
            if flight is None or (ticket is not None and flight.ticket is not ticket):
                continue
            del self._inflight[key]
            flight.error = error
            flight.done.set()


def runs_of(indexes: list[int]) -> list[list[int]]:
    """Sorted indexes grouped into runs of consecutive ones."""
    runs: list[list[int]] = []
    for index in indexes:
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _slice(
    blocks: dict[int, bytes], first: int, last: int, unit: int, offset: int, end: int
) -> bytes:
    if first == last:
        return blocks[first][offset - first * unit : end - first * unit]
    # one copy: the ends as views, joined with the blocks between them
    head = memoryview(blocks[first])[offset - first * unit :]
    tail = memoryview(blocks[last])[: end - last * unit]
    return b"".join([head, *(blocks[i] for i in range(first + 1, last)), tail])
