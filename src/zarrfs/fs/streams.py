"""Read state for files the kernel opens without asking (FUSE's zero-message open).

Owns: on a mount where the kernel sends READs with no OPEN before them and no RELEASE after (the
version mount, where pyfuse3 and the kernel support it: `fuse_ops.ZarrfsOperations.no_open`), the
readers those reads go through. A file has up to `config.STREAMS_PER_FILE` of them (*streams*), each
an `OpenFile` with its own sequential prefetch, as separate descriptors had: several processes, or
several descriptors of one process, may read one file at different places. A read goes to the
file's stream whose run it continues (`ObjectReader.continues`: where the stream's last read ended,
within `config.PREFETCH_TOLERANCE`, or inside what it prefetched); otherwise to a new stream, or,
when the file has as many as it may, to its least recently read one (whose prefetch then starts
over, as a random read's does). A file's first stream is opened by `Filesystem.open` (so the
array's chunk readahead sees the file opened); later ones share its source. A stream nobody has
read for `config.STREAM_IDLE_CLOSE` seconds is closed (its prefetch stops and gives its budget
back), as is the least recently read one beyond `config.STREAMS_MAX` for the whole mount. Nothing
tells the daemon that a file was closed: the idle time stands in for the RELEASE. Streams are closed
when a read comes (idle ones cost nothing until then: the budget they hold matters only to a reader).

Never does: I/O. Opening is `Filesystem`'s, reading the stack's.

Concurrency: one trio run. Two first reads of one file racing through `Filesystem.open` keep one
stream: the second finds the first's and closes its own.
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
    last_read: float = 0.0


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
        self.per_file = per_file
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

    async def handle_for(self, ino: int, offset: int) -> OpenFile:
        """The handle a read of file `ino` at `offset` goes through (opening one if need be)."""
        now = self._clock()
        self._close_idle(now)
        stream = self._continued(ino, offset)
        if stream is None:
            streams = self._by_file.get(ino)
            if streams is None:
                handle = await self._open(ino)  # may wait (a manifest), may raise: nothing kept
                now = self._clock()
                stream = self._continued(ino, offset)  # a read that raced this one opened it
                if stream is None:
                    stream = self._add(ino, handle)
                elif handle.reader is not None:
                    handle.reader.close()
            elif len(streams) < self.per_file:
                stream = self._add(ino, self._reopen(streams[0].handle))
            else:
                stream = streams[0]  # the file's least recently read
        stream.last_read = now
        self._recent.move_to_end(stream)
        streams = self._by_file[ino]
        if streams[-1] is not stream:
            streams.remove(stream)
            streams.append(stream)
        return stream.handle

    def close_all(self) -> None:
        """Close every stream (the mount is going away)."""
        for stream in list(self._recent):
            self._close(stream)

    def _continued(self, ino: int, offset: int) -> _Stream | None:
        for stream in self._by_file.get(ino, ()):
            reader = stream.handle.reader
            if reader is None or reader.continues(offset):
                return stream
        return None

    def _add(self, ino: int, handle: OpenFile) -> _Stream:
        stream = _Stream(ino, handle)
        self._by_file.setdefault(ino, []).append(stream)
        self._recent[stream] = None
        self.opened += 1
        while len(self._recent) > self.most:  # the new one is the most recent: never itself
            self._close(next(iter(self._recent)))
        return stream

    def _close_idle(self, now: float) -> None:
        recent = self._recent
        while recent:
            oldest = next(iter(recent))
            if now - oldest.last_read < self.idle_close:
                return
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
