"""Manifest fetching and caching: fetch once (single-flight), verify, convert, persist, bound memory.

Owns: where a Zarr's manifest is looked up (`<root>/<z[0:3]>/<z[3:6]>/<z>/<checksum>.json` under each
configured root in order), the on-disk store of converted indexes (`<cache dir>/manifests/...arrow`,
immutable, keyed by Zarr id and checksum, files 0600 in 0700 dirs, capped at `disk_budget` bytes with
least-recently-loaded files removed first), and a size-weighted LRU of loaded indexes. Never knows about
paths inside the dandiset or FUSE; parsing and verification live in `manifest`.

A download is refused as soon as it grows past what its checksum allows: `<md5>-<count>--<size>` names
the number of files, which bounds the size of an honest manifest (`max_manifest_bytes`).

Concurrency: at most one fetch/convert per (zarr id, checksum) at a time in this process, however many
tasks ask (a `_Load` per key in flight), and at most one across processes sharing the cache dir (an
`flock` on `locks/<zarr id>-<checksum>.lock`, polled so that waiting stays cancellable; the second
process then finds the index on disk). With a `service_nursery` (set by whoever runs the cache: the mount,
the fsspec runtime), loads run there, so a requester that gives up (its deadline, an interrupted
syscall) does not cancel a load others will want; without one a load runs in the first requester's
task and a cancelled loader hands over to its waiters. Conversion runs in worker threads bounded by a
CapacityLimiter and is abandoned on cancellation (a flag stops the thread at its next directory). A
failed load is remembered for `FAILURE_TTL` seconds so a broken Zarr is not re-downloaded on every
probe, then retried. An index larger than the whole memory budget is not put in the LRU but kept as the
one most recent oversized index, so it is not reloaded on every request.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cachetools
import trio

from . import config
from .cache_dir import CacheLayout, make_private_dir
from .dandi import AssetRecord
from .errors import (
    DataError,
    DocumentTooLarge,
    IntegrityError,
    ManifestError,
    ManifestMissing,
    ObjectMissing,
    RemoteError,
)
from .remote import Remote
from .zarr_checksums import parse_checksum
from .zarr_listing import write_manifest_from_listing, zarr_prefix

if TYPE_CHECKING:  # imported when a Zarr is first entered: numpy, pyarrow, zarr_checksum are heavy
    from .manifest import ManifestIndex

log = logging.getLogger(__name__)

#: Seconds a failed manifest load is remembered before it is tried again.
FAILURE_TTL = 30.0
#: Conversions slower than this get progress log lines.
SLOW_CONVERSION = 2.0
#: Temporary files older than this in the cache dir were left by a killed process: removed at start.
STALE_TEMP_AGE = 86400.0
#: Seconds between two tries of the cross-process lock while another process loads the manifest.
LOCK_POLL = 0.1

_Key = tuple[str, str]


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


@dataclass(slots=True)
class _Load:
    """One load in flight: waiters wait on `done`, then read `index` or `error`."""

    done: trio.Event = field(default_factory=trio.Event)
    index: ManifestIndex | None = None
    error: DataError | None = None


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
        self._loaded: cachetools.LRUCache[_Key, ManifestIndex] = cachetools.LRUCache(
            maxsize=self._memory_budget, getsizeof=lambda index: max(index.nbytes, 1)
        )
        self._oversized: tuple[_Key, ManifestIndex] | None = None
        self._inflight: dict[_Key, _Load] = {}
        self._failures: dict[_Key, tuple[float, DataError, bool]] = {}
        self._limiter = cpu_limiter or trio.CapacityLimiter(config.CPU_THREADS)
        self._sweep_pending = False
        #: Where loads run (see the module docstring); None: in the first requester's task.
        self.service_nursery: trio.Nursery | None = None
        self.stats = {
            "memory_hits": 0,
            "disk_loads": 0,
            "fetches": 0,
            "listings": 0,
            "lock_waits": 0,
        }

    # --- the disk store ---------------------------------------------------------------------------

    def index_path(self, zarr_id: str, checksum: str) -> Path:
        return self._dir / zarr_id[:3] / zarr_id / f"{checksum}.arrow"

    def built_path(self, zarr_id: str, checksum: str) -> Path:
        """Where a manifest built from the bucket's listing is kept."""
        return Path(manifest_url(str(self._layout.built_manifests), zarr_id, checksum))

    def sweep(self) -> tuple[int, int]:
        """Remove temporary and lock files a killed process left behind (old enough not to be in use
        by another process sharing this cache dir), then the least recently loaded indexes until the
        store fits `disk_budget`. Returns (temporary files, indexes) removed. Synchronous; run it in a
        worker thread. Files vanishing meanwhile (another process sweeping) are fine."""
        temps = indexes = 0
        now = time.time()
        stale = [*self._tmp.glob("*"), *self._dir.glob("*/*/.*.tmp"), *self._layout.locks.glob("*")]
        for path in stale:
            try:
                if now - path.stat().st_mtime > STALE_TEMP_AGE:
                    path.unlink()
                    temps += 1
            except OSError:
                continue
        files: list[tuple[float, int, Path]] = []
        for path in self._dir.glob("*/*/*.arrow"):
            try:
                st = path.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self._disk_budget:
                break
            try:
                path.unlink()
            except OSError:
                continue
            total -= size
            indexes += 1
        if indexes:
            log.info(
                "manifest index store over %d bytes: removed %d indexes", self._disk_budget, indexes
            )
        return temps, indexes

    def sweep_stale_temp_files(self) -> int:
        """`sweep`, returning only the number of temporary files removed."""
        return self.sweep()[0]

    def usage(self) -> tuple[int, int]:
        """(bytes, number) of indexes in the disk store."""
        sizes = []
        for path in self._dir.glob("*/*/*.arrow"):
            try:
                sizes.append(path.stat().st_size)
            except OSError:
                continue
        return sum(sizes), len(sizes)

    @property
    def loaded_bytes(self) -> int:
        oversized = self._oversized[1].nbytes if self._oversized else 0
        return int(self._loaded.currsize) + oversized

    # --- loading ----------------------------------------------------------------------------------

    async def get(self, asset: AssetRecord) -> ManifestIndex:
        """The verified index of `asset`'s pinned manifest. Raises DataError (EIO) when unavailable."""
        if not asset.zarr_id or not asset.zarr_checksum or asset.problem:
            raise DataError(f"Zarr asset {asset.path} cannot be served: {asset.problem}")
        return await self.get_index(
            asset.zarr_id, asset.zarr_checksum, f"asset {asset.path}", live=asset.live
        )

    async def get_index(
        self, zarr_id: str, checksum: str, what: str, *, live: bool = False
    ) -> ManifestIndex:
        """The verified index of Zarr `zarr_id` at `checksum`; `what` names it in log lines.

        `live`: the checksum is the Zarr's current one (the API said so), so when no root has its
        manifest it may be built from the bucket's listing (verified against the checksum like any
        manifest). Raises ManifestMissing when there is none, another DataError when unusable.
        """
        key = (zarr_id, checksum)
        while True:
            index = self._cached(key)
            if index is not None:
                self.stats["memory_hits"] += 1
                return index
            failed = self._failures.get(key)
            if failed is not None:
                at, error, failed_live = failed
                # a load that could not build from the listing does not answer one that may
                if time.monotonic() - at < FAILURE_TTL and (failed_live or not live):
                    # a fresh exception each time: re-raising one object grows its traceback
                    raise type(error)(*error.args)
                del self._failures[key]
            load = self._inflight.get(key)
            if load is None:
                load = self._inflight[key] = _Load()
                if self.service_nursery is not None:
                    self.service_nursery.start_soon(self._run_load, key, what, live, load)
                else:
                    await self._run_load(key, what, live, load)
            await load.done.wait()
            if load.error is not None:
                raise type(load.error)(*load.error.args)
            if load.index is not None:
                return load.index
            # the loader was cancelled: look again (loaded, failed, or ours to load)

    def _cached(self, key: _Key) -> ManifestIndex | None:
        index = self._loaded.get(key)
        if index is None and self._oversized is not None and self._oversized[0] == key:
            index = self._oversized[1]
        return index

    async def _run_load(self, key: _Key, what: str, live: bool, load: _Load) -> None:
        try:
            index = await self._load(key, what, live)
        except OSError as e:  # the local cache dir (full, read-only, ...): EIO, never a crash
            error = ManifestError(f"Zarr {what}: manifest cache {self._dir}: {e}")
            log.error("%s", error)
            self._failures[key] = (time.monotonic(), error, live)
            load.error = error
        except DataError as e:
            self._failures[key] = (time.monotonic(), e, live)
            load.error = e
        else:
            load.index = index
            self._keep(key, index, what)
        finally:
            del self._inflight[key]
            load.done.set()

    def _keep(self, key: _Key, index: ManifestIndex, what: str) -> None:
        if index.nbytes <= self._memory_budget:
            self._loaded[key] = index
            return
        if self._oversized is None or self._oversized[0] != key:
            log.warning(
                "manifest index of %s (%d bytes) exceeds the manifest memory budget (%d bytes); "
                "it is kept loaded as the one oversized index (raise --manifest-memory)",
                what,
                index.nbytes,
                self._memory_budget,
            )
        self._oversized = (key, index)

    async def _load(self, key: _Key, what: str, live: bool) -> ManifestIndex:
        zarr_id, checksum = key
        path = self.index_path(zarr_id, checksum)
        index = await self._load_from_disk(path, key)
        if index is not None:
            return index
        async with self._cross_process_lock(key):
            index = await self._load_from_disk(path, key)  # another process may have made it
            if index is not None:
                return index
            return await self._fetch_and_convert(key, what, path, live)

    async def _load_from_disk(self, path: Path, key: _Key) -> ManifestIndex | None:
        zarr_id, checksum = key
        if not await trio.to_thread.run_sync(path.exists):
            return None

        def load() -> ManifestIndex:
            from .manifest import ManifestIndex  # in the worker thread, as in `_convert`

            return ManifestIndex.load(path, zarr_id=zarr_id, checksum=checksum)

        try:
            index = await trio.to_thread.run_sync(
                load, limiter=self._limiter, abandon_on_cancel=True
            )
        except ManifestError as e:
            log.warning("discarding cached index %s: %s", path, e)
            await trio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
            return None
        self.stats["disk_loads"] += 1
        await trio.to_thread.run_sync(_touch, path)  # least recently loaded goes first
        return index

    @asynccontextmanager
    async def _cross_process_lock(self, key: _Key) -> AsyncIterator[None]:
        """Hold `locks/<zarr id>-<checksum>.lock` (flock) while loading, so processes sharing the
        cache dir download and convert each manifest once. Polls (cancellable); a lock that cannot be
        taken at all (no such filesystem support) is logged and skipped."""
        lock_dir = self._layout.locks
        path = lock_dir / f"{key[0]}-{key[1]}.lock"

        def open_lock() -> int:
            make_private_dir(lock_dir)
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

        try:
            fd = await trio.to_thread.run_sync(open_lock)
        except OSError as e:
            log.warning("cannot create %s (%s): loading without cross-process lock", path, e)
            yield
            return
        try:
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        waited = True
                        self.stats["lock_waits"] += 1
                        log.info("another process is loading manifest %s; waiting", key[1])
                    await trio.sleep(LOCK_POLL)
                except OSError as e:
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
                    log.warning("cannot lock %s (%s): loading without cross-process lock", path, e)
                    break
            yield
        finally:
            os.close(fd)  # releases the flock

    async def _fetch_and_convert(
        self, key: _Key, what: str, path: Path, live: bool
    ) -> ManifestIndex:
        zarr_id, checksum = key
        tried: list[str] = []
        rejected: DataError | None = None
        limit = max_manifest_bytes(checksum)
        await trio.to_thread.run_sync(make_private_dir, self._tmp)
        roots = [*self._roots]
        if await trio.to_thread.run_sync(self.built_path(zarr_id, checksum).exists):
            # built from a listing earlier: a manifest like any other
            roots.insert(0, f"file://{self._layout.built_manifests}/")
        for root in roots:
            url = manifest_url(root, zarr_id, checksum)
            tmp = self._tmp / f"{zarr_id}-{checksum}-{uuid.uuid4().hex}.json"  # unique per host
            try:
                started = time.monotonic()
                size = await self._remote.download(url, tmp, max_bytes=limit)
                self.stats["fetches"] += 1
                log.info(
                    "fetched manifest of %s (%d bytes) from %s in %.1f s",
                    what,
                    size,
                    url,
                    time.monotonic() - started,
                )
                return await self._convert(key, what, url, tmp, path)
            except ObjectMissing:
                tried.append(f"{url}: not found")
            except DocumentTooLarge as e:
                tried.append(f"{url}: rejected")
                log.error("Zarr %s: manifest %s refused: %s", what, url, e)
                rejected = rejected or ManifestError(f"Zarr {what}: manifest {url}: {e}")
            except (IntegrityError, ManifestError) as e:
                tried.append(f"{url}: rejected")  # logged by _convert; another root may be intact
                rejected = rejected or e
            except RemoteError as e:
                tried.append(f"{url}: {e}")
                log.warning("manifest of %s: %s: %s", what, url, e)
            finally:
                tmp.unlink(missing_ok=True)  # synchronous: must happen even when cancelled
        if rejected is not None:
            raise rejected
        if live:
            return await self._build_from_listing(key, what, path)
        message = (
            f"Zarr {what} (zarr {zarr_id}, checksum {checksum}): no manifest found ("
            + "; ".join(tried)
            + ")"
        )
        log.error("%s", message)
        raise ManifestMissing(message)

    async def _build_from_listing(self, key: _Key, what: str, path: Path) -> ManifestIndex:
        """List the Zarr's live state, write it as a manifest and verify it against `checksum` (the
        API's current one); a listing that does not add up (the Zarr changed meanwhile) is retried.
        The verified JSON is kept under `<cache dir>/manifests-built/`, laid out like a manifest
        root, and the index is kept like any other."""
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
            tmp = self._tmp / f"{zarr_id}-{checksum}-{uuid.uuid4().hex}.listing.json"
            try:
                await write_manifest_from_listing(self._remote.s3, zarr_id, tmp, what=what)
                self.stats["listings"] += 1
                index = await self._convert(key, what, source, tmp, path)
                await trio.to_thread.run_sync(self._keep_built, tmp, zarr_id, checksum)
                return index
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
            finally:
                tmp.unlink(missing_ok=True)
        message = (
            f"Zarr {what} (zarr {zarr_id}): no manifest of checksum {checksum} anywhere, and "
            f"{config.LISTING_ATTEMPTS} listings of {source} did not add up to it (the Zarr is "
            f"being edited, or the API's checksum is stale): {failure}"
        )
        log.error("%s", message)
        raise IntegrityError(message)

    def _keep_built(self, src: Path, zarr_id: str, checksum: str) -> None:
        dest = self.built_path(zarr_id, checksum)
        try:
            make_private_dir(dest.parent)
            os.link(src, dest)
        except FileExistsError:
            pass
        except OSError as e:
            log.warning("cannot keep the built manifest %s: %s", dest, e)

    async def _convert(
        self, key: _Key, what: str, url: str, src: Path, dest: Path
    ) -> ManifestIndex:
        zarr_id, checksum = key
        started = time.monotonic()
        cancel = threading.Event()

        def convert() -> ManifestIndex:
            # imported here, in the worker thread: the first import (numpy, pyarrow) takes
            # ~0.2 s, which the event loop spends serving other requests
            from .manifest import ManifestIndex, parse_manifest_file

            built = parse_manifest_file(
                src, zarr_id=zarr_id, expected_checksum=checksum, cancel=cancel
            )
            try:
                make_private_dir(dest.parent)
                built.write(dest)
            except OSError as e:  # the disk cache is an optimisation: serve from memory
                log.warning("cannot keep the index of %s in %s: %s", what, dest, e)
                return built
            del built  # drop the heap columns; serve from the memory map instead
            return ManifestIndex.load(dest, zarr_id=zarr_id, checksum=checksum)

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
        if failure is not None and not isinstance(failure, ManifestError | IntegrityError):
            raise failure
        if isinstance(failure, IntegrityError):
            log.error(
                "Zarr %s (zarr %s): manifest %s does not match the published checksum "
                "%s: %s; refusing to serve this Zarr",
                what,
                zarr_id,
                url,
                checksum,
                failure,
            )
            raise IntegrityError(
                f"Zarr {what}: manifest {url} fails verification: {failure}"
            ) from failure
        if failure is not None:
            log.error("Zarr %s: manifest %s is unusable: %s", what, url, failure)
            raise ManifestError(f"Zarr {what}: manifest {url}: {failure}") from failure
        log.info(
            "indexed manifest of %s: %d files, %d nodes in %.1f s",
            what,
            index.n_files,
            index.n_nodes,
            time.monotonic() - started,
        )
        self._schedule_sweep()
        return index

    def _schedule_sweep(self) -> None:
        """Keep the disk store within its budget after it grew (in the background, once at a time)."""
        if self._sweep_pending or self.service_nursery is None:
            return
        self._sweep_pending = True

        async def run() -> None:
            try:
                await trio.to_thread.run_sync(self.sweep, abandon_on_cancel=True)
            except OSError as e:
                log.warning("cannot sweep the manifest index store: %s", e)
            finally:
                self._sweep_pending = False

        self.service_nursery.start_soon(run)

    @staticmethod
    async def _report_progress(what: str, started: float) -> None:
        await trio.sleep(SLOW_CONVERSION)
        while True:
            log.info("still converting manifest of %s (%.0f s)", what, time.monotonic() - started)
            await trio.sleep(5)


def _touch(path: Path) -> None:
    # a read-only store, or a file removed by another process: only the eviction order suffers
    with contextlib.suppress(OSError):
        os.utime(path)
