"""Sequential prefetch: per open file, streaming GETs ahead of a reader that reads in order.

Owns: deciding, per open file handle, when a reader reads sequentially and how far ahead to fetch
(mountpoint-s3's prefetcher is the model, its multiplier too): reads fetch only what they ask for
until a run of reads, each continuing where the previous one ended, has read
`config.PREFETCH_TRIGGER` bytes (a first read at the start of the file begins a run); from then on
the prefetch keeps up to `config.PREFETCH_MULTIPLIER` times what the run has read fetched ahead of
it (at most `config.PREFETCH_MAX_WINDOW`: the *window*), as *segments* (ranged GETs of at most
`config.PREFETCH_PART`, each streamed into the block cache block by block as the bytes arrive,
several at once: one connection to S3 carries some 100 MB/s, several carry more). The window is
topped up a part at a time as the reader moves on, so the pipeline never drains between windows,
and a run shows how far it goes before the bet grows: a reader that reads 2 MiB in order has asked
for at most 16 MiB beyond them, one that reads on has 56-64 MiB fetched ahead once it has read 8
MiB. What the run has read is the sum of its reads' sizes (a read that overlaps another, or lands
inside the prefetched range, counts in full). A read elsewhere (a random pread) resets it: random
reads keep fetching exactly their blocks. The trigger is the bytes a run has read, not its second
read, because the kernel splits one pread into requests of at most 128 KiB: a random 256 KiB pread
arrives as two reads that continue each other. Blocks the disk cache holds are read from disk
instead of S3, until one segment's lookup finds none of its blocks: that reader's later segments
then stream without asking (a cold read is 7% faster without a trip to the disk's thread per
segment; blocks cached further on, if any, are fetched again). All prefetched bytes not yet read
count against one budget shared by every open file (`PrefetchBudget`): when it is used up, segments
shrink or wait (backpressure), and readers fetch their own blocks. Closing the file cancels its
segments.

Never does: serve reads (the block cache does; prefetched blocks are claimed there, so a reader who
needs one waits for the stream instead of fetching it twice), or I/O of its own: it streams through
the block cache's `lower` (disk first, then one streamed GET per remainder), like every read.

Concurrency: one trio run; each handle's segments run in the service nursery inside that handle's
cancel scope. A segment that fails or is cancelled abandons the blocks it had claimed, so waiting
readers fetch them themselves.
"""

from __future__ import annotations

import logging

import trio

from zarrfs import config
from zarrfs.base.refs import ObjectRef
from zarrfs.errors import DataError
from zarrfs.io.blocks import BlockCache, runs_of
from zarrfs.io.scheduler import Priority, Ticket

log = logging.getLogger(__name__)


class PrefetchBudget:
    """Bytes fetched ahead of readers and not yet read, across all open files."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, wanted: int, unit: int) -> int:
        """Up to `wanted` bytes (whole units), as much as is free; 0 when none is."""
        free = max(0, self.limit - self.used)
        granted = min(wanted, free // unit * unit)
        self.used += granted
        return granted

    def give_back(self, amount: int) -> None:
        self.used = max(0, self.used - amount)


class Prefetcher:
    """Sequential prefetch for one open file of `ref` (a multi-block object)."""

    def __init__(
        self, ref: ObjectRef, blocks: BlockCache, budget: PrefetchBudget, nursery: trio.Nursery
    ) -> None:
        self.ref = ref
        self.blocks = blocks
        self.budget = budget
        self.nursery = nursery
        self.unit = blocks.unit(ref)
        self.part = max(self.unit, config.PREFETCH_PART // self.unit * self.unit)  # whole blocks
        self._scopes: set[trio.CancelScope] = set()  # of the segments running
        # where the previous read ended; a first read at the start of the file begins a run (cp,
        # md5sum and numpy.fromfile start there), so its first MiB already opens the window
        self.next_offset = 0
        self.run_bytes = 0  # read by the current run of reads that continue each other
        self.fetched_from = 0  # prefetch covers [fetched_from, fetched_until)
        self.fetched_until = 0
        self.held = 0  # budget held: fetched ahead of the reader, not yet read
        self.segments = 0
        self.closed = False
        #: A segment's disk lookup found none of its blocks: later segments stream without asking.
        self.disk_empty = False

    def observe(self, offset: int, size: int) -> None:
        """A read of [offset, offset + size) is about to be served: keep the window ahead of it if
        it continues the reads before it (within `PREFETCH_TOLERANCE` either way, as the kernel
        may send one reader's requests slightly out of order, or inside what was prefetched),
        drop the prefetch if it jumped elsewhere."""
        if self.closed:  # a read that raced the close: it fetches its own blocks
            return
        end = min(offset + size, self.ref.size)
        if not self.continues(offset):
            self.next_offset = end
            self.run_bytes = end - offset
            if self.fetched_until:
                self._reset()
            return
        self.next_offset = max(self.next_offset, end)
        self.run_bytes += end - offset
        read_until = self.next_offset
        self._settle_budget(read_until)
        if not self.fetched_until and self.run_bytes < config.PREFETCH_TRIGGER:
            return  # not (yet) a sequential reader: maybe one pread in several requests
        if self.fetched_until >= self.ref.size:
            return
        window = min(self.run_bytes * config.PREFETCH_MULTIPLIER, config.PREFETCH_MAX_WINDOW)
        if self.fetched_until - read_until > window - min(self.part, window // 2):
            return  # enough ahead already: top up once a part's worth (or half) has been read
        start = max(self.fetched_until, -(-read_until // self.unit) * self.unit)
        if start >= self.ref.size:
            return
        wanted = min(read_until + window, self.ref.size) - start
        if wanted <= 0:
            return
        if wanted >= self.part and start + wanted < self.ref.size:
            wanted = wanted // self.part * self.part  # whole parts; the rest in the next top-up
        granted = self.budget.take(-(-wanted // self.unit) * self.unit, self.unit)
        if granted == 0:
            return  # backpressure: the reader fetches its own blocks until readers catch up
        stop = min(start + granted, self.ref.size)
        if not self.fetched_until:
            self.fetched_from = start
        self.fetched_until = stop
        self.held += granted
        for part_start in range(start, stop, self.part):
            self.segments += 1
            self.nursery.start_soon(self._segment, part_start, min(part_start + self.part, stop))

    def continues(self, offset: int) -> bool:
        """Whether a read at `offset` continues this reader's run: it starts where the reads
        before it ended (within `PREFETCH_TOLERANCE`) or inside what was prefetched."""
        return (
            abs(offset - self.next_offset) <= config.PREFETCH_TOLERANCE
            or self.fetched_from <= offset < self.fetched_until
        )

    def close(self) -> None:
        """The file was closed: stop its segments, give its budget back."""
        self.closed = True
        self._cancel_segments()
        self.budget.give_back(self.held)
        self.held = 0

    def _cancel_segments(self) -> None:
        for scope in self._scopes:
            scope.cancel()
        self._scopes.clear()

    def _reset(self) -> None:
        self._cancel_segments()
        self.budget.give_back(self.held)
        self.held = 0
        self.fetched_from = self.fetched_until = 0

    def _settle_budget(self, read_until: int) -> None:
        """Bytes the reader has now read no longer count as fetched ahead."""
        ahead = max(0, self.fetched_until - read_until)
        if ahead < self.held:
            self.budget.give_back(self.held - ahead)
            self.held = ahead

    async def _segment(self, start: int, stop: int) -> None:
        """Produce blocks [start, stop): from memory or disk where possible, the rest by one
        streaming GET per contiguous remainder, each block published as soon as it is complete."""
        unit, ref, blocks = self.unit, self.ref, self.blocks
        first, last = start // unit, (stop - 1) // unit
        ticket = Ticket(Priority.PREFETCH, flow=ref.key)
        if self.closed:
            return
        claimed = blocks.claim(ref, first, last, ticket)
        if not claimed:
            return
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                remote = await self._from_disk(claimed)
                for run in runs_of(remote):
                    await self._stream(run, ticket)
            except DataError as e:
                log.debug("prefetch of %s [%d, %d) failed: %s", ref.key, start, stop, e)
            except Exception:  # a bug: logged loudly, never taking the service nursery down
                log.exception("prefetch of %s [%d, %d) failed unexpectedly", ref.key, start, stop)
            finally:
                self._scopes.discard(scope)
                blocks.abandon(ref, claimed, None, ticket)  # not produced: readers fetch it

    async def _from_disk(self, claimed: list[int]) -> list[int]:
        """The blocks of `claimed` the disk cache has, fulfilled; returns the others. Once a
        segment's lookup found none of its blocks, this reader's later segments do not ask: the
        object is being read from S3, and each lookup (a trip to a worker thread per
        `DISK_CACHE_BATCH` blocks) would only delay the stream."""
        if self.disk_empty:
            return claimed
        on_disk = await self.blocks.lower.from_disk(self.ref, claimed, self.unit)
        if claimed and not on_disk:
            self.disk_empty = True
        for index, data in on_disk.items():
            self.blocks.fulfil(self.ref, index, data)
        return [index for index in claimed if index not in on_disk]

    async def _stream(self, run: list[int], ticket: Ticket) -> None:
        unit, ref, blocks = self.unit, self.ref, self.blocks
        lower = blocks.lower
        index = run[0]
        start = index * unit
        stop = min((run[-1] + 1) * unit, ref.size)
        parts: list[bytes] = []  # of the block being received
        held = 0  # bytes in parts

        def sink(chunk: bytes) -> None:
            # Chunks are joined into blocks with one copy (chunks of a stream that starts on a
            # block boundary usually end on one too: a block is then its chunks, joined).
            nonlocal index, held
            while chunk:
                take = min(len(chunk), min(unit, stop - index * unit) - held)
                parts.append(chunk if take == len(chunk) else chunk[:take])
                chunk = chunk[take:]
                held += take
                if held == min(unit, stop - index * unit):
                    block = parts[0] if len(parts) == 1 else b"".join(parts)
                    parts.clear()
                    held = 0
                    blocks.fulfil(ref, index, block)
                    lower.keep(ref, index, unit, block)
                    index += 1

        await lower.stream(ref, start, stop, ticket, sink)
