"""The synthetic directories of an archive or dandiset mount: `dandisets/`, `releases/`, `latest`,
`zarrs/<z[0:3]>/<z[3:6]>/<id>/` and the like, above the volumes.

Owns: the nodes of those levels (what `archive.levels` says may exist there, and `archive.catalog`
says does exist now), their inode numbers, lookups in them (creating the volume a name stands for:
a version, or one Zarr at one checksum), their listings, attributes and the `latest` link, and how
long each answer may be remembered. Never does: resolve a volume (`volumes`), FUSE, I/O of its own.

What it keeps grows only with what exists: a name gets an inode only once the archive says it exists
(a Zarr id once a manifest root or the API knows it, a Zarr checksum once its manifest is found),
and the two `zarrs/` hex levels get inode numbers derived from their names, from one block reserved
at start, with no node object kept at all. An unreachable remote is EIO (RemoteError), never "does
not exist". Concurrency: one trio run; the catalog's answers are single flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

from zarrfs import config
from zarrfs.archive import levels
from zarrfs.archive.catalog import Catalog
from zarrfs.archive.levels import Level, NodeKey
from zarrfs.errors import ManifestMissing, NotADirectory, NotFound
from zarrfs.fs.inodes import InodeSpace, Volume
from zarrfs.fs.namespace import Entry
from zarrfs.fs.volumes import Volumes
from zarrfs.manifest_cache import ManifestCache

#: The `zarrs/` hex levels: `zarrs/<z[0:3]>` (4,096 names) and `zarrs/<z[0:3]>/<z[3:6]>` (16.8 M).
_HEX3 = 1 << 12
_HEX_BLOCK = _HEX3 + (1 << 24)


@dataclass(frozen=True, slots=True)
class Synthetic:
    """A directory (or the `latest` link) of the archive's levels."""

    ino: int
    key: NodeKey
    path: str  # from the mount's root, for log lines


class SyntheticLevels:
    """The synthetic levels of one mount (see the module docstring)."""

    def __init__(
        self,
        catalog: Catalog,
        manifests: ManifestCache,
        inodes: InodeSpace,
        volumes: Volumes,
    ) -> None:
        self.catalog = catalog
        self.manifests = manifests
        self.inodes = inodes
        self.volumes = volumes
        self._nodes: dict[int, Synthetic] = {}
        self._by_key: dict[NodeKey, int] = {}
        self._hex_base = 0  # first inode of the zarrs/ hex levels (archive mounts)
        self._started_ns = time.time_ns()

    def add_root(self, ino: int, key: NodeKey) -> None:
        """The mount's root is this level (the archive, or one dandiset's versions)."""
        self._add(ino, key, "")
        if key == levels.ARCHIVE:
            self._hex_base = self.inodes.new_block(_HEX_BLOCK)

    @property
    def kept(self) -> int:
        """Nodes kept (for tests and statistics): grows only with names that exist."""
        return len(self._nodes) + len(self._by_key)

    def _add(self, ino: int, key: NodeKey, path: str) -> Synthetic:
        node = Synthetic(ino, key, path)
        self._nodes[ino] = node
        self._by_key[key] = ino
        return node

    def node(self, ino: int) -> Synthetic | None:
        """The synthetic node `ino` is (None: a volume's inode), the derived hex levels included."""
        node = self._nodes.get(ino)
        if node is not None or not self._hex_base:
            return node
        n = ino - self._hex_base
        if 0 <= n < _HEX3:
            prefix = f"{n:03x}"
            return Synthetic(ino, NodeKey(Level.ZARRS_PREFIX, zarr=prefix), f"zarrs/{prefix}")
        if _HEX3 <= n < _HEX_BLOCK:
            z = f"{n - _HEX3:06x}"
            return Synthetic(ino, NodeKey(Level.ZARRS_IDS, zarr=z), f"zarrs/{z[:3]}/{z[3:]}")
        return None

    def _derived_ino(self, key: NodeKey) -> int | None:
        if not self._hex_base:
            return None
        if key.level == Level.ZARRS_PREFIX:
            return self._hex_base + int(key.zarr, 16)
        if key.level == Level.ZARRS_IDS:
            return self._hex_base + _HEX3 + int(key.zarr, 16)
        return None

    def _child_ino(self, parent: Synthetic, name: str, key: NodeKey) -> int:
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
            self.volumes.add(ino, key, path)
        else:
            self._add(ino, key, path)
        return ino

    # --- answers ------------------------------------------------------------------------------------

    async def lookup(self, node: Synthetic, raw: bytes) -> Entry:
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

    async def _child_entry(self, node: Synthetic, name: str, key: NodeKey) -> Entry:
        ino = self._child_ino(node, name, key)
        child = self.node(ino)
        if child is not None:
            return await self.entry(child)
        volume = self.inodes.volume_of(ino)
        assert volume is not None
        return self._volume_root_entry(volume, key)

    def _volume_root_entry(self, volume: Volume, key: NodeKey) -> Entry:
        namespace = self.volumes.cached(volume)
        if namespace is not None:
            return namespace.getattr(volume.root_ino)
        mtime = levels.publication_time_ns(key.version) or self._started_ns
        if key.level == Level.ZARR:
            mtime = 0
        return Entry(volume.root_ino, True, 0, mtime)

    async def entry(self, node: Synthetic) -> Entry:
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

    async def readlink(self, node: Synthetic) -> bytes:
        if node.key.level != Level.LATEST:
            raise NotFound(f"{node.path} is not a symbolic link")
        entry = await self.entry(node)
        assert entry.link is not None
        return entry.link

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

    async def listing(self, node: Synthetic) -> list[tuple[bytes, Entry]]:
        """Every entry of directory `node`, as it is now."""
        key = node.key
        if key.level == Level.LATEST:
            raise NotADirectory(f"{node.path} is a symbolic link")
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


def _listing_ttl(key: NodeKey) -> float | None:
    if key.level in (Level.ARCHIVE,):
        return None
    if key.level == Level.DANDISETS:
        return config.DANDISET_LIST_TTL
    if key.level in (Level.ZARRS, Level.ZARRS_PREFIX, Level.ZARRS_IDS, Level.ZARR_CHECKSUMS):
        return config.ZARR_LIST_TTL
    return config.VERSION_LIST_TTL
