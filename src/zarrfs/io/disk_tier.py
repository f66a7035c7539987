"""The disk tier under the in-memory block cache: the async face of `io.disk_store.DiskBlockCache`.

Owns: when the block cache's memory misses go to disk and how long they may wait for it, writing
fetched blocks to disk in the background, and keeping the disk cache within its bounds (eviction on a
schedule and whenever this process's writes call for it). The files, their format and their
verification are `io.disk_store`'s; which blocks exist is `io.blocks`'s.

Never does: make a read wait for a write, or for eviction (both run in the background: writes in
the core's write nursery, eviction in its service nursery), or let
a slow or broken disk slow reads down: every trip to the disk goes through the cache dir's
`disk_gate.DiskGate`, so a read that waits more than `config.DISK_CACHE_STALL_TIMEOUT` for the disk (a
hung NFS server) is a miss, and the whole cache dir (blocks, indexes, locks) is bypassed for
`config.DISK_CACHE_STALL_PAUSE` seconds (logged once). Blocks never wait to be written with more
than `config.DISK_CACHE_PENDING_MAX` bytes held for them: beyond that a block is *owed* (its name
kept, at most `config.DISK_CACHE_OWED_MAX`) and written in its turn from the memory cache
(`recall`, checked there), or dropped (counted) if memory no longer holds it. A reader faster than
the disk (a sequential read at 250 MB/s against a writer that shares the GIL with the event loop)
thus leaves on disk whatever memory still held when the writer got to it, not only the first
64 MiB.

Concurrency: one trio run. Reads and writes use the gate's worker threads; eviction runs one scan at a
time. Blocks go to and from the threads in batches of up to `config.DISK_CACHE_BATCH` (a trip to a
thread costs the event loop more than reading or writing a 256 KiB block on a local disk). Worker
threads are abandoned on cancellation (a hung disk must not hold up shutdown).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import trio

from zarrfs import config
from zarrfs.base.refs import ObjectRef
from zarrfs.errors import report_bug
from zarrfs.io.disk_gate import CacheDirStalled, DiskGate
from zarrfs.io.disk_store import DiskBlockCache

log = logging.getLogger(__name__)


class DiskTier:
    """Blocks on disk below the memory cache, read with a bounded wait and written in the background."""

    def __init__(self, disk: DiskBlockCache, bucket: str, gate: DiskGate | None = None) -> None:
        self.disk = disk
        self.bucket = bucket
        self.gate = gate or DiskGate(disk.cache_dir)
        #: Where writes run; set by whoever runs the core (writes are skipped without): a nursery
        #: that a stop does not cancel before `flush` (the core's write nursery).
        self.nursery: trio.Nursery | None = None
        self._pending = 0
        self._queue: deque[tuple[ObjectRef, int, int, bytes]] = deque()  # to be written
        #: Blocks owed to the disk, written after the queue, from memory (their bytes not held).
        self._owed: deque[tuple[ObjectRef, int, int]] = deque()
        #: Where an owed block is found when its turn comes: `(ref, index, block size)` -> its
        #: bytes (checked), or None when memory no longer holds it. Set by the read stack (the
        #: memory caches); None: blocks over the pending bound are dropped.
        self.recall: Callable[[ObjectRef, int, int], bytes | None] | None = None
        self._writers = 0  # tasks writing the queue
        self._evict_wanted = trio.Event()
        self._stats = {"writes_dropped": 0, "write_errors": 0, "writes_deferred": 0}

    @property
    def stats(self) -> dict[str, int]:
        """writes_deferred (owed: over the pending bound, to be written from memory),
        writes_dropped (owed beyond the bound, or gone from memory by their turn), write_errors
        (bugs), and the cache dir's stalls."""
        return {**self._stats, "stalls": self.gate.stats["stalls"]}

    @property
    def pending(self) -> int:
        """Bytes waiting to be written to disk (held for the queue)."""
        return self._pending

    @property
    def owed(self) -> int:
        """Blocks owed to the disk (to be written from memory)."""
        return len(self._owed)

    async def get_many(
        self, ref: ObjectRef, indexes: list[int], block_size: int
    ) -> dict[int, bytes]:
        """The blocks of `indexes` the disk has (each verified there), read in trips to a worker
        thread of up to `config.DISK_CACHE_BATCH` blocks each; a miss, a bad block or a slow disk
        (a trip longer than the stall timeout) leaves a block out."""
        found: dict[int, bytes] = {}
        for start in range(0, len(indexes), config.DISK_CACHE_BATCH):
            batch = indexes[start : start + config.DISK_CACHE_BATCH]
            try:
                found.update(await self.gate.run(self._get_all, ref, batch, block_size))
            except CacheDirStalled:
                break
        return found

    def _get_all(self, ref: ObjectRef, indexes: list[int], block_size: int) -> dict[int, bytes]:
        found = {}
        for index in indexes:
            data = self.disk.get(self.bucket, ref, index, block_size)
            if data is not None:
                found[index] = data
        return found

    def put_later(self, ref: ObjectRef, index: int, block_size: int, data: bytes) -> None:
        """Write the block to disk in the background: queued with its bytes while the pending
        bound has room and nothing is owed (first come, first written), else owed (written from
        memory in its turn), else dropped. Blocks are written in batches by at most
        `config.DISK_CACHE_WRITERS` tasks."""
        if self.nursery is None or self.gate.stalled:
            return
        if self._owed or self._pending + len(data) > config.DISK_CACHE_PENDING_MAX:
            if self.recall is None or len(self._owed) >= config.DISK_CACHE_OWED_MAX:
                self._stats["writes_dropped"] += 1
                return
            self._owed.append((ref, index, block_size))
            self._stats["writes_deferred"] += 1
        else:
            self._pending += len(data)
            self._queue.append((ref, index, block_size, data))
        if self._writers < config.DISK_CACHE_WRITERS:
            self.nursery.start_soon(self._write_queued)  # raises on a closed nursery: count after
            self._writers += 1

    async def _write_queued(self) -> None:
        try:
            while batch := self._next_batch():
                size = sum(len(item[3]) for item in batch)
                try:
                    await self.gate.run(self._put_all, batch, timeout=self.gate.write_timeout(size))
                except CacheDirStalled:  # the blocks are not written: a later read fetches them
                    self._drop_queue()
                finally:
                    self._pending -= size
                if self.disk.needs_eviction:
                    self._evict_wanted.set()
        finally:
            self._writers -= 1

    async def flush(self) -> None:
        """Wait until the blocks queued or owed are written (or dropped: gone from memory, or a
        stall): at the end of a process, so that a remount finds on disk everything this one read
        (bound the wait with a deadline)."""
        while self._pending or self._owed:
            await trio.sleep(0.01)

    def _next_batch(self) -> list[tuple[ObjectRef, int, int, bytes]]:
        """The next blocks to write: queued ones first; when none is queued, owed ones that memory
        still holds, counted as pending while they are written (those it no longer holds are
        dropped, counted). Empty when nothing is left to write."""
        if self._queue:
            return [
                self._queue.popleft() for _ in range(min(len(self._queue), config.DISK_CACHE_BATCH))
            ]
        batch: list[tuple[ObjectRef, int, int, bytes]] = []
        while self._owed and len(batch) < config.DISK_CACHE_BATCH:
            ref, index, block_size = self._owed.popleft()
            data = self.recall(ref, index, block_size) if self.recall is not None else None
            if data is None:
                self._stats["writes_dropped"] += 1
                continue
            self._pending += len(data)
            batch.append((ref, index, block_size, data))
        return batch

    def _drop_queue(self) -> None:
        while self._queue:
            self._pending -= len(self._queue.popleft()[3])
        self._stats["writes_dropped"] += len(self._owed)
        self._owed.clear()

    def _put_all(self, batch: list[tuple[ObjectRef, int, int, bytes]]) -> None:
        for ref, index, block_size, data in batch:
            try:
                self.disk.put(self.bucket, ref, index, data, block_size)
            except Exception as e:  # a bug (disk problems never raise): that block is not written
                self._stats["write_errors"] += 1
                report_bug(f"disk cache write of block {index} of {ref.key}", e)

    async def keep_within_bounds(self) -> None:
        """Run forever (in the service nursery): evict at start, then whenever this process's writes
        call for it and at least every `DISK_CACHE_EVICT_INTERVAL` (other processes write too), at
        most once every `DISK_CACHE_EVICT_MIN_GAP` seconds."""
        while True:
            started = time.monotonic()
            try:
                report = await self.gate.run(self.disk.evict, timeout=config.SWEEP_TIMEOUT)
            except CacheDirStalled:
                report = None
            if report is not None:
                level = logging.INFO if report.removed_blocks else logging.DEBUG
                log.log(level, "disk block cache: %s", report)
            took = time.monotonic() - started
            interval = max(config.DISK_CACHE_EVICT_INTERVAL, 100 * took)
            await trio.sleep(config.DISK_CACHE_EVICT_MIN_GAP)
            self._evict_wanted = trio.Event()
            with trio.move_on_after(max(0.0, interval - config.DISK_CACHE_EVICT_MIN_GAP)):
                await self._evict_wanted.wait()
