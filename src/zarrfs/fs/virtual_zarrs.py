"""Virtual Zarr views of HDF5 blobs as a mount shows them (`--virtual-zarr`): `<name>.nwb.zarr/`.

Owns: `VirtualView`, the entries of one blob's view (a `virtual.VirtualZarr`) in the inode numbers of
its `namespace.ZarrPlace` (the same methods as `zarrs.ZarrView`, so the filesystem routes to either
alike), and `VirtualZarrs`, which makes views: it asks the `VirtualCache` for the blob's model (from
the cache dir, or extracted), numbers it, and keeps the views in an LRU bounded by their bytes
(`config.VIRTUAL_MEMORY`); a view dropped is loaded again from the cache dir. Node ids: 0 is the view's root; `1 .. n_named - 1` its other directories
and inline files (`.zgroup`, `.zarray`, `.zattrs`, inlined arrays' chunks) in sorted path order;
`n_named + row` the referenced chunk of row `row` of the model's chunk columns. So a view of millions
of chunks costs no Python object per chunk, and an inode means the same entry for the mount's life
(the model of a blob version never changes).

What a file is: an inline file is held in memory (`InlineFile`); a chunk is a byte range of the
pinned blob (`BlobRange`), read through the blob's own cache blocks. A blob that is not HDF5, or that
the extractor refuses, fails the entry with EIO (`NotVirtualizable`, logged once with the blob's S3
object); the rest of the mount keeps serving. Never does: HDF5, S3 of its own, FUSE.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass

from zarrfs import config
from zarrfs.base.flight import BoundedLRU
from zarrfs.base.refs import ObjectRef
from zarrfs.errors import DataError, IsADirectory, NotADirectory, NotFound
from zarrfs.fs.namespace import (
    NODE_MASK,
    BlobRange,
    Entry,
    FileSource,
    InlineFile,
    ZarrPlace,
    blob_ref,
)
from zarrfs.virtual import VirtualZarr
from zarrfs.virtual_cache import VirtualCache

#: Chunk names converted per step of a big readdir (the kernel takes a few dozen per request).
_FIRST_BATCH, _LAST_BATCH = 64, 4096


@dataclass(frozen=True, slots=True, eq=False)
class VirtualView:
    """One blob's virtual Zarr in inode numbers; see the module docstring."""

    model: VirtualZarr
    blob: ObjectRef
    mtime_ns: int
    #: The path of each named node (0: the root, "").
    paths: tuple[str, ...]
    #: The node of each named path.
    nodes: dict[str, int]

    @classmethod
    def of(cls, model: VirtualZarr, blob: ObjectRef, mtime_ns: int) -> VirtualView:
        named = sorted({*model.directories(), *model.inline})  # "" (the root) sorts first
        if len(named) + model.chunk_count > NODE_MASK:
            raise DataError(f"the virtual Zarr view of {blob.key} has too many entries")
        return cls(model, blob, mtime_ns, tuple(named), {p: i for i, p in enumerate(named)})

    @property
    def n_named(self) -> int:
        return len(self.paths)

    def _path_of(self, node: int) -> str | None:
        """The path of named node `node`, None for a chunk node; NotFound past the end."""
        if node < self.n_named:
            return self.paths[node]
        if node - self.n_named < self.model.chunk_count:
            return None
        raise NotFound(f"no node {node} in the virtual Zarr of {self.blob.key}")

    def _entry(self, place: ZarrPlace, node: int) -> Entry:
        path = self._path_of(node)
        if path is None:
            size = int(self.model.lengths[node - self.n_named])
            return Entry(place.ino(node), False, size, self.mtime_ns)
        data = self.model.inline.get(path)
        if data is not None:
            return Entry(place.ino(node), False, len(data), self.mtime_ns)
        return Entry(place.ino(node), True, 0, self.mtime_ns)

    def _dir_path(self, place: ZarrPlace, node: int) -> str:
        path = self._path_of(node)
        if path is None or path in self.model.inline:
            raise NotADirectory(f"inode {place.ino(node)} is not a directory")
        return path

    def getattr(self, place: ZarrPlace, node: int) -> Entry:
        """The entry of node `node` (>= 1)."""
        if node == 0:
            raise NotFound(f"no inode {place.ino(node)}")
        return self._entry(place, node)

    def check_dir(self, place: ZarrPlace, node: int) -> None:
        self._dir_path(place, node)

    def lookup(self, place: ZarrPlace, node: int, name: bytes) -> Entry:
        parent = self._dir_path(place, node)
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise NotFound(name.decode("utf-8", "replace")) from None
        path = f"{parent}/{text}" if parent else text
        child = self.nodes.get(path)
        if child is None:
            row = self.model.chunk_row(path)
            if row is None:
                raise NotFound(text)
            child = self.n_named + row
        return self._entry(place, child)

    def readdir(
        self, place: ZarrPlace, node: int, offset: int
    ) -> Iterator[tuple[bytes, Entry, int]]:
        """(name, entry, next offset) for the children of `node` from `offset` on (0 = start):
        its metadata files and subdirectories (sorted), then an array's chunks (row-major)."""
        parent = self._dir_path(place, node)
        named = self.model.entries(parent) or ()
        for i in range(offset, len(named)):
            path = f"{parent}/{named[i]}" if parent else named[i]
            yield named[i].encode(), self._entry(place, self.nodes[path]), i + 1
        rows = self.model.chunk_rows(parent)
        position = max(offset - len(named), 0)
        batch = _FIRST_BATCH
        while position < len(rows):
            names = self.model.chunk_names(parent, position, position + batch)
            for name in names:
                row = rows.start + position
                position += 1
                child = self.n_named + row
                size = int(self.model.lengths[row])
                yield (
                    name.encode(),
                    Entry(place.ino(child), False, size, self.mtime_ns),
                    (len(named) + position),
                )
            batch = min(batch * 4, _LAST_BATCH)

    def file_source(self, place: ZarrPlace, node: int) -> FileSource:
        """Where the bytes of file node `node` come from."""
        path = self._path_of(node)
        if path is None:
            row = node - self.n_named
            offset, length = int(self.model.offsets[row]), int(self.model.lengths[row])
            return BlobRange(self.blob, offset, length)
        data = self.model.inline.get(path)
        if data is None:
            raise IsADirectory(f"inode {place.ino(node)} is a directory")
        return InlineFile(data)

    def chunk_of(self, node: int) -> tuple[Hashable, tuple[int, ...]] | None:
        """(its array, its row) when `node` is a referenced chunk (readahead), else None."""
        row = node - self.n_named
        if not 0 <= row < self.model.chunk_count:
            return None
        return self.model.table_of(row), (row,)

    def next_chunk(
        self, array: Hashable, coords: tuple[int, ...]
    ) -> tuple[tuple[int, ...], int] | None:
        """The chunk after row `coords` of the same array (rows are in row-major order), and its
        node; None at the array's end."""
        row = coords[0] + 1
        if row >= self.model.chunk_count or self.model.table_of(row) != array:
            return None
        return (row,), self.n_named + row

    def path(self, node: int) -> str:
        """The path of `node` in the view (for log lines)."""
        path = self._path_of(node)
        return path if path is not None else self.model.chunk_at(node - self.n_named)[0]


class VirtualZarrs:
    """Makes `VirtualView`s of blobs: see the module docstring."""

    def __init__(self, cache: VirtualCache) -> None:
        self.cache = cache
        #: Views kept, by blob version.
        self._views: BoundedLRU[ObjectRef, VirtualView] = BoundedLRU(
            config.VIRTUAL_MEMORY, lambda view: view.model.approx_bytes + 200 * view.n_named
        )

    @property
    def loaded_bytes(self) -> int:
        """Bytes of the views kept in memory (roughly)."""
        return self._views.weight

    def view_now(self, place: ZarrPlace) -> VirtualView | None:
        """The view of the blob at `place` if it is built and kept, else None: then ask `view`."""
        return self._views.get(blob_ref(place.asset))

    async def view(self, place: ZarrPlace) -> VirtualView:
        """The virtual Zarr view of the blob at `place` (built on first entry)."""
        asset = place.asset
        ref = blob_ref(asset)
        view = self._views.get(ref)
        if view is None:
            model = await self.cache.get(ref, asset.path)
            view = self._views.get(ref)  # numbered meanwhile by another request
            if view is None:
                view = VirtualView.of(model, ref, asset.mtime_ns)
                self._views.put(ref, view)
        return view
