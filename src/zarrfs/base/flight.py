"""Single flight: at most one producer per key at a time, every caller of that key waiting for its
outcome; and the bounded LRU that keeps one oversized value besides.

Owns: the two mechanisms every cache of zarrfs shares (manifest loads, version resolutions, the
catalog's answers, Zarr entries): `SingleFlight` and `BoundedLRU`. Never decides what to cache or for
how long: its users do.

`SingleFlight.run(key, produce)` calls `produce()` once for all concurrent callers of `key`. With a
`nursery` (the core's service nursery) the producer runs there, so a caller that gives up (its
deadline, an interrupted syscall) does not cancel work others wait for; without one it runs in the
first caller's task, and if that caller is cancelled the next waiter produces instead. Every caller
gets the value, or a fresh copy of the producer's error (`errors.copy_error`). The producer's
`ZarrfsError`s are its answers; any other exception is a bug: it is reported once by the last resort
(`errors.report_bug`, marked `INTERNAL_ERROR`) and its callers get a `DataError` (EIO), and nothing
else fails: a bug in a background task never reaches the service nursery (which would unmount).

Concurrency: one trio run; no lock needed (no await between a check and its update).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import cachetools
import trio

from zarrfs.errors import DataError, ZarrfsError, copy_error, report_bug

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(slots=True)
class _Flight(Generic[V]):
    done: trio.Event = field(default_factory=trio.Event)
    produced: bool = False
    value: V | None = None
    error: Exception | None = None


class SingleFlight(Generic[K, V]):
    """One producer per key at a time; see the module docstring. `what` names the work in logs."""

    def __init__(self, what: str) -> None:
        self.what = what
        #: Where producers run (None: in the first caller's task).
        self.nursery: trio.Nursery | None = None
        self._inflight: dict[K, _Flight[V]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._inflight

    async def run(self, key: K, produce: Callable[[], Awaitable[V]]) -> V:
        """The value `produce()` gives for `key`, produced once however many callers ask at once."""
        while True:
            flight = self._inflight.get(key)
            if flight is None:
                flight = self._inflight[key] = _Flight()
                if self.nursery is not None:
                    self.nursery.start_soon(self._produce, key, flight, produce)
                else:
                    await self._produce(key, flight, produce)
            await flight.done.wait()
            if flight.error is not None:
                raise copy_error(flight.error) from None
            if flight.produced:
                return flight.value  # type: ignore[return-value]
            # its producer was cancelled: produce again (or wait for whoever does)

    async def _produce(
        self, key: K, flight: _Flight[V], produce: Callable[[], Awaitable[V]]
    ) -> None:
        try:
            flight.value = await produce()
            flight.produced = True
        except ZarrfsError as e:
            flight.error = e
        except Exception as e:  # a bug: fails this flight's callers only
            report_bug(f"{self.what} of {key!r:.200}", e)
            flight.error = DataError(f"internal error in {self.what}: {type(e).__name__}: {e}")
        finally:
            del self._inflight[key]
            flight.done.set()


class BoundedLRU(Generic[K, V]):
    """An LRU bounded by the total weight of its values (`weigh`) and by their number. A value
    heavier than the whole weight budget is not refused but kept on its own, as the one oversized
    value, until another one replaces it: so a working set of one huge item is not reloaded on
    every request."""

    def __init__(
        self, max_weight: int, weigh: Callable[[V], int], max_items: int | None = None
    ) -> None:
        self.max_weight = max(max_weight, 1)
        self.max_items = max_items
        self._weigh = weigh
        self._lru: cachetools.LRUCache[K, V] = cachetools.LRUCache(
            maxsize=self.max_weight, getsizeof=lambda value: max(weigh(value), 1)
        )
        self._oversized: tuple[K, V] | None = None

    def get(self, key: K) -> V | None:
        value = self._lru.get(key)
        if value is None and self._oversized is not None and self._oversized[0] == key:
            return self._oversized[1]
        return value

    def put(self, key: K, value: V) -> bool:
        """Keep `value`; True when it is kept as the one oversized value."""
        if max(self._weigh(value), 1) > self.max_weight:
            self._lru.pop(key, None)
            self._oversized = (key, value)
            return True
        self._lru[key] = value
        if self._oversized is not None and self._oversized[0] == key:
            self._oversized = None
        if self.max_items is not None:
            while len(self._lru) > self.max_items:
                self._lru.popitem()
        return False

    def values(self) -> Iterator[V]:
        yield from self._lru.values()
        if self._oversized is not None:
            yield self._oversized[1]

    @property
    def weight(self) -> int:
        """The total weight held, the oversized value included."""
        extra = max(self._weigh(self._oversized[1]), 1) if self._oversized is not None else 0
        return int(self._lru.currsize) + extra

    def __len__(self) -> int:
        return len(self._lru) + (self._oversized is not None)
