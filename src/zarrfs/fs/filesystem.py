"""The filesystem's domain operations: lookup, getattr, readdir, readlink, open, read, statfs.

Owns: what one mount shows (`MountSource`: the whole archive, one dandiset's versions, one version,
or one directory of a version: its root is then an alias of that directory), and the routing of every
operation, downwards only: an inode is a synthetic level of the archive (`synthetic`), or belongs to a
volume (`volumes`), whose namespace answers for its top-level tree and says which Zarr an inode inside
one is in; that Zarr's view (`zarrs`, or `virtual_zarrs` for the virtual Zarr view of an HDF5 blob)
answers for it. Also: a deadline on every operation that must wait (none is opened when the answer
is in memory, which is nearly always), read statistics, the log line naming the object whenever
a read fails, and reads of files the kernel opened without asking (`read_unopened`, through the
readers `streams` keeps per file). Works in domain types and raises typed `ZarrfsError`s; knows nothing of pyfuse3, so it
is tested by awaiting it directly. Never parses, never retries, never decides cache policy.

Every operation answers within `config.READ_DEADLINE` or fails with EIO (a lookup never waits without
bound on a manifest, an asset list or the API); an unreachable remote is EIO, never "does not exist".

Concurrency: all state is touched from tasks of one trio run; resolutions and Zarr loads are single
flight (in `service_nursery` when set, so a requester that gives up cancels nothing others need).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from zarrfs import config
from zarrfs.archive import levels
from zarrfs.archive.catalog import Catalog
from zarrfs.archive.levels import Level, NodeKey
from zarrfs.base.histogram import LatencyHistogram
from zarrfs.base.refs import ObjectRef
from zarrfs.base.resources import Budget, DescriptorGauge
from zarrfs.config import MountSource
from zarrfs.errors import (
    DataError,
    IsADirectory,
    NotADirectory,
    NotFound,
    RemoteError,
    SourceError,
    VersionNotFound,
)
from zarrfs.fs.inodes import InodeSpace, Volume
from zarrfs.fs.namespace import (
    ROOT_INO,
    BlobRange,
    Entry,
    FileSource,
    InlineFile,
    Namespace,
    ZarrPlace,
)
from zarrfs.fs.readahead import ChunkReadahead
from zarrfs.fs.streams import Streams
from zarrfs.fs.synthetic import SyntheticLevels
from zarrfs.fs.volumes import Volumes, report_unservable
from zarrfs.fs.zarrs import Zarrs, ZarrView
from zarrfs.io.disk_gate import DiskGate
from zarrfs.io.stack import ObjectReader, ReadStack
from zarrfs.manifest_cache import ManifestCache
from zarrfs.s3_reader import S3Reader

if TYPE_CHECKING:  # imported by the core only with --virtual-zarr (numpy, the extractor)
    from zarrfs.fs.virtual_zarrs import VirtualView, VirtualZarrs

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
    kernel (`cacheable`). Any other directory is found when opened (`where`), so reading it finds
    nothing again."""

    ino: int
    cacheable: bool
    snapshot: tuple[tuple[bytes, Entry], ...] | None = None
    where: _Inside | None = None


@dataclass(frozen=True, slots=True)
class FsStats:
    """What statfs reports."""

    total_bytes: int
    files: int


@dataclass(frozen=True, slots=True)
class _Inside:
    """Where a volume's inode is: its volume and namespace, and its Zarr (None: top-level) with that
    Zarr's view when the operation needs it (inside the Zarr, or about its root's children)."""

    volume: Volume
    namespace: Namespace
    zarr: ZarrPlace | None
    view: ZarrView | VirtualView | None = None


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
        virtual: VirtualZarrs | None = None,
    ) -> None:
        self.source = source
        self.catalog = catalog
        self.manifests = manifests
        self.stack = stack
        self.reader = reader
        self.bucket = reader.bucket
        self.gate = gate or (DiskGate(cache_dir) if cache_dir is not None else None)
        self.inodes = InodeSpace()
        self.volumes = Volumes(
            catalog,
            self.inodes,
            version_memory=version_memory,
            cache_dir=cache_dir,
            gate=self.gate,
            virtual_zarr=virtual is not None,
        )
        self.levels = SyntheticLevels(catalog, manifests, self.inodes, self.volumes)
        self.zarrs = Zarrs(manifests, catalog, stack, consolidate=consolidate)
        #: Chunks fetched ahead of a reader that opens an array's chunk files in order.
        self.readahead = ChunkReadahead(stack)
        #: Readers of files read without being opened (zero-message open: `read_unopened`).
        self.streams = Streams(self.open, self.reopen)
        #: The virtual Zarr views of HDF5 blobs (`--virtual-zarr`; None: not shown).
        self.virtual = virtual
        #: An operation fails with EIO rather than take longer than this.
        self.read_deadline = config.READ_DEADLINE
        #: The mounted version holds Zarrs (known after `start`; False for the archive levels).
        self.holds_zarrs = False
        self._root_alias: int | None = None
        #: Reads served (count, bytes, errors) and their latency, for `zarrfs stats`.
        self.read_stats = {"count": 0, "bytes": 0, "errors": 0}
        self.read_latency = LatencyHistogram()
        #: The process's descriptors (sampled by the core) and the memory budget of its parts.
        self.descriptors = DescriptorGauge()
        self.budget = Budget(
            block_cache=stack.blocks.max_bytes,
            manifests=manifests.memory_budget,
            versions=version_memory,
            virtual_zarr=config.VIRTUAL_MEMORY if virtual is not None else 0,
            virtual_metadata=stack.sparse.max_bytes if virtual is not None else 0,
        )

    @property
    def service_nursery(self) -> trio.Nursery | None:
        """Where resolutions and background work run; None: in the requester's task."""
        return self.volumes.nursery

    @service_nursery.setter
    def service_nursery(self, nursery: trio.Nursery | None) -> None:
        self.volumes.nursery = self.zarrs.nursery = self.readahead.nursery = nursery
        if self.virtual is not None:
            self.virtual.cache.nursery = nursery

    @property
    def consolidate(self) -> bool:
        return self.zarrs.consolidate

    # --- setting up -------------------------------------------------------------------------------

    async def start(self) -> str:
        """Lay out the mount's root. A version (and a path in it) is resolved now, so that a
        missing version or path fails the mount (VersionNotFound) instead of mounting an error.
        Returns a description for the log."""
        source = self.source
        if source.kind == "archive":
            self.levels.add_root(ROOT_INO, levels.ARCHIVE)
            return "the whole archive"
        assert source.dandiset_id is not None
        if source.kind == "dandiset":
            if not await self.catalog.dandiset_exists(source.dandiset_id):
                raise VersionNotFound(f"dandiset {source.dandiset_id} not found in the bucket")
            self.levels.add_root(ROOT_INO, NodeKey(Level.DANDISET_VERSIONS, source.dandiset_id))
            return f"every version of dandiset {source.dandiset_id}"
        resolved = await self.catalog.resolve(source.version_source())
        key = NodeKey(Level.VERSION, source.dandiset_id, resolved.source.version)
        root = ROOT_INO if not source.path else self.inodes.new_synthetic()
        volume = self.volumes.add(root, key, "")
        namespace = self.volumes.version_namespace(resolved)
        self.volumes.settle(volume, namespace, keep=True)
        report_unservable(resolved)
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
        ino = self._in(ino)
        node = self.levels.node(ino)
        if node is not None:
            with self._bounded(f"getattr of inode {ino}"):
                return self._out(await self.levels.entry(node))
        inside = await self._inside(ino, "getattr")
        if inside.view is None:
            return self._out(inside.namespace.getattr(ino))
        assert inside.zarr is not None
        return self._out(inside.view.getattr(inside.zarr, inside.zarr.node(ino)))

    async def lookup(self, parent: int, name: bytes) -> Entry:
        parent = self._in(parent)
        node = self.levels.node(parent)
        if node is not None:
            with self._bounded(f"lookup of {name!r:.80} in inode {parent}"):
                return self._out(await self.levels.lookup(node, name))
        inside = await self._inside(parent, "lookup", name, children=True)
        if inside.view is None:
            return self._out(inside.namespace.lookup(parent, name))
        assert inside.zarr is not None
        return self._out(inside.view.lookup(inside.zarr, inside.zarr.node(parent), name))

    async def opendir(self, ino: int) -> OpenDir:
        ino = self._in(ino)
        node = self.levels.node(ino)
        if node is not None:
            with self._bounded(f"opendir of inode {ino}"):
                listing = await self.levels.listing(node)
            return OpenDir(ino, cacheable=False, snapshot=tuple(listing))
        inside = await self._inside(ino, "opendir", children=True)
        if inside.view is None:
            inside.namespace.check_dir(ino)
        else:
            assert inside.zarr is not None
            inside.view.check_dir(inside.zarr, inside.zarr.node(ino))
        return OpenDir(ino, cacheable=True, where=inside)

    async def readdir(self, handle: OpenDir, offset: int) -> Iterator[tuple[bytes, Entry, int]]:
        """Entries of an open directory from `offset` (a value a previous entry returned, or 0)."""
        if handle.snapshot is not None:
            entries = handle.snapshot
            return (
                (name, self._out(entry), i + 1)
                for i, (name, entry) in enumerate(entries)
                if i >= offset
            )
        inside = handle.where
        assert inside is not None  # found when opened
        if inside.view is None:
            rows = inside.namespace.readdir(handle.ino, offset)
        else:
            assert inside.zarr is not None
            rows = inside.view.readdir(inside.zarr, inside.zarr.node(handle.ino), offset)
        if self._root_alias is None:
            return rows
        return ((name, self._out(entry), next_offset) for name, entry, next_offset in rows)

    async def readlink(self, ino: int) -> bytes:
        with self._bounded(f"readlink of inode {ino}"):
            node = self.levels.node(self._in(ino))
            if node is None:
                raise NotFound(f"inode {ino} is not a symbolic link")
            return await self.levels.readlink(node)

    async def open(self, ino: int) -> OpenFile:
        ino = self._in(ino)
        if self.levels.node(ino) is not None:
            raise IsADirectory(f"inode {ino} is a directory")
        source, where = await self._source(ino, opening=True)
        return OpenFile(ino, source, where, self._reader_of(source))

    def reopen(self, handle: OpenFile) -> OpenFile:
        """The file of `handle` opened again, with a reader of its own (its own prefetch), without
        finding it again."""
        return OpenFile(handle.ino, handle.source, handle.path, self._reader_of(handle.source))

    def _reader_of(self, source: FileSource) -> ObjectReader | None:
        if isinstance(source, ObjectRef):
            return self.stack.open(source)
        if isinstance(source, BlobRange):
            return self.stack.open_range(source.ref, source.offset, source.length)
        return None

    async def release(self, handle: OpenFile) -> None:
        """The file was closed by every process that had it open: its prefetch stops."""
        if handle.reader is not None:
            handle.reader.close()

    async def read_unopened(self, ino: int, offset: int, size: int) -> bytes:
        """Bytes of file `ino` that the kernel opened without asking (zero-message open): read
        through the file's stream that this read continues (`streams`). Opening it when it has
        none and reading share one `read_deadline`."""
        started = time.monotonic()

        async def through(handle: OpenFile) -> bytes:
            left = self.read_deadline - (time.monotonic() - started)
            return await self.read(handle, offset, size, deadline=left)

        return await self.streams.read(ino, offset, through)

    async def read(
        self, handle: OpenFile, offset: int, size: int, *, deadline: float | None = None
    ) -> bytes:
        """Bytes [offset, offset + size) of the open file (fewer at its end), within `deadline`
        seconds (default `read_deadline`)."""
        source, reader = handle.source, handle.reader
        if isinstance(source, InlineFile):
            return source.data[offset : offset + size]
        assert reader is not None  # every object file is opened with one
        started = time.monotonic()
        try:
            with trio.fail_after(self.read_deadline if deadline is None else max(0.0, deadline)):
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
                describe_source(self.bucket, source),
                size,
                offset,
                error,
            )
            if error is exc:
                raise
            raise error from None

    async def source_of(self, ino: int) -> FileSource:
        """Where the bytes of file `ino` come from, without opening it (no reader, no prefetch)."""
        ino = self._in(ino)
        if self.levels.node(ino) is not None:
            raise IsADirectory(f"inode {ino} is a directory")
        return (await self._source(ino))[0]

    def version_namespace(self) -> Namespace | None:
        """The namespace of the one version a version mount shows (None for the archive and
        dandiset mounts, which show many)."""
        if self.source.kind != "version":
            return None
        return next(self.volumes.namespaces(), None)

    async def provenance(self, ino: int) -> dict[str, str]:
        """What `ino` is a copy of, as `user.zarrfs.<name>` attributes show it (without the
        prefix): `version` (a version's root), `zarr_id` and `zarr_checksum` (a Zarr's root),
        `asset_id`, and for files of the bucket `s3_url`, `version_id` and `etag` (a chunk of a
        virtual Zarr: its blob's, and `byte_range`). A file zarrfs makes (`.zmetadata`, a virtual
        Zarr's metadata) has none of the last."""
        with self._bounded(f"provenance of inode {ino}"):
            return await self._provenance(ino)

    async def _provenance(self, ino: int) -> dict[str, str]:
        ino = self._in(ino)
        out: dict[str, str] = {}
        if self.levels.node(ino) is not None:
            return out
        inside = await self._inside(ino, "provenance")
        key = self.volumes.key(inside.volume)
        namespace = inside.namespace
        if ino == inside.volume.root_ino and key.level == Level.VERSION:
            out["version"] = str(namespace.resolved.source)
        asset = namespace.asset_of(ino)
        if asset is not None and asset.asset_id:
            out["asset_id"] = asset.asset_id
        if inside.zarr is not None and ino == inside.zarr.root_ino and not inside.zarr.virtual:
            out["zarr_id"] = inside.zarr.asset.zarr_id or ""
            out["zarr_checksum"] = inside.zarr.asset.zarr_checksum or ""
        if (await self.getattr(ino)).is_dir:
            return out
        source, _ = await self._source(ino)
        if isinstance(source, BlobRange):  # a chunk of a virtual Zarr: a range of its blob
            out["byte_range"] = f"{source.offset}-{source.offset + source.length - 1}"
            source = source.ref
        if isinstance(source, ObjectRef):
            out["s3_url"] = describe_object(self.bucket, source)
            if source.version_id is not None:
                out["version_id"] = source.version_id
            if source.etag is not None:
                out["etag"] = source.etag
        elif inside.zarr is None and key.level == Level.VERSION:  # dandiset.yaml: its key
            resolved = namespace.resolved.source
            out["s3_url"] = (
                f"s3://{self.bucket}/dandisets/{resolved.dandiset_id}/{resolved.version}/"
                "dandiset.yaml"
            )
        return out

    def statfs(self) -> FsStats:
        namespaces = list(self.volumes.namespaces())
        return FsStats(
            total_bytes=sum(ns.total_size for ns in namespaces),
            files=sum(ns.n_assets for ns in namespaces),
        )

    @property
    def consolidated_bytes(self) -> int:
        return self.zarrs.consolidated_bytes

    @property
    def versions_bytes(self) -> int:
        """Approximate memory of the resolved versions kept (for `zarrfs stats`)."""
        return self.volumes.approx_bytes

    # --- routing ------------------------------------------------------------------------------------

    def _in(self, ino: int) -> int:
        """A kernel inode as this filesystem numbers it (the root of a path mount is an alias)."""
        return self._root_alias if ino == ROOT_INO and self._root_alias is not None else ino

    def _out(self, entry: Entry) -> Entry:
        if self._root_alias is not None and entry.ino == self._root_alias:
            return Entry(ROOT_INO, entry.is_dir, entry.size, entry.mtime_ns, entry.ttl, entry.link)
        return entry

    def _inside_now(self, ino: int, children: bool) -> _Inside | None:
        """Where `ino` is (see `_inside`) if that is known without waiting, else None. The path of
        nearly every operation: it opens no deadline, which costs more than the rest of a lookup."""
        volume = self.inodes.volume_of(ino)
        if volume is None or (not volume.reserved and ino != volume.root_ino):
            raise NotFound(f"no inode {ino}")
        namespace = self.volumes.cached(volume)
        if namespace is None:
            return None
        zarr = namespace.zarr_at(ino)
        if not _wants_view(ino, zarr, children):
            return _Inside(volume, namespace, zarr)
        assert zarr is not None
        if zarr.virtual:
            assert self.virtual is not None  # a namespace shows virtual Zarrs only when it is set
            view: ZarrView | VirtualView | None = self.virtual.view_now(zarr)
        else:
            view = self.zarrs.view_now(zarr)
        return None if view is None else _Inside(volume, namespace, zarr, view)

    async def _inside(
        self, ino: int, op: str, name: bytes | None = None, *, children: bool = False
    ) -> _Inside:
        """The volume `ino` belongs to, resolved now if need be, and its Zarr, if any, with that
        Zarr's view loaded if the operation needs it: `ino` is inside the Zarr, or is its root and
        `children` (a lookup, opendir, readdir). Waits at most `read_deadline` (`op`, `name`: the
        operation, for the error)."""
        inside = self._inside_now(ino, children)
        if inside is not None:
            return inside
        what = f"{op} of inode {ino}" if name is None else f"{op} of {name!r:.80} in inode {ino}"
        with self._bounded(what):
            volume = self.inodes.volume_of(ino)
            assert volume is not None  # checked by _inside_now
            namespace = await self.volumes.namespace(volume)
            zarr = namespace.zarr_at(ino)
            if not _wants_view(ino, zarr, children):
                return _Inside(volume, namespace, zarr)
            assert zarr is not None
            if zarr.virtual:
                assert self.virtual is not None
                view: ZarrView | VirtualView = await self.virtual.view(zarr)
            else:
                ask_api = self.volumes.key(volume).level == Level.ZARR  # zarrs/...: live unknown
                view = await self.zarrs.view(zarr, ask_api=ask_api)
            return _Inside(volume, namespace, zarr, view)

    async def _source(self, ino: int, *, opening: bool = False) -> tuple[FileSource, str]:
        """Where the bytes of file `ino` come from, and its path for log lines. `opening`: the
        file is being opened (a chunk of an array read in order has the next ones fetched)."""
        inside = await self._inside(ino, "open" if opening else "source")
        prefix = self.volumes.path(inside.volume)
        zarr, view = inside.zarr, inside.view
        if zarr is None or view is None:
            where = _join(prefix, inside.namespace.describe(ino))
            try:
                return inside.namespace.file_source(ino), where
            except DataError as e:
                log.error("cannot open %s: %s", where, e)
                raise
        node = zarr.node(ino)
        inner = view.path(node) if zarr.path == "/" else f"{zarr.path}/{view.path(node)}"
        where = _join(prefix, inner)
        source = view.file_source(zarr, node)
        if opening:
            self.readahead.opened(zarr, view, node)
        return source, where


def _wants_view(ino: int, zarr: ZarrPlace | None, children: bool) -> bool:
    """Whether an operation on `ino` needs its Zarr's view: `ino` is inside the Zarr, or is its
    root and the operation is about its children. A Zarr root's own attributes are the namespace's,
    so listing a directory of Zarrs loads none of their manifests."""
    return zarr is not None and (children or ino != zarr.root_ino)


def _join(prefix: str, inner: str) -> str:
    if not prefix:
        return inner
    return prefix if inner == "/" else f"{prefix}/{inner}"


def describe_object(bucket: str, ref: ObjectRef) -> str:
    """`s3://bucket/key?versionId=...` for log lines."""
    version = f"?versionId={ref.version_id}" if ref.version_id else ""
    return f"s3://{bucket}/{ref.key}{version}"


def describe_source(bucket: str, source: ObjectRef | BlobRange) -> str:
    """The object (and for a range, which bytes of it) a file's bytes come from, for log lines."""
    if isinstance(source, BlobRange):
        end = source.offset + source.length - 1
        return f"{describe_object(bucket, source.ref)} bytes {source.offset}-{end}"
    return describe_object(bucket, source)
