"""The disk tier under the in-memory block cache: the async face of `disk_cache.DiskBlockCache`.

Owns: when the block cache's memory misses go to disk and how long they may wait for it, writing
fetched blocks to disk in the background, and keeping the disk cache within its bounds (eviction on a
schedule and whenever this process's writes call for it). The files, their format and their
verification are `disk_cache`'s; which blocks exist is `chunk_cache`'s.

Never does: make a read wait for a write, or for eviction (both run in the service nursery, on their own
limiters), or let a slow or broken disk slow reads down: a read that waits more than
`config.DISK_CACHE_STALL_TIMEOUT` for the disk (a hung NFS server) is a miss, and the disk tier is
bypassed for `config.DISK_CACHE_STALL_PAUSE` seconds (logged). Writes queued beyond
`config.DISK_CACHE_PENDING_MAX` bytes are dropped (counted), never buffered without bound.

Concurrency: one trio run. Reads use `config.DISK_CACHE_THREADS` worker threads; writes share them;
eviction has one thread of its own. Blocks go to and from the threads in batches of up to
`config.DISK_CACHE_BATCH` (a trip to a thread costs the event loop more than reading or writing a
256 KiB block on a local disk). Worker threads are abandoned on cancellation (a hung disk must not
hold up shutdown).
"""

from __future__ import annotations

import logging
import time
from collections import deque

import trio

from . import config
from .disk_cache import DiskBlockCache
from .refs import ObjectRef

log = logging.getLogger(__name__)


class DiskTier:
    """Blocks on disk below the memory cache, read with a bounded wait and written in the background."""

    def __init__(self, disk: DiskBlockCache, bucket: str) -> None:
        self.disk = disk
        self.bucket = bucket
        #: Where writes and eviction run; set by whoever runs the core (writes are skipped without).
        self.nursery: trio.Nursery | None = None
        self._threads = trio.CapacityLimiter(config.DISK_CACHE_THREADS)
        self._bypass_until = 0.0
        self._pending = 0
        self._queue: deque[tuple[ObjectRef, int, int, bytes]] = deque()  # to be written
        self._writers = 0  # tasks writing the queue
        self._evict_wanted = trio.Event()
        self.stats = {"stalls": 0, "writes_dropped": 0, "write_errors": 0}

    @property
    def pending(self) -> int:
        """Bytes waiting to be written to disk."""
        return self._pending

    async def get(self, ref: ObjectRef, index: int, block_size: int) -> bytes | None:
        """The block from disk (verified there), or None: a miss, a bad block, a slow disk."""
        return (await self.get_many(ref, [index], block_size)).get(index)

    async def get_many(
        self, ref: ObjectRef, indexes: list[int], block_size: int
    ) -> dict[int, bytes]:
        """The blocks of `indexes` the disk has (each verified there), read in trips to a worker
        thread of up to `config.DISK_CACHE_BATCH` blocks each; a miss, a bad block or a slow disk
        (a trip longer than the stall timeout) leaves a block out."""
        found: dict[int, bytes] = {}
        for start in range(0, len(indexes), config.DISK_CACHE_BATCH):
            if time.monotonic() < self._bypass_until:
                break
            batch = indexes[start : start + config.DISK_CACHE_BATCH]
            with trio.move_on_after(config.DISK_CACHE_STALL_TIMEOUT) as scope:
                found.update(
                    await trio.to_thread.run_sync(
                        self._get_all,
                        ref,
                        batch,
                        block_size,
                        limiter=self._threads,
                        abandon_on_cancel=True,
                    )
                )
            if scope.cancelled_caught:
                self.stats["stalls"] += 1
                self._bypass_until = time.monotonic() + config.DISK_CACHE_STALL_PAUSE
                log.warning(
                    "the disk block cache %s did not answer within %.0f s: bypassing it for %.0f s",
                    self.disk.cache_dir,
                    config.DISK_CACHE_STALL_TIMEOUT,
                    config.DISK_CACHE_STALL_PAUSE,
                )
        return found

    def _get_all(self, ref: ObjectRef, indexes: list[int], block_size: int) -> dict[int, bytes]:
        found = {}
        for index in indexes:
            data = self.disk.get(self.bucket, ref, index, block_size)
            if data is not None:
                found[index] = data
        return found

    def put_later(self, ref: ObjectRef, index: int, block_size: int, data: bytes) -> None:
        """Write the block to disk in the background (dropped if too much is pending already).
        Blocks queue up and are written in batches by at most `config.DISK_CACHE_WRITERS` tasks."""
        if self.nursery is None or time.monotonic() < self._bypass_until:
            return
        if self._pending + len(data) > config.DISK_CACHE_PENDING_MAX:
            self.stats["writes_dropped"] += 1
            return
        self._pending += len(data)
        self._queue.append((ref, index, block_size, data))
        if self._writers < config.DISK_CACHE_WRITERS:
            self.nursery.start_soon(self._write_queued)  # raises on a closed nursery: count after
            self._writers += 1

    async def _write_queued(self) -> None:
        try:
            while self._queue:
                batch = [
                    self._queue.popleft()
                    for _ in range(min(len(self._queue), config.DISK_CACHE_BATCH))
                ]
                try:
                    await trio.to_thread.run_sync(
                        self._put_all, batch, limiter=self._threads, abandon_on_cancel=True
                    )
                finally:
                    self._pending -= sum(len(item[3]) for item in batch)
                if self.disk.needs_eviction:
                    self._evict_wanted.set()
        finally:
            self._writers -= 1

    def _put_all(self, batch: list[tuple[ObjectRef, int, int, bytes]]) -> None:
        for ref, index, block_size, data in batch:
            try:
                self.disk.put(self.bucket, ref, index, data, block_size)
            except Exception:  # a bug (disk problems never raise): the block is not written
                self.stats["write_errors"] += 1
                log.exception("cannot write block %d of %s to the disk cache", index, ref.key)

    async def keep_within_bounds(self) -> None:
        """Run forever (in the service nursery): evict at start, then whenever this process's writes
        call for it and at least every `DISK_CACHE_EVICT_INTERVAL` (other processes write too), at
        most once every `DISK_CACHE_EVICT_MIN_GAP` seconds."""
        evictor = trio.CapacityLimiter(1)
        while True:
            started = time.monotonic()
            report = await trio.to_thread.run_sync(
                self.disk.evict, limiter=evictor, abandon_on_cancel=True
            )
            if report is not None:
                level = logging.INFO if report.removed_blocks else logging.DEBUG
                log.log(level, "disk block cache: %s", report)
            took = time.monotonic() - started
            interval = max(config.DISK_CACHE_EVICT_INTERVAL, 100 * took)
            await trio.sleep(config.DISK_CACHE_EVICT_MIN_GAP)
            self._evict_wanted = trio.Event()
            with trio.move_on_after(max(0.0, interval - config.DISK_CACHE_EVICT_MIN_GAP)):
                await self._evict_wanted.wait()
