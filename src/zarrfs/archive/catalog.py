"""The archive's lists, fetched when a path needs them and kept for a bounded time.

Owns: the questions the archive's levels ask (which dandisets exist, which versions a dandiset has
published, which Zarr ids and checksums the manifest roots hold, a Zarr's current checksum), each
answered once however many requests ask at the same time (single flight) and remembered for a
documented lifetime, and the resolution of one dandiset version (`archive.resolver.resolve`).

Lifetimes (`config`): the list of dandisets `DANDISET_LIST_TTL`; a dandiset's published versions
(hence `latest`) and its existence `VERSION_LIST_TTL`; listings of the manifest roots `ZARR_LIST_TTL`;
a Zarr's current checksum `ZARR_CHECKSUM_TTL`. A failed query is remembered for `FAILED_LIST_TTL`
so that a dead API is not asked again by every lookup. A resolved published version never changes,
so it is cached (by the caller's LRU) without a lifetime.

Never does: FUSE, inode numbers, or decide what a name means (see `archive.levels`). Which source answers
what: the dandiset list pages through the API (falling back to the bucket's `dandisets/` prefixes),
existence and published versions come from the bucket (an unreachable API only breaks `draft`), the
zarrs/ levels are best-effort listings of the manifest roots. A resolved published version is kept
in the cache dir (it never changes), so mounting it again needs no request at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import cachetools

from zarrfs import config
from zarrfs.archive.levels import ZARR_SUFFIX, Level, NodeKey
from zarrfs.archive.resolver import (
    ResolvedVersion,
    dandiset_exists,
    list_dandisets,
    list_published_versions,
    resolve,
    resolved_from_json,
    resolved_to_json,
    zarr_current_checksum,
)
from zarrfs.archive.sources import PUBLISHED_VERSION_RE
from zarrfs.base.flight import SingleFlight
from zarrfs.config import Source
from zarrfs.errors import DataError, ObjectMissing, RemoteError, VersionNotFound, copy_error
from zarrfs.io.cache_dir import CacheLayout, read_checked_json, write_checked_json
from zarrfs.io.disk_gate import DiskGate
from zarrfs.io.remote import Remote
from zarrfs.manifests.checksums import is_checksum

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Memo(Generic[T]):
    """Answers by key, each fetched once at a time (`SingleFlight`) and kept for `ttl` seconds (or
    for what `ttl(answer)` says: a partial answer is kept briefly); a failure for `error_ttl` (short:
    an outage must not be remembered as an answer); at most `maxsize` answers are kept (the least
    recently used are dropped first)."""

    def __init__(
        self,
        what: str,
        ttl: float | Callable[[T], float],
        error_ttl: float,
        maxsize: int = 100_000,
    ) -> None:
        self.ttl = ttl
        self.error_ttl = error_ttl
        self._kept: cachetools.LRUCache[Hashable, tuple[float, T | None, Exception | None]] = (
            cachetools.LRUCache(maxsize=maxsize)
        )
        self._flights: SingleFlight[Hashable, T] = SingleFlight(what)

    def peek(self, key: Hashable) -> T | None:
        kept = self._kept.get(key)
        if kept is None or kept[0] < time.monotonic() or kept[2] is not None:
            return None
        return kept[1]

    async def get(self, key: Hashable, fetch: Callable[[], Awaitable[T]]) -> T:
        kept = self._kept.get(key)
        if kept is not None and kept[0] >= time.monotonic():
            if kept[2] is not None:
                raise copy_error(kept[2]) from None
            return kept[1]  # type: ignore[return-value]

        async def produce() -> T:
            try:
                value = await fetch()
            except (DataError, VersionNotFound) as e:
                self._kept[key] = (time.monotonic() + self.error_ttl, None, e)
                raise
            ttl = self.ttl(value) if callable(self.ttl) else self.ttl
            self._kept[key] = (time.monotonic() + ttl, value, None)
            return value

        return await self._flights.run(key, produce)


@dataclass(frozen=True, slots=True)
class Listing:
    """Names at a zarrs/ level, and whether every manifest root could be listed (else the names
    are those of the roots that could, kept only briefly)."""

    names: tuple[str, ...]
    complete: bool


class Catalog:
    """What the archive holds, asked lazily and remembered for a bounded time."""

    def __init__(
        self,
        remote: Remote,
        *,
        bucket: str,
        api_url: str,
        manifest_roots: Sequence[str],
        cache_dir: Path | None = None,
        gate: DiskGate | None = None,
    ) -> None:
        self.remote = remote
        self.cache_dir = cache_dir
        self.gate = gate or (DiskGate(cache_dir) if cache_dir is not None else None)
        self.bucket = bucket
        self.api_url = api_url
        self.manifest_roots = tuple(manifest_roots)
        error_ttl = config.FAILED_LIST_TTL
        self._dandisets: _Memo[list[str]] = _Memo(
            "the list of dandisets", config.DANDISET_LIST_TTL, error_ttl, 1
        )
        self._exists: _Memo[bool] = _Memo("a dandiset", config.VERSION_LIST_TTL, error_ttl)
        self._versions: _Memo[list[str]] = _Memo(
            "the versions of a dandiset", config.VERSION_LIST_TTL, error_ttl
        )
        self._zarr_names: _Memo[Listing] = _Memo(
            "a zarrs/ listing",
            lambda listing: config.ZARR_LIST_TTL if listing.complete else error_ttl,
            error_ttl,
        )
        self._zarr_exists: _Memo[bool] = _Memo("a Zarr id", config.ZARR_LIST_TTL, error_ttl)
        self._checksums: _Memo[str | None] = _Memo(
            "the current checksum of a Zarr", config.ZARR_CHECKSUM_TTL, error_ttl
        )

    async def dandisets(self) -> list[str]:
        return await self._dandisets.get("all", lambda: list_dandisets(self.remote, self.api_url))

    async def dandiset_exists(self, dandiset_id: str) -> bool:
        listed = self._dandisets.peek("all")
        if listed is not None and dandiset_id in listed:
            return True
        return await self._exists.get(
            dandiset_id, lambda: dandiset_exists(dandiset_id, self.remote)
        )

    async def published_versions(self, dandiset_id: str) -> list[str]:
        return await self._versions.get(
            dandiset_id, lambda: list_published_versions(dandiset_id, self.remote)
        )

    async def current_checksum(self, zarr_id: str) -> str | None:
        """The Zarr's live checksum per the API; None when the API knows no such Zarr or it is not
        finalized (then no manifest is built from the bucket for it). RemoteError (EIO) when the
        API cannot be asked: an outage is never taken for "no such Zarr"."""

        async def fetch() -> str | None:
            try:
                return await zarr_current_checksum(zarr_id, self.remote, self.api_url)
            except VersionNotFound:  # the API answered 404
                return None

        return await self._checksums.get(zarr_id, fetch)

    async def is_live(self, zarr_id: str, checksum: str) -> bool:
        """Whether `checksum` is the Zarr's current one (asked of the API; RemoteError when it
        cannot be asked)."""
        return await self.current_checksum(zarr_id) == checksum

    async def resolve(self, source: Source) -> ResolvedVersion:
        """One version, pinned. A published version never changes, so with a cache dir it is
        kept there (`versions/<bucket>/<id>/<version>.json`, checked on read, through the disk
        gate: a stalled cache dir only means it is resolved from the bucket) and a later mount
        resolves it without a request."""
        if source.version == "latest":
            versions = await self.published_versions(source.dandiset_id)
            if not versions:
                raise VersionNotFound(f"dandiset {source.dandiset_id} has no published version")
            source = Source(source.dandiset_id, versions[-1])
        path = self.stored_path(source)
        if path is not None and self.gate is not None:
            try:
                doc = await self.gate.run(read_checked_json, path)
                if doc is not None:
                    return resolved_from_json(doc)
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("ignoring the stored version %s: %s", path, e)
        resolved = await resolve(source, self.remote, bucket=self.bucket, api_url=self.api_url)
        if path is not None and self.gate is not None and resolved.published:
            try:
                doc = resolved_to_json(resolved)
                await self.gate.run(write_checked_json, path, doc)
            except OSError as e:
                log.warning("cannot keep the resolved version in %s: %s", path, e)
        return resolved

    def stored_path(self, source: Source) -> Path | None:
        """Where a resolved published version is kept (None: not kept: a draft, no cache dir)."""
        if self.cache_dir is None or not PUBLISHED_VERSION_RE.match(source.version):
            return None
        root = CacheLayout(self.cache_dir).versions
        return root / self.bucket / source.dandiset_id / f"{source.version}.json"

    # --- the zarrs/ levels: best effort -------------------------------------------------------------

    async def zarr_names(self, key: NodeKey) -> list[str]:
        """Names at a zarrs/ level, from the manifest roots' listings (the union; when some roots
        cannot be listed, the others' names, kept only briefly). Only a best effort: lookups by
        exact name never need it. RemoteError when no root can be listed."""
        listing = await self._zarr_names.get(key, lambda: self._list_zarr_level(key))
        return list(listing.names)

    async def _list_zarr_level(self, key: NodeKey) -> Listing:
        relative = _root_relative_dir(key)
        names: set[str] = set()
        failures: list[str] = []
        for root in self.manifest_roots:
            url = f"{root.rstrip('/')}/{relative}"
            try:
                entries = await self.remote.list_dir(url)
            except ObjectMissing:
                continue  # that root has nothing there: an answer
            except RemoteError as e:
                log.debug("cannot list %s: %s", url, e)
                failures.append(f"{url}: {e}")
                continue
            names.update(n for n in (_zarr_name(key, entry) for entry in entries) if n)
        if failures and len(failures) == len(self.manifest_roots):
            raise RemoteError("no manifest root could be listed: " + "; ".join(failures))
        return Listing(tuple(sorted(names)), complete=not failures)

    async def zarr_exists(self, zarr_id: str) -> bool:
        """Whether the archive knows Zarr `zarr_id`: some manifest root has a directory for it, or
        the API reports it (a draft Zarr none of whose states has a manifest yet). RemoteError
        when neither could answer: never "no such Zarr" for an outage."""
        return await self._zarr_exists.get(zarr_id, lambda: self._find_zarr(zarr_id))

    async def _find_zarr(self, zarr_id: str) -> bool:
        relative = f"{zarr_id[:3]}/{zarr_id[3:6]}/{zarr_id}/"
        failures: list[str] = []
        for root in self.manifest_roots:
            url = f"{root.rstrip('/')}/{relative}"
            try:
                if await self.remote.list_dir(url, limit=1):
                    return True
            except ObjectMissing:
                continue
            except RemoteError as e:
                failures.append(f"{url}: {e}")
        try:
            if await self.current_checksum(zarr_id) is not None:
                return True
        except RemoteError as e:
            failures.append(f"API: {e}")
        if failures:
            raise RemoteError(f"cannot tell whether zarr {zarr_id} exists: " + "; ".join(failures))
        return False


def _root_relative_dir(key: NodeKey) -> str:
    z = key.zarr
    if key.level == Level.ZARRS:
        return ""
    if key.level == Level.ZARRS_PREFIX:
        return f"{z}/"
    if key.level == Level.ZARRS_IDS:
        return f"{z[:3]}/{z[3:6]}/"
    if key.level == Level.ZARR_CHECKSUMS:
        return f"{z[:3]}/{z[3:6]}/{z}/"
    raise ValueError(f"{key} is not a zarrs/ level")


def _zarr_name(key: NodeKey, entry: str) -> str | None:
    """The name a root's directory entry shows as at this level (None: not one of ours)."""
    from zarrfs.archive.levels import child_key

    if key.level == Level.ZARR_CHECKSUMS:
        checksum = entry.removesuffix(".json")
        name = checksum + ZARR_SUFFIX
        return name if entry.endswith(".json") and is_checksum(checksum) else None
    name = entry.rstrip("/")
    return name if entry.endswith("/") and child_key(key, name) is not None else None
