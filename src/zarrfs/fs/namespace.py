"""The namespace: inode numbers, lookup, readdir iteration and attributes. Pure and synchronous.

Owns: the directory tree of one resolved dandiset version (`dandiset.yaml`, every asset at its path,
parent directories implied by the paths) and the mapping between inode numbers and entries, including
entries inside Zarrs. Never performs I/O: questions about entries inside a Zarr take that Zarr's loaded
`ManifestIndex` as an argument, and `zarr_of` says which index a question needs.

Inode numbers here are *local* to the namespace, deterministic and never reused (`inodes` maps them
into a mount's global inode space). The top-level tree gets 1..T in sorted path order (1 is the root).
The Zarrs are numbered 1..Z in sorted path order ("slots"); node `n` (n >= 1) of the manifest index of
slot `s` is inode `(s << ZARR_SHIFT) | n`, and node 0 (the Zarr root) is the Zarr asset's own top-level
inode. So an inode survives the index being evicted and reloaded, and `forget` needs no bookkeeping.
Readdir offsets are 1 + the position of the entry in its directory's sorted children, stable because
the tree never changes. A namespace may also be rooted at one Zarr (`root_zarr`: the root is slot 1).
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zarrfs import config
from zarrfs.archive.assets import AssetRecord
from zarrfs.archive.resolver import ResolvedVersion
from zarrfs.base.refs import ObjectRef
from zarrfs.config import Source
from zarrfs.errors import DataError, IsADirectory, NotADirectory, NotFound

if TYPE_CHECKING:  # the manifest machinery is imported when a Zarr is first entered
    from zarrfs.manifests.index import ManifestIndex

log = logging.getLogger(__name__)

ROOT_INO = 1
#: Bits of a node id within one Zarr (4 billion nodes; the largest DANDI Zarr has 1.5 million).
ZARR_SHIFT = 32
NODE_MASK = (1 << ZARR_SHIFT) - 1
DANDISET_YAML = "dandiset.yaml"
#: The name of a synthesized consolidated metadata document (`--consolidate`).
CONSOLIDATED = b".zmetadata"


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


FileSource = ObjectRef | InlineFile


@dataclass(slots=True)
class _Top:
    """A node of the top-level tree (internal)."""

    ino: int
    name: bytes
    parent: int
    is_dir: bool
    size: int = 0
    mtime_ns: int = 0
    asset: AssetRecord | None = None
    inline: bytes | None = None
    slot: int = 0  # Zarr slot when this is a Zarr root, else 0
    child_names: list[bytes] = field(default_factory=list)  # sorted, for directories
    child_inos: list[int] = field(default_factory=list)

    def entry(self) -> Entry:
        return Entry(self.ino, self.is_dir, self.size, self.mtime_ns)


class Namespace:
    """The immutable inode table of one mounted version."""

    def __init__(
        self, resolved: ResolvedVersion, *, bucket: str, root_zarr: AssetRecord | None = None
    ) -> None:
        self.resolved = resolved
        self.bucket = bucket
        newest = max((a.mtime_ns for a in resolved.assets), default=0)
        self._nodes: list[_Top | None] = [None]  # index = inode
        self._zarr_roots: list[_Top | None] = [None]  # index = slot
        #: Synthesized `.zmetadata` documents by Zarr slot (`--consolidate`): node `n_nodes`.
        self._consolidated: dict[int, bytes] = {}
        root = self._add(b"", parent=ROOT_INO, is_dir=True, mtime_ns=newest)
        assert root.ino == ROOT_INO
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
                    parent=ROOT_INO,
                    is_dir=False,
                    size=len(resolved.dandiset_yaml),
                    mtime_ns=newest,
                    inline=resolved.dandiset_yaml,
                ),
            )
        for asset in sorted(resolved.assets, key=lambda a: a.path.encode("utf-8")):
            self._add_asset(asset, dirs, pending)
        for node in self._nodes:
            if node is not None and node.is_dir:
                kids = sorted(pending.pop(node.ino, {}).items())
                node.child_names = [name for name, _ in kids]
                node.child_inos = [n.ino for _, n in kids]
        self.n_assets = len(resolved.assets)
        self.total_size = sum(a.size for a in resolved.assets)

    @classmethod
    def for_zarr(cls, asset: AssetRecord, *, bucket: str, source: Source) -> Namespace:
        """A namespace that is one Zarr (`zarrs/.../<checksum>.zarr` of an archive mount)."""
        resolved = ResolvedVersion(
            source=source, assets=(asset,), dandiset_yaml=None, published=True
        )
        return cls(resolved, bucket=bucket, root_zarr=asset)

    @property
    def n_plain(self) -> int:
        """Local inodes of the top-level tree besides the root (2..T)."""
        return len(self._nodes) - 2

    @property
    def n_slots(self) -> int:
        """Zarr slots (1..Z)."""
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
        pending.setdefault(parent.ino, {})[node.name] = node

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
                node = self._add(part.encode(), parent=parent.ino, is_dir=True)
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
                parent=parent.ino,
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
                parent=parent.ino,
                is_dir=False,
                size=asset.size,
                mtime_ns=asset.mtime_ns,
                asset=asset,
            )
        self._insert(pending, parent, node)

    @staticmethod
    def _file_exists(pending: dict[int, dict[bytes, _Top]], parent: _Top, name: bytes) -> bool:
        return name in pending.get(parent.ino, {})

    # --- inode arithmetic -----------------------------------------------------------------------

    def _top(self, ino: int) -> _Top:
        if 0 < ino < len(self._nodes):
            node = self._nodes[ino]
            if node is not None:
                return node
        raise NotFound(f"no inode {ino}")

    def _split(self, ino: int) -> tuple[_Top, int] | None:
        """(Zarr root node, manifest node) for an inode inside or at a Zarr, else None."""
        slot = ino >> ZARR_SHIFT
        if slot:
            if slot >= len(self._zarr_roots):
                raise NotFound(f"no inode {ino}")
            root = self._zarr_roots[slot]
            assert root is not None
            return root, ino & NODE_MASK
        node = self._top(ino)
        return (node, 0) if node.slot else None

    def zarr_of(self, ino: int, *, inside_only: bool = False) -> AssetRecord | None:
        """The Zarr asset whose index is needed to answer about `ino`.

        With `inside_only`, a Zarr root itself does not count (its attributes need no index).
        """
        split = self._split(ino)
        if split is None or (inside_only and split[1] == 0):
            return None
        root, _ = split
        asset = root.asset
        assert asset is not None
        if asset.problem:
            raise DataError(f"Zarr asset {asset.path} cannot be served: {asset.problem}")
        return asset

    def asset_of(self, ino: int) -> AssetRecord | None:
        """The asset `ino` belongs to (a blob, a Zarr or an entry inside one), if any."""
        split = self._split(ino)
        node = split[0] if split is not None else self._top(ino)
        return node.asset

    def is_zarr_root(self, ino: int) -> bool:
        split = self._split(ino)
        return split is not None and split[1] == 0

    def zarr_assets(self) -> list[AssetRecord]:
        return [n.asset for n in self._zarr_roots if n is not None and n.asset is not None]

    def _zarr_entry(self, root: _Top, index: ManifestIndex, node: int) -> Entry:
        if node == 0:
            return root.entry()
        if node == index.n_nodes and root.slot in self._consolidated:
            size = len(self._consolidated[root.slot])
            return Entry((root.slot << ZARR_SHIFT) | node, False, size, root.mtime_ns)
        stat = index.stat(node)
        return Entry((root.slot << ZARR_SHIFT) | node, stat.is_dir, stat.size, stat.mtime_ns)

    def add_consolidated(self, ino: int, data: bytes) -> None:
        """Show a synthesized `.zmetadata` (`data`) at the root of the Zarr that `ino` is in
        (`--consolidate`; the Zarr has none of its own). Its node id is one past the index's last."""
        split = self._split(ino)
        if split is None:
            raise ValueError(f"inode {ino} is not in a Zarr")
        self._consolidated[split[0].slot] = data

    def has_consolidated(self, ino: int) -> bool:
        """Whether the Zarr that `ino` is in shows a synthesized `.zmetadata` already."""
        split = self._split(ino)
        return split is not None and split[0].slot in self._consolidated

    def _has_node(self, root: _Top, index: ManifestIndex, node: int) -> bool:
        return node < index.n_nodes or (node == index.n_nodes and root.slot in self._consolidated)

    @staticmethod
    def _check_index(root: _Top, index: ManifestIndex | None) -> ManifestIndex:
        asset = root.asset
        if index is None or asset is None or index.zarr_id != asset.zarr_id:
            raise AssertionError(f"caller passed the wrong manifest index for {root.name!r}")
        return index

    # --- queries ----------------------------------------------------------------------------------

    def getattr(self, ino: int, index: ManifestIndex | None = None) -> Entry:
        split = self._split(ino)
        if split is None or split[1] == 0:
            return self._top(ino if split is None else split[0].ino).entry()
        root, node = split
        idx = self._check_index(root, index)
        if not self._has_node(root, idx, node):
            raise NotFound(f"no inode {ino}")
        return self._zarr_entry(root, idx, node)

    def lookup(self, parent: int, name: bytes, index: ManifestIndex | None = None) -> Entry:
        split = self._split(parent)
        if split is None:
            node = self._top(parent)
            if not node.is_dir:
                raise NotADirectory(f"inode {parent} is not a directory")
            i = bisect_left(node.child_names, name)
            if i < len(node.child_names) and node.child_names[i] == name:
                return self._top(node.child_inos[i]).entry()
            raise NotFound(name.decode("utf-8", "replace"))
        root, mnode = split
        idx = self._check_index(root, index)
        if mnode >= idx.n_nodes:
            raise NotFound(f"no inode {parent}")
        if not idx.is_dir(mnode):
            raise NotADirectory(f"inode {parent} is not a directory")
        child = idx.lookup(mnode, name)
        if (
            child is None
            and mnode == 0
            and name == CONSOLIDATED
            and root.slot in self._consolidated
        ):
            child = idx.n_nodes
        if child is None:
            raise NotFound(name.decode("utf-8", "replace"))
        return self._zarr_entry(root, idx, child)

    def check_dir(self, ino: int, index: ManifestIndex | None = None) -> None:
        if not self.getattr(ino, index).is_dir:
            raise NotADirectory(f"inode {ino} is not a directory")

    def readdir(
        self, ino: int, offset: int, index: ManifestIndex | None = None
    ) -> Iterator[tuple[bytes, Entry, int]]:
        """(name, entry, next offset) for the children of `ino` from `offset` on (0 = start)."""
        split = self._split(ino)
        if split is None:
            node = self._top(ino)
            if not node.is_dir:
                raise NotADirectory(f"inode {ino} is not a directory")
            for i in range(offset, len(node.child_inos)):
                yield node.child_names[i], self._top(node.child_inos[i]).entry(), i + 1
            return
        root, mnode = split
        idx = self._check_index(root, index)
        if mnode >= idx.n_nodes or not idx.is_dir(mnode):
            raise NotADirectory(f"inode {ino} is not a directory")
        base = root.slot << ZARR_SHIFT
        if mnode == 0 and root.slot in self._consolidated:
            listing = [
                (name, Entry(base | child, is_dir, size, mtime))
                for child, name, is_dir, size, mtime in idx.children(0, 0, 1 << 30)
            ]
            listing.append((CONSOLIDATED, self._zarr_entry(root, idx, idx.n_nodes)))
            listing.sort(key=lambda row: row[0])
            for i in range(offset, len(listing)):
                yield listing[i][0], listing[i][1], i + 1
            return
        batch = 64  # the kernel takes a few dozen entries per request; grow for big listings
        while rows := idx.children(mnode, offset, batch):
            for child, name, is_dir, size, mtime_ns in rows:
                offset += 1
                yield name, Entry(base | child, is_dir, size, mtime_ns), offset
            batch = min(batch * 4, 4096)

    def file_source(self, ino: int, index: ManifestIndex | None = None) -> FileSource:
        """Where the bytes of file `ino` come from."""
        split = self._split(ino)
        if split is None:
            node = self._top(ino)
            if node.is_dir:
                raise IsADirectory(f"inode {ino} is a directory")
            if node.inline is not None:
                return InlineFile(node.inline)
            asset = node.asset
            assert asset is not None
            if asset.problem or asset.blob_key is None:
                raise DataError(f"asset {asset.path} cannot be served: {asset.problem}")
            return ObjectRef(
                key=asset.blob_key, version_id=None, size=asset.size, etag=asset.blob_etag
            )
        root, mnode = split
        idx = self._check_index(root, index)
        if not self._has_node(root, idx, mnode):
            raise NotFound(f"no inode {ino}")
        if mnode == idx.n_nodes:
            return InlineFile(self._consolidated[root.slot])
        if mnode == 0 or idx.is_dir(mnode):
            raise IsADirectory(f"inode {ino} is a directory")
        return idx.object_ref(mnode)

    def describe(self, ino: int, index: ManifestIndex | None = None) -> str:
        """A human-readable path for log lines."""
        split = self._split(ino)
        node = split[0] if split else self._top(ino)
        parts = []
        while node.ino != ROOT_INO:
            parts.append(node.name.decode("utf-8", "replace"))
            node = self._top(node.parent)
        path = "/".join(reversed(parts))
        if split and split[1] and index is not None:
            inner = CONSOLIDATED.decode() if split[1] == index.n_nodes else index.path(split[1])
            path += "/" + inner
        return path or "/"
