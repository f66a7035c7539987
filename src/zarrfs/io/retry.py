"""One retry helper for every remote request zarrfs makes.

Owns: the retry policy: a per-attempt deadline (`trio.fail_after`), exponential back-off with full
jitter (from `config.RETRY_BASE_DELAY`, capped by `config.RETRY_MAX_DELAY`), one warning per retry,
the final `RemoteError` once the attempts are used up, and how an attempt's deadline meets the wait for
a connection slot (`scheduler.RequestSlots`): for a demand request the deadline covers the wait, so
`max_attempts * timeout` plus the back-off sleeps (`config.READ_DEADLINE`) bounds the whole request; a
background request waits for its slot without a deadline (it is cancelled by its owner instead) and
its deadline starts once it holds the slot.

Never does: classify errors itself (the caller passes `is_retryable`; only a per-attempt timeout is
always retryable), wrap a non-retryable error (it propagates unchanged), or catch `trio.Cancelled`
(only `Exception` is caught, so cancellation of the caller always propagates at once).

Concurrency: no state but two process-wide counters (`stats`); safe to call from any number of trio
tasks at once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import TypeVar

import trio

from zarrfs import config
from zarrfs.errors import RemoteError
from zarrfs.io.scheduler import Priority, RequestSlots, Ticket

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Process-wide counts: attempts that failed and were tried again, requests that gave up.
stats = {"retried": 0, "gave_up": 0}


def backoff_delay(attempt: int, base_delay: float, max_delay: float) -> float:
    """Full-jitter delay before retry `attempt` (1-based): uniform [0, min(max, base*2^(n-1))]."""
    ceiling = min(max_delay, base_delay * (2 ** (attempt - 1)))
    return random.uniform(0.0, ceiling)


async def retry(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    max_attempts: int,
    timeout: float | None,
    is_retryable: Callable[[BaseException], bool],
    base_delay: float = config.RETRY_BASE_DELAY,
    max_delay: float = config.RETRY_MAX_DELAY,
    slots: RequestSlots | None = None,
    ticket: Ticket | None = None,
) -> T:
    """Await `op()` until it succeeds, at most `max_attempts` times.

    Each attempt runs inside `trio.fail_after(timeout)` (no deadline when `timeout` is None: the
    operation watches for stalls itself); a timeout is retryable. An exception for which
    `is_retryable` is false propagates unchanged. After the last failed attempt, raises `RemoteError`
    naming `what` and the cause (chained with `from`). With `slots`, each attempt holds one slot of
    the `ticket`'s class (demand when no ticket is given); see the module docstring for how the wait
    meets the deadline.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    ticket = ticket or Ticket(Priority.DEMAND)
    attempt = 0
    while True:
        attempt += 1
        try:
            if slots is None:
                with _deadline(timeout):
                    return await op()
            elif ticket.priority == Priority.DEMAND:
                with _deadline(timeout):
                    async with slots.slot(ticket):
                        return await op()
            else:
                async with slots.slot(ticket):
                    with _deadline(timeout):
                        return await op()
        except trio.TooSlowError as exc:
            cause: Exception = exc
            reason = f"timed out after {timeout:g}s"
        except Exception as exc:
            if not is_retryable(exc):
                raise
            cause = exc
            reason = f"{type(exc).__name__}: {exc}"
        if attempt >= max_attempts:
            stats["gave_up"] += 1
            raise RemoteError(f"{what}: failed after {attempt} attempt(s): {reason}") from cause
        stats["retried"] += 1
        delay = backoff_delay(attempt, base_delay, max_delay)
        log.warning(
            "%s: attempt %d/%d failed (%s); retrying in %.2fs",
            what,
            attempt,
            max_attempts,
            reason,
            delay,
        )
        await trio.sleep(delay)


def _deadline(timeout: float | None) -> AbstractContextManager[object]:
    return trio.fail_after(timeout) if timeout is not None else trio.CancelScope()
