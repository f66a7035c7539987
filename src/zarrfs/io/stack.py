"""The read stack: memory, then disk, then S3, with prefetch beside it; composed once per core.

Owns: `Lower`, what lies below the memory cache (the disk tier, when there is one, then S3 at the
pinned version, every block fetched from S3 written back to disk in the background), and `ReadStack`,
the one composition every face reads through:

    ReadStack --- BlockCache (memory, single flight) --- Lower --- DiskTier (disk)
         \\                                                  \\--- S3Reader (ranged and streamed GETs)
          \\--- Prefetcher per open object (streams ahead into the BlockCache through the same Lower)

`open(ref)` gives an `ObjectReader` (with a sequential prefetcher when the object has more than one
block and the stack has a nursery to run it in), `read(ref, offset, size)` reads without one, and
`read_many(refs)` reads small objects whole and concurrently (a Zarr's metadata objects).
`open_range(ref, start, length)` gives a reader of one byte range of an object (a chunk of a virtual
Zarr: a range of an HDF5 blob), through the object's own blocks, the range fetched whole in the
background when it is opened and no prefetch past its end. `read_sparse(ref, offset, size)` reads
small scattered pieces (the HDF5 metadata an extraction asks for) through a second block cache of
small blocks (`config.VIRTUAL_METADATA_BLOCK`) over the same lower tiers, so that a B-tree node of a
few KiB does not cost a 256 KiB block.

Never does: FUSE, paths, manifests, or retries of its own (`S3Reader` retries). Concurrency: one trio
run; prefetch segments run in `nursery` (the core's service nursery).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import trio

from zarrfs import config
from zarrfs.base.refs import ObjectRef
from zarrfs.errors import DataError, is_transient, report_bug
from zarrfs.io.blocks import BlockCache
from zarrfs.io.disk_tier import DiskTier
from zarrfs.io.prefetch import PrefetchBudget, Prefetcher
from zarrfs.io.scheduler import Priority, Ticket

log = logging.getLogger(__name__)


class RangeSource(Protocol):
    """The remote end of the stack (`S3Reader` in production): ranges of exact object versions,
    read whole or streamed."""

    async def read_range(
        self, ref: ObjectRef, start: int, end: int, ticket: Ticket | None = None
    ) -> bytes: ...

    async def stream_range(
        self,
        ref: ObjectRef,
        start: int,
        end: int,
        ticket: Ticket,
        sink: Callable[[bytes], None],
    ) -> None: ...


class Lower:
    """The tiers below the memory cache: the disk tier (if any), then the remote source."""

    def __init__(self, source: RangeSource, disk: DiskTier | None = None) -> None:
        self.source = source
        self.disk = disk

    async def from_disk(self, ref: ObjectRef, indexes: list[int], unit: int) -> dict[int, bytes]:
        """The blocks of `indexes` the disk has (each verified there); nothing without a disk."""
        if self.disk is None or not indexes:
            return {}
        return await self.disk.get_many(ref, indexes, unit)

    async def fetch(self, ref: ObjectRef, start: int, end: int, ticket: Ticket) -> bytes:
        """Bytes [start, end) from the remote source (verified there)."""
        return await self.source.read_range(ref, start, end, ticket)

    async def stream(
        self, ref: ObjectRef, start: int, end: int, ticket: Ticket, sink: Callable[[bytes], None]
    ) -> None:
        """Bytes [start, end) from the remote source, passed to `sink` as they arrive."""
        await self.source.stream_range(ref, start, end, ticket, sink)

    def keep(self, ref: ObjectRef, index: int, unit: int, data: bytes) -> None:
        """A block fetched from the remote source: write it back to disk in the background."""
        if self.disk is not None:
            self.disk.put_later(ref, index, unit, data)


class ObjectReader:
    """Reads of one open object, or of the range [start, start + length) of it, with its
    sequential prefetch (if any)."""

    def __init__(
        self,
        stack: ReadStack,
        ref: ObjectRef,
        prefetcher: Prefetcher | None,
        start: int = 0,
        length: int | None = None,
    ) -> None:
        self.stack = stack
        self.ref = ref
        self.prefetcher = prefetcher
        self.start = start
        self.length = ref.size - start if length is None else length
        #: The fetch of the whole range started when it was opened (`ReadStack.open_range`).
        self.fetch_scope: trio.CancelScope | None = None

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset + size) of the object or range (fewer at its end)."""
        if self.prefetcher is not None:
            self.prefetcher.observe(offset, size)
        size = max(0, min(size, self.length - offset))
        return await self.stack.blocks.read(self.ref, self.start + offset, size)

    def continues(self, offset: int) -> bool:
        """Whether a read at `offset` continues this reader's sequential run (always, for a reader
        without prefetch: it has no run to break)."""
        return self.prefetcher is None or self.prefetcher.continues(offset)

    def close(self) -> None:
        """The object was closed: its prefetch stops and gives its budget back."""
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.fetch_scope is not None:
            self.fetch_scope.cancel()


class ReadStack:
    """Memory, disk and S3 composed once; see the module docstring."""

    def __init__(
        self,
        source: RangeSource,
        *,
        memory_bytes: int,
        block_size: int = config.BLOCK_SIZE,
        disk: DiskTier | None = None,
    ) -> None:
        self.lower = Lower(source, disk)
        self.blocks = BlockCache(memory_bytes, block_size, self.lower)
        #: Small scattered reads (`read_sparse`): small blocks, their own memory, the same tiers.
        self.sparse = BlockCache(
            config.VIRTUAL_METADATA_MEMORY,
            config.VIRTUAL_METADATA_BLOCK,
            self.lower,
            whole_object_max=config.VIRTUAL_METADATA_WHOLE_MAX,
        )
        if disk is not None:  # blocks over the disk tier's pending bound are written from here
            disk.recall = self._recall
        #: Bytes prefetched ahead of readers and not yet read, across every open object.
        self.prefetch_budget = PrefetchBudget(int(memory_bytes * config.PREFETCH_MEMORY_SHARE))
        #: Where prefetch segments run (the core's service nursery); None: no prefetch.
        self.nursery: trio.Nursery | None = None

    @property
    def disk(self) -> DiskTier | None:
        return self.lower.disk

    def _recall(self, ref: ObjectRef, index: int, unit: int) -> bytes | None:
        """Block `index` of `ref` in units of `unit` bytes, from whichever memory cache reads
        `ref` in that unit (checked there), or None when none holds it now. The whole of an
        object fetched only whole but kept in memory by blocks is those blocks, joined, when
        memory still holds them all."""
        for cache in (self.blocks, self.sparse):
            if cache.unit(ref) == unit:
                data = cache.cached_block(ref, index)
                if data is not None:
                    return data
            elif unit == ref.size and index == 0 and cache.kept_by_blocks(ref):
                pieces = [cache.cached_block(ref, i) for i in range(cache.blocks_of(ref))]
                if all(piece is not None for piece in pieces):
                    return b"".join(piece for piece in pieces if piece is not None)
        return None

    def open(self, ref: ObjectRef) -> ObjectReader:
        """A reader of `ref`, prefetching ahead of sequential reads when it has several blocks and
        may be fetched in parts (an object fetched only whole, `BlockCache.checked_whole`, comes
        whole with its first read: a ranged prefetch stream of it could not be checked)."""
        prefetcher = None
        blocks = self.blocks
        if self.nursery is not None and blocks.blocks_of(ref) > 1 and not blocks.checked_whole(ref):
            prefetcher = Prefetcher(ref, self.blocks, self.prefetch_budget, self.nursery)
        return ObjectReader(self, ref, prefetcher)

    def open_range(self, ref: ObjectRef, start: int, length: int) -> ObjectReader:
        """A reader of bytes [start, start + length) of `ref` (offsets relative to `start`). The
        range, when it spans more than one block and is at most `config.VIRTUAL_CHUNK_FETCH_MAX`,
        is fetched whole in the background now (its reader reads it whole: a chunk file), nothing
        past it; that fetch counts against the prefetch budget (none when it is used up) and stops
        when the reader is closed."""
        if not 0 <= start <= start + length <= ref.size:
            raise ValueError(f"range {start}+{length} outside {ref.key} ({ref.size} bytes)")
        reader = ObjectReader(self, ref, None, start, length)
        unit = self.blocks.unit(ref)
        spans = (start + length - 1) // unit - start // unit + 1 if length else 0
        if self.nursery is not None and spans > 1 and length <= config.VIRTUAL_CHUNK_FETCH_MAX:
            granted = self.prefetch_budget.take(spans * unit, unit)
            if granted:
                reader.fetch_scope = trio.CancelScope()
                self.nursery.start_soon(
                    self.fetch_ahead, ref, start, length, granted, reader.fetch_scope
                )
        return reader

    async def fetch_ahead(
        self,
        ref: ObjectRef,
        offset: int,
        length: int,
        granted: int,
        scope: trio.CancelScope | None = None,
    ) -> None:
        """Bring bytes [offset, offset + length) of `ref` into the cache at prefetch priority (in
        the background: run it in a nursery), within `scope` when given; then give the `granted`
        bytes back to the prefetch budget. A failure is left to the reader's own read."""
        try:
            with scope or trio.CancelScope():
                await self.blocks.read(ref, offset, length, Priority.PREFETCH)
        except DataError as e:  # not cached: the reader's own read fetches it and sees the error
            log.debug("fetch ahead of %s failed: %s", ref.key, e)
        except Exception as e:  # a bug: logged loudly, never taking the service nursery down
            report_bug(f"fetch ahead of {ref.key}", e)
        finally:
            self.prefetch_budget.give_back(granted)

    async def read_sparse(self, ref: ObjectRef, offset: int, size: int) -> bytes:
        """Bytes [offset, offset + size) of `ref` through the cache of small blocks (for small
        scattered reads of metadata)."""
        return await self.sparse.read(ref, offset, size)

    async def read(
        self, ref: ObjectRef, offset: int, size: int, priority: Priority = Priority.DEMAND
    ) -> bytes:
        """Bytes [offset, offset + size) of `ref`, without prefetch."""
        return await self.blocks.read(ref, offset, size, priority)

    async def read_many(
        self, refs: dict[str, ObjectRef], priority: Priority = Priority.DEMAND
    ) -> dict[str, bytes]:
        """Each object of `refs` whole, all at once. If some fail, raises one of their errors (a
        transient one first: the caller may try again)."""
        out: dict[str, bytes] = {}
        errors: list[DataError] = []

        async def one(name: str, ref: ObjectRef) -> None:
            try:
                out[name] = await self.blocks.read(ref, 0, ref.size, priority)
            except DataError as e:
                errors.append(e)

        async with trio.open_nursery() as nursery:
            for name, ref in refs.items():
                nursery.start_soon(one, name, ref)
        if errors:
            transient = [e for e in errors if is_transient(e)]
            raise (transient or errors)[0]
        return out
