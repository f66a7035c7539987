"""Read state for files read without being opened (zero-message open): `fs.streams.Streams`.

Tier 1: `Streams` over fake handles whose readers follow the prefetcher's own rule for "continues"
(`Prefetcher.continues`), with a fake clock. Tier 2: `Filesystem.read_unopened` over the sample
dandiset, with real readers and prefetch, against the published bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from test_filesystem import make_fs, walk
from test_prefetch import BLOCK, DATA, REF, SIZE, FakeS3
from zarrfs import config
from zarrfs.config import S3Settings
from zarrfs.demo.sample import V1, SampleDandiset
from zarrfs.errors import DataError, RemoteError
from zarrfs.fs.filesystem import Filesystem, OpenFile
from zarrfs.fs.namespace import ROOT_INO, InlineFile
from zarrfs.fs.streams import Streams
from zarrfs.io.stack import ReadStack
from zarrfs.s3_reader import S3Reader

pytestmark = pytest.mark.trio


class FakeReader:
    """Continues a read within the prefetcher's tolerance of where its last one ended."""

    def __init__(self) -> None:
        self.next_offset = 0
        self.closed = False

    def continues(self, offset: int) -> bool:
        return abs(offset - self.next_offset) <= config.PREFETCH_TOLERANCE

    def read(self, offset: int, size: int) -> None:
        self.next_offset = offset + size

    def close(self) -> None:
        self.closed = True


class Files:
    """`Filesystem.open` and `reopen` for `Streams`, counting what they open."""

    def __init__(self, *, fail: set[int] | None = None, inline: set[int] | None = None) -> None:
        self.opens: list[int] = []
        self.readers: list[FakeReader] = []
        self.fail = fail or set()
        self.inline = inline or set()
        self.gate: trio.Event | None = None  # when set, `open` waits for it

    def _handle(self, ino: int) -> OpenFile:
        if ino in self.inline:
            return OpenFile(ino, InlineFile(b"x"), f"file-{ino}", None)
        reader = FakeReader()
        self.readers.append(reader)
        return OpenFile(ino, InlineFile(b""), f"file-{ino}", reader)  # type: ignore[arg-type]

    async def open(self, ino: int) -> OpenFile:
        self.opens.append(ino)
        if self.gate is not None:
            await self.gate.wait()
        if ino in self.fail:
            raise DataError(f"cannot open file-{ino}")
        return self._handle(ino)

    def reopen(self, handle: OpenFile) -> OpenFile:
        return self._handle(handle.ino)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(files: Files, clock: Clock | None = None, **kwargs: int | float) -> Streams:
    return Streams(files.open, files.reopen, clock=clock or Clock(), **kwargs)  # type: ignore[arg-type]


async def read(streams: Streams, ino: int, offset: int, size: int = 1 << 17) -> FakeReader:
    """A read through `streams`; returns the reader that saw it."""
    seen: list[FakeReader] = []

    async def through(handle: OpenFile) -> bytes:
        reader = handle.reader
        assert isinstance(reader, FakeReader)
        reader.read(offset, size)
        seen.append(reader)
        return b""

    await streams.read(ino, offset, through)
    return seen[0]


async def handle_of(streams: Streams, ino: int, offset: int) -> OpenFile:
    """The handle a read at `offset` goes through."""
    seen: list[OpenFile] = []

    async def through(handle: OpenFile) -> bytes:
        seen.append(handle)
        return b""

    await streams.read(ino, offset, through)
    return seen[0]


async def test_a_sequential_reader_keeps_one_stream_opened_once() -> None:
    files = Files()
    streams = make(files)
    readers = {id(await read(streams, 5, offset)) for offset in range(0, 8 << 20, 1 << 17)}
    assert len(readers) == 1 and files.opens == [5]
    assert streams.stats() == {"open": 1, "opened": 1, "closed": 0}


async def test_readers_far_apart_in_one_file_get_a_stream_each() -> None:
    """Two processes reading one file in order from different places: each keeps its own run,
    so each keeps its own prefetch (as two descriptors did), and the file is found once."""
    files = Files()
    streams = make(files)
    first, second = [], []
    for step in range(40):
        first.append(await read(streams, 5, step << 17))
        second.append(await read(streams, 5, (1 << 30) + (step << 17)))
    assert len(set(map(id, first))) == 1 and len(set(map(id, second))) == 1
    assert first[0] is not second[0]
    assert files.opens == [5] and len(streams) == 2


async def test_a_file_with_as_many_streams_as_it_may_reuses_its_least_recently_read() -> None:
    files = Files()
    streams = make(files, per_file=3)
    places = [0, 1 << 30, 2 << 30]
    readers = [await read(streams, 5, place) for place in places]
    await read(streams, 5, places[0] + (1 << 17))  # the first stream read again: not the oldest
    fourth = await read(streams, 5, 3 << 30)  # a fourth place: the least recently read stream
    assert fourth is readers[1] and len(streams) == 3 and not fourth.closed
    assert len(files.readers) == 3


async def test_a_stream_idle_too_long_is_closed_at_the_next_read() -> None:
    """No RELEASE comes: the idle time stands in for it, and gives the prefetch budget back."""
    clock = Clock()
    files = Files()
    streams = make(files, clock, idle_close=5.0)
    old = await read(streams, 5, 0)
    clock.now += 4.9
    await read(streams, 6, 0)
    assert not old.closed
    clock.now += 0.2  # file 5 unread for 5.1 s, file 6 for 0.2 s
    await read(streams, 7, 0)
    assert old.closed and not files.readers[1].closed
    assert streams.stats() == {"open": 2, "opened": 3, "closed": 1}
    again = await read(streams, 5, 1 << 17)  # file 5 read again: a new stream, found again
    assert again is not old and files.opens == [5, 6, 7, 5]


async def test_the_mount_keeps_at_most_so_many_streams() -> None:
    files = Files()
    streams = make(files, most=4)
    readers = [await read(streams, ino, 0) for ino in range(10)]
    assert len(streams) == 4
    assert [reader.closed for reader in readers] == [True] * 6 + [False] * 4


async def test_a_file_that_cannot_be_opened_keeps_nothing() -> None:
    files = Files(fail={5})
    streams = make(files)
    with pytest.raises(DataError):
        await handle_of(streams, 5, 0)
    assert len(streams) == 0
    with pytest.raises(DataError):  # asked again, not remembered as failed
        await handle_of(streams, 5, 0)
    assert files.opens == [5, 5]


async def test_first_reads_that_race_keep_one_stream() -> None:
    files = Files()
    files.gate = trio.Event()
    streams = make(files)
    handles: list[OpenFile] = []

    async def first_read(offset: int) -> None:
        handles.append(await handle_of(streams, 5, offset))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first_read, 0)
        nursery.start_soon(first_read, 1 << 17)
        await trio.testing.wait_all_tasks_blocked()
        files.gate.set()
    assert handles[0] is handles[1] and len(streams) == 1
    assert len(files.readers) == 2 and sum(r.closed for r in files.readers) == 1


async def test_first_reads_far_apart_that_race_keep_at_most_so_many_streams() -> None:
    files = Files()
    files.gate = trio.Event()
    streams = make(files, per_file=2)
    async with trio.open_nursery() as nursery:
        for place in range(4):
            nursery.start_soon(read, streams, 5, place << 30)
        await trio.testing.wait_all_tasks_blocked()
        files.gate.set()
    assert len(streams) == 2 and files.opens == [5] * 4
    open_readers = [reader for reader in files.readers if not reader.closed]
    assert len(files.readers) == 4 and len(open_readers) == 2


async def test_a_stream_whose_read_is_in_progress_is_not_closed_as_idle() -> None:
    """A read waiting on a slow S3 for longer than the idle time keeps its stream (and prefetch)."""
    clock = Clock()
    files = Files()
    streams = make(files, clock, idle_close=5.0, most=1)
    release = trio.Event()
    seen: list[OpenFile] = []

    async def slow(handle: OpenFile) -> bytes:
        seen.append(handle)
        await release.wait()
        return b""

    async with trio.open_nursery() as nursery:
        nursery.start_soon(streams.read, 5, 0, slow)
        await trio.testing.wait_all_tasks_blocked()
        clock.now += 60
        await read(streams, 6, 0)  # idle time long past, and over the mount's total of 1
        assert seen[0].reader is not None and not seen[0].reader.closed  # type: ignore[attr-defined]
        assert len(streams) == 2
        release.set()
    clock.now += 6  # now idle: closed at the next read
    await read(streams, 7, 0)
    assert seen[0].reader.closed  # type: ignore[union-attr, attr-defined]


async def test_a_file_without_a_reader_has_one_stream() -> None:
    """A file held in memory has no run to break: every read goes through its one handle."""
    files = Files(inline={5})
    streams = make(files)
    handles = {id(await handle_of(streams, 5, offset)) for offset in (0, 1 << 30, 0)}
    assert len(handles) == 1 and files.opens == [5]


# --- the filesystem, with real readers -----------------------------------------------------------


@pytest.fixture
async def fs(sample: SampleDandiset, tmp_path: Path) -> AsyncIterator[Filesystem]:
    async for filesystem in make_fs(sample, V1, tmp_path):
        yield filesystem


async def test_every_file_read_unopened_and_interleaved_is_the_published_bytes(
    sample: SampleDandiset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file of V1 read without being opened, from the start and from the middle at once
    (their reads alternating): the published bytes, each file found (`Filesystem.open`) once."""
    opened: list[int] = []
    original = Filesystem.open

    async def counting(self: Filesystem, ino: int) -> OpenFile:
        opened.append(ino)
        return await original(self, ino)

    monkeypatch.setattr(Filesystem, "open", counting)
    async for fs in make_fs(sample, V1, tmp_path):
        expected = sample.versions[V1].files
        files = await walk(fs, ROOT_INO)
        step = 1 << 16
        for path, ino in files.items():
            data = expected[path]
            middle = len(data) // 2 // step * step
            parts: dict[int, bytes] = {}
            for start in range(0, max(middle, len(data) - middle), step):
                for at in (start, middle + start):
                    if at < (middle if at < middle else len(data)):
                        parts[at] = await fs.read_unopened(ino, at, min(step, len(data) - at))
            assert b"".join(parts[k] for k in sorted(parts)) == data, path
        assert sorted(opened) == sorted(ino for path, ino in files.items() if expected[path])


async def test_a_file_reopened_reads_the_same_bytes_through_a_reader_of_its_own(
    fs: Filesystem, sample: SampleDandiset
) -> None:
    expected = sample.versions[V1].files
    for path, ino in (await walk(fs, ROOT_INO)).items():
        handle = await fs.open(ino)
        again = fs.reopen(handle)
        assert (again.ino, again.source, again.path) == (handle.ino, handle.source, handle.path)
        assert again.reader is None or again.reader is not handle.reader
        assert (again.reader is None) == (handle.reader is None)
        size = len(expected[path])
        assert await fs.read(again, 0, size + 1) == expected[path], path


async def test_opening_and_reading_an_unopened_file_share_one_deadline(
    fs: Filesystem, sample: SampleDandiset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open that used up the deadline leaves the read none: EIO (RemoteError), not twice the
    wait the kernel was promised."""
    files = await walk(fs, ROOT_INO)
    path = max(files, key=lambda p: len(sample.versions[V1].files[p]))  # a blob: from S3
    ino = files[path]
    original = Filesystem.open

    async def slow(self: Filesystem, ino: int) -> OpenFile:
        await trio.sleep(0.3)
        return await original(self, ino)

    monkeypatch.setattr(fs.streams, "_open", slow.__get__(fs))
    fs.read_deadline = 0.2
    with pytest.raises(RemoteError):
        await fs.read_unopened(ino, 0, 1000)
    fs.read_deadline = 10.0
    assert await fs.read_unopened(ino, 0, 1000) == sample.versions[V1].files[path][:1000]


@pytest.mark.parametrize(("readers", "most_gets"), [(2, 12), (16, 80)])
async def test_sequential_readers_of_one_object_each_keep_their_prefetch(
    autojump_clock: trio.abc.Clock, readers: int, most_gets: int
) -> None:
    """Readers of one 32 MiB object, each from its own place, their reads alternating (threads of a
    job reading their parts of a blob): each keeps its own stream with the default limit, so each
    run reaches its own prefetcher and S3 sees a few long GETs. One stream per file would see every
    read break the run (2 readers: 33 GETs, a read each); 8 per file made 16 readers take over
    each other's streams at every read (128 GETs, a read each, against 68)."""
    fake = FakeS3()
    stack = ReadStack(
        S3Reader(fake, S3Settings(max_concurrency=32)), memory_bytes=512 << 20, block_size=BLOCK
    )

    async def open_file(ino: int) -> OpenFile:
        return OpenFile(ino, REF, "x", stack.open(REF))

    def reopen(handle: OpenFile) -> OpenFile:
        return OpenFile(handle.ino, REF, "x", stack.open(REF))

    async with trio.open_nursery() as nursery:
        stack.nursery = nursery
        streams = Streams(open_file, reopen)
        part = SIZE // readers
        step = min(1 << 20, part // 8)
        got = {k * part: b"" for k in range(readers)}
        for offset in range(0, part, step):
            for start in got:

                async def through(handle: OpenFile, at: int = start + offset) -> bytes:
                    assert handle.reader is not None
                    return await handle.reader.read(at, step)

                got[start] += await streams.read(1, start + offset, through)
        assert b"".join(got[k] for k in sorted(got)) == DATA
        assert len(streams) == readers and streams.opened == readers
        assert len(fake.ranges) <= most_gets, fake.ranges
        streams.close_all()
        assert len(streams) == 0 and stack.prefetch_budget.used == 0
        nursery.cancel_scope.cancel()
