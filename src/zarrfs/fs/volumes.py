"""The volumes of a mount: resolved versions and Zarrs, each resolved once and kept within a budget.

Owns: the registry of volumes (one resolved dandiset version, or one Zarr at one checksum of an
archive mount's `zarrs/`), what each is (its level key and its path, for log lines), resolving a
volume when it is first entered (single flight: however many requests need it, and in the service
nursery when set, so a requester that gives up cancels nothing others need), placing its namespace
where the inode space reserved room for it, and keeping resolved volumes in a byte-bounded LRU
(`version_memory`; a version mount's own volume is kept for good). An evicted volume resolves again
into the same inodes. A draft stays pinned to what it first resolved to: its asset list is kept under
the cache dir's `tmp/` in a directory named for this host and process (`manifest_cache.pins_dir_name`)
whose lease (mtime) `renew_pins` renews, so that sweeps remove only those of mounts that are gone.
(A pin file that is damaged or removed meanwhile, by `zarrfs cache clear`, is not a pin: that draft
is resolved again through the API, and may show its newer state.)
Never does: FUSE, reading files, deciding what names exist (`levels`).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import trio

from zarrfs.archive.assets import AssetRecord
from zarrfs.archive.catalog import Catalog
from zarrfs.archive.levels import Level, NodeKey
from zarrfs.archive.resolver import ResolvedVersion, resolved_from_json, resolved_to_json
from zarrfs.base.flight import BoundedLRU, SingleFlight
from zarrfs.config import Source
from zarrfs.errors import DataError, VersionNotFound
from zarrfs.fs.inodes import InodeSpace, Volume
from zarrfs.fs.namespace import Namespace
from zarrfs.io.cache_dir import CacheLayout, read_checked_json, write_checked_json
from zarrfs.io.disk_gate import DiskGate
from zarrfs.manifest_cache import pins_dir_name
from zarrfs.manifests.checksums import parse_checksum

log = logging.getLogger(__name__)


class Volumes:
    """The volumes of one mount (see the module docstring)."""

    def __init__(
        self,
        catalog: Catalog,
        inodes: InodeSpace,
        *,
        version_memory: int,
        cache_dir: Path | None = None,
        gate: DiskGate | None = None,
        virtual_zarr: bool = False,
    ) -> None:
        self.catalog = catalog
        self.inodes = inodes
        self.gate = gate
        #: Versions show a virtual Zarr view beside each HDF5 blob (`--virtual-zarr`).
        self.virtual_zarr = virtual_zarr
        self._keys: dict[int, NodeKey] = {}  # by volume id
        self._paths: dict[int, str] = {}
        self._loaded: BoundedLRU[int, Namespace] = BoundedLRU(
            version_memory, lambda ns: ns.approx_bytes
        )
        self._kept: dict[int, Namespace] = {}  # never evicted: a version mount's, unpinnable drafts
        self._resolutions: SingleFlight[int, Namespace] = SingleFlight("version resolution")
        self._pins: Path | None = None
        if cache_dir is not None and gate is not None:
            name = pins_dir_name(os.getpid(), uuid.uuid4().hex[:8])
            self._pins = CacheLayout(cache_dir).tmp / name

    @property
    def nursery(self) -> trio.Nursery | None:
        """Where resolutions run (None: in the requester's task)."""
        return self._resolutions.nursery

    @nursery.setter
    def nursery(self, nursery: trio.Nursery | None) -> None:
        self._resolutions.nursery = nursery

    def add(self, root_ino: int, key: NodeKey, path: str) -> Volume:
        """A new volume rooted at `root_ino` for what `key` names (`path`: where it is shown)."""
        volume = self.inodes.new_volume(root_ino)
        self._keys[volume.id] = key
        self._paths[volume.id] = path
        return volume

    def key(self, volume: Volume) -> NodeKey:
        return self._keys[volume.id]

    def path(self, volume: Volume) -> str:
        """Where the volume is shown, from the mount's root ("" for the mount's own version)."""
        return self._paths[volume.id]

    def version_namespace(self, resolved: ResolvedVersion) -> Namespace:
        """The namespace of a resolved version, as this mount shows versions."""
        return Namespace(resolved, virtual_zarr=self.virtual_zarr)

    def settle(self, volume: Volume, namespace: Namespace, *, keep: bool = False) -> None:
        """Place `namespace` where `volume`'s inodes are (reserved the first time) and keep it."""
        self.inodes.reserve(volume, namespace.n_plain, namespace.n_slots)
        namespace.place(volume.root_ino, volume.plain_base, volume.slot_base)
        if keep:
            self._kept[volume.id] = namespace
        else:
            self._loaded.put(volume.id, namespace)

    def cached(self, volume: Volume) -> Namespace | None:
        """The volume's namespace if it is resolved and kept, else None."""
        return self._kept.get(volume.id) or self._loaded.get(volume.id)

    def namespaces(self) -> Iterator[Namespace]:
        """Every namespace kept now."""
        yield from self._kept.values()
        yield from self._loaded.values()

    @property
    def approx_bytes(self) -> int:
        """Approximate memory of the resolved versions kept (for `zarrfs stats`)."""
        return self._loaded.weight + sum(ns.approx_bytes for ns in self._kept.values())

    async def namespace(self, volume: Volume) -> Namespace:
        """The volume's namespace, resolved now if need be (once, however many ask)."""
        namespace = self.cached(volume)
        if namespace is not None:
            return namespace
        return await self._resolutions.run(volume.id, partial(self._resolve, volume))

    async def _resolve(self, volume: Volume) -> Namespace:
        key, path = self._keys[volume.id], self._paths[volume.id]
        try:
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
                namespace = Namespace.for_zarr(asset, source=Source("", ""))
            else:
                namespace = await self._resolve_version(key, path, volume)
        except VersionNotFound as e:  # it existed when it was looked up: EIO now
            raise DataError(str(e)) from None
        self.settle(volume, namespace)
        return namespace

    async def _resolve_version(self, key: NodeKey, path: str, volume: Volume) -> Namespace:
        pinned = await self._load_pin(volume)
        if pinned is not None:
            return self.version_namespace(pinned)
        resolved = await self.catalog.resolve(Source(key.dandiset_id, key.version))
        report_unservable(resolved)
        if key.version == "draft":
            await self._save_pin(volume, resolved)
        log.info("entered %s: %d assets", path or resolved.source, len(resolved.assets))
        return self.version_namespace(resolved)

    # --- draft pins -------------------------------------------------------------------------------

    async def _save_pin(self, volume: Volume, resolved: ResolvedVersion) -> None:
        if self._pins is None or self.gate is None:
            self._kept[volume.id] = self.version_namespace(resolved)  # no cache dir: in memory
            return
        path = self._pins / f"{volume.id}.json"
        try:
            await self.gate.run(write_checked_json, path, resolved_to_json(resolved))
        except OSError as e:
            log.warning("cannot keep the pin of %s on disk (%s): keeping it in memory", path, e)
            self._kept[volume.id] = self.version_namespace(resolved)

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
        if self._pins is not None and self.gate is not None:
            try:
                await self.gate.run(_touch_if_exists, self._pins)
            except OSError as e:
                log.debug("cannot renew the lease of %s: %s", self._pins, e)

    async def remove_pins(self) -> None:
        """Delete this mount's pin files (at unmount), through the gate (a stalled cache dir is
        left for a later sweep)."""
        if self._pins is not None and self.gate is not None:
            try:
                await self.gate.run(shutil.rmtree, self._pins, True)
            except OSError as e:
                log.debug("cannot remove %s: %s", self._pins, e)


def report_unservable(resolved: ResolvedVersion) -> None:
    """Log each asset of `resolved` that is listed but cannot be served."""
    for asset in resolved.assets:
        if asset.problem:
            log.warning(
                "asset %s of %s is listed but cannot be served (EIO): %s",
                asset.path,
                resolved.source,
                asset.problem,
            )


def _touch_if_exists(path: Path) -> None:
    if path.exists():
        os.utime(path)
