"""The filesystem's domain operations: lookup, getattr, readdir, readlink, open, read, statfs.

Owns: what one mount shows (`MountSource`: the whole archive, one dandiset's versions, one version,
or one directory of a version), routing every inode either to a synthetic level of the archive
(`archive` says what can exist, `catalog` what does) or to a *volume* (one resolved version, or one
Zarr at one checksum, served by its `tree.Namespace` and the manifest cache), resolving volumes when
first entered and keeping them in a byte-bounded LRU (`version_memory`; an evicted volume resolves
again into the same inode numbers, see `inodes`; a draft stays pinned to what it was first resolved
to: its asset list is kept on disk for that), and the log line naming the object whenever a read
fails. Works in domain types and raises typed `ZarrfsError`s; knows nothing of pyfuse3, so it is
tested by awaiting it directly. Never parses, never retries, never decides cache policy.

Every operation answers within `config.READ_DEADLINE` or fails with EIO (a lookup never waits
without bound on a manifest, an asset list or the API); an unreachable remote is EIO, never "does not
exist". What this module keeps grows only with what exists: names are given inodes only once the
archive says they exist (the `zarrs/` hex levels have inode numbers derived from their names, and no
node object at all).

Concurrency: all state is touched from tasks of one trio run. Each volume is resolved once however
many requests need it (`flight.SingleFlight`); a requester that gives up does not cancel a resolution
others wait for (it runs in `service_nursery` when set), and a bug in one fails only the requests
waiting on it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import cachetools
import trio

from zarrfs import config
from zarrfs.archive import levels
from zarrfs.archive.assets import AssetRecord
from zarrfs.archive.catalog import Catalog
from zarrfs.archive.levels import Level, NodeKey
from zarrfs.archive.resolver import ResolvedVersion, resolved_from_json, resolved_to_json
from zarrfs.base.flight import BoundedLRU, SingleFlight
from zarrfs.base.histogram import LatencyHistogram
from zarrfs.base.refs import ObjectRef
from zarrfs.base.resources import Budget, DescriptorGauge
from zarrfs.config import MountSource, Source
from zarrfs.errors import (
    DataError,
    IsADirectory,
    ManifestMissing,
    NotADirectory,
    NotFound,
    RemoteError,
    SourceError,
    VersionNotFound,
    is_transient,
    report_bug,
)
from zarrfs.fs.inodes import InodeSpace, Volume
from zarrfs.fs.namespace import ROOT_INO, Entry, FileSource, InlineFile, Namespace
from zarrfs.io.cache_dir import CacheLayout, read_checked_json, write_checked_json
from zarrfs.io.disk_gate import DiskGate
from zarrfs.io.scheduler import Priority
from zarrfs.io.stack import ObjectReader, ReadStack
from zarrfs.manifest_cache import Live, ManifestCache, pins_dir_name
from zarrfs.manifests.checksums import parse_checksum
from zarrfs.s3_reader import S3Reader

if TYPE_CHECKING:  # the manifest machinery is imported when a Zarr is first entered
    from zarrfs.manifests.index import ManifestIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OpenFile:
    """An open file: where its bytes come from, a name for log lines, and the stack's reader of
    its object (with its sequential prefetch; None for a file held in memory)."""

    ino: int
    source: FileSource
    path: str
    reader: ObjectReader | None = None


@dataclass(frozen=True, slots=True)
class OpenDir:
    """An open directory. A level that can change is listed once, when opened (`snapshot`), so
    offsets stay consistent while it is read; only an immutable directory may be cached by the
    kernel (`cacheable`)."""

    ino: int
    cacheable: bool
    snapshot: tuple[tuple[bytes, Entry], ...] | None = None


@dataclass(frozen=True, slots=True)
class FsStats:
    """What statfs reports."""

    total_bytes: int
    files: int


@dataclass(frozen=True, slots=True)
class _Synthetic:
    """A directory (or `latest` link) of the archive's levels (internal)."""

    ino: int
    key: NodeKey
    path: str  # from the mount's root, for log lines


#: The `zarrs/` hex levels of an archive mount: `zarrs/<z[0:3]>` and `zarrs/<z[0:3]>/<z[3:6]>`;
#: their inode numbers are derived from the hex digits, from one block reserved at start.
_HEX3 = 1 << 12
_HEX_BLOCK = _HEX3 + (1 << 24)


class Filesystem:
    """What one mount shows, as async domain operations."""

    def __init__(
        self,
        source: MountSource,
        catalog: Catalog,
        manifests: ManifestCache,
        stack: ReadStack,
        reader: S3Reader,
        *,
        cache_dir: Path | None = None,
        version_memory: int = config.DEFAULT_VERSION_MEMORY,
        consolidate: bool = False,
        gate: DiskGate | None = None,
    ) -> None:
        self.source = source
        self.catalog = catalog
        self.manifests = manifests
        self.stack = stack
        self.reader = reader
        self.bucket = reader.bucket
        self.inodes = InodeSpace()
        #: A read (any operation) fails with EIO rather than take longer than this.
        self.read_deadline = config.READ_DEADLINE
        self._started_ns = time.time_ns()
        #: The mounted version holds Zarrs (known after `start`; False for the archive levels).
        self.holds_zarrs = False
        self._synthetic: dict[int, _Synthetic] = {}
        self._by_key: dict[NodeKey, int] = {}
        self._hex_base = 0  # first inode of the zarrs/ hex levels (archive mounts)
        self._volumes: dict[int, Volume] = {}  # by volume id
        self._volume_keys: dict[int, NodeKey] = {}
        self._volume_paths: dict[int, str] = {}
        self._loaded: BoundedLRU[int, Namespace] = BoundedLRU(
            version_memory, lambda ns: ns.approx_bytes
        )
        self._kept: dict[int, Namespace] = {}  # never evicted: a version mount's, unpinnable drafts
        self._resolutions: SingleFlight[int, Namespace] = SingleFlight("version resolution")
        self.gate = gate or (DiskGate(cache_dir) if cache_dir is not None else None)
        self._pins: Path | None = None
        if cache_dir is not None:
            name = pins_dir_name(os.getpid(), uuid.uuid4().hex[:8])
            self._pins = CacheLayout(cache_dir).tmp / name
        self._root_alias: int | None = None
        self._reported: set[str] = set()
        #: Zarrs (id, checksum) entered: their metadata was prefetched.
        self._entered: cachetools.LRUCache[tuple[str, str], bool] = cachetools.LRUCache(
            maxsize=config.FAILURES_REMEMBERED
        )
        #: `--consolidate`: the `.zmetadata` built for each Zarr (id, checksum) that needs one (b""
        #: for those that need none or whose metadata cannot be had for good); rebuilt when dropped.
        self._consolidated: BoundedLRU[tuple[str, str], bytes] = BoundedLRU(
            config.CONSOLIDATED_MEMORY, len
        )
        self._consolidating: SingleFlight[tuple[str, str], bytes] = SingleFlight(
            "consolidation of Zarr metadata"
        )
        #: Reads served (count, bytes, errors) and their latency, for `zarrfs stats`.
        self.read_stats = {"count": 0, "bytes": 0, "errors": 0}
        self.read_latency = LatencyHistogram()
        #: Serve a synthesized `.zmetadata` in format 2 Zarrs without one (`--consolidate`).
        self.consolidate = consolidate
        #: The process's descriptors (sampled by the core) and the memory budget of its parts.
        self.descriptors = DescriptorGauge()
        self.budget = Budget(
            block_cache=stack.blocks.max_bytes,
            manifests=manifests.memory_budget,
            versions=version_memory,
        )

    @property
    def service_nursery(self) -> trio.Nursery | None:
        """Where resolutions and background work run (so a requester giving up cancels nothing
        others need); None: in the requester's task."""
        return self._resolutions.nursery

    @service_nursery.setter
    def service_nursery(self, nursery: trio.Nursery | None) -> None:
        self._resolutions.nursery = nursery

    # --- setting up -------------------------------------------------------------------------------

    async def start(self) -> str:
        """Lay out the mount's root. A version (and a path in it) is resolved now, so that a
        missing version or path fails the mount (VersionNotFound) instead of mounting an error.
        Returns a description for the log."""
        source = self.source
        if source.kind == "archive":
            self._add_synthetic(ROOT_INO, levels.ARCHIVE, "")
            self._hex_base = self.inodes.new_block(_HEX_BLOCK)
            return "the whole archive"
        assert source.dandiset_id is not None
        if source.kind == "dandiset":
            if not await self.catalog.dandiset_exists(source.dandiset_id):
                raise VersionNotFound(f"dandiset {source.dandiset_id} not found in the bucket")
            key = NodeKey(Level.DANDISET_VERSIONS, source.dandiset_id)
            self._add_synthetic(ROOT_INO, key, "")
            return f"every version of dandiset {source.dandiset_id}"
        resolved = await self.catalog.resolve(source.version_source())
        version = resolved.source.version
        key = NodeKey(Level.VERSION, source.dandiset_id, version)
        root = ROOT_INO if not source.path else self.inodes.new_synthetic()
        volume = self._add_volume(root, key, "")
        namespace = self._namespace_of(resolved)
        self._settle(volume, namespace, keep=True)
        self._report_unservable(resolved)
        self.holds_zarrs = bool(namespace.zarr_assets())
        if source.path:
            try:
                target = await self.walk(source.path, start=root)
            except (NotFound, NotADirectory):
                raise VersionNotFound(f"no directory {source.path} in {resolved.source}") from None
            if not (await self.getattr(target)).is_dir:
                raise SourceError(
                    f"{source.path} in {resolved.source} is a file: mount its directory instead"
                )
            self._root_alias = target
        return f"{resolved.source} ({len(resolved.assets)} assets)"

    async def walk(self, path: str, *, start: int = ROOT_INO) -> int:
        """The inode of a `/`-separated path below `start` (NotFound, NotADirectory otherwise)."""
        ino = start
        for part in filter(None, path.split("/")):
            ino = (await self.lookup(ino, part.encode())).ino
        return ino

    # --- domain operations ------------------------------------------------------------------------

    @contextmanager
    def _bounded(self, what: str) -> Iterator[None]:
        """Fail with EIO (RemoteError) rather than take longer than `read_deadline`: a lookup
        must not wait without bound on a manifest root, the API or a slot."""
        try:
            with trio.fail_after(self.read_deadline):
                yield
        except trio.TooSlowError:
            raise RemoteError(f"{what}: no answer within {self.read_deadline:g} s") from None

    async def getattr(self, ino: int) -> Entry:
        with self._bounded(f"getattr of inode {ino}"):
            ino = self._in(ino)
            node = self._node(ino)
            if node is not None:
                return self._out(await self._synthetic_entry(node))
            volume, local = self._volume(ino)
            namespace = await self._namespace(volume)
            index = await self._index(namespace, local, volume, inside_only=True)
            return self._out(self._globalize(volume, namespace.getattr(local, index)))

    async def lookup(self, parent: int, name: bytes) -> Entry:
        with self._bounded(f"lookup of {name!r:.80} in inode {parent}"):
            parent = self._in(parent)
            node = self._node(parent)
            if node is not None:
                return self._out(await self._synthetic_lookup(node, name))
            volume, local = self._volume(parent)
            namespace = await self._namespace(volume)
            index = await self._index(namespace, local, volume, inside_only=False)
            return self._out(self._globalize(volume, namespace.lookup(local, name, index)))

    async def opendir(self, ino: int) -> OpenDir:
        with self._bounded(f"opendir of inode {ino}"):
            ino = self._in(ino)
            node = self._node(ino)
            if node is not None:
                if node.key.level == Level.LATEST:
                    raise NotADirectory(f"{node.path} is a symbolic link")
                listing = await self._synthetic_listing(node)
                return OpenDir(ino, cacheable=False, snapshot=tuple(listing))
            volume, local = self._volume(ino)
            namespace = await self._namespace(volume)
            index = await self._index(namespace, local, volume, inside_only=False)
            namespace.check_dir(local, index)
            return OpenDir(ino, cacheable=True)

    async def readdir(self, handle: OpenDir, offset: int) -> Iterator[tuple[bytes, Entry, int]]:
        """Entries of an open directory from `offset` (a value a previous entry returned, or 0)."""
        if handle.snapshot is not None:
            entries = handle.snapshot
            return (
                (name, self._out(entry), i + 1)
                for i, (name, entry) in enumerate(entries)
                if i >= offset
            )
        with self._bounded(f"readdir of inode {handle.ino}"):
            volume, local = self._volume(handle.ino)
            namespace = await self._namespace(volume)
            index = await self._index(namespace, local, volume, inside_only=False)
        return (
            (name, self._out(self._globalize(volume, entry)), next_offset)
            for name, entry, next_offset in namespace.readdir(local, offset, index)
        )

    async def readlink(self, ino: int) -> bytes:
        with self._bounded(f"readlink of inode {ino}"):
            node = self._node(self._in(ino))
            if node is None or node.key.level != Level.LATEST:
                raise NotFound(f"inode {ino} is not a symbolic link")
            entry = await self._synthetic_entry(node)
            assert entry.link is not None
            return entry.link

    async def open(self, ino: int) -> OpenFile:
        with self._bounded(f"open of inode {ino}"):
            ino = self._in(ino)
            if self._node(ino) is not None:
                raise IsADirectory(f"inode {ino} is a directory")
            volume, local = self._volume(ino)
            namespace = await self._namespace(volume)
            index = await self._index(namespace, local, volume, inside_only=True)
        where = self._describe(volume, namespace, local, index)
        try:
            source = namespace.file_source(local, index)
        except DataError as e:
            log.error("cannot open %s: %s", where, e)
            raise
        reader = self.stack.open(source) if isinstance(source, ObjectRef) else None
        return OpenFile(ino, source, where, reader)

    async def release(self, handle: OpenFile) -> None:
        """The file was closed by every process that had it open: its prefetch stops."""
        if handle.reader is not None:
            handle.reader.close()

    async def read(self, handle: OpenFile, offset: int, size: int) -> bytes:
        source, reader = handle.source, handle.reader
        if isinstance(source, InlineFile):
            return source.data[offset : offset + size]
        assert reader is not None  # every object file is opened with one
        started = time.monotonic()
        try:
            with trio.fail_after(self.read_deadline):
                data = await reader.read(offset, size)
            self.read_latency.observe(time.monotonic() - started)
            self.read_stats["count"] += 1
            self.read_stats["bytes"] += len(data)
            return data
        except (DataError, trio.TooSlowError) as exc:
            error = (
                exc
                if isinstance(exc, DataError)
                else RemoteError(f"no answer within {self.read_deadline:g} s")
            )
            self.read_stats["errors"] += 1
            log.error(
                "read of %s failed (%s, %d bytes at %d): %s",
                handle.path,
                describe_object(self.bucket, source),
                size,
                offset,
                error,
            )
            if error is exc:
                raise
            raise error from None

    def version_namespace(self) -> Namespace | None:
        """The namespace of the one version a version mount shows (None for the archive and
        dandiset mounts, which show many)."""
        if self.source.kind != "version":
            return None
        return next(iter(self._kept.values()), None)

    async def provenance(self, ino: int) -> dict[str, str]:
        """What `ino` is a copy of, as `user.zarrfs.<name>` attributes show it (without the
        prefix): `version` (a version's root), `zarr_id` and `zarr_checksum` (a Zarr's root),
        `asset_id`, and for files `s3_url`, `version_id` and `etag`."""
        ino = self._in(ino)
        out: dict[str, str] = {}
        if self._node(ino) is not None:
            return out
        volume, local = self._volume(ino)
        key = self._volume_keys[volume.id]
        namespace = await self._namespace(volume)
        if local == ROOT_INO and key.level == Level.VERSION:
            out["version"] = str(namespace.resolved.source)
        asset = namespace.asset_of(local)
        if asset is not None and asset.asset_id:
            out["asset_id"] = asset.asset_id
        if namespace.is_zarr_root(local) and asset is not None:
            out["zarr_id"] = asset.zarr_id or ""
            out["zarr_checksum"] = asset.zarr_checksum or ""
        entry = await self.getattr(ino)
        if entry.is_dir:
            return out
        index = await self._index(namespace, local, volume, inside_only=True)
        source = namespace.file_source(local, index)
        if isinstance(source, ObjectRef):
            out["s3_url"] = describe_object(self.bucket, source)
            if source.version_id is not None:
                out["version_id"] = source.version_id
            if source.etag is not None:
                out["etag"] = source.etag
        elif key.level == Level.VERSION:  # dandiset.yaml: the current object of its key
            resolved = namespace.resolved.source
            out["s3_url"] = (
                f"s3://{self.bucket}/dandisets/{resolved.dandiset_id}/{resolved.version}/"
                "dandiset.yaml"
            )
        return out

    def statfs(self) -> FsStats:
        namespaces = [*self._kept.values(), *self._loaded.values()]
        return FsStats(
            total_bytes=sum(ns.total_size for ns in namespaces),
            files=sum(ns.n_assets for ns in namespaces),
        )

    @property
    def consolidated_bytes(self) -> int:
        return self._consolidated.weight

    @property
    def versions_bytes(self) -> int:
        """Approximate memory of the resolved versions kept (for `zarrfs stats`)."""
        return self._loaded.weight + sum(ns.approx_bytes for ns in self._kept.values())

    # --- inode plumbing -----------------------------------------------------------------------------

    def _in(self, ino: int) -> int:
        """A kernel inode as this filesystem numbers it (the root of a path mount is an alias)."""
        return self._root_alias if ino == ROOT_INO and self._root_alias is not None else ino

    def _out(self, entry: Entry) -> Entry:
        if self._root_alias is not None and entry.ino == self._root_alias:
            return Entry(ROOT_INO, entry.is_dir, entry.size, entry.mtime_ns, entry.ttl, entry.link)
        return entry

    def _volume(self, ino: int) -> tuple[Volume, int]:
        volume = self.inodes.volume_of(ino)
        if volume is None:
            raise NotFound(f"no inode {ino}")
        if not volume.reserved and ino != volume.root_ino:
            raise NotFound(f"no inode {ino}")
        return volume, self.inodes.to_local(volume, ino)

    def _globalize(self, volume: Volume, entry: Entry) -> Entry:
        ino = self.inodes.to_global(volume, entry.ino)
        return Entry(ino, entry.is_dir, entry.size, entry.mtime_ns, entry.ttl, entry.link)

    # --- volumes ----------------------------------------------------------------------------------

    def _add_volume(self, root_ino: int, key: NodeKey, path: str) -> Volume:
        volume = self.inodes.new_volume(root_ino)
        self._volumes[volume.id] = volume
        self._volume_keys[volume.id] = key
        self._volume_paths[volume.id] = path
        return volume

    def _namespace_of(self, resolved: ResolvedVersion) -> Namespace:
        return Namespace(resolved, bucket=self.bucket)

    def _settle(self, volume: Volume, namespace: Namespace, *, keep: bool = False) -> None:
        self.inodes.reserve(volume, namespace.n_plain, namespace.n_slots)
        if keep:
            self._kept[volume.id] = namespace
        else:
            self._loaded.put(volume.id, namespace)

    def _cached(self, volume: Volume) -> Namespace | None:
        return self._kept.get(volume.id) or self._loaded.get(volume.id)

    async def _namespace(self, volume: Volume) -> Namespace:
        namespace = self._cached(volume)
        if namespace is not None:
            return namespace
        return await self._resolutions.run(volume.id, partial(self._run_resolution, volume))

    async def _run_resolution(self, volume: Volume) -> Namespace:
        try:
            namespace = await self._resolve_volume(volume)
        except VersionNotFound as e:  # it existed when it was looked up: EIO now
            raise DataError(str(e)) from None
        self._settle(volume, namespace)
        return namespace

    async def _resolve_volume(self, volume: Volume) -> Namespace:
        key = self._volume_keys[volume.id]
        path = self._volume_paths[volume.id]
        if key.level == Level.ZARR:
            _count, size = parse_checksum(key.checksum)
            asset = AssetRecord(
                asset_id="",
                path=path,
                size=size,
                mtime_ns=0,
                zarr_id=key.zarr,
                zarr_checksum=key.checksum,
            )
            return Namespace.for_zarr(asset, bucket=self.bucket, source=Source("", ""))
        source = Source(key.dandiset_id, key.version)
        pinned = await self._load_pin(volume)
        if pinned is not None:
            return self._namespace_of(pinned)
        resolved = await self.catalog.resolve(source)
        self._report_unservable(resolved)
        if key.version == "draft":
            await self._save_pin(volume, resolved)
        log.info("entered %s: %d assets", path or resolved.source, len(resolved.assets))
        return self._namespace_of(resolved)

    def _report_unservable(self, resolved: ResolvedVersion) -> None:
        for asset in resolved.assets:
            if asset.problem:
                log.warning(
                    "asset %s of %s is listed but cannot be served (EIO): %s",
                    asset.path,
                    resolved.source,
                    asset.problem,
                )

    # draft pins: what a draft resolved to the first time, so that a re-resolution after eviction
    # gives the same tree (the draft may have changed meanwhile). Kept under the cache dir's tmp/
    # in a directory named for this host and process, whose lease (mtime) `renew_pins` renews;
    # sweeps remove those of mounts that are gone.

    async def _save_pin(self, volume: Volume, resolved: ResolvedVersion) -> None:
        if self._pins is None or self.gate is None:
            self._kept[volume.id] = self._namespace_of(resolved)  # no cache dir: keep it in memory
            return
        path = self._pins / f"{volume.id}.json"
        try:
            await self.gate.run(write_checked_json, path, resolved_to_json(resolved))
        except OSError as e:
            log.warning("cannot keep the pin of %s on disk (%s): keeping it in memory", path, e)
            self._kept[volume.id] = self._namespace_of(resolved)

    async def _load_pin(self, volume: Volume) -> ResolvedVersion | None:
        if self._pins is None or self.gate is None:
            return None
        path = self._pins / f"{volume.id}.json"
        try:
            doc = await self.gate.run(read_checked_json, path)
            return None if doc is None else resolved_from_json(doc)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"the pinned draft {path} cannot be read: {e}") from e

    async def renew_pins(self) -> None:
        """Renew the lease of this mount's pins directory (its mtime), so that no sweep removes
        it while the mount runs."""
        if self._pins is None or self.gate is None:
            return
        with suppress(OSError):
            await self.gate.run(_touch_if_exists, self._pins)

    async def remove_pins(self) -> None:
        """Delete this mount's pin files (at unmount), through the gate (a stalled cache dir is
        left for a later sweep)."""
        if self._pins is None or self.gate is None:
            return
        with suppress(OSError):
            await self.gate.run(shutil.rmtree, self._pins, True)

    # --- inside a volume: the manifest index a question needs -----------------------------------

    async def _index(
        self, namespace: Namespace, local: int, volume: Volume, *, inside_only: bool
    ) -> ManifestIndex | None:
        try:
            asset = namespace.zarr_of(local, inside_only=inside_only)
        except DataError as e:  # an asset that cannot be served at all: say why, once
            message = str(e)
            if message not in self._reported:
                self._reported.add(message)
                log.error("%s", message)
            raise
        if asset is None:
            return None
        assert asset.zarr_id is not None and asset.zarr_checksum is not None
        live: Live = asset.live
        if not live and self._volume_keys[volume.id].level == Level.ZARR:  # zarrs/...: ask the API
            live = partial(self.catalog.is_live, asset.zarr_id, asset.zarr_checksum)
        index = await self.manifests.get_index(
            asset.zarr_id, asset.zarr_checksum, f"asset {asset.path}", live=live
        )
        await self._enter_zarr(namespace, local, asset, index)
        return index

    async def _enter_zarr(
        self, namespace: Namespace, local: int, asset: AssetRecord, index: ManifestIndex
    ) -> None:
        """A Zarr is entered: the first time (per id and checksum), fetch its metadata objects now,
        all at once (concurrently, in the background); with `consolidate`, make sure the namespace
        shows the `.zmetadata` it lacks (built once per Zarr, before answering: the reader is about
        to ask for it; again in a namespace resolved anew after eviction)."""
        key = (index.zarr_id, index.checksum)
        if self.consolidate and not namespace.has_consolidated(local):
            document = self._consolidated.get(key)
            if document is None:
                document = await self._consolidating.run(
                    key, partial(self._consolidate, key, asset, index)
                )
            if document:
                namespace.add_consolidated(local, document)
            return
        if key in self._entered:
            return
        self._entered[key] = True
        if self.service_nursery is not None and not self.consolidate:
            from zarrfs.manifests.metadata import metadata_nodes

            refs = {index.path(node): index.object_ref(node) for node in metadata_nodes(index)}
            if refs:
                self.service_nursery.start_soon(self._prefetch_metadata, refs, asset.path)

    async def _consolidate(
        self, key: tuple[str, str], asset: AssetRecord, index: ManifestIndex
    ) -> bytes:
        """The `.zmetadata` of a Zarr format 2 hierarchy that has none (b"" when it needs none, or
        when a metadata object cannot be had for good). A transient failure (S3 unreachable) fails
        the request and is tried again by the next: a `.zmetadata` never goes missing because of
        an outage."""
        from zarrfs.manifests.metadata import consolidated, metadata_nodes, needs_consolidation

        if not needs_consolidation(index):
            document = b""
        else:
            refs = {index.path(node): index.object_ref(node) for node in metadata_nodes(index)}
            try:
                objects = await self.stack.read_many(refs, Priority.DEMAND)
            except DataError as e:
                if is_transient(e):
                    raise
                log.warning("cannot consolidate the metadata of %s: %s", asset.path, e)
                document = b""
            else:
                document = consolidated(objects)
                log.info("consolidated %d metadata objects of %s", len(objects), asset.path)
        self._consolidated.put(key, document)
        self._entered[key] = True
        return document

    async def _prefetch_metadata(self, refs: dict[str, ObjectRef], what: str) -> None:
        try:
            await self.stack.read_many(refs, Priority.PREFETCH)
        except DataError as e:  # not cached: whoever reads one of them sees the error itself
            log.debug("metadata prefetch of %s failed: %s", what, e)
        except Exception as e:  # a bug: logged loudly, never taking the service nursery down
            report_bug(f"metadata prefetch of {what}", e)

    def _describe(
        self, volume: Volume, namespace: Namespace, local: int, index: ManifestIndex | None
    ) -> str:
        inner = namespace.describe(local, index)
        prefix = self._volume_paths[volume.id]
        if not prefix:
            return inner
        return prefix if inner == "/" else f"{prefix}/{inner}"

    # --- the archive's levels ---------------------------------------------------------------------

    def _add_synthetic(self, ino: int, key: NodeKey, path: str) -> _Synthetic:
        node = _Synthetic(ino, key, path)
        self._synthetic[ino] = node
        self._by_key[key] = ino
        return node

    def _node(self, ino: int) -> _Synthetic | None:
        """The synthetic node `ino` is (None: a volume's inode), the derived hex levels included."""
        node = self._synthetic.get(ino)
        if node is not None or not self._hex_base:
            return node
        n = ino - self._hex_base
        if 0 <= n < _HEX3:
            prefix = f"{n:03x}"
            return _Synthetic(ino, NodeKey(Level.ZARRS_PREFIX, zarr=prefix), f"zarrs/{prefix}")
        if _HEX3 <= n < _HEX_BLOCK:
            z = f"{n - _HEX3:06x}"
            key = NodeKey(Level.ZARRS_IDS, zarr=z)
            return _Synthetic(ino, key, f"zarrs/{z[:3]}/{z[3:]}")
        return None

    def _derived_ino(self, key: NodeKey) -> int | None:
        if not self._hex_base:
            return None
        if key.level == Level.ZARRS_PREFIX:
            return self._hex_base + int(key.zarr, 16)
        if key.level == Level.ZARRS_IDS:
            return self._hex_base + _HEX3 + int(key.zarr, 16)
        return None

    def _child_ino(self, parent: _Synthetic, name: str, key: NodeKey) -> int:
        derived = self._derived_ino(key)
        if derived is not None:
            return derived
        ino = self._by_key.get(key)
        if ino is not None:
            return ino
        path = f"{parent.path}/{name}" if parent.path else name
        ino = self.inodes.new_synthetic()
        if key.is_volume:
            self._by_key[key] = ino
            self._add_volume(ino, key, path)
        else:
            self._add_synthetic(ino, key, path)
        return ino

    async def _synthetic_lookup(self, node: _Synthetic, raw: bytes) -> Entry:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise NotFound(repr(raw)) from None
        key = levels.child_key(node.key, name)
        if key is None:
            raise NotFound(f"{node.path}/{name}")  # can never exist: the kernel may remember that
        if not await self._exists(key):
            raise NotFound(f"{node.path}/{name}", ttl=config.NEGATIVE_MUTABLE_TTL)
        return await self._child_entry(node, name, key)

    async def _child_entry(self, node: _Synthetic, name: str, key: NodeKey) -> Entry:
        ino = self._child_ino(node, name, key)
        child = self._node(ino)
        if child is not None:
            return await self._synthetic_entry(child)
        volume = self.inodes.volume_of(ino)
        assert volume is not None
        return await self._volume_root_entry(volume, key)

    async def _volume_root_entry(self, volume: Volume, key: NodeKey) -> Entry:
        namespace = self._cached(volume)
        if namespace is not None:
            return self._globalize(volume, namespace.getattr(ROOT_INO))
        mtime = levels.publication_time_ns(key.version) or self._started_ns
        if key.level == Level.ZARR:
            mtime = 0
        return Entry(volume.root_ino, True, 0, mtime)

    async def _synthetic_entry(self, node: _Synthetic) -> Entry:
        key = node.key
        if key.level == Level.LATEST:
            versions = await self.catalog.published_versions(key.dandiset_id)
            if not versions:
                raise NotFound(node.path, ttl=config.NEGATIVE_MUTABLE_TTL)
            target = levels.latest_target(versions[-1])
            return Entry(
                node.ino, False, len(target), self._started_ns, config.VERSION_LIST_TTL, target
            )
        return Entry(node.ino, True, 0, self._started_ns, _listing_ttl(key))

    async def _exists(self, key: NodeKey) -> bool:
        """Whether the name `key` stands for exists now (RemoteError when that cannot be told)."""
        level = key.level
        if level in (Level.DANDISETS, Level.ZARRS, Level.ZARRS_PREFIX, Level.ZARRS_IDS):
            return True  # best effort: their inodes are derived, nothing is kept for them
        if level == Level.ZARR_CHECKSUMS:
            return await self.catalog.zarr_exists(key.zarr)
        if level in (Level.DANDISET, Level.RELEASES):
            return await self.catalog.dandiset_exists(key.dandiset_id)
        if level == Level.LATEST:
            return bool(await self.catalog.published_versions(key.dandiset_id))
        if level == Level.VERSION:
            if key.version == "draft":
                return await self.catalog.dandiset_exists(key.dandiset_id)
            return key.version in await self.catalog.published_versions(key.dandiset_id)
        if level == Level.ZARR:
            what = levels.zarr_path(key.zarr, key.checksum)
            live = partial(self.catalog.is_live, key.zarr, key.checksum)
            try:
                await self.manifests.get_index(key.zarr, key.checksum, what, live=live)
            except ManifestMissing:
                return False
            return True
        return False

    async def _synthetic_listing(self, node: _Synthetic) -> list[tuple[bytes, Entry]]:
        key = node.key
        static = levels.static_children(key)
        if static is not None:
            names = static
        elif key.level == Level.DANDISETS:
            names = await self.catalog.dandisets()
        elif key.level == Level.DANDISET:
            published = await self.catalog.published_versions(key.dandiset_id)
            names = ["draft", *(["latest"] if published else []), "releases"]
        elif key.level == Level.DANDISET_VERSIONS:
            names = [*await self.catalog.published_versions(key.dandiset_id), "draft"]
        elif key.level == Level.RELEASES:
            names = await self.catalog.published_versions(key.dandiset_id)
        else:
            names = await self.catalog.zarr_names(key)
        listing = []
        for name in names:
            child_key = levels.child_key(key, name)
            if child_key is None:
                continue
            try:
                entry = await self._child_entry(node, name, child_key)
            except NotFound:
                continue
            listing.append((name.encode(), entry))
        return listing


def _touch_if_exists(path: Path) -> None:
    if path.exists():
        os.utime(path)


def _listing_ttl(key: NodeKey) -> float | None:
    if key.level in (Level.ARCHIVE,):
        return None
    if key.level == Level.DANDISETS:
        return config.DANDISET_LIST_TTL
    if key.level in (Level.ZARRS, Level.ZARRS_PREFIX, Level.ZARRS_IDS, Level.ZARR_CHECKSUMS):
        return config.ZARR_LIST_TTL
    return config.VERSION_LIST_TTL


def describe_object(bucket: str, ref: ObjectRef) -> str:
    """`s3://bucket/key?versionId=...` for log lines."""
    version = f"?versionId={ref.version_id}" if ref.version_id else ""
    return f"s3://{bucket}/{ref.key}{version}"
