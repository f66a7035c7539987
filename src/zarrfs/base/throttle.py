"""A background job that is asked for often and run seldom: at most one run at a time, at most one
every `gap` seconds, in a nursery.

Owns: `Throttled`, what the stores in the cache dir (manifest indexes, virtual Zarr views) use to
sweep themselves after they grew without listing a shared directory on every write. Never decides
what the job does; a bug in the job is reported by the last resort (`errors.report_bug`), never
raised into the nursery (which would end the mount).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from zarrfs.errors import report_bug


class Throttled:
    """`job` run when `request`ed: at once if it never ran, else no sooner than `gap` seconds after
    the previous run began; requests while one is pending or running are folded into it."""

    def __init__(self, job: Callable[[], Awaitable[object]], gap: float, what: str) -> None:
        self.job = job
        self.gap = gap
        self.what = what
        self._pending = False
        self._last = -float("inf")

    def request(self, nursery: trio.Nursery | None) -> None:
        """Run the job in `nursery` when its turn comes (nothing without a nursery)."""
        if self._pending or nursery is None:
            return
        self._pending = True
        nursery.start_soon(self._run)

    async def _run(self) -> None:
        try:
            await trio.sleep_until(self._last + self.gap)
            self._last = trio.current_time()
            await self.job()
        except Exception as e:  # a bug: logged loudly, never taking the nursery down
            report_bug(self.what, e)
        finally:
            self._pending = False
