"""Throttled: a background job asked for often runs at most once at a time, at most once per gap,
and a bug in it never reaches the nursery."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from zarrfs.base.throttle import Throttled


@pytest.mark.trio
async def test_requests_fold_into_one_run_per_gap(autojump_clock: trio.abc.Clock) -> None:
    runs: list[float] = []

    async def job() -> None:
        runs.append(trio.current_time())
        await trio.sleep(1)

    throttled = Throttled(job, gap=10, what="test job")
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            throttled.request(nursery)  # at once, then folded in
        await trio.sleep(2)
        for _ in range(5):
            throttled.request(nursery)  # after the first: waits for the gap
        await trio.sleep(30)
        throttled.request(None)  # no nursery: nothing
    assert len(runs) == 2 and runs[1] - runs[0] >= 10


@pytest.mark.trio
@pytest.mark.internal_errors  # the job's bug is reported on purpose
async def test_a_bug_in_the_job_is_reported_not_raised(autojump_clock: trio.abc.Clock) -> None:
    async def job() -> None:
        raise KeyError("a bug")

    throttled = Throttled(job, gap=1, what="test job")
    async with trio.open_nursery() as nursery:
        throttled.request(nursery)
        await trio.sleep(2)
        throttled.request(nursery)  # and it can run again
        await trio.sleep(2)
