"""Read state for files the kernel opens without asking (FUSE's zero-message open).

Owns: on a mount where the kernel sends READs with no OPEN before them and no RELEASE after (where
pyfuse3 and the kernel support it: `fuse_ops.ZarrfsOperations.no_open`), the
readers those reads go through. A file has up to `config.STREAMS_PER_FILE` of them (*streams*), each
an `OpenFile` with its own sequential prefetch, as separate descriptors had: several processes, or
several descriptors of one process, may read one file at different places. A read goes to the
file's stream whose run it continues (`ObjectReader.continues`: where the stream's last read ended,
within `config.PREFETCH_TOLERANCE`, or inside what it prefetched); otherwise to a new stream, or,
when the file has as many as it may, to its least recently read one (whose prefetch then starts
over, as a random read's does). A file's first stream is opened by `Filesystem.open` (so the
array's chunk readahead sees the file opened); later ones share its source (`Filesystem.reopen`).

Nothing tells the daemon that a file was closed: idle time stands in for the RELEASE. A stream
with no read in progress and none finished for `config.STREAM_IDLE_CLOSE` seconds is closed (its
prefetch stops and gives its budget back) when the next read of any file comes; until then its
prefetch goes on to the end of the window it had asked for, no further. So is the least recently
read idle stream beyond `config.STREAMS_MAX` for the whole mount. A stream whose read is in progress
(a slow S3) is never closed under it.

Never does: I/O. Opening is `Filesystem`'s, reading the stack's.

Concurrency: one trio run. First reads of one file that race through `Filesystem.open` keep at most
`STREAMS_PER_FILE` streams: a read that finds the file opened meanwhile joins the stream it
continues, or adds its own where there is room, or closes its own and takes the file's least
recently read.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zarrfs import config

if TYPE_CHECKING:
    from zarrfs.fs.filesystem import OpenFile


@dataclass(eq=False, slots=True)
class _Stream:
    """One reader of file `ino` (compared and hashed by identity)."""

    ino: int
    handle: OpenFile
    last_read: float = 0.0  # when its last read ended (or it was found busy by `_close_idle`)
    reading: int = 0  # reads in progress


class Streams:
    """The streams of every file read without a handle; see the module docstring."""

    def __init__(
        self,
        open_file: Callable[[int], Awaitable[OpenFile]],
        reopen: Callable[[OpenFile], OpenFile],
        *,
        per_file: int = config.STREAMS_PER_FILE,
        idle_close: float = config.STREAM_IDLE_CLOSE,
        most: int = config.STREAMS_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._open = open_file
        self._reopen = reopen
        self.per_file = max(1, per_file)
        self.idle_close = idle_close
        self.most = max(1, most)
        self._clock = clock
        self._by_file: dict[int, list[_Stream]] = {}  # each least recently read first
        self._recent: OrderedDict[_Stream, None] = OrderedDict()  # least recently read first
        #: Streams opened and closed so far (for `zarrfs stats` and tests).
        self.opened = 0
        self.closed = 0

    def __len__(self) -> int:
        return len(self._recent)

    def stats(self) -> dict[str, int]:
        """Streams open now, opened and closed so far."""
        return {"open": len(self._recent), "opened": self.opened, "closed": self.closed}

    async def read(
        self, ino: int, offset: int, read: Callable[[OpenFile], Awaitable[bytes]]
    ) -> bytes:
        """`read(handle)` through the stream of file `ino` that a read at `offset` goes to
        (opened if need be: `Filesystem.open`'s errors leave as they are, and nothing is kept)."""
        stream = await self._stream_for(ino, offset)
        stream.reading += 1
        try:
            return await read(stream.handle)
        finally:
            stream.reading -= 1
            stream.last_read = self._clock()

    def close_all(self) -> None:
        """Close every stream: every prefetch stops and gives its budget back."""
        for stream in list(self._recent):
            self._close(stream)

    async def _stream_for(self, ino: int, offset: int) -> _Stream:
        self._close_idle(self._clock())  # a busy stream is never closed: no stamp needed here
        stream = self._continued(ino, offset)
        if stream is None:
            if ino not in self._by_file:
                handle = await self._open(ino)  # may wait (a manifest), may raise: nothing kept
                stream = self._continued(ino, offset)  # a read that raced this one opened it
                if stream is None:
                    stream = self._place(ino, handle)
                elif handle.reader is not None:
                    handle.reader.close()
            else:
                stream = self._place(ino, None)
        self._recent.move_to_end(stream)
        streams = self._by_file[ino]
        if streams[-1] is not stream:
            streams.remove(stream)
            streams.append(stream)
        return stream

    def _continued(self, ino: int, offset: int) -> _Stream | None:
        for stream in reversed(self._by_file.get(ino, ())):  # the most recently read first
            reader = stream.handle.reader
            if reader is None or reader.continues(offset):
                return stream
        return None

    def _place(self, ino: int, handle: OpenFile | None) -> _Stream:
        """A stream of `ino` for a read that continues none: `handle` (just opened; None: the
        file has streams, one is reopened) as a new one where the file has room, else the file's
        least recently read stream (`handle` is closed)."""
        streams = self._by_file.get(ino)
        if streams is None or len(streams) < self.per_file:
            if handle is None:
                assert streams is not None
                handle = self._reopen(streams[0].handle)
            return self._add(ino, handle)
        if handle is not None and handle.reader is not None:
            handle.reader.close()
        return streams[0]

    def _add(self, ino: int, handle: OpenFile) -> _Stream:
        stream = _Stream(ino, handle)
        self._by_file.setdefault(ino, []).append(stream)
        self._recent[stream] = None
        self.opened += 1
        if len(self._recent) > self.most:  # the least recently read idle one goes (not this one)
            for old in self._recent:
                if old is not stream and not old.reading:
                    self._close(old)
                    break
        return stream

    def _close_idle(self, now: float) -> None:
        recent = self._recent
        while recent:
            oldest = next(iter(recent))
            if now - oldest.last_read < self.idle_close:
                return
            if oldest.reading:  # a read in progress (a slow S3): not idle; looked at again later
                oldest.last_read = now
                recent.move_to_end(oldest)
                continue
            self._close(oldest)

    def _close(self, stream: _Stream) -> None:
        del self._recent[stream]
        streams = self._by_file[stream.ino]
        streams.remove(stream)
        if not streams:
            del self._by_file[stream.ino]
        if stream.handle.reader is not None:
            stream.handle.reader.close()
        self.closed += 1
