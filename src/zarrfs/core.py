"""The core every face of zarrfs sits on: one `Config` wired into a running `Filesystem`.

Owns: building, in one place, what the mount, the command-line verbs (`zarrfs ls`, ...) and the
fsspec filesystem share: the remote clients, the catalog, the manifest cache, the block cache with its
disk tier (and the disk's eviction), and the service nursery where loads, resolutions, prefetch and
disk writes run; sweeping the cache dir on start;
removing the mount's temporary files at the end. Never imports pyfuse3: a face that has no FUSE
uses this module as it is.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from . import config as cfg
from .catalog import Catalog
from .chunk_cache import BlockCache
from .config import Config
from .disk_cache import DiskBlockCache, default_size
from .disk_tier import DiskTier
from .errors import unwrap_single_exception
from .filesystem import Filesystem
from .manifest_cache import ManifestCache
from .remote import Remote

log = logging.getLogger(__name__)


@asynccontextmanager
async def open_filesystem(config: Config) -> AsyncIterator[Filesystem]:
    """A started `Filesystem` for `config.source` (VersionNotFound, NotFound... when the source
    does not exist), with its service nursery running; everything is closed on exit. Exceptions
    leave as themselves, not wrapped in an exception group."""
    async with Remote.open(config.s3) as remote:
        roots = config.manifest_roots or cfg.default_manifest_roots(config.s3.bucket)
        catalog = Catalog(
            remote,
            bucket=config.s3.bucket,
            api_url=config.api_url,
            manifest_roots=roots,
            cache_dir=config.cache_dir,
        )
        manifests = ManifestCache(
            remote,
            roots=roots,
            cache_dir=config.cache_dir,
            memory_budget=config.manifest_memory,
            disk_budget=config.manifest_disk_size,
            cpu_limiter=trio.CapacityLimiter(cfg.CPU_THREADS),
        )
        temps, _ = await trio.to_thread.run_sync(manifests.sweep, abandon_on_cancel=True)
        if temps:
            log.info("removed %d stale temporary files from %s", temps, config.cache_dir)
        disk, disk_note = await _disk_tier(config)
        blocks = BlockCache(config.memory_cache_size, config.block_size, disk=disk)
        fs = Filesystem(
            config.source,
            catalog,
            manifests,
            blocks,
            remote.s3,
            cache_dir=config.cache_dir,
            version_memory=config.version_memory,
            consolidate=config.consolidate,
        )
        try:
            description = await fs.start()  # before the nursery: its errors stay plain
            log.info("serving %s; %s", description, disk_note)
            with unwrap_single_exception():
                async with trio.open_nursery() as service:
                    manifests.service_nursery = fs.service_nursery = service
                    if disk is not None:
                        disk.nursery = service
                        service.start_soon(disk.keep_within_bounds)
                    if fs.holds_zarrs:
                        service.start_soon(_import_manifest_machinery)
                    try:
                        yield fs
                    finally:
                        service.cancel_scope.cancel()
        finally:
            fs.remove_pins()


async def _import_manifest_machinery() -> None:
    """Import numpy, pyarrow and zarr_checksum (~0.2 s) in a thread now that the mount serves, so
    that entering a Zarr does not wait for them. Only for versions that hold Zarrs: they cost ~40 MB
    of memory, which a mount of NWB files alone never needs."""
    await trio.to_thread.run_sync(
        importlib.import_module, "zarrfs.manifest", abandon_on_cancel=True
    )


async def _disk_tier(config: Config) -> tuple[DiskTier | None, str]:
    """The disk block cache of `config` (None when its size is 0), and a line for the log."""
    size = config.disk_cache_size
    how = "--cache-size"
    if size is None:
        size = await trio.to_thread.run_sync(default_size, config.cache_dir)
        how = "default: a tenth of the free space"
    if size <= 0:
        return None, f"no disk block cache ({how} is 0)"
    disk = DiskBlockCache(config.cache_dir, max_bytes=size, block_size=config.block_size)
    note = f"disk block cache in {disk.cache_dir}, up to {size >> 20} MiB ({how})"
    return DiskTier(disk, config.s3.bucket), note
