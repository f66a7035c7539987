"""Zarrs as a mount shows them: entering one (its verified manifest index, its metadata fetched ahead,
the `.zmetadata` `--consolidate` adds), and its nodes as inodes (`ZarrView`).

Owns: `ZarrView`, the entries of one Zarr at one checksum (lookup, readdir, attributes, where a file's
bytes are) in the inode numbers of its `namespace.ZarrPlace`; and `Zarrs`, which makes views: it asks
the manifest cache for the index (whether the checksum is the Zarr's live one is asked of the catalog
only when no manifest exists: the API is not needed for a Zarr with a manifest), fetches the Zarr's
metadata objects in the background the first time it is entered (once per Zarr id and checksum), and
with `consolidate` builds the `.zmetadata` a Zarr format 2 hierarchy lacks, once per Zarr id and
checksum, kept with the view's key, not with any version's tree (so a version resolved anew after
eviction shows it again). Never does: FUSE, parsing, S3 of its own (metadata objects are read through
the read stack).

Errors: a Zarr asset that cannot be served at all (no checksum, ...) is `DataError`, logged once; an
outage while building `.zmetadata` fails that request (EIO) and is tried again by the next one, while a
metadata object that is gone for good only means no `.zmetadata`.

Concurrency: one trio run; building a `.zmetadata` is single flight; the metadata prefetch runs in the
service nursery.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import cachetools
import trio

from zarrfs import config
from zarrfs.archive.catalog import Catalog
from zarrfs.base.flight import BoundedLRU, SingleFlight
from zarrfs.base.refs import ObjectRef
from zarrfs.errors import DataError, IsADirectory, NotADirectory, NotFound, is_transient, report_bug
from zarrfs.fs.namespace import Entry, FileSource, InlineFile, ZarrPlace
from zarrfs.io.scheduler import Priority
from zarrfs.io.stack import ReadStack
from zarrfs.manifest_cache import Live, ManifestCache

if TYPE_CHECKING:  # the manifest machinery is imported when a Zarr is first entered
    from zarrfs.manifests.index import ManifestIndex

log = logging.getLogger(__name__)

#: The name of a synthesized consolidated metadata document (`--consolidate`).
CONSOLIDATED = b".zmetadata"
#: Children converted per step of a big readdir (the kernel takes a few dozen per request).
_FIRST_BATCH, _LAST_BATCH = 64, 4096


@dataclass(frozen=True, slots=True)
class ZarrView:
    """One Zarr at one checksum: its index, and the synthesized `.zmetadata` shown at its root (node
    `index.n_nodes`), if any. Methods take the Zarr's place in the inode space and a node id; node 0
    (the root) is the namespace's to describe, but may be listed and looked up in here."""

    index: ManifestIndex
    consolidated: bytes | None = None

    def _has(self, node: int) -> bool:
        n = self.index.n_nodes
        return node < n or (node == n and self.consolidated is not None)

    def _entry(self, place: ZarrPlace, node: int) -> Entry:
        if node == self.index.n_nodes:
            assert self.consolidated is not None
            return Entry(place.ino(node), False, len(self.consolidated), place.asset.mtime_ns)
        stat = self.index.stat(node)
        return Entry(place.ino(node), stat.is_dir, stat.size, stat.mtime_ns)

    def getattr(self, place: ZarrPlace, node: int) -> Entry:
        """The entry of node `node` (>= 1)."""
        if node == 0 or not self._has(node):
            raise NotFound(f"no inode {place.ino(node)}")
        return self._entry(place, node)

    def check_dir(self, place: ZarrPlace, node: int) -> None:
        if not self._has(node) or node == self.index.n_nodes or not self.index.is_dir(node):
            raise NotADirectory(f"inode {place.ino(node)} is not a directory")

    def lookup(self, place: ZarrPlace, node: int, name: bytes) -> Entry:
        self.check_dir(place, node)
        child = self.index.lookup(node, name)
        if child is None and node == 0 and name == CONSOLIDATED and self.consolidated is not None:
            child = self.index.n_nodes
        if child is None:
            raise NotFound(name.decode("utf-8", "replace"))
        return self._entry(place, child)

    def readdir(
        self, place: ZarrPlace, node: int, offset: int
    ) -> Iterator[tuple[bytes, Entry, int]]:
        """(name, entry, next offset) for the children of `node` from `offset` on (0 = start)."""
        self.check_dir(place, node)
        index, base = self.index, place.base
        if node == 0 and self.consolidated is not None:
            listing = [
                (name, Entry(base | child, is_dir, size, mtime))
                for child, name, is_dir, size, mtime in index.children(0, 0, 1 << 30)
            ]
            listing.append((CONSOLIDATED, self._entry(place, index.n_nodes)))
            listing.sort(key=lambda row: row[0])
            for i in range(offset, len(listing)):
                yield listing[i][0], listing[i][1], i + 1
            return
        batch = _FIRST_BATCH
        while rows := index.children(node, offset, batch):
            for child, name, is_dir, size, mtime_ns in rows:
                offset += 1
                yield name, Entry(base | child, is_dir, size, mtime_ns), offset
            if len(rows) < batch:  # the last of them: asking again would only find none
                return
            batch = min(batch * 4, _LAST_BATCH)

    def file_source(self, place: ZarrPlace, node: int) -> FileSource:
        """Where the bytes of file node `node` come from."""
        if not self._has(node):
            raise NotFound(f"no inode {place.ino(node)}")
        if node == self.index.n_nodes:
            assert self.consolidated is not None
            return InlineFile(self.consolidated)
        if node == 0 or self.index.is_dir(node):
            raise IsADirectory(f"inode {place.ino(node)} is a directory")
        return self.index.object_ref(node)

    def path(self, node: int) -> str:
        """The path of `node` in the Zarr (for log lines)."""
        return CONSOLIDATED.decode() if node == self.index.n_nodes else self.index.path(node)

    # --- chunk keys (for readahead) --------------------------------------------------------------

    def chunk_of(self, node: int) -> tuple[_ChunkArray, tuple[int, ...]] | None:
        """(its array, its coordinates) when file `node` is a chunk key of a Zarr array: below the
        directory holding the array's `.zarray` or `zarr.json`, integers joined by `.` (one file)
        or by `/` (nested directories), after v3's `c/`; else None."""
        index = self.index
        if node >= index.n_nodes or node == 0 or index.is_dir(node):
            return None
        parts = [index.name(node)]
        directory = index.parent(node)
        for _ in range(_MAX_CHUNK_DEPTH):
            if index.lookup(directory, b".zarray") is not None:
                break
            if index.lookup(directory, b"zarr.json") is not None:
                break
            if directory == 0:
                return None
            parts.append(index.name(directory))
            directory = index.parent(directory)
        else:
            return None
        parts.reverse()
        prefix = b""
        if len(parts) > 1 and parts[0] == b"c":
            prefix, parts = b"c", parts[1:]
        fields = parts[0].split(b".") if len(parts) == 1 else parts
        if not all(_DECIMAL.fullmatch(field) for field in fields):
            return None
        separator = b"." if len(parts) == 1 else b"/"
        return _ChunkArray(directory, prefix, separator), tuple(int(f) for f in fields)

    def next_chunk(self, array: Hashable, coords: tuple[int, ...]) -> tuple[Coords, int] | None:
        """The chunk after `coords` in row-major order that exists (the next along the last axis,
        else the first of the next row, ...), and its node; None at the end, or past a missing
        chunk where no next one along any axis exists."""
        assert isinstance(array, _ChunkArray)
        current = list(coords)
        for axis in reversed(range(len(current))):
            current[axis] += 1
            node = self._chunk_node(array, current)
            if node is not None:
                return tuple(current), node
            current[axis] = 0
        return None

    def _chunk_node(self, array: _ChunkArray, coords: list[int]) -> int | None:
        names = [str(c).encode() for c in coords]
        path = [array.separator.join(names)] if array.separator == b"." else names
        node = array.directory
        for name in [array.prefix, *path] if array.prefix else path:
            found = self.index.lookup(node, name)
            if found is None:
                return None
            node = found
        return None if self.index.is_dir(node) else node


#: Directories between an array's metadata and a chunk file, at most (v3's `c/` and the axes).
_MAX_CHUNK_DEPTH = 33
_DECIMAL = re.compile(rb"0|[1-9][0-9]{0,18}")
Coords = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _ChunkArray:
    """One Zarr array as its chunk keys spell it: the directory of its metadata, v3's `c` prefix
    (or none), and the separator of the coordinates in a key (`.` or `/`)."""

    directory: int
    prefix: bytes
    separator: bytes


class Zarrs:
    """Makes `ZarrView`s: see the module docstring."""

    def __init__(
        self,
        manifests: ManifestCache,
        catalog: Catalog,
        stack: ReadStack,
        *,
        consolidate: bool = False,
    ) -> None:
        self.manifests = manifests
        self.catalog = catalog
        self.stack = stack
        #: Serve a synthesized `.zmetadata` in format 2 Zarrs without one (`--consolidate`).
        self.consolidate = consolidate
        #: Where the metadata prefetch runs (the core's service nursery; None: no prefetch).
        self.nursery: trio.Nursery | None = None
        self._reported: set[str] = set()
        #: Zarrs (id, checksum) entered: their metadata was fetched ahead.
        self._entered: cachetools.LRUCache[tuple[str, str], bool] = cachetools.LRUCache(
            maxsize=config.FAILURES_REMEMBERED
        )
        #: `--consolidate`: the `.zmetadata` built for each Zarr (id, checksum) (b"" for those that
        #: need none or whose metadata cannot be had for good); built again when dropped.
        self._consolidated: BoundedLRU[tuple[str, str], bytes] = BoundedLRU(
            config.CONSOLIDATED_MEMORY, len
        )
        self._consolidating: SingleFlight[tuple[str, str], bytes] = SingleFlight(
            "consolidation of Zarr metadata"
        )

    @property
    def consolidated_bytes(self) -> int:
        return self._consolidated.weight

    async def view(self, place: ZarrPlace, *, ask_api: bool = False) -> ZarrView:
        """The view of the Zarr at `place`. `ask_api`: the asset does not say whether its checksum
        is the Zarr's live one (a `zarrs/` path of an archive mount): ask the catalog if no
        manifest exists, so a draft Zarr's current state can be built from the bucket's listing."""
        view = self.view_now(place)
        if view is not None:
            return view
        asset = place.asset
        zarr_id, checksum = asset.zarr_id, asset.zarr_checksum
        assert zarr_id and checksum  # view_now raised DataError otherwise
        live: Live = asset.live
        if not live and ask_api:
            live = partial(self.catalog.is_live, zarr_id, checksum)
        index = await self.manifests.get_index(zarr_id, checksum, f"asset {asset.path}", live=live)
        key = (index.zarr_id, index.checksum)
        if self.consolidate:
            document = self._consolidated.get(key)
            if document is None:
                document = await self._consolidating.run(
                    key, partial(self._consolidate, key, asset.path, index)
                )
            return ZarrView(index, document or None)
        return self._entered_view(index, asset.path)

    def view_now(self, place: ZarrPlace) -> ZarrView | None:
        """The view of the Zarr at `place` when it is at hand without waiting (its index in memory,
        and with `--consolidate` its `.zmetadata` built), else None: then ask `view`. DataError
        for an asset that cannot be served."""
        asset = place.asset
        if asset.problem or not asset.zarr_id or not asset.zarr_checksum:
            message = f"Zarr asset {asset.path} cannot be served: {asset.problem}"
            if message not in self._reported:  # say why, once
                self._reported.add(message)
                log.error("%s", message)
            raise DataError(message)
        index = self.manifests.loaded(asset.zarr_id, asset.zarr_checksum)
        if index is None:
            return None
        if self.consolidate:
            document = self._consolidated.get((index.zarr_id, index.checksum))
            return None if document is None else ZarrView(index, document or None)
        return self._entered_view(index, asset.path)

    def _entered_view(self, index: ManifestIndex, what: str) -> ZarrView:
        key = (index.zarr_id, index.checksum)
        if key not in self._entered:
            self._entered[key] = True
            self._prefetch_metadata(index, what)
        return ZarrView(index)

    def _metadata_refs(self, index: ManifestIndex) -> dict[str, ObjectRef]:
        from zarrfs.manifests.metadata import metadata_nodes

        return {index.path(node): index.object_ref(node) for node in metadata_nodes(index)}

    def _prefetch_metadata(self, index: ManifestIndex, what: str) -> None:
        """A Zarr is entered for the first time: fetch its metadata objects now, all at once, in
        the background (the reader is about to ask for them)."""
        if self.nursery is None:
            return
        refs = self._metadata_refs(index)
        if refs:
            self.nursery.start_soon(self._fetch_metadata, refs, what)

    async def _fetch_metadata(self, refs: dict[str, ObjectRef], what: str) -> None:
        try:
            await self.stack.read_many(refs, Priority.PREFETCH)
        except DataError as e:  # not cached: whoever reads one of them sees the error itself
            log.debug("metadata prefetch of %s failed: %s", what, e)
        except Exception as e:  # a bug: logged loudly, never taking the service nursery down
            report_bug(f"metadata prefetch of {what}", e)

    async def _consolidate(self, key: tuple[str, str], what: str, index: ManifestIndex) -> bytes:
        """The `.zmetadata` of a Zarr format 2 hierarchy that has none (b"" when it needs none, or
        when a metadata object cannot be had for good). A transient failure (S3 unreachable) fails
        the request and is tried again by the next: a `.zmetadata` never goes missing because of
        an outage."""
        from zarrfs.manifests.metadata import consolidated, needs_consolidation

        if not needs_consolidation(index):
            self._prefetch_metadata(index, what)  # nothing to build: fetch ahead all the same
            document = b""
        else:
            try:
                objects = await self.stack.read_many(self._metadata_refs(index), Priority.DEMAND)
            except DataError as e:
                if is_transient(e):
                    raise
                log.warning("cannot consolidate the metadata of %s: %s", what, e)
                document = b""
            else:
                document = consolidated(objects)
                log.info("consolidated %d metadata objects of %s", len(objects), what)
        self._consolidated.put(key, document)
        self._entered[key] = True
        return document
