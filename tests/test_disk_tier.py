"""DiskTier, the async face of the disk block cache: blocks written in the background in batches,
read in batches, a bound on what waits to be written, and a hung disk bypassed instead of waited
for. Real threads and real files, no mounts."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import trio

from zarrfs import config
from zarrfs.base.refs import ObjectRef
from zarrfs.io.disk_store import DiskBlockCache
from zarrfs.io.disk_tier import DiskTier

BUCKET = "dandiarchive"
BS = 64 << 10
pytestmark = pytest.mark.trio

REF = ObjectRef("blobs/abc/def/abcdef", None, 40 * BS + 123, "etag-1")


def block(index: int) -> bytes:
    length = min(BS, REF.size - index * BS)
    return random.Random(index).randbytes(length)


def make_tier(tmp_path: Path) -> DiskTier:
    disk = DiskBlockCache(tmp_path / "cache", max_bytes=1 << 30, block_size=BS, min_free_fraction=0)
    return DiskTier(disk, BUCKET)


def record_batches(tier: DiskTier) -> list[list[int]]:
    """The block indexes of each batch the tier writes from now on (written as before)."""
    batches: list[list[int]] = []
    put_all = tier._put_all

    def recording(batch: list[tuple[ObjectRef, int, int, bytes]]) -> None:
        batches.append([index for _, index, _, _ in batch])
        put_all(batch)

    tier._put_all = recording  # type: ignore[method-assign]
    return batches


async def test_blocks_written_in_the_background_in_batches(tmp_path: Path) -> None:
    tier = make_tier(tmp_path)
    batches = record_batches(tier)
    async with trio.open_nursery() as nursery:
        tier.nursery = nursery
        for index in range(41):
            tier.put_later(REF, index, BS, block(index))
        assert tier.pending == sum(len(block(i)) for i in range(41))
    assert tier.pending == 0
    trips = [len(batch) for batch in batches]
    assert sum(trips) == 41
    assert max(trips) <= config.DISK_CACHE_BATCH
    assert len(trips) <= -(-41 // config.DISK_CACHE_BATCH) + config.DISK_CACHE_WRITERS
    found = await tier.get_many(REF, list(range(41)), BS)
    assert found == {i: block(i) for i in range(41)}  # the short last block too


async def test_get_many_leaves_out_what_the_disk_lacks_or_has_damaged(tmp_path: Path) -> None:
    tier = make_tier(tmp_path)
    for index in (1, 2, 5):
        assert tier.disk.put(BUCKET, REF, index, block(index), BS)
    damaged = next(p for p in (tmp_path / "cache").rglob("*.2") if not p.name.startswith("."))
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(bytes(data))
    assert await tier.get_many(REF, [0, 1, 2, 3, 4, 5], BS) == {1: block(1), 5: block(5)}
    assert await tier.get_many(REF, [5], BS) == {5: block(5)}
    assert await tier.get_many(REF, [2], BS) == {}  # discarded, never served
    assert await tier.get_many(REF, [], BS) == {}


async def test_writes_beyond_the_pending_bound_are_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "DISK_CACHE_PENDING_MAX", 3 * BS)
    tier = make_tier(tmp_path)
    async with trio.open_nursery() as nursery:
        tier.nursery = nursery
        for index in range(5):  # nothing is written before the loop yields
            tier.put_later(REF, index, BS, block(index))
        assert tier.pending == 3 * BS
        assert tier.stats["writes_dropped"] == 2
    assert tier.pending == 0
    assert set(await tier.get_many(REF, list(range(5)), BS)) == {0, 1, 2}


async def test_a_hung_disk_is_bypassed_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "DISK_CACHE_STALL_TIMEOUT", 0.2)
    tier = make_tier(tmp_path)
    assert tier.disk.put(BUCKET, REF, 0, block(0), BS)
    hang = threading.Event()
    get = tier.disk.get

    def hung_get(*args: object) -> bytes | None:
        hang.wait(10)
        return get(*args)  # type: ignore[arg-type]

    tier.disk.get = hung_get  # type: ignore[method-assign]
    try:
        with trio.fail_after(2):
            assert await tier.get_many(REF, [0], BS) == {}  # after the stall timeout: a miss
            assert tier.stats["stalls"] == 1
            assert await tier.get_many(REF, [0], BS) == {}  # bypassed: no wait at all
        assert tier.stats["stalls"] == 1
        async with trio.open_nursery() as nursery:
            tier.nursery = nursery
            tier.put_later(REF, 1, BS, block(1))  # bypassed too: not even queued
            assert tier.pending == 0
    finally:
        hang.set()


@pytest.mark.internal_errors  # a bug in the disk cache's writer, injected on purpose
async def test_a_write_that_fails_skips_that_block_only(tmp_path: Path) -> None:
    tier = make_tier(tmp_path)
    put = tier.disk.put

    def failing_put(bucket: str, ref: ObjectRef, index: int, data: bytes, bs: int) -> bool:
        if index == 1:
            raise ValueError("a bug")
        return put(bucket, ref, index, data, bs)

    tier.disk.put = failing_put  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:  # would be torn down by an escaping error
        tier.nursery = nursery
        for index in range(4):
            tier.put_later(REF, index, BS, block(index))
    assert tier.stats["write_errors"] == 1
    assert set(await tier.get_many(REF, list(range(4)), BS)) == {0, 2, 3}
    assert tier.pending == 0


async def test_a_closed_nursery_strands_no_later_write(tmp_path: Path) -> None:
    tier = make_tier(tmp_path)
    async with trio.open_nursery() as nursery:
        tier.nursery = nursery
    with pytest.raises(RuntimeError):
        tier.put_later(REF, 0, BS, block(0))  # the nursery is closed
    async with trio.open_nursery() as nursery:
        tier.nursery = nursery
        tier.put_later(REF, 1, BS, block(1))  # a writer starts: none counted from before
    assert set(await tier.get_many(REF, [0, 1], BS)) == {0, 1}  # block 0 stayed queued
    assert tier.pending == 0


async def test_what_an_abandoned_call_opens_is_closed_when_it_returns(tmp_path: Path) -> None:
    """A call through the gate that outlives its deadline (a lock file opened on a hung NFS server)
    still returns its result later: it goes to `discard`, so nothing leaks."""
    import os

    from zarrfs.io.disk_gate import CacheDirStalled, DiskGate

    gate = DiskGate(tmp_path, timeout=0.2, pause=0.0)
    answer = threading.Event()
    discarded: list[int] = []
    opened: list[int] = []

    def slow_open() -> int:
        answer.wait(10)
        fd = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        opened.append(fd)
        return fd

    def discard(fd: int) -> None:
        discarded.append(fd)
        os.close(fd)

    with pytest.raises(CacheDirStalled):
        await gate.run(slow_open, discard=discard)
    answer.set()
    with trio.fail_after(5):
        while not discarded:
            await trio.sleep(0.01)
    assert discarded == opened  # closed by `discard`
    # an answer in time goes to the caller, not to `discard`
    fd = await gate.run(slow_open, discard=discard)
    assert fd == opened[1] and discarded == opened[:1]
    os.close(fd)


async def test_a_call_whose_caller_is_cancelled_is_discarded_too(tmp_path: Path) -> None:
    """The caller gives up by itself (its own deadline, a shutdown), not the gate: the late result
    still goes to `discard`."""
    from zarrfs.io.disk_gate import DiskGate

    gate = DiskGate(tmp_path, timeout=30)
    answer = threading.Event()
    discarded: list[str] = []

    def slow() -> str:
        answer.wait(10)
        return "a descriptor"

    with trio.move_on_after(0.2):
        await gate.run(slow, discard=discarded.append)
    answer.set()
    with trio.fail_after(5):
        while not discarded:
            await trio.sleep(0.01)
    assert discarded == ["a descriptor"]


async def test_flush_waits_for_what_is_queued(tmp_path: Path) -> None:
    """At the end of a process the core flushes the tier: every block read is then on disk (a
    remount reads it from there, not from S3)."""
    tier = make_tier(tmp_path)
    async with trio.open_nursery() as nursery:
        tier.nursery = nursery
        for index in range(41):
            tier.put_later(REF, index, BS, block(index))
        assert tier.pending > 0
        with trio.fail_after(10):
            await tier.flush()
        assert tier.pending == 0
        found = await tier.get_many(REF, list(range(41)), BS)
        assert len(found) == 41
        nursery.cancel_scope.cancel()


async def test_the_close_line_says_what_was_written_and_what_was_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At close the core logs what this process gave the disk cache: the blocks written (INFO), and
    a WARNING when blocks were dropped over the pending bound or are still unwritten, so that a
    remount that goes to S3 can be explained from the log."""
    from zarrfs.fs.core import _log_disk_tier_at_close

    tier = make_tier(tmp_path)
    async with trio.open_nursery() as nursery:
        tier.nursery = nursery
        for index in range(3):
            tier.put_later(REF, index, BS, block(index))
        with trio.fail_after(10):
            await tier.flush()
        with caplog.at_level("INFO", logger="zarrfs.fs.core"):
            _log_disk_tier_at_close(tier)
        assert [r.levelname for r in caplog.records] == ["INFO"]
        assert "3 blocks written; 0 owed over the pending bound" in caplog.records[0].getMessage()
        assert "; 0 dropped" in caplog.records[0].getMessage()
        caplog.clear()
        monkeypatch.setattr(config, "DISK_CACHE_PENDING_MAX", BS)
        for index in range(3, 6):
            tier.put_later(REF, index, BS, block(index))  # one queued, two over the bound
        with caplog.at_level("INFO", logger="zarrfs.fs.core"):
            _log_disk_tier_at_close(tier)
        [record] = caplog.records
        assert record.levelname == "WARNING"
        assert "2 dropped" in record.getMessage()
        assert f"{BS} bytes and 0 owed blocks left unwritten" in record.getMessage()
        nursery.cancel_scope.cancel()


async def test_blocks_over_the_pending_bound_are_written_from_memory_in_their_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader faster than the disk: beyond the pending bound a block is owed, not dropped, and is
    written in its turn with the bytes memory still holds (asked for then, not held meanwhile); one
    that memory no longer holds is dropped and counted. The queue stays first come, first written."""
    monkeypatch.setattr(config, "DISK_CACHE_PENDING_MAX", 2 * BS)
    tier = make_tier(tmp_path)
    memory = {i: block(i) for i in range(10)}
    recalled: list[int] = []

    def recall(ref: ObjectRef, index: int, block_size: int) -> bytes | None:
        assert (ref, block_size) == (REF, BS)
        recalled.append(index)
        return memory.get(index)

    tier.recall = recall
    batches = record_batches(tier)
    async with trio.open_nursery() as nursery:
        tier.nursery = nursery
        for index in range(10):
            tier.put_later(REF, index, BS, block(index))
        assert tier.pending == 2 * BS and tier.owed == 8  # two held, eight owed by name
        del memory[5]  # evicted from memory before its turn
        with trio.fail_after(10):
            await tier.flush()
        assert tier.pending == 0 and tier.owed == 0
    assert recalled == [2, 3, 4, 5, 6, 7, 8, 9]
    assert [index for batch in batches for index in batch] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert tier.stats["writes_deferred"] == 8
    assert tier.stats["writes_dropped"] == 1
    found = await tier.get_many(REF, list(range(10)), BS)
    assert found == {i: block(i) for i in range(10) if i != 5}


async def test_the_read_stack_recalls_owed_blocks_from_the_cache_that_reads_them_in_that_unit(
    tmp_path: Path,
) -> None:
    """The stack's recall answers from its block cache only for the unit that cache reads the
    object in (the small-block cache of scattered reads has other blocks under the same numbers)."""
    from zarrfs.io.stack import ReadStack

    tier = make_tier(tmp_path)

    class Nowhere:
        async def read_range(self, *args: object, **kwargs: object) -> bytes:
            raise AssertionError("no remote read expected")

        async def stream_range(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("no remote read expected")

    unit = 4 * BS
    assert unit != config.VIRTUAL_METADATA_BLOCK
    stack = ReadStack(Nowhere(), memory_bytes=1 << 24, block_size=unit, disk=tier)
    assert tier.recall is not None
    data = random.Random(3).randbytes(unit)
    stack.blocks.fulfil(REF, 3, data)
    assert tier.recall(REF, 3, unit) == data
    assert tier.recall(REF, 3, config.VIRTUAL_METADATA_BLOCK) is None  # not that unit's block 3
    assert tier.recall(REF, 4, unit) is None  # not in memory
