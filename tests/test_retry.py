"""retry.retry: attempts, back-off, timeouts, error propagation, cancellation (virtual clock)."""

from __future__ import annotations

import logging

import pytest
import trio

from zarrfs.errors import ObjectMissing, RemoteError
from zarrfs.io.retry import backoff_delay, retry

pytestmark = pytest.mark.trio


class Flaky(Exception):
    """A retryable failure for these tests."""


def flaky_only(exc: BaseException) -> bool:
    return isinstance(exc, Flaky)


class Op:
    """Fails with the given exceptions in order, then returns "ok"."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        await trio.sleep(0)
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


async def test_first_attempt_succeeds_without_sleeping(autojump_clock: trio.abc.Clock) -> None:
    op = Op()
    t0 = trio.current_time()
    assert await retry(op, what="x", max_attempts=3, timeout=1, is_retryable=flaky_only) == "ok"
    assert op.calls == 1
    assert trio.current_time() == t0


async def test_retries_then_succeeds_and_warns(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    op = Op(Flaky("boom 1"), Flaky("boom 2"))
    with caplog.at_level(logging.WARNING, logger="zarrfs.io.retry"):
        result = await retry(
            op, what="GET s3://b/k", max_attempts=5, timeout=1, is_retryable=flaky_only
        )
    assert result == "ok"
    assert op.calls == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("GET s3://b/k" in r.getMessage() for r in warnings)
    assert "boom 1" in warnings[0].getMessage()


async def test_exhaustion_raises_remote_error_chained(autojump_clock: trio.abc.Clock) -> None:
    last = Flaky("third")
    op = Op(Flaky("first"), Flaky("second"), last, Flaky("never reached"))
    with pytest.raises(RemoteError) as info:
        await retry(op, what="GET thing", max_attempts=3, timeout=1, is_retryable=flaky_only)
    assert op.calls == 3
    assert "GET thing" in str(info.value)
    assert "third" in str(info.value)
    assert info.value.__cause__ is last
    assert type(info.value) is RemoteError


async def test_non_retryable_propagates_unchanged(autojump_clock: trio.abc.Clock) -> None:
    missing = ObjectMissing("gone")
    op = Op(missing)
    with pytest.raises(ObjectMissing) as info:
        await retry(op, what="x", max_attempts=5, timeout=1, is_retryable=flaky_only)
    assert info.value is missing
    assert op.calls == 1


async def test_unknown_non_retryable_error_is_not_wrapped(autojump_clock: trio.abc.Clock) -> None:
    op = Op(KeyError("bug"))
    with pytest.raises(KeyError):
        await retry(op, what="x", max_attempts=5, timeout=1, is_retryable=flaky_only)
    assert op.calls == 1


async def test_timeout_is_retryable(autojump_clock: trio.abc.Clock) -> None:
    calls = 0

    async def hangs_once() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await trio.sleep_forever()
        return "late"

    assert (
        await retry(hangs_once, what="x", max_attempts=2, timeout=5, is_retryable=lambda e: False)
        == "late"
    )
    assert calls == 2


async def test_timeouts_exhaust_into_remote_error(autojump_clock: trio.abc.Clock) -> None:
    async def hangs() -> None:
        await trio.sleep_forever()

    t0 = trio.current_time()
    with pytest.raises(RemoteError, match=r"GET slow.*timed out") as info:
        await retry(hangs, what="GET slow", max_attempts=3, timeout=2, is_retryable=flaky_only)
    assert isinstance(info.value.__cause__, trio.TooSlowError)
    elapsed = trio.current_time() - t0
    # three 2 s attempts plus two jittered back-offs of at most 0.1 and 0.2 s
    assert 6 <= elapsed <= 6 + 0.1 + 0.2 + 1e-6


async def test_cancellation_is_never_caught(autojump_clock: trio.abc.Clock) -> None:
    calls = 0

    async def slow() -> None:
        nonlocal calls
        calls += 1
        await trio.sleep(100)

    with trio.move_on_after(1) as scope:
        await retry(slow, what="x", max_attempts=5, timeout=50, is_retryable=lambda e: True)
    assert scope.cancelled_caught
    assert calls == 1


async def test_backoff_is_bounded_and_jittered() -> None:
    for attempt in range(1, 12):
        cap = min(5.0, 0.1 * 2 ** (attempt - 1))
        samples = [backoff_delay(attempt, 0.1, 5.0) for _ in range(200)]
        assert all(0 <= s <= cap for s in samples)
        assert len(set(samples)) > 1


async def test_rejects_zero_attempts() -> None:
    with pytest.raises(ValueError):
        await retry(Op(), what="x", max_attempts=0, timeout=1, is_retryable=flaky_only)
