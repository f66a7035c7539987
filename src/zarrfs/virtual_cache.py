"""Virtual Zarr views of HDF5 blobs, built once and kept: in the cache dir, else extracted.

Owns: getting the `VirtualZarr` of one blob version (`get`; keeping views in memory is the caller's,
`fs.virtual_zarrs`): the store in the cache dir (`virtual/<h[:3]>/<h>.vzarr`, `h`
the sha256 of the blob's identity `[format, bucket, key, version id, ETag, size, extractor version]`,
so a view is immutable and never invalidated; checked on load by `VirtualZarr.from_bytes` (its
xxh3-128, the blob's size, the extractor version), a damaged one deleted and built again; capped at
`disk_budget` bytes, the least recently loaded removed first); else an extraction
(`zarrfs.virtual.extract`: HDF5 runs in a worker process, killed at `config.VIRTUAL_EXTRACT_DEADLINE`,
at most `config.VIRTUAL_EXTRACTIONS` at once), whose reads of the blob go through the read stack's
cache of small blocks (`ReadStack.read_sparse`), so that only the HDF5 metadata moves, once. HDF5 walks
a chunk index one node per read; the nodes it will read next (`virtual.hints`: the children of the B-tree
nodes it just read) are fetched ahead, `config.VIRTUAL_METADATA_AHEAD` at once, so that an index of
thousands of nodes costs a few round trips' worth of time, not thousands.

Answers: a blob the extractor refuses for good (no HDF5 signature, the HDF5 library refused it, over
the extraction's budget) is `NotVirtualizable` (EIO), remembered in memory for `config.FAILURE_TTL`
seconds and in the store as a refusal (`<h>.refused`, a checked JSON document naming the reason), so
no process sharing the cache dir extracts it again. A failure that says nothing about the blob (the
worker crashed, could not start or import its libraries, ran out of memory, broke the protocol, or
the translation failed unexpectedly) is `NotVirtualizable` remembered in memory only, never stored.
An extraction that ran out of time, and a read of the blob that failed (S3 unreachable), fail the
request (EIO) and are never remembered: the next entry tries again.

The cache dir is an optimisation, reached only through the `DiskGate`: a stalled or broken one means
the view is served from memory and not stored. Two processes sharing a cache dir may extract one blob
at the same time (no lock across processes: both write identical bytes, and an extraction is rare).

Never does: FUSE, paths of the dandiset, HDF5 in this process (only the worker imports h5py).
Concurrency: one trio run; one extraction per blob at a time (`SingleFlight`, in the service nursery
when set, so a requester that gives up cancels nothing others wait for).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from contextlib import suppress
from dataclasses import replace
from functools import partial
from pathlib import Path

import cachetools
import trio

from zarrfs import config
from zarrfs.base.flight import SingleFlight
from zarrfs.base.refs import ObjectRef
from zarrfs.base.throttle import Throttled
from zarrfs.errors import (
    DataError,
    IntegrityError,
    NotVirtualizable,
    RemoteError,
    copy_error,
    unwrap_single_exception,
)
from zarrfs.io.cache_dir import (
    CacheLayout,
    read_checked_json,
    read_if_exists,
    trim_to_budget,
    write_checked_json,
    write_new_file,
)
from zarrfs.io.disk_gate import CacheDirStalled, DiskGate
from zarrfs.io.stack import ReadStack
from zarrfs.virtual import (
    EXTRACTOR_VERSION,
    ExtractionError,
    ExtractionLimitError,
    ExtractionTimeoutError,
    ExtractionUnavailable,
    IndexFormatError,
    NotHdf5Error,
    VirtualZarr,
    WorkerCrashedError,
    WorkerProtocolError,
    default_budget,
    extract,
)
from zarrfs.virtual.hints import metadata_children

log = logging.getLogger(__name__)

#: Part of every view's identity: bump when the store's layout changes.
STORE_FORMAT = "zarrfs-virtual-store-1"
VIEW_SUFFIX = ".vzarr"
REFUSED_SUFFIX = ".refused"


class VirtualCache:
    """The views of HDF5 blobs; see the module docstring."""

    def __init__(
        self,
        stack: ReadStack,
        *,
        bucket: str,
        cache_dir: Path,
        gate: DiskGate,
        disk_budget: int = config.VIRTUAL_DISK_BUDGET,
        python: str = sys.executable,
    ) -> None:
        self.stack = stack
        self.bucket = bucket
        self.gate = gate
        self.python = python
        self._dir = CacheLayout(cache_dir).virtual
        self._disk_budget = disk_budget
        self._flights: SingleFlight[ObjectRef, VirtualZarr] = SingleFlight(
            "building of a virtual Zarr view"
        )
        #: Refusals and crashes, by blob: (when, the error), for `config.FAILURE_TTL` seconds.
        self._failures: cachetools.LRUCache[ObjectRef, tuple[float, NotVirtualizable]] = (
            cachetools.LRUCache(maxsize=config.FAILURES_REMEMBERED)
        )
        self._extractions = trio.CapacityLimiter(config.VIRTUAL_EXTRACTIONS)
        self._sweeps = Throttled(
            self.sweep_in_background, config.MANIFEST_SWEEP_MIN_GAP, "sweep of the view store"
        )
        #: For `zarrfs stats`: views loaded from disk, extracted, refused; bytes the workers asked
        #: for; seconds spent extracting; views stored and not stored.
        self.stats = {
            "from_disk": 0,
            "extracted": 0,
            "refused": 0,
            "bytes_asked": 0,
            "read_ahead": 0,  # B-tree nodes fetched before the extractor asked for them
            "extract_seconds": 0,
            "stored": 0,
            "not_stored": 0,
        }

    @property
    def nursery(self) -> trio.Nursery | None:
        """Where extractions run (the core's service nursery; None: in the requester's task)."""
        return self._flights.nursery

    @nursery.setter
    def nursery(self, nursery: trio.Nursery | None) -> None:
        self._flights.nursery = nursery

    def path(self, ref: ObjectRef) -> Path:
        """Where the view of blob `ref` is stored (a refusal: the same with `REFUSED_SUFFIX`)."""
        identity = [STORE_FORMAT, self.bucket, ref.key, ref.version_id, ref.etag, ref.size]
        identity.append(EXTRACTOR_VERSION)
        digest = hashlib.sha256(json.dumps(identity, separators=(",", ":")).encode()).hexdigest()
        return self._dir / digest[:3] / f"{digest}{VIEW_SUFFIX}"

    async def get(self, ref: ObjectRef, what: str) -> VirtualZarr:
        """The view of blob `ref` (`what` names it in log lines). NotVirtualizable when it has
        none; RemoteError when it cannot be had now; other DataErrors of the read stack."""
        failed = self._failures.get(ref)
        if failed is not None:
            at, error = failed
            if time.monotonic() - at < config.FAILURE_TTL:
                raise copy_error(error) from None
            del self._failures[ref]
        return await self._flights.run(ref, lambda: self._load(ref, what))

    async def _load(self, ref: ObjectRef, what: str) -> VirtualZarr:
        try:
            view = await self._from_disk(ref, what)
            if view is None:
                view = await self._extract(ref, what)
        except NotVirtualizable as e:
            self._failures[ref] = (time.monotonic(), e)
            raise
        return view

    # --- the store in the cache dir ---------------------------------------------------------------

    async def _from_disk(self, ref: ObjectRef, what: str) -> VirtualZarr | None:
        """The stored view (None when absent, damaged, or the cache dir does not answer); a stored
        refusal is raised as NotVirtualizable."""
        path = self.path(ref)
        try:
            data = await self.gate.run(_read_touching, path)
            refusal = (
                None if data is not None else await self.gate.run(read_checked_json, _refused(path))
            )
        except OSError as e:
            if not isinstance(e, CacheDirStalled):
                log.warning("cannot read the stored virtual Zarr view of %s: %s", what, e)
            return None
        if refusal is not None:
            reason = refusal.get("reason") if isinstance(refusal, dict) else None
            self.stats["refused"] += 1
            raise NotVirtualizable(f"{what} has no virtual Zarr view: {reason}")
        if data is None:
            return None
        try:  # checked in a thread: a view of a million chunks is some 24 MB
            view = await trio.to_thread.run_sync(
                partial(VirtualZarr.from_bytes, data, blob_size=ref.size)
            )
        except IndexFormatError as e:
            log.warning("discarding the stored virtual Zarr view of %s (%s): %s", what, path, e)
            with suppress(OSError):
                await self.gate.run(path.unlink, True)
            return None
        self.stats["from_disk"] += 1
        return view

    async def _store(self, ref: ObjectRef, what: str, data: bytes | None, reason: str = "") -> None:
        """Keep a view (`data`) or a refusal (`reason`) in the cache dir; a disk that fails or
        stalls only means it is not kept."""
        path = self.path(ref)
        try:
            if data is not None:
                timeout = self.gate.write_timeout(len(data))
                await self.gate.run(write_new_file, path, data, timeout=timeout)
            else:
                doc = {"reason": reason, "extractor": EXTRACTOR_VERSION, "blob": ref.key}
                await self.gate.run(write_checked_json, _refused(path), doc)
        except OSError as e:
            self.stats["not_stored"] += 1
            if not isinstance(e, CacheDirStalled):
                log.warning("cannot keep the virtual Zarr view of %s in %s: %s", what, path, e)
            return
        self.stats["stored"] += 1
        self._schedule_sweep()

    def sweep(self) -> int:
        """Remove temporary files older than `config.STALE_TEMP_AGE`, then the least recently
        loaded views and refusals until the store fits `disk_budget`; the number of views removed.
        Synchronous: run it through the gate. Files vanishing meanwhile are fine."""
        now = time.time()
        files: list[Path] = []
        for path in self._dir.glob("*/*"):
            if not path.name.endswith(".tmp"):
                files.append(path)
                continue
            with suppress(OSError):
                if now - path.lstat().st_mtime > config.STALE_TEMP_AGE:
                    path.unlink(missing_ok=True)
        removed, _, _ = trim_to_budget(files, self._disk_budget, now)
        if removed:
            log.info(
                "virtual Zarr store over %d bytes: removed %d views", self._disk_budget, removed
            )
        return removed

    async def sweep_in_background(self) -> None:
        """`sweep` through the gate; a stalled or broken cache dir only skips it."""
        try:
            await self.gate.run(self.sweep, timeout=config.SWEEP_TIMEOUT)
        except OSError as e:
            log.warning("cannot sweep the virtual Zarr store %s: %s", self._dir, e)

    def _schedule_sweep(self) -> None:
        """After the store grew: one sweep in the background, at most one every
        `config.MANIFEST_SWEEP_MIN_GAP` seconds."""
        self._sweeps.request(self._flights.nursery)

    # --- extraction -------------------------------------------------------------------------------

    async def _extract(self, ref: ObjectRef, what: str) -> VirtualZarr:
        """Build the view in a worker process, reading the blob through the read stack; keep it
        (or the refusal) in the cache dir."""
        asked = 0
        hinted: set[int] = set()
        ahead_slots = trio.CapacityLimiter(config.VIRTUAL_METADATA_AHEAD)

        async def fetch_ahead(address: int) -> None:
            async with ahead_slots:
                with suppress(DataError):  # the extractor's own read will say it
                    await self.stack.read_sparse(ref, address, min(4096, ref.size - address))

        async def read(offset: int, length: int) -> bytes:
            nonlocal asked
            data = await self.stack.read_sparse(ref, offset, length)
            if len(data) != length:
                raise IntegrityError(
                    f"{what}: {len(data)} bytes at {offset} of {ref.key}, expected {length}"
                )
            asked += length
            # the B-tree nodes HDF5 will read next, fetched now, many at once
            for address in metadata_children(data, ref.size):
                if address not in hinted and len(hinted) < config.VIRTUAL_METADATA_AHEAD_MAX:
                    hinted.add(address)
                    ahead.start_soon(fetch_ahead, address)
            return data

        budget = replace(default_budget(ref.size), max_memory=config.VIRTUAL_WORKER_MEMORY)
        async with self._extractions:
            started = time.monotonic()
            deadline = trio.current_time() + config.VIRTUAL_EXTRACT_DEADLINE
            try:
                with unwrap_single_exception():
                    async with trio.open_nursery() as ahead:
                        try:
                            view = await extract(
                                read, ref.size, deadline=deadline, python=self.python, budget=budget
                            )
                        finally:
                            ahead.cancel_scope.cancel()
            except ExtractionTimeoutError as e:
                log.error("virtual Zarr view of %s (s3://%s/%s): %s", what, self.bucket, ref.key, e)
                raise RemoteError(f"{what}: {e}") from None
            except (NotHdf5Error, ExtractionLimitError) as e:  # answers about the blob
                await self._refuse(ref, what, e, store=True)
            except (WorkerCrashedError, WorkerProtocolError, ExtractionUnavailable) as e:
                await self._refuse(ref, what, e, store=False)  # nothing about the blob
            except ExtractionError as e:  # the HDF5 library refused the file
                await self._refuse(ref, what, e, store=True)
            finally:
                elapsed = time.monotonic() - started
                self.stats["bytes_asked"] += asked
                self.stats["read_ahead"] += len(hinted)
                self.stats["extract_seconds"] += round(elapsed)
        self.stats["extracted"] += 1
        log.info(
            "built the virtual Zarr view of %s: %d chunks, %d inline files, %.1f MiB of the blob "
            "read by the extractor in %.1f s",
            what,
            view.chunk_count,
            len(view.inline),
            asked / (1 << 20),
            elapsed,
        )
        await self._store(ref, what, await trio.to_thread.run_sync(view.to_bytes))
        return view

    async def _refuse(self, ref: ObjectRef, what: str, error: Exception, *, store: bool) -> None:
        """The blob has no view: say why (once: the refusal is remembered), keep the refusal in
        the cache dir when it is an answer about the blob, and raise NotVirtualizable."""
        self.stats["refused"] += 1
        reason = f"{type(error).__name__}: {error}"
        log.error("no virtual Zarr view of %s (s3://%s/%s): %s", what, self.bucket, ref.key, reason)
        if store:
            await self._store(ref, what, None, reason)
        raise NotVirtualizable(f"{what} has no virtual Zarr view: {reason}") from None


def _refused(path: Path) -> Path:
    return path.with_suffix(REFUSED_SUFFIX)


def _read_touching(path: Path) -> bytes | None:
    """The bytes of `path` (None when absent), its mtime (the store's LRU clock) set to now."""
    data = read_if_exists(path)
    if data is not None:
        with suppress(OSError):
            path.touch()
    return data
