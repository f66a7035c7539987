"""One retry helper for every remote request zarrfs makes.

Owns: the retry policy: a per-attempt deadline (`trio.fail_after`), exponential back-off with full
jitter (from `config.RETRY_BASE_DELAY`, capped by `config.RETRY_MAX_DELAY`), one warning per retry,
and the final `RemoteError` once the attempts are used up.

Never does: classify errors itself (the caller passes `is_retryable`; only a per-attempt timeout is
always retryable), wrap a non-retryable error (it propagates unchanged), or catch `trio.Cancelled`
(only `Exception` is caught, so cancellation of the caller always propagates at once).

Concurrency: stateless; safe to call from any number of trio tasks at once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from zarrfs import config
from zarrfs.errors import RemoteError

log = logging.getLogger(__name__)

T = TypeVar("T")


class _NoLimit:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_LIMIT = _NoLimit()


def backoff_delay(attempt: int, base_delay: float, max_delay: float) -> float:
    """Full-jitter delay before retry `attempt` (1-based): uniform [0, min(max, base*2^(n-1))]."""
    ceiling = min(max_delay, base_delay * (2 ** (attempt - 1)))
    return random.uniform(0.0, ceiling)


async def retry(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    max_attempts: int,
    timeout: float,
    is_retryable: Callable[[BaseException], bool],
    base_delay: float = config.RETRY_BASE_DELAY,
    max_delay: float = config.RETRY_MAX_DELAY,
    limiter: trio.CapacityLimiter | None = None,
) -> T:
    """Await `op()` until it succeeds, at most `max_attempts` times.

    Each attempt runs inside `trio.fail_after(timeout)`; a timeout is retryable. An exception for
    which `is_retryable` is false propagates unchanged. After the last failed attempt, raises
    `RemoteError` naming `what` and the cause (chained with `from`). With a `limiter`, each attempt
    first takes one of its slots, outside the deadline: waiting for a slot is not a slow server.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    attempt = 0
    while True:
        attempt += 1
        try:
            async with limiter if limiter is not None else _NO_LIMIT:
                with trio.fail_after(timeout):
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
            raise RemoteError(f"{what}: failed after {attempt} attempt(s): {reason}") from cause
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
