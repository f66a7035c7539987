"""Readahead across the chunk files of one Zarr array: a reader that opens an array's chunks in order
(zarr-python or Dask reading an array, or a region of it, whole) finds the next ones fetched already.

Owns: detecting, per array (of a Zarr, or of a virtual Zarr view of an HDF5 blob), opens of chunk
files that follow each other in row-major order, and fetching the chunks ahead of them whole, in the
background, at prefetch priority, within the read stack's prefetch budget. A reader of one file at
a time (zarr-python reads a handful of chunks at once, each a separate open of a separate small
file) otherwise waits a full S3 round trip per chunk however fast S3 is, as no per-file prefetch
can help a file of one block; a whole-array read through a mount then takes as many round trips as
it has chunks divided by the reader's own concurrency. Opens that arrive slightly out of order (a
reader's threads) still count as sequential. Random access (a chunk here and there) starts nothing.

The window ahead starts at `config.READAHEAD_FIRST_FILES` chunks and doubles while the reader keeps
to the order, up to `config.READAHEAD_MAX_FILES`; a chunk larger than `config.READAHEAD_FILE_MAX`
ends the window (it has its own prefetch when read sequentially). What is "the next chunk" is the
view's to say (`next_chunk`): by the chunk keys' names in a Zarr (integers joined by `.` or `/`,
after v3's `c/`, below the directory holding the array's metadata), by row in a virtual view.

Never does: fetch anything itself (the read stack does, into its block cache: a chunk fetched ahead
is served, verified, exactly as if the reader had asked), parse metadata, or FUSE.
Concurrency: one trio run; fetches run in `nursery` (the core's service nursery).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

import cachetools
import trio

from zarrfs import config
from zarrfs.base.refs import ObjectRef
from zarrfs.fs.namespace import BlobRange, FileSource, ZarrPlace
from zarrfs.io.stack import ReadStack

Coords = tuple[int, ...]
#: The successors of this many recent opens count as "in order" (a reader's threads open a few
#: chunks at once, not quite in order).
_EXPECTED = 16


class ChunkedView(Protocol):
    """What a view (a Zarr's, a virtual one's) tells readahead about its files."""

    def chunk_of(self, node: int) -> tuple[Hashable, Coords] | None:
        """(the array, the coordinates) of chunk file `node`, or None if it is not a chunk."""

    def next_chunk(self, array: Hashable, coords: Coords) -> tuple[Coords, int] | None:
        """The chunk after `coords` in row-major order that exists, and its node; None at the
        end."""

    def file_source(self, place: ZarrPlace, node: int) -> FileSource: ...


@dataclass(slots=True)
class _Array:
    """What readahead knows of one array: the chunks the reader's order makes it expect next, the
    chunks fetched ahead (in row-major order), and how far ahead it fetches."""

    expected: deque[Coords] = field(default_factory=lambda: deque(maxlen=_EXPECTED))
    ahead: deque[Coords] = field(default_factory=deque)
    frontier: Coords | None = None
    window: int = config.READAHEAD_FIRST_FILES
    hits: int = 0


class ChunkReadahead:
    """Readahead across chunk files: see the module docstring."""

    def __init__(self, stack: ReadStack) -> None:
        self.stack = stack
        #: Where fetches run (the core's service nursery; None: no readahead).
        self.nursery: trio.Nursery | None = None
        self._arrays: cachetools.LRUCache[tuple[int, Hashable], _Array] = cachetools.LRUCache(
            maxsize=config.READAHEAD_ARRAYS
        )
        #: For `zarrfs stats`: chunks fetched ahead, and windows started.
        self.stats = {"files": 0, "bytes": 0, "windows": 0}

    def opened(self, place: ZarrPlace, view: ChunkedView, node: int) -> None:
        """File `node` of the Zarr at `place` was opened: keep chunks ahead of a reader in order."""
        if self.nursery is None:
            return
        chunk = view.chunk_of(node)
        if chunk is None:
            return
        array_id, coords = chunk
        array = self._arrays.get((place.base, array_id))
        if array is None:
            array = self._arrays[(place.base, array_id)] = _Array()
        in_order = coords in array.expected or coords in array.ahead
        array.hits = array.hits + 1 if in_order else 0
        following = view.next_chunk(array_id, coords)
        if following is not None:
            array.expected.append(following[0])
        while array.ahead and array.ahead[0] <= coords:
            array.ahead.popleft()
        if array.hits < 2:
            return
        if len(array.ahead) > array.window // 2:
            return  # enough ahead
        start = coords if array.frontier is None or array.frontier < coords else array.frontier
        self.stats["windows"] += 1
        self._fetch_ahead(place, view, array_id, array, start, array.window - len(array.ahead))
        array.window = min(array.window * 2, config.READAHEAD_MAX_FILES)

    def _fetch_ahead(
        self,
        place: ZarrPlace,
        view: ChunkedView,
        array_id: Hashable,
        array: _Array,
        start: Coords,
        count: int,
    ) -> None:
        assert self.nursery is not None
        coords = start
        for _ in range(count):
            following = view.next_chunk(array_id, coords)
            if following is None:
                break
            coords, node = following
            source = view.file_source(place, node)
            if isinstance(source, ObjectRef):
                ref, offset, length = source, 0, source.size
            elif isinstance(source, BlobRange):
                ref, offset, length = source.ref, source.offset, source.length
            else:
                array.frontier = coords  # held in memory already
                continue
            if length > config.READAHEAD_FILE_MAX:
                break
            granted = self.stack.prefetch_budget.take(length, 1)
            if granted < length:
                self.stack.prefetch_budget.give_back(granted)
                break  # backpressure: the reader fetches its own
            array.frontier = coords
            array.ahead.append(coords)
            self.stats["files"] += 1
            self.stats["bytes"] += length
            self.nursery.start_soon(self.stack.fetch_ahead, ref, offset, length, length)
