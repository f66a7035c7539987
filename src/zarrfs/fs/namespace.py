"""The namespace of one resolved version: its tree, inode numbers, lookup, readdir, attributes. Pure.

Owns: the directory tree of one resolved dandiset version (`dandiset.yaml`, every asset at its path,
parent directories implied by the paths) in the mount's inode numbers, and where each Zarr's nodes are
numbered (`ZarrPlace`). Never performs I/O and never sees a manifest: the inodes inside a Zarr are
answered by that Zarr's view (`zarrs.ZarrView`); `zarr_at` says which Zarr an inode is in.

Inode numbers are the mount's, deterministic and never reused. A namespace is built first (its shape:
`n_plain` top-level entries besides the root, `n_slots` Zarrs) and then `place`d where the mount's
inode space reserved room for it (`inodes`): its root is `root_ino`, the rest of its top-level tree
`plain_base ..` in sorted path order, and its Zarrs `slot_base ..` in sorted path order, node `n >= 1`
of the Zarr in slot `s` being inode `(s << ZARR_SHIFT) | n` (node 0, the Zarr root, is the Zarr
asset's own top-level inode). An unplaced namespace numbers as if placed at `(1, 2, 1)`. So an inode
survives the version being evicted and resolved again, and `forget` needs no bookkeeping. Readdir
offsets are 1 + the position of the entry in its directory's sorted children, stable because the tree
never changes. A namespace may also be rooted at one Zarr (`root_zarr`: the root is the Zarr).

With `virtual_zarr`, every blob that may be HDF5 (`config.VIRTUAL_ZARR_SUFFIXES`, or a media type of
`config.VIRTUAL_ZARR_MEDIA_TYPES`) also gets a sibling directory `<name>.zarr`, its virtual Zarr view
(`virtual_zarrs`), unless that name is taken. It is numbered like a Zarr (its place says `virtual`),
in slots after every real Zarr's, so a real Zarr's inodes do not depend on the option. Whether the
blob is HDF5 at all is learned when the view is entered: listing a directory opens nothing.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field

from zarrfs import config
from zarrfs.archive.assets import AssetRecord
from zarrfs.archive.resolver import ResolvedVersion
from zarrfs.base.refs import ObjectRef
from zarrfs.config import Source
from zarrfs.errors import DataError, IsADirectory, NotADirectory, NotFound

log = logging.getLogger(__name__)

ROOT_INO = 1
#: Bits of a node id within one Zarr (4 billion nodes; the largest DANDI Zarr has 1.5 million).
ZARR_SHIFT = 32
NODE_MASK = (1 << ZARR_SHIFT) - 1
DANDISET_YAML = "dandiset.yaml"


@dataclass(frozen=True, slots=True)
class Entry:
    """What lookup/getattr/readdir report for one name."""

    ino: int
    is_dir: bool
    size: int
    mtime_ns: int
    #: Seconds the kernel may keep this entry and its attributes; None: as long as it likes
    #: (`config.ENTRY_TIMEOUT`), because it never changes.
    ttl: float | None = None
    #: The target of a symbolic link (is_dir is then False and size is the target's length).
    link: bytes | None = None


@dataclass(frozen=True, slots=True)
class InlineFile:
    """A small file held in memory (e.g. `dandiset.yaml`, fetched whole at mount)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class BlobRange:
    """A file whose bytes are `length` bytes of object `ref` from `offset` on (a chunk of a virtual
    Zarr: a range of its HDF5 blob)."""

    ref: ObjectRef
    offset: int
    length: int


FileSource = ObjectRef | InlineFile | BlobRange


@dataclass(frozen=True, slots=True)
class ZarrPlace:
    """Where a Zarr's nodes are in the inode space: its asset, its root's inode (node 0), and the
    base its other nodes' inodes are `base | node` of."""

    asset: AssetRecord
    root_ino: int
    base: int
    #: The Zarr's place in its version's tree, for log lines.
    path: str
    #: A virtual Zarr view of the blob `asset` (`--virtual-zarr`), not a Zarr asset.
    virtual: bool = False

    def node(self, ino: int) -> int:
        """The node id (0: the root) of inode `ino` of this Zarr."""
        return 0 if ino == self.root_ino else ino & NODE_MASK

    def ino(self, node: int) -> int:
        """The inode of node `node` of this Zarr."""
        return self.root_ino if node == 0 else self.base | node


@dataclass(slots=True)
class _Top:
    """A node of the top-level tree (internal; `index` is its position, not its inode)."""

    index: int
    name: bytes
    parent: int  # index
    is_dir: bool
    size: int = 0
    mtime_ns: int = 0
    asset: AssetRecord | None = None
    inline: bytes | None = None
    slot: int = 0  # the Zarr's position (1..) when this is a Zarr root, else 0
    virtual: bool = False  # a Zarr root that is the virtual Zarr view of the blob `asset`
    child_names: list[bytes] = field(default_factory=list)  # sorted, for directories
    child_indexes: list[int] = field(default_factory=list)


class Namespace:
    """The immutable inode table of one mounted version."""

    def __init__(
        self,
        resolved: ResolvedVersion,
        *,
        root_zarr: AssetRecord | None = None,
        virtual_zarr: bool = False,
    ) -> None:
        self.resolved = resolved
        newest = max((a.mtime_ns for a in resolved.assets), default=0)
        self._nodes: list[_Top | None] = [None]  # by index; 1 is the root
        self._zarr_roots: list[_Top | None] = [None]  # by slot
        #: The `ZarrPlace` of each slot, made when first asked for (every operation inside a Zarr
        #: asks), and dropped when the namespace is placed again.
        self._places: dict[int, ZarrPlace] = {}
        self.root_ino, self._plain_base, self._slot_base = ROOT_INO, 2, 1
        root = self._add(b"", parent=1, is_dir=True, mtime_ns=newest)
        if root_zarr is not None:  # the root is the Zarr itself: slot 1
            root.asset, root.slot, root.mtime_ns = root_zarr, 1, root_zarr.mtime_ns
            self._zarr_roots.append(root)
            self.n_assets, self.total_size = 1, root_zarr.size
            return
        pending: dict[int, dict[bytes, _Top]] = {}
        dirs: dict[str, _Top] = {"": root}
        if resolved.dandiset_yaml is not None:
            self._insert(
                pending,
                root,
                self._add(
                    DANDISET_YAML.encode(),
                    parent=1,
                    is_dir=False,
                    size=len(resolved.dandiset_yaml),
                    mtime_ns=newest,
                    inline=resolved.dandiset_yaml,
                ),
            )
        for asset in sorted(resolved.assets, key=lambda a: a.path.encode("utf-8")):
            self._add_asset(asset, dirs, pending)
        if virtual_zarr:
            self._add_virtual_zarrs(pending)
        for node in self._nodes:
            if node is not None and node.is_dir:
                kids = sorted(pending.pop(node.index, {}).items())
                node.child_names = [name for name, _ in kids]
                node.child_indexes = [n.index for _, n in kids]
        self.n_assets = len(resolved.assets)
        self.total_size = sum(a.size for a in resolved.assets)

    @classmethod
    def for_zarr(cls, asset: AssetRecord, *, source: Source) -> Namespace:
        """A namespace that is one Zarr (`zarrs/.../<checksum>.zarr` of an archive mount)."""
        resolved = ResolvedVersion(
            source=source, assets=(asset,), dandiset_yaml=None, published=True
        )
        return cls(resolved, root_zarr=asset)

    def place(self, root_ino: int, plain_base: int, slot_base: int) -> None:
        """Number this namespace where the mount reserved room for it (see the module docstring)."""
        self.root_ino, self._plain_base, self._slot_base = root_ino, plain_base, slot_base
        self._places.clear()

    @property
    def n_plain(self) -> int:
        """Top-level entries besides the root (inodes `plain_base ..`)."""
        return len(self._nodes) - 2

    @property
    def n_slots(self) -> int:
        """Zarrs (slots `slot_base ..`)."""
        return len(self._zarr_roots) - 1

    @property
    def approx_bytes(self) -> int:
        """Rough memory this namespace holds (its weight in an LRU of resolved versions)."""
        return config.NODE_BYTES * len(self._nodes)

    # --- construction ---------------------------------------------------------------------------

    def _add(self, name: bytes, *, parent: int, is_dir: bool, **kw: object) -> _Top:
        node = _Top(len(self._nodes), name, parent, is_dir, **kw)  # type: ignore[arg-type]
        self._nodes.append(node)
        return node

    @staticmethod
    def _insert(pending: dict[int, dict[bytes, _Top]], parent: _Top, node: _Top) -> None:
        pending.setdefault(parent.index, {})[node.name] = node

    def _add_asset(
        self,
        asset: AssetRecord,
        dirs: dict[str, _Top],
        pending: dict[int, dict[bytes, _Top]],
    ) -> None:
        parts = asset.path.split("/")
        if asset.path in dirs or (len(parts) == 1 and parts[0] == DANDISET_YAML):
            log.warning("skipping asset %s: its path is already taken", asset.path)
            return
        parent = dirs[""]
        for i, part in enumerate(parts[:-1]):
            prefix = "/".join(parts[: i + 1])
            node = dirs.get(prefix)
            if node is None:
                if self._file_exists(pending, parent, part.encode()):
                    log.warning("skipping asset %s: %s is a file", asset.path, prefix)
                    return
                node = self._add(part.encode(), parent=parent.index, is_dir=True)
                self._insert(pending, parent, node)
                dirs[prefix] = node
            elif node.slot:
                log.warning("skipping asset %s: %s is a Zarr", asset.path, prefix)
                return
            node.mtime_ns = max(node.mtime_ns, asset.mtime_ns)
            parent = node
        name = parts[-1].encode()
        if self._file_exists(pending, parent, name):
            log.warning("skipping asset %s: duplicate path", asset.path)
            return
        if asset.is_zarr:
            slot = len(self._zarr_roots)
            node = self._add(
                name,
                parent=parent.index,
                is_dir=True,
                mtime_ns=asset.mtime_ns,
                asset=asset,
                slot=slot,
            )
            self._zarr_roots.append(node)
            dirs[asset.path] = node
        else:
            node = self._add(
                name,
                parent=parent.index,
                is_dir=False,
                size=asset.size,
                mtime_ns=asset.mtime_ns,
                asset=asset,
            )
        self._insert(pending, parent, node)

    def _add_virtual_zarrs(self, pending: dict[int, dict[bytes, _Top]]) -> None:
        """A `<name>.zarr` directory beside each blob that may be HDF5, in path order, after every
        Zarr (so their slots follow the real Zarrs'); skipped when the name is taken."""
        blobs = [
            node
            for node in self._nodes
            if node is not None and not node.is_dir and node.asset is not None
            and might_be_hdf5(node.asset)
        ]  # fmt: skip
        for blob in blobs:
            parent = self._nodes[blob.parent]
            assert blob.asset is not None and parent is not None
            name = blob.name + b".zarr"
            if self._file_exists(pending, parent, name):
                log.info("no virtual Zarr view of %s: %s exists", blob.asset.path, name.decode())
                continue
            node = self._add(
                name,
                parent=blob.parent,
                is_dir=True,
                mtime_ns=blob.mtime_ns,
                asset=blob.asset,
                slot=len(self._zarr_roots),
                virtual=True,
            )
            self._zarr_roots.append(node)
            self._insert(pending, parent, node)

    @staticmethod
    def _file_exists(pending: dict[int, dict[bytes, _Top]], parent: _Top, name: bytes) -> bool:
        return name in pending.get(parent.index, {})

    # --- inode arithmetic -----------------------------------------------------------------------

    def _ino(self, node: _Top) -> int:
        return self.root_ino if node.index == 1 else self._plain_base + node.index - 2

    def _top(self, ino: int) -> _Top:
        index = 1 if ino == self.root_ino else ino - self._plain_base + 2
        if (index == 1 and ino != self.root_ino) or not 0 < index < len(self._nodes):
            raise NotFound(f"no inode {ino}")
        node = self._nodes[index]
        assert node is not None
        return node

    def _entry(self, node: _Top) -> Entry:
        return Entry(self._ino(node), node.is_dir, node.size, node.mtime_ns)

    def _place(self, root: _Top) -> ZarrPlace:
        place = self._places.get(root.slot)
        if place is None:
            assert root.asset is not None
            base = (self._slot_base + root.slot - 1) << ZARR_SHIFT
            place = ZarrPlace(root.asset, self._ino(root), base, self._path(root), root.virtual)
            self._places[root.slot] = place
        return place

    def zarr_at(self, ino: int) -> ZarrPlace | None:
        """The Zarr `ino` is in or is the root of (None: a top-level inode that is not a Zarr).
        NotFound for an inode that is not this namespace's."""
        if ino >> ZARR_SHIFT:
            slot = (ino >> ZARR_SHIFT) - self._slot_base + 1
            if not 0 < slot < len(self._zarr_roots):
                raise NotFound(f"no inode {ino}")
            root = self._zarr_roots[slot]
            assert root is not None
            return self._place(root)
        node = self._top(ino)
        return self._place(node) if node.slot else None

    # --- queries about top-level inodes (Zarr roots included, not what is inside a Zarr) -------

    def asset_of(self, ino: int) -> AssetRecord | None:
        """The asset `ino` belongs to (a blob, a Zarr or an entry inside one), if any."""
        place = self.zarr_at(ino)
        return place.asset if place is not None else self._top(ino).asset

    def zarr_assets(self) -> list[AssetRecord]:
        """The Zarr assets (not the virtual Zarr views of blobs)."""
        return [
            n.asset
            for n in self._zarr_roots
            if n is not None and n.asset is not None and not n.virtual
        ]

    def getattr(self, ino: int) -> Entry:
        return self._entry(self._top(ino))

    def lookup(self, parent: int, name: bytes) -> Entry:
        node = self._top(parent)
        if not node.is_dir or node.slot:
            raise NotADirectory(f"inode {parent} is not a directory of the version")
        i = bisect_left(node.child_names, name)
        if i < len(node.child_names) and node.child_names[i] == name:
            child = self._nodes[node.child_indexes[i]]
            assert child is not None
            return self._entry(child)
        raise NotFound(name.decode("utf-8", "replace"))

    def check_dir(self, ino: int) -> None:
        if not self._top(ino).is_dir:
            raise NotADirectory(f"inode {ino} is not a directory")

    def readdir(self, ino: int, offset: int) -> Iterator[tuple[bytes, Entry, int]]:
        """(name, entry, next offset) for the children of `ino` from `offset` on (0 = start)."""
        node = self._top(ino)
        if not node.is_dir or node.slot:
            raise NotADirectory(f"inode {ino} is not a directory of the version")
        for i in range(offset, len(node.child_indexes)):
            child = self._nodes[node.child_indexes[i]]
            assert child is not None
            yield node.child_names[i], self._entry(child), i + 1

    def file_source(self, ino: int) -> FileSource:
        """Where the bytes of top-level file `ino` come from."""
        node = self._top(ino)
        if node.is_dir:
            raise IsADirectory(f"inode {ino} is a directory")
        if node.inline is not None:
            return InlineFile(node.inline)
        assert node.asset is not None
        return blob_ref(node.asset)

    def describe(self, ino: int) -> str:
        """A human-readable path of top-level inode `ino` (a Zarr's root for one inside it), for log
        lines."""
        place = self.zarr_at(ino) if ino >> ZARR_SHIFT else None
        return place.path if place is not None else self._path(self._top(ino))

    def _path(self, node: _Top) -> str:
        parts = []
        while node.index != 1:
            parts.append(node.name.decode("utf-8", "replace"))
            parent = self._nodes[node.parent]
            assert parent is not None
            node = parent
        return "/".join(reversed(parts)) or "/"


def blob_ref(asset: AssetRecord) -> ObjectRef:
    """The object a blob asset's bytes are read from (its immutable key); DataError when the asset
    cannot be served."""
    if asset.problem or asset.blob_key is None:
        raise DataError(f"asset {asset.path} cannot be served: {asset.problem}")
    return ObjectRef(key=asset.blob_key, version_id=None, size=asset.size, etag=asset.blob_etag)


def might_be_hdf5(asset: AssetRecord) -> bool:
    """Whether blob `asset` gets a virtual Zarr view (`config.VIRTUAL_ZARR_SUFFIXES`,
    `config.VIRTUAL_ZARR_MEDIA_TYPES`); whether it is HDF5 is checked when the view is entered."""
    if asset.is_zarr or asset.problem is not None:
        return False
    name = asset.path.rpartition("/")[2].lower()
    return name.endswith(config.VIRTUAL_ZARR_SUFFIXES) or (
        asset.media_type is not None and asset.media_type.lower() in config.VIRTUAL_ZARR_MEDIA_TYPES
    )
