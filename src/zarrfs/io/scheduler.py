"""Request admission: which request gets one of the mount's S3 connection slots next.

Owns: the priority classes of remote requests and the slot pool they share. A request something is
blocked on (`DEMAND`: a read, and every document a lookup waits for: manifests, asset lists, API
answers, listings) never waits behind background work (`PREFETCH`: readahead and prefetch): it may use
any free slot, background work may hold at most `background_max` slots, so `total - background_max`
slots are always left for demand, and a freed slot goes to a waiter of the most urgent class it may
serve. A waiting background request whose result a blocked reader needs is promoted
(`Ticket.promote`) and is then served as demand.

Within a class, waiters are served least-attained-service first: each ticket names a *flow* (the
object it reads), and the waiter whose flow has been granted the fewest slots goes next (oldest first
among equals). So a reader opening a new chunk is not queued behind dozens of sequential readers that
each keep requests in flight: it goes to the front, and those streams share what is left fairly.
Service counts are kept for the most recent `config.FLOWS_REMEMBERED` flows.

Never does: I/O, timeouts or retries (the caller's deadline covers the wait when it should: see
`retry.retry`), or know what a request is for.

Concurrency: plain trio primitives, used from one trio run; no lock needed. A waiter cancelled after
it was granted a slot gives the slot back, so slots never leak.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from enum import IntEnum
from itertools import count

import trio
from cachetools import LRUCache

from zarrfs import config


class Priority(IntEnum):
    """Most urgent first."""

    DEMAND = 0
    PREFETCH = 1


class Ticket:
    """One request's place in the queue. Its priority may rise (never fall) while it waits.
    `flow` names what it reads (an object key), for fair service within a class."""

    __slots__ = ("_granted", "_owner", "_seq", "_wakeup", "flow", "priority")

    def __init__(self, priority: Priority, flow: Hashable = None) -> None:
        self.priority = priority
        self.flow = flow
        self._seq = 0
        self._owner: RequestSlots | None = None
        self._wakeup: trio.Event | None = None
        self._granted: Priority | None = None

    def promote(self) -> None:
        """Serve this request as demand from now on (a blocked reader waits for it)."""
        if self.priority == Priority.DEMAND:
            return
        self.priority = Priority.DEMAND
        if self._owner is not None and self._wakeup is not None and self._granted is None:
            self._owner._requeue(self)


class RequestSlots:
    """`total` slots; background work holds at most `background_max` of them."""

    def __init__(self, total: int, *, background_max: int) -> None:
        if not 0 < background_max <= total:
            raise ValueError(f"need 0 < background_max ({background_max}) <= total ({total})")
        self.total = total
        self.background_max = background_max
        self._in_use = {p: 0 for p in Priority}
        self._waiting: dict[Priority, list[Ticket]] = {p: [] for p in Priority}
        self._served: LRUCache[Hashable, int] = LRUCache(maxsize=config.FLOWS_REMEMBERED)
        self._arrivals = count()
        self.stats = {"granted": 0, "waited": 0, "promoted": 0}

    # --- state ------------------------------------------------------------------------------------

    @property
    def in_use(self) -> int:
        return sum(self._in_use.values())

    def waiting(self, priority: Priority) -> int:
        return len(self._waiting[priority])

    def _may_start(self, priority: Priority) -> bool:
        if self.in_use >= self.total:
            return False
        if priority == Priority.DEMAND:
            return True
        return self._in_use[Priority.PREFETCH] < self.background_max

    # --- use --------------------------------------------------------------------------------------

    @asynccontextmanager
    async def slot(self, ticket: Ticket) -> AsyncIterator[None]:
        """Hold one slot for the body of the `async with`."""
        await self._acquire(ticket)
        try:
            yield
        finally:
            self._release(ticket)

    async def _acquire(self, ticket: Ticket) -> None:
        ahead = any(self._waiting[p] for p in Priority if p <= ticket.priority)
        if not ahead and self._may_start(ticket.priority):
            self._grant(ticket)
            return
        self.stats["waited"] += 1
        ticket._owner = self
        ticket._wakeup = trio.Event()
        ticket._seq = next(self._arrivals)
        self._waiting[ticket.priority].append(ticket)
        try:
            await ticket._wakeup.wait()
        except BaseException:
            if ticket._granted is None:
                self._waiting[ticket.priority].remove(ticket)
            else:
                self._release(ticket)  # granted, but the waiter is gone: give it back
            raise
        finally:
            ticket._owner = ticket._wakeup = None

    def _grant(self, ticket: Ticket) -> None:
        ticket._granted = ticket.priority
        self._in_use[ticket.priority] += 1
        self.stats["granted"] += 1
        if ticket.flow is not None:
            self._served[ticket.flow] = self._served.get(ticket.flow, 0) + 1

    def _release(self, ticket: Ticket) -> None:
        granted = ticket._granted
        if granted is None:
            return
        ticket._granted = None
        self._in_use[granted] -= 1
        self._dispatch()

    def _requeue(self, ticket: Ticket) -> None:
        for queue in self._waiting.values():
            if ticket in queue:
                queue.remove(ticket)
                break
        self._waiting[ticket.priority].append(ticket)
        self.stats["promoted"] += 1
        self._dispatch()

    def _next(self, queue: list[Ticket]) -> Ticket:
        """The waiter whose flow has attained the least service (oldest among equals)."""
        served = self._served

        def rank(ticket: Ticket) -> tuple[int, int]:
            return (served.get(ticket.flow, 0) if ticket.flow is not None else 0, ticket._seq)

        best = min(queue, key=rank)
        queue.remove(best)
        return best

    def _dispatch(self) -> None:
        for priority in Priority:
            queue = self._waiting[priority]
            while queue and self._may_start(priority):
                ticket = self._next(queue)
                self._grant(ticket)
                assert ticket._wakeup is not None
                ticket._wakeup.set()
