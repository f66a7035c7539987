"""Manifest fetching and caching: fetch once (single flight), verify, convert, persist, bound memory.

Owns: where a Zarr's manifest is looked up (`<root>/<z[0:3]>/<z[3:6]>/<z>/<checksum>.json` under each
configured root in order; a manifest built from the bucket's listing is kept under
`<cache dir>/manifests-built/` and tried first), the on-disk index store (`<cache dir>/manifests/`,
immutable, keyed by Zarr id and checksum, files 0600 in 0700 dirs, capped at `disk_budget` bytes with
least-recently-loaded files removed first, never one that another process may have mapped), and a
bounded LRU of loaded indexes (by bytes and by count). The store keeps a manifest of at most
`document_max_files` files (`config.MANIFEST_DOCUMENT_MAX_FILES`; the checksum says how many) as its
verified document, `<checksum>.json` (`write_checked`: an xxh3-128 of the document on its first line,
checked on load, as the VersionIds are not covered by the Zarr checksum), then parsed and verified
against the checksum again like a download, on every load from disk (a later mount, or after the LRU
evicted it): that needs no pyarrow, whose import would stall the first reads for longer than the parse
takes. A bigger one is kept as its converted index, `<checksum>.arrow` (`ManifestIndex.write`; checked
on load); so was every manifest before, and such an index of a small manifest is still read when its
document is not there. Never knows about paths inside the dandiset or FUSE; parsing and verification
live in `manifests.parse` and `manifests.index`.

A download is refused as soon as it grows past what its checksum allows: `<md5>-<count>--<size>` names
the number of files, which bounds the size of an honest manifest (`max_manifest_bytes`). Downloads go to
memory (never through the cache dir), at demand priority: a lookup is waiting for them.

The cache dir is an optimisation: every operation on it goes through the `DiskGate` (a worker thread,
a deadline, a bypass while it stalls), and any local disk problem (stalled, full, read-only, not a
directory) only means the index is served from memory, not stored. Indexes are loaded without keeping
a descriptor (`ManifestIndex.load`); a loaded index that is memory-mapped holds a *lease* on its file:
its mtime is set `config.INDEX_LEASE` seconds into the future and renewed (`renew_leases`) while it is
loaded, and `sweep` never deletes a leased file, so a node sharing the cache dir over NFS never deletes
what another node has mapped.

Answers and failures: a manifest that no root has is `ManifestMissing` (ENOENT where that means "no
such Zarr"), but only when every root answered; if a root could not be reached, the load fails with a
`RemoteError` (EIO), never "does not exist". A failure that is an answer about the data (missing,
malformed, not matching its checksum) is remembered for `config.FAILURE_TTL` seconds (at most
`config.FAILURES_REMEMBERED` of them) so a broken Zarr is not re-downloaded on every probe; an outage
is never remembered.

Concurrency: at most one load per (zarr id, checksum) at a time in this process (`SingleFlight`, in the
service nursery when set, so a requester that gives up does not cancel a load others want), and at
most one across processes sharing the cache dir (an `flock` on `locks/<zarr id>-<checksum>.lock`,
polled so that waiting stays cancellable, given up after `config.MANIFEST_LOCK_WAIT`; the second
process then finds the index on disk). A small index (served from memory whatever becomes of its
file) is written to disk in the write nursery after the lookup that needed it has its answer, the
cross-process lock handed over to that write; `flush` waits (bounded, by the caller) for such writes
before a core closes. Conversion runs in worker threads bounded by a CapacityLimiter and is abandoned
on cancellation (a flag stops the thread at its next directory). pyarrow, which only index files
need, is imported outside the gate's deadline.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import cachetools
import trio

from zarrfs import config
from zarrfs.base.flight import BoundedLRU, SingleFlight
from zarrfs.base.resources import pid_running
from zarrfs.base.throttle import Throttled
from zarrfs.errors import (
    DataError,
    DocumentTooLarge,
    IntegrityError,
    ManifestError,
    ManifestMissing,
    ObjectMissing,
    RemoteError,
    ZarrfsError,
    copy_error,
    is_transient,
    report_bug,
)
from zarrfs.io.cache_dir import (
    CacheLayout,
    make_private_dir,
    read_checked,
    read_if_exists,
    trim_to_budget,
    write_checked,
    write_new_file,
)
from zarrfs.io.disk_gate import CacheDirStalled, DiskGate
from zarrfs.io.remote import Remote
from zarrfs.manifests.checksums import is_checksum, parse_checksum
from zarrfs.manifests.listing import manifest_from_listing, zarr_prefix

if TYPE_CHECKING:  # imported when a Zarr is first entered (numpy; pyarrow for Arrow index files)
    from zarrfs.manifests.index import ManifestIndex

log = logging.getLogger(__name__)

_Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class _Fetched:
    """A manifest just fetched, built or read from `manifests-built/`: its verified index, and its
    document when something keeps it (the store keeps small manifests as documents; a manifest
    built from a listing, `built`, is kept in `manifests-built/` whatever its size)."""

    index: ManifestIndex
    document: bytes | None
    built: bool


class ZarrAsset(Protocol):
    """What the cache needs of a Zarr asset (`archive.assets.AssetRecord` has it)."""

    @property
    def path(self) -> str: ...
    @property
    def zarr_id(self) -> str | None: ...
    @property
    def zarr_checksum(self) -> str | None: ...
    @property
    def problem(self) -> str | None: ...
    @property
    def live(self) -> bool: ...


#: Whether a Zarr's checksum is its live one (a draft pinned through the API), or how to find out.
Live = bool | Callable[[], Awaitable[bool]]
#: Prefix of a mount's directory of draft pins under `<cache dir>/tmp/` (see `pins_dir_name`).
PINS_PREFIX = "pins-"


def manifest_url(root: str, zarr_id: str, checksum: str) -> str:
    """`<root>/<z[0:3]>/<z[3:6]>/<z>/<checksum>.json`."""
    return f"{root.rstrip('/')}/{zarr_id[:3]}/{zarr_id[3:6]}/{zarr_id}/{checksum}.json"


def max_manifest_bytes(checksum: str) -> int:
    """The largest manifest document an honest Zarr with this checksum can have.

    Per file: a name of at most 255 bytes, possibly \\u-escaped (6 bytes per byte), a VersionId, a
    timestamp, a size and an ETag, plus indentation; directories add at most as much again. So
    `config.MANIFEST_BYTES_PER_FILE` per file plus `config.MANIFEST_BASE_BYTES`.
    """
    count, _ = parse_checksum(checksum)
    return config.MANIFEST_BASE_BYTES + count * config.MANIFEST_BYTES_PER_FILE


def pins_dir_name(pid: int, tag: str) -> str:
    """The name of a mount's pins directory: its host and pid say whether its owner still runs."""
    return f"{PINS_PREFIX}{_host()}-{pid}-{tag}"


def _host() -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in socket.gethostname())[:64]


class ManifestCache:
    """Loaded manifest indexes by (zarr id, checksum): memory LRU, then disk, then the roots."""

    def __init__(
        self,
        remote: Remote,
        *,
        roots: Sequence[str],
        cache_dir: Path,
        memory_budget: int,
        disk_budget: int = config.DEFAULT_MANIFEST_DISK_BUDGET,
        cpu_limiter: trio.CapacityLimiter | None = None,
        gate: DiskGate | None = None,
        document_max_files: int = config.MANIFEST_DOCUMENT_MAX_FILES,
    ) -> None:
        if not roots:
            raise ValueError("at least one manifest root is needed")
        self._remote = remote
        self._roots = tuple(roots)
        self._layout = CacheLayout(cache_dir)
        self._dir = self._layout.manifests
        self._tmp = self._layout.tmp
        self._memory_budget = max(memory_budget, 1)
        self._disk_budget = disk_budget
        self._document_max_files = document_max_files
        self.gate = gate or DiskGate(cache_dir)
        self._loaded: BoundedLRU[_Key, ManifestIndex] = BoundedLRU(
            self._memory_budget, lambda index: index.nbytes, config.MANIFEST_MAX_LOADED
        )
        self._loads: SingleFlight[_Key, ManifestIndex] = SingleFlight("manifest load")
        self._failures: cachetools.LRUCache[_Key, tuple[float, ZarrfsError]] = cachetools.LRUCache(
            maxsize=config.FAILURES_REMEMBERED
        )
        self._limiter = cpu_limiter or trio.CapacityLimiter(config.CPU_THREADS)
        self._sweeps = Throttled(
            self.sweep_in_background, config.MANIFEST_SWEEP_MIN_GAP, "sweep of the index store"
        )
        #: Indexes being written in the background, and what wakes `flush` when none are.
        self._storing = 0
        self._stored = trio.Event()
        #: Where an index is written to the cache dir after its lookup has its answer (the core's
        #: write nursery, which a stop does not cancel before `flush`); None: the service nursery.
        self.write_nursery: trio.Nursery | None = None
        self._warned_oversized: _Key | None = None
        self.stats = {
            "memory_hits": 0,
            "disk_loads": 0,
            "fetches": 0,
            "listings": 0,
            "lock_waits": 0,
            "stored": 0,
            "not_stored": 0,
        }

    @property
    def service_nursery(self) -> trio.Nursery | None:
        """Where loads and sweeps run (see the module docstring); None: in the requester's task."""
        return self._loads.nursery

    @service_nursery.setter
    def service_nursery(self, nursery: trio.Nursery | None) -> None:
        self._loads.nursery = nursery

    # --- the disk store ---------------------------------------------------------------------------

    def index_path(self, zarr_id: str, checksum: str) -> Path:
        """Where the converted index of a big manifest is kept."""
        return self._dir / zarr_id[:3] / zarr_id / f"{checksum}.arrow"

    def document_path(self, zarr_id: str, checksum: str) -> Path:
        """Where a small manifest is kept as its verified document."""
        return self._dir / zarr_id[:3] / zarr_id / f"{checksum}.json"

    def keeps_document(self, checksum: str) -> bool:
        """Whether the store keeps the manifest of `checksum` as its document (at most
        `document_max_files` files), not as a converted index."""
        return parse_checksum(checksum)[0] <= self._document_max_files

    def stored_path(self, zarr_id: str, checksum: str) -> Path:
        """Where the store keeps the manifest of `zarr_id` at `checksum`, in whichever form."""
        if self.keeps_document(checksum):
            return self.document_path(zarr_id, checksum)
        return self.index_path(zarr_id, checksum)

    def _indexes(self) -> Iterator[Path]:
        return self._dir.glob("*/*/*.arrow")

    def _stored_files(self) -> list[Path]:
        return [*self._indexes(), *self._dir.glob("*/*/*.json")]

    def built_path(self, zarr_id: str, checksum: str) -> Path:
        """Where a manifest built from the bucket's listing is kept."""
        return Path(manifest_url(str(self._layout.built_manifests), zarr_id, checksum))

    def sweep(self) -> tuple[int, int]:
        """Remove what killed processes left behind: temporary and lock files older than
        `config.STALE_TEMP_AGE`, and pins directories whose mount is gone (same host, pid not
        running) or whose lease lapsed that long ago; Arrow indexes of manifests that the store now
        keeps as documents once the document is there too (older releases wrote them; until then
        they are still read); then the least recently loaded indexes until the store fits
        `disk_budget`, never a leased one (mtime in the future: mapped by a running process
        somewhere). Returns (temporary files and directories, indexes) removed. Synchronous; run it
        through the gate. Files vanishing meanwhile (another process sweeping) are fine."""
        temps = indexes = 0
        now = time.time()
        stale = [*self._tmp.glob("*"), *self._dir.glob("*/*/.*.tmp"), *self._layout.locks.glob("*")]
        for path in stale:
            try:
                st = path.lstat()
                if path.name.startswith(PINS_PREFIX) and path.is_dir():
                    if self._pins_abandoned(path.name, now - st.st_mtime):
                        shutil.rmtree(path, ignore_errors=True)
                        temps += 1
                elif now - st.st_mtime > config.STALE_TEMP_AGE:
                    path.unlink()
                    temps += 1
            except OSError:
                continue
        superseded = 0
        for path in self._indexes():
            with suppress(OSError):
                if (
                    is_checksum(path.stem)
                    and self.keeps_document(path.stem)
                    and path.with_suffix(".json").exists()
                    and path.stat().st_mtime <= now
                ):
                    path.unlink()
                    superseded += 1
        if superseded:
            log.info("removed %d indexes superseded by stored manifest documents", superseded)
        trimmed, total, leased = trim_to_budget(self._stored_files(), self._disk_budget, now)
        indexes = superseded + trimmed
        if trimmed:
            log.info(
                "manifest index store over %d bytes: removed %d indexes", self._disk_budget, trimmed
            )
        if total > self._disk_budget and leased:
            log.info(
                "manifest index store holds %d bytes (over its %d) because %d bytes of indexes are "
                "mapped by running mounts",
                total,
                self._disk_budget,
                leased,
            )
        return temps, indexes

    @staticmethod
    def _pins_abandoned(name: str, age: float) -> bool:
        if age > config.STALE_TEMP_AGE:
            return True  # its owner renews the lease far more often than that
        parts = name[len(PINS_PREFIX) :].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != _host() or not parts[1].isdigit():
            return False  # another node's: only its lease tells
        return not pid_running(int(parts[1]))

    def sweep_stale_temp_files(self) -> int:
        """`sweep`, returning only the number of temporary files removed."""
        return self.sweep()[0]

    def holds_stored_indexes(self) -> bool:
        """Whether the disk store holds a converted index (`.arrow`, what needs pyarrow to read) at
        all (stops at the first one; synchronous: run it through the gate). False when the store
        cannot be read."""
        try:
            return next(self._indexes(), None) is not None
        except OSError:
            return False

    def usage(self) -> tuple[int, int]:
        """(bytes, number) of indexes and documents in the disk store."""
        sizes = []
        for path in self._stored_files():
            try:
                sizes.append(path.stat().st_size)
            except OSError:
                continue
        return sum(sizes), len(sizes)

    @property
    def memory_budget(self) -> int:
        return self._memory_budget

    @property
    def loaded_bytes(self) -> int:
        return self._loaded.weight

    @property
    def loaded_count(self) -> int:
        return len(self._loaded)

    async def renew_leases(self) -> int:
        """Renew the lease of every loaded memory-mapped index (so that no process sharing the
        cache dir deletes it); the number renewed. Skipped while the cache dir stalls."""
        paths = [index.mapped for index in self._loaded.values() if index.mapped is not None]
        if not paths:
            return 0
        try:
            return await self.gate.run(_lease_all, paths)
        except OSError as e:
            log.debug("cannot renew the leases of loaded indexes: %s", e)
            return 0

    async def sweep_in_background(self) -> None:
        """`sweep` through the gate (a scan of a shared cache dir may take a while), logging what it
        removed; a stalled or broken cache dir only skips it."""
        try:
            temps, _ = await self.gate.run(self.sweep, timeout=config.SWEEP_TIMEOUT)
        except OSError as e:
            log.warning("cannot sweep the manifest index store %s: %s", self._dir, e)
            return
        if temps:
            log.info("removed %d stale temporary files from %s", temps, self._layout.root)

    # --- loading ----------------------------------------------------------------------------------

    async def get(self, asset: ZarrAsset) -> ManifestIndex:
        """The verified index of `asset`'s pinned manifest. Raises DataError (EIO) when unavailable."""
        if not asset.zarr_id or not asset.zarr_checksum or asset.problem:
            raise DataError(f"Zarr asset {asset.path} cannot be served: {asset.problem}")
        return await self.get_index(
            asset.zarr_id, asset.zarr_checksum, f"asset {asset.path}", live=asset.live
        )

    def loaded(self, zarr_id: str, checksum: str) -> ManifestIndex | None:
        """The index of Zarr `zarr_id` at `checksum` if it is in memory now (a memory hit), else
        None: the answer of `get_index` when it need not wait."""
        index = self._loaded.get((zarr_id, checksum))
        if index is not None:
            self.stats["memory_hits"] += 1
        return index

    async def get_index(
        self, zarr_id: str, checksum: str, what: str, *, live: Live = False
    ) -> ManifestIndex:
        """The verified index of Zarr `zarr_id` at `checksum`; `what` names it in log lines.

        `live`: whether the checksum is the Zarr's current one (the API said so), or an async
        function that asks the API (called only when no root has the manifest): then the manifest
        may be built from the bucket's listing (verified against the checksum like any manifest).
        Raises ManifestMissing when there is none, RemoteError when a root (or the API) could not
        be asked, another DataError when the manifest is unusable.
        """
        index = self.loaded(zarr_id, checksum)
        if index is not None:
            return index
        key = (zarr_id, checksum)
        failed = self._failures.get(key)
        if failed is not None:
            at, error = failed
            if time.monotonic() - at < config.FAILURE_TTL:
                raise copy_error(error) from None
            del self._failures[key]
        return await self._loads.run(key, lambda: self._load(key, what, live))

    async def _load(self, key: _Key, what: str, live: Live) -> ManifestIndex:
        """The producer of one load (in the single flight)."""
        try:
            index = await self._load_somewhere(key, what, live)
        except ZarrfsError as e:
            if not is_transient(e):
                self._failures[key] = (time.monotonic(), e)
            raise
        self._keep(key, index, what)
        return index

    def _keep(self, key: _Key, index: ManifestIndex, what: str) -> None:
        if self._loaded.put(key, index) and self._warned_oversized != key:
            self._warned_oversized = key
            log.warning(
                "manifest index of %s (%d bytes) exceeds the manifest memory budget (%d bytes); "
                "it is kept loaded as the one oversized index (raise --manifest-memory)",
                what,
                index.nbytes,
                self._memory_budget,
            )

    async def _load_somewhere(self, key: _Key, what: str, live: Live) -> ManifestIndex:
        try:
            index = await self._from_disk(key)
            if index is not None:
                return index
            lock = AsyncExitStack()
            await lock.enter_async_context(self._cross_process_lock(key))
            handed_over = False
            try:
                index = await self._from_disk(key)  # another process may have made it meanwhile
                if index is not None:
                    return index
                fetched = await self._fetch_and_parse(key, what, live)
                index = fetched.index
                nursery = self.write_nursery or self.service_nursery
                if index.nbytes < config.INDEX_MAP_MIN and nursery is not None:
                    # Served from memory whatever becomes of its file: the lookup need not wait
                    # for the write (nor for pyarrow's import). The lock goes with the write, so
                    # processes sharing the cache dir still fetch the manifest once.
                    nursery.start_soon(self._store_then_unlock, lock, key, fetched, what)
                    self._storing += 1  # now, not when the task starts: `flush` counts it
                    handed_over = True
                    return index
                return await self._store(key, fetched, what)
            finally:
                if not handed_over:
                    await lock.aclose()
        except CacheDirStalled:
            pass  # logged by the gate: serve from memory, store nothing
        return (await self._fetch_and_parse(key, what, live)).index

    async def _store_then_unlock(
        self, lock: AsyncExitStack, key: _Key, fetched: _Fetched, what: str
    ) -> None:
        """`_store` in the background, then give the cross-process lock back."""
        try:
            try:
                await self._store(key, fetched, what)
            except Exception as e:  # a bug: logged loudly, never taking the service nursery down
                report_bug(f"storing the index of {what}", e)
            finally:
                await lock.aclose()
        finally:
            self._storing -= 1
            if not self._storing:
                self._stored.set()
                self._stored = trio.Event()

    async def flush(self) -> None:
        """Wait until the indexes being written in the background are written (at the end of a
        process: a verb or an unmount must not cancel them; bound it with a deadline)."""
        while self._storing:
            await self._stored.wait()

    async def _from_disk(self, key: _Key) -> ManifestIndex | None:
        """The stored index (loaded and verified, its lease or LRU clock renewed), or None when it
        is absent, damaged (then deleted) or unreadable. CacheDirStalled when the dir stalls."""
        zarr_id, checksum = key
        if self.keeps_document(checksum):
            index = await self._from_document(key)
            if index is not None:
                return index
            # else the Arrow index an older release stored for it, if any (a cache dir warmed
            # for nodes that cannot download stays usable)
        path = self.index_path(zarr_id, checksum)
        try:
            if not _index_format_imported():
                if not await self.gate.run(path.exists):
                    return None
                await import_index_format()  # not against the cache dir's deadline
            index = await self.gate.run(_load_index, path, zarr_id, checksum)
        except CacheDirStalled:
            raise
        except OSError as e:
            log.warning("cannot read the manifest index store (%s): %s", path, e)
            return None
        if index is not None:
            self.stats["disk_loads"] += 1
        return index

    async def _from_document(self, key: _Key) -> ManifestIndex | None:
        """`_from_disk` for a manifest kept as its document: read through the gate, parsed and
        verified in a worker thread (not against the gate's deadline), like a download."""
        path = self.document_path(*key)
        try:
            data = await self.gate.run(_read_document, path)
        except CacheDirStalled:
            raise
        except OSError as e:
            log.warning("cannot read the manifest index store (%s): %s", path, e)
            return None
        if data is None:
            return None
        try:
            index = await self._convert(key, str(path), data)
        except (ManifestError, IntegrityError) as e:
            log.warning("discarding cached manifest %s: %s", path, e)
            with suppress(OSError):
                await self.gate.run(lambda: path.unlink(missing_ok=True))
            return None
        self.stats["disk_loads"] += 1
        return index

    @asynccontextmanager
    async def _cross_process_lock(self, key: _Key) -> AsyncIterator[None]:
        """Hold `locks/<zarr id>-<checksum>.lock` (flock) while loading, so processes sharing the
        cache dir download and convert each manifest once. Polls (cancellable) for at most
        `config.MANIFEST_LOCK_WAIT`; a lock that cannot be taken at all (no such filesystem support,
        an unwritable dir) is logged and skipped. CacheDirStalled when the dir stalls."""
        path = self._layout.locks / f"{key[0]}-{key[1]}.lock"
        try:
            fd = await self.gate.run(_open_lock, path, discard=os.close)
        except CacheDirStalled:
            raise
        except OSError as e:
            log.warning("cannot create %s (%s): loading without cross-process lock", path, e)
            yield
            return
        try:
            waited = False
            deadline = trio.current_time() + config.MANIFEST_LOCK_WAIT
            while not await self._try_lock(fd, path):
                if not waited:
                    waited = True
                    self.stats["lock_waits"] += 1
                    log.info("another process is loading manifest %s; waiting", key[1])
                if trio.current_time() > deadline:
                    log.warning(
                        "manifest %s: another process held %s for over %.0f s: loading anyway",
                        key[1],
                        path,
                        config.MANIFEST_LOCK_WAIT,
                    )
                    break
                await trio.sleep(config.LOCK_POLL)
            yield
        finally:
            self.gate.release(os.close, fd)  # releases the flock, stalled dir or not

    async def _try_lock(self, fd: int, path: Path) -> bool:
        """True once the flock is held, or when it cannot be had at all (then the load goes on
        without it, logged). CacheDirStalled when the dir stalls."""
        try:
            return await self.gate.run(_try_flock, fd)
        except CacheDirStalled:
            raise
        except OSError as e:
            log.warning("cannot lock %s (%s): loading without cross-process lock", path, e)
            return True

    async def _fetch_and_parse(self, key: _Key, what: str, live: Live) -> _Fetched:
        """The verified index from the first root that has the manifest (or from the bucket's
        listing for a live checksum), with its document when the store keeps it."""
        zarr_id, checksum = key
        keep = self.keeps_document(checksum)
        built = await self._read_built(key)
        if built is not None:
            try:
                index = await self._parse(key, what, "(built earlier from a listing)", built)
                return _Fetched(index, built if keep else None, built=False)
            except (IntegrityError, ManifestError):
                pass  # logged; the roots or a new listing may do better
        tried: list[str] = []
        rejected: DataError | None = None
        unreachable: list[str] = []
        limit = max_manifest_bytes(checksum)
        for root in self._roots:
            url = manifest_url(root, zarr_id, checksum)
            try:
                started = time.monotonic()
                data = await self._remote.get_bytes(url, max_bytes=limit)
                self.stats["fetches"] += 1
                log.info(
                    "fetched manifest of %s (%d bytes) from %s in %.1f s",
                    what,
                    len(data),
                    url,
                    time.monotonic() - started,
                )
                index = await self._parse(key, what, url, data)
                return _Fetched(index, data if keep else None, built=False)
            except ObjectMissing:
                tried.append(f"{url}: not found")
            except DocumentTooLarge as e:
                tried.append(f"{url}: rejected")
                log.error("Zarr %s: manifest %s refused: %s", what, url, e)
                rejected = rejected or ManifestError(f"Zarr {what}: manifest {url}: {e}")
            except (IntegrityError, ManifestError) as e:
                tried.append(f"{url}: rejected")  # logged by _parse; another root may be intact
                rejected = rejected or e
            except RemoteError as e:
                tried.append(f"{url}: {e}")
                unreachable.append(url)
                log.warning("manifest of %s: %s: %s", what, url, e)
        if rejected is not None:
            raise rejected
        if live if isinstance(live, bool) else await live():
            return await self._build_from_listing(key, what)
        if unreachable:
            message = (
                f"Zarr {what} (zarr {zarr_id}, checksum {checksum}): no manifest root could be "
                "asked (" + "; ".join(tried) + ")"
            )
            log.error("%s", message)
            raise RemoteError(message)
        message = (
            f"Zarr {what} (zarr {zarr_id}, checksum {checksum}): no manifest found ("
            + "; ".join(tried)
            + ")"
        )
        log.error("%s", message)
        raise ManifestMissing(message)

    async def _read_built(self, key: _Key) -> bytes | None:
        path = self.built_path(*key)
        try:
            return await self.gate.run(read_if_exists, path)
        except OSError:
            return None  # stalled or unreadable: fetched or listed again

    async def _build_from_listing(self, key: _Key, what: str) -> _Fetched:
        """List the Zarr's live state as a manifest and verify it against `checksum` (the API's
        current one); a listing that does not add up (the Zarr changed meanwhile) is retried."""
        zarr_id, checksum = key
        source = f"s3://{self._remote.s3.bucket}/{zarr_prefix(zarr_id)} (live listing)"
        log.info(
            "Zarr %s: no manifest of checksum %s anywhere; building it from %s",
            what,
            checksum,
            source,
        )
        failure: DataError | None = None
        for attempt in range(1, config.LISTING_ATTEMPTS + 1):
            document, _ = await manifest_from_listing(self._remote.s3, zarr_id, what=what)
            self.stats["listings"] += 1
            try:
                return _Fetched(
                    await self._parse(key, what, source, document), document, built=True
                )
            except IntegrityError as e:
                failure = e
                if attempt < config.LISTING_ATTEMPTS:
                    log.warning(
                        "Zarr %s: the listing does not add up to checksum %s (changed while listed?): "
                        "listing again in %.0f s (attempt %d/%d)",
                        what,
                        checksum,
                        config.LISTING_RETRY_DELAY,
                        attempt,
                        config.LISTING_ATTEMPTS,
                    )
                    await trio.sleep(config.LISTING_RETRY_DELAY)
        message = (
            f"Zarr {what} (zarr {zarr_id}): no manifest of checksum {checksum} anywhere, and "
            f"{config.LISTING_ATTEMPTS} listings of {source} did not add up to it (the Zarr is "
            f"being edited, or the API's checksum is stale): {failure}"
        )
        log.error("%s", message)
        raise IntegrityError(message)

    async def _store(self, key: _Key, fetched: _Fetched, what: str) -> ManifestIndex:
        """Keep a fetched manifest in the cache dir, through the gate: its document when the store
        keeps it so, else its index; and a manifest built from a listing, whatever its size, in
        `manifests-built/` too (it cannot be fetched again: a small one is then kept twice).
        Returns the index to serve (a big one reloaded memory-mapped). A disk that fails or stalls
        only means the index is served from memory."""
        zarr_id, checksum = key
        index, document = fetched.index, fetched.document
        as_document = self.keeps_document(checksum)
        if not as_document:
            await import_index_format()  # not against the cache dir's deadline
        target = self.built_path(zarr_id, checksum)
        try:
            if fetched.built and document is not None:
                await self.gate.run(
                    write_new_file, target, document, timeout=self.gate.write_timeout(len(document))
                )
            mapped = None
            if as_document and document is not None:
                target = self.document_path(zarr_id, checksum)  # in the store: checked on load
                await self.gate.run(
                    write_checked, target, document, timeout=self.gate.write_timeout(len(document))
                )
            elif not as_document:
                target = self.index_path(zarr_id, checksum)
                mapped = await self.gate.run(
                    _write_index, index, target, timeout=self.gate.write_timeout(index.nbytes)
                )
        except OSError as e:  # stalled, full, read-only: the disk store is an optimisation
            self.stats["not_stored"] += 1
            if not isinstance(e, CacheDirStalled):
                log.warning("cannot keep the manifest of %s in %s: %s", what, target, e)
            return index
        self.stats["stored"] += 1
        self._schedule_sweep()
        return mapped or index

    async def _parse(self, key: _Key, what: str, url: str, data: bytes) -> ManifestIndex:
        """`_convert` a manifest fetched from `url`, logging the reason for a refusal and how long
        the conversion took."""
        zarr_id, checksum = key
        started = time.monotonic()
        try:
            index = await self._convert(key, what, data)
        except IntegrityError as e:
            log.error(
                "Zarr %s (zarr %s): manifest %s does not match the published checksum "
                "%s: %s; refusing to serve this Zarr",
                what,
                zarr_id,
                url,
                checksum,
                e,
            )
            raise IntegrityError(f"Zarr {what}: manifest {url} fails verification: {e}") from e
        except ManifestError as e:
            log.error("Zarr %s: manifest %s is unusable: %s", what, url, e)
            raise ManifestError(f"Zarr {what}: manifest {url}: {e}") from e
        log.info(
            "indexed manifest of %s: %d files, %d nodes in %.1f s",
            what,
            index.n_files,
            index.n_nodes,
            time.monotonic() - started,
        )
        return index

    async def _convert(self, key: _Key, what: str, data: bytes) -> ManifestIndex:
        """Parse and verify a manifest document in a worker thread (CPU-heavy; abandoned on
        cancellation), logging progress for slow ones. Raises ManifestError or IntegrityError when
        the document is unusable or does not match its checksum."""
        zarr_id, checksum = key
        started = time.monotonic()
        cancel = threading.Event()

        def convert() -> ManifestIndex:
            # imported here, in the worker thread: the first import (numpy) takes ~0.1 s, which
            # the event loop spends serving other requests
            from zarrfs.manifests.parse import parse_manifest

            return parse_manifest(data, zarr_id=zarr_id, expected_checksum=checksum, cancel=cancel)

        failure: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:  # only for the progress reporter
                nursery.start_soon(self._report_progress, what, started)
                try:
                    index = await trio.to_thread.run_sync(
                        convert, limiter=self._limiter, abandon_on_cancel=True
                    )
                except Exception as e:  # re-raised below, outside the nursery (no group)
                    failure = e
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            cancel.set()  # an abandoned conversion stops at its next directory
        if failure is not None:
            raise failure
        return index

    def _schedule_sweep(self) -> None:
        """Keep the disk store within its budget after it grew: in the background, one sweep at a
        time, at most one every `config.MANIFEST_SWEEP_MIN_GAP` seconds (a sweep lists the whole
        store: on NFS, many round trips)."""
        self._sweeps.request(self.service_nursery)

    @staticmethod
    async def _report_progress(what: str, started: float) -> None:
        await trio.sleep(config.SLOW_CONVERSION)
        while True:
            log.info("still converting manifest of %s (%.0f s)", what, time.monotonic() - started)
            await trio.sleep(5)


# --- what runs in the gate's worker threads ---------------------------------------------------------


#: What reading or writing an index file imports (pyarrow: some 0.1 s, more with a cold page
#: cache), the package before its submodule: importing `pyarrow.ipc` first while another thread
#: imports `pyarrow` takes their import locks in opposite orders, and one of the two gets a
#: half-initialized module.
_INDEX_FORMAT_MODULES = ("zarrfs.manifests.index", "pyarrow", "pyarrow.ipc")


def _index_format_imported() -> bool:
    return all(name in sys.modules for name in _INDEX_FORMAT_MODULES)


async def import_index_format() -> None:
    """Import what index files need in a worker thread, outside the gate: a first import slow on a
    cold page cache must not count as a stalled cache dir."""
    if not _index_format_imported():
        for name in _INDEX_FORMAT_MODULES:
            await trio.to_thread.run_sync(importlib.import_module, name, abandon_on_cancel=True)


def _load_index(path: Path, zarr_id: str, checksum: str) -> ManifestIndex | None:
    """The index stored at `path`, or None when absent or damaged (a damaged one is deleted); its
    lease (mapped) or LRU clock (in memory) is renewed."""
    if not path.exists():
        return None
    from zarrfs.manifests.index import ManifestIndex  # in the worker thread, as in `_convert`

    try:
        index = ManifestIndex.load(path, zarr_id=zarr_id, checksum=checksum)
    except ManifestError as e:
        log.warning("discarding cached index %s: %s", path, e)
        path.unlink(missing_ok=True)
        return None
    _renew(path, leased=index.mapped is not None)
    return index


def _write_index(index: ManifestIndex, path: Path) -> ManifestIndex | None:
    """Write `index` to `path`; a big one is reloaded memory-mapped (served from the page cache)
    and leased; None when the one in memory should be served."""
    from zarrfs.manifests.index import ManifestIndex

    make_private_dir(path.parent)
    size = index.write(path)
    if size < config.INDEX_MAP_MIN:
        return None
    mapped = ManifestIndex.load(path, zarr_id=index.zarr_id, checksum=index.checksum)
    _renew(path, leased=True)
    return mapped


def _read_document(path: Path) -> bytes | None:
    """The manifest kept as its document at `path` (its LRU clock renewed), or None when absent or
    damaged (logged and removed by `read_checked`)."""
    data = read_checked(path)
    if data is not None:
        _renew(path, leased=False)
    return data


def _renew(path: Path, *, leased: bool) -> None:
    # a read-only store, or a file removed by another process: only the eviction order suffers
    stamp = time.time() + (config.INDEX_LEASE if leased else 0.0)
    with suppress(OSError):
        os.utime(path, (stamp, stamp))


def _lease_all(paths: list[Path]) -> int:
    for path in paths:
        _renew(path, leased=True)
    return len(paths)


def _open_lock(path: Path) -> int:
    make_private_dir(path.parent)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try_flock(fd: int) -> bool:
    """Take the exclusive flock on `fd` if it is free: True when held, False when another process
    holds it; OSError when the filesystem cannot lock at all."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
