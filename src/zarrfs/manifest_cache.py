"""Manifest fetching and caching: fetch once (single-flight), verify, convert, persist, bound memory.

Owns: where a Zarr's manifest is looked up (`<root>/<z[0:3]>/<z[3:6]>/<z>/<checksum>.json` under each
configured root in order), the on-disk cache of converted indexes (`<cache dir>/manifests/...arrow`,
immutable, keyed by Zarr id and checksum), and a size-weighted LRU of loaded indexes. Never knows about
paths inside the dandiset or FUSE; parsing and verification live in `manifest`.

Concurrency: at most one fetch/convert per (zarr id, checksum) at a time, however many tasks ask
(a `trio.Event` per key in flight); conversion runs in worker threads bounded by a CapacityLimiter.
A failed load is remembered for `FAILURE_TTL` seconds so a broken Zarr is not re-downloaded on every
probe, then retried.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import cachetools
import trio

from .dandi import AssetRecord
from .errors import DataError, IntegrityError, ManifestError, ObjectMissing, RemoteError
from .manifest import ManifestIndex, parse_manifest_file
from .remote import Remote

log = logging.getLogger(__name__)

#: Seconds a failed manifest load is remembered before it is tried again.
FAILURE_TTL = 30.0
#: Conversions slower than this get progress log lines.
SLOW_CONVERSION = 2.0
#: Temporary files older than this in the cache dir were left by a killed process: removed at start.
STALE_TEMP_AGE = 86400.0

_Key = tuple[str, str]


def manifest_url(root: str, zarr_id: str, checksum: str) -> str:
    """`<root>/<z[0:3]>/<z[3:6]>/<z>/<checksum>.json`."""
    return f"{root.rstrip('/')}/{zarr_id[:3]}/{zarr_id[3:6]}/{zarr_id}/{checksum}.json"


class ManifestCache:
    """Loaded manifest indexes by (zarr id, checksum): memory LRU, then disk, then the roots."""

    def __init__(
        self,
        remote: Remote,
        *,
        roots: Sequence[str],
        cache_dir: Path,
        memory_budget: int,
        cpu_limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        if not roots:
            raise ValueError("at least one manifest root is needed")
        self._remote = remote
        self._roots = tuple(roots)
        self._dir = cache_dir / "manifests"
        self._tmp = cache_dir / "tmp"
        self._loaded: cachetools.LRUCache[_Key, ManifestIndex] = cachetools.LRUCache(
            maxsize=max(memory_budget, 1), getsizeof=lambda index: max(index.nbytes, 1)
        )
        self._inflight: dict[_Key, trio.Event] = {}
        self._failures: dict[_Key, tuple[float, DataError]] = {}
        self._limiter = cpu_limiter or trio.CapacityLimiter(2)
        self.stats = {"memory_hits": 0, "disk_loads": 0, "fetches": 0}

    def sweep_stale_temp_files(self) -> int:
        """Remove temporary files a killed process left behind (old enough not to be in use by
        another mount sharing this cache dir). Synchronous; call before serving."""
        removed = 0
        now = time.time()
        candidates = [*self._tmp.glob("*"), *self._dir.glob("*/*/.*.tmp")]
        for path in candidates:
            try:
                if now - path.stat().st_mtime > STALE_TEMP_AGE:
                    path.unlink()
                    removed += 1
            except OSError:
                continue
        return removed

    def index_path(self, zarr_id: str, checksum: str) -> Path:
        return self._dir / zarr_id[:3] / zarr_id / f"{checksum}.arrow"

    @property
    def loaded_bytes(self) -> int:
        return int(self._loaded.currsize)

    async def get(self, asset: AssetRecord) -> ManifestIndex:
        """The verified index of `asset`'s pinned manifest. Raises DataError (EIO) when unavailable."""
        if not asset.zarr_id or not asset.zarr_checksum or asset.problem:
            raise DataError(f"Zarr asset {asset.path} cannot be served: {asset.problem}")
        key = (asset.zarr_id, asset.zarr_checksum)
        while True:
            index = self._loaded.get(key)
            if index is not None:
                self.stats["memory_hits"] += 1
                return index
            failed = self._failures.get(key)
            if failed is not None:
                if time.monotonic() - failed[0] < FAILURE_TTL:
                    # a fresh exception each time: re-raising one object grows its traceback
                    raise type(failed[1])(*failed[1].args)
                del self._failures[key]
            event = self._inflight.get(key)
            if event is None:
                break
            # then look again: loaded, failed, or (the loader was cancelled) ours to load
            await event.wait()
        event = self._inflight[key] = trio.Event()
        try:
            index = await self._load(asset)
        except OSError as e:  # the local cache dir (full, read-only, ...): EIO, never a crash
            error = ManifestError(f"Zarr asset {asset.path}: manifest cache {self._dir}: {e}")
            log.error("%s", error)
            self._failures[key] = (time.monotonic(), error)
            raise error from e
        except DataError as e:
            self._failures[key] = (time.monotonic(), e)
            raise
        finally:
            del self._inflight[key]
            event.set()
        try:
            self._loaded[key] = index
        except ValueError:
            log.warning(
                "manifest index of %s (%d bytes) exceeds the manifest memory budget; "
                "it is served from its memory map without being kept",
                asset.path,
                index.nbytes,
            )
        return index

    async def _load(self, asset: AssetRecord) -> ManifestIndex:
        zarr_id, checksum = asset.zarr_id or "", asset.zarr_checksum or ""
        path = self.index_path(zarr_id, checksum)
        if await trio.to_thread.run_sync(path.exists):
            try:
                index = await trio.to_thread.run_sync(
                    lambda: ManifestIndex.load(path, zarr_id=zarr_id, checksum=checksum),
                    limiter=self._limiter,
                )
                self.stats["disk_loads"] += 1
                return index
            except ManifestError as e:
                log.warning("discarding cached index %s: %s", path, e)
                await trio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
        return await self._fetch_and_convert(asset, path)

    async def _fetch_and_convert(self, asset: AssetRecord, path: Path) -> ManifestIndex:
        zarr_id, checksum = asset.zarr_id or "", asset.zarr_checksum or ""
        tried: list[str] = []
        rejected: DataError | None = None
        for root in self._roots:
            url = manifest_url(root, zarr_id, checksum)
            tmp = self._tmp / f"{zarr_id}-{checksum}-{uuid.uuid4().hex}.json"  # unique per host
            await trio.to_thread.run_sync(lambda: self._tmp.mkdir(parents=True, exist_ok=True))
            try:
                started = time.monotonic()
                size = await self._remote.download(url, tmp)
                self.stats["fetches"] += 1
                log.info(
                    "fetched manifest of %s (%d bytes) from %s in %.1f s",
                    asset.path,
                    size,
                    url,
                    time.monotonic() - started,
                )
                return await self._convert(asset, url, tmp, path)
            except ObjectMissing:
                tried.append(f"{url}: not found")
            except (IntegrityError, ManifestError) as e:
                tried.append(f"{url}: rejected")  # logged by _convert; another root may be intact
                rejected = rejected or e
            except RemoteError as e:
                tried.append(f"{url}: {e}")
                log.warning("manifest of %s: %s: %s", asset.path, url, e)
            finally:
                tmp.unlink(missing_ok=True)  # synchronous: must happen even when cancelled
        if rejected is not None:
            raise rejected
        message = (
            f"Zarr asset {asset.path} (zarr {zarr_id}, checksum {checksum}): no manifest found ("
            + "; ".join(tried)
            + ")"
        )
        log.error("%s", message)
        raise ManifestError(message)

    async def _convert(self, asset: AssetRecord, url: str, src: Path, dest: Path) -> ManifestIndex:
        zarr_id, checksum = asset.zarr_id or "", asset.zarr_checksum or ""
        started = time.monotonic()

        def convert() -> ManifestIndex:
            built = parse_manifest_file(src, zarr_id=zarr_id, expected_checksum=checksum)
            try:
                built.write(dest)
            except OSError as e:  # the disk cache is an optimisation: serve from memory
                log.warning("cannot keep the index of %s in %s: %s", asset.path, dest, e)
                return built
            del built  # drop the heap columns; serve from the memory map instead
            return ManifestIndex.load(dest, zarr_id=zarr_id, checksum=checksum)

        failure: Exception | None = None
        async with trio.open_nursery() as nursery:  # only for the progress reporter
            nursery.start_soon(self._report_progress, asset.path, started)
            try:
                index = await trio.to_thread.run_sync(convert, limiter=self._limiter)
            except Exception as e:  # re-raised unchanged below, outside the nursery (no group)
                failure = e
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None and not isinstance(failure, ManifestError | IntegrityError):
            raise failure
        if isinstance(failure, IntegrityError):
            log.error(
                "Zarr asset %s (zarr %s): manifest %s does not match the published checksum "
                "%s: %s; refusing to serve this Zarr",
                asset.path,
                zarr_id,
                url,
                checksum,
                failure,
            )
            raise IntegrityError(
                f"Zarr asset {asset.path}: manifest {url} fails verification: {failure}"
            ) from failure
        if failure is not None:
            log.error("Zarr asset %s: manifest %s is unusable: %s", asset.path, url, failure)
            raise ManifestError(f"Zarr asset {asset.path}: manifest {url}: {failure}") from failure
        log.info(
            "indexed manifest of %s: %d files, %d nodes in %.1f s",
            asset.path,
            index.n_files,
            index.n_nodes,
            time.monotonic() - started,
        )
        return index

    @staticmethod
    async def _report_progress(what: str, started: float) -> None:
        await trio.sleep(SLOW_CONVERSION)
        while True:
            log.info("still converting manifest of %s (%.0f s)", what, time.monotonic() - started)
            await trio.sleep(5)
