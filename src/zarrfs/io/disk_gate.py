"""The one way the core touches the cache dir: off the event loop, bounded in time, bypassed while
the cache dir stalls.

Owns: running every piece of cache-dir I/O (index and block reads and writes, lock files, resolved
versions, pins, sweeps) in worker threads with a deadline, and the cache dir's health: an operation
that takes longer than its deadline (`config.DISK_CACHE_STALL_TIMEOUT` unless the caller gives a
longer one for a big write) means the cache dir stalls (a hung NFS server); it raises
`CacheDirStalled`, and every operation through the gate raises it at once for
`config.DISK_CACHE_STALL_PAUSE` seconds (logged once per stall). Callers treat that as a miss or a
skipped write and serve from S3 and memory instead, so a dead cache dir never hangs a request.

Never does: decide what to read or write (callers pass the function), or retry. A thread stuck in a
hung filesystem is abandoned, never waited for (it holds one of the gate's threads until the kernel
gives up; a stall therefore also stops further operations from queueing behind it).

Concurrency: one trio run; `threads` worker threads at most (the wait for one counts against the
deadline).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Generic, TypeVar

import outcome
import trio

from zarrfs import config

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Handoff(Generic[T]):
    """One call through the gate, and who gets its result: the caller, or (once the caller gave
    up) `discard`, whichever way the race between the thread and the deadline goes."""

    def __init__(
        self,
        fn: Callable[..., T],
        args: tuple[object, ...],
        discard: Callable[[T], object] | None,
    ) -> None:
        self.fn, self.args, self.discard = fn, args, discard
        self._lock = threading.Lock()
        self._abandoned = False
        self._done = False
        self._result: T | None = None

    def call(self) -> T:
        result = self.fn(*self.args)
        with self._lock:
            if self._abandoned:
                self._discard(result)
            else:
                self._done, self._result = True, result
        return result

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            if self._done:  # it came back just as the deadline passed: nobody will read it
                self._discard(self._result)  # type: ignore[arg-type]

    def _discard(self, result: T) -> None:
        if self.discard is not None:
            try:
                self.discard(result)
            except Exception as e:  # (in a worker thread or at a deadline: only logged)
                log.warning("while discarding an abandoned cache-dir result: %s", e)


class CacheDirStalled(OSError):
    """The cache dir did not answer in time (now, or recently): a miss, or a skipped write."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(errno.ETIMEDOUT, message, str(path))


class DiskGate:
    """Bounded, bypassable cache-dir I/O for one cache dir."""

    def __init__(
        self,
        path: Path,
        *,
        threads: int | None = None,
        timeout: float | None = None,
        pause: float | None = None,
    ) -> None:
        self.path = path
        self.timeout = config.DISK_CACHE_STALL_TIMEOUT if timeout is None else timeout
        self.pause = config.DISK_CACHE_STALL_PAUSE if pause is None else pause
        self._threads = trio.CapacityLimiter(threads or config.DISK_CACHE_THREADS)
        self._bypass_until = 0.0
        self.stats = {"operations": 0, "stalls": 0, "bypassed": 0}

    @property
    def stalled(self) -> bool:
        """Whether the cache dir is being bypassed now."""
        return time.monotonic() < self._bypass_until

    async def run(
        self,
        fn: Callable[..., T],
        *args: object,
        timeout: float | None = None,
        discard: Callable[[T], object] | None = None,
    ) -> T:
        """`fn(*args)` in a worker thread; CacheDirStalled if the cache dir is bypassed, or if it
        does not return within `timeout` (default: the gate's), which starts a bypass. `discard`:
        what to do with a result that comes after the caller gave up (close a descriptor that
        `fn` opened), so that an abandoned call leaks nothing."""
        if self.stalled:
            self.stats["bypassed"] += 1
            raise CacheDirStalled(self.path, f"the cache dir {self.path} is being bypassed")
        limit = self.timeout if timeout is None else timeout
        self.stats["operations"] += 1
        handoff: _Handoff[T] = _Handoff(fn, args, discard)
        try:
            with trio.move_on_after(limit):
                return await trio.to_thread.run_sync(
                    handoff.call, limiter=self._threads, abandon_on_cancel=True
                )
        except trio.Cancelled:  # the caller itself gave up (its deadline, a shutdown)
            handoff.abandon()
            raise
        handoff.abandon()
        self.stats["stalls"] += 1
        if not self.stalled:
            log.warning(
                "the cache dir %s did not answer within %g s: bypassing it for %g s "
                "(serving from S3 and memory meanwhile)",
                self.path,
                limit,
                self.pause,
            )
        self._bypass_until = time.monotonic() + self.pause
        raise CacheDirStalled(self.path, f"the cache dir {self.path} did not answer in {limit:g} s")

    def release(self, fn: Callable[..., object], *args: object) -> None:
        """Run `fn(*args)` (closing a descriptor, releasing a lock) in a thread of its own even while
        the cache dir is bypassed: what was taken must be given back. Never waits for it (a close
        on a hung NFS server returns when the server does) and never raises: a failure is logged
        from that thread."""
        path = self.path

        def deliver(result: outcome.Outcome[object]) -> None:
            if isinstance(result, outcome.Error):
                log.warning("while releasing a cache-dir resource under %s: %s", path, result.error)

        trio.lowlevel.start_thread_soon(partial(fn, *args), deliver)

    def write_timeout(self, nbytes: int) -> float:
        """A deadline for writing `nbytes` at once: the gate's, plus a second per
        `config.DISK_WRITE_MIN_RATE` bytes (a big index on a slow disk is not a stall)."""
        return self.timeout + nbytes / config.DISK_WRITE_MIN_RATE
