"""The core every face of zarrfs sits on: one `Config` wired into a running `Filesystem`.

Owns: building, in one place, what the mount, the command-line verbs (`zarrfs ls`, ...) and the
fsspec filesystem share: the remote clients, the one gate to the cache dir (`disk_gate`), the catalog,
the manifest cache, the block cache with its disk tier (and the disk's eviction), the service
nursery where loads, resolutions and prefetch run, and the write nursery where blocks and indexes
are written to the cache dir in the background (shielded from the stop that cancels everything
else, so that closing waits, bounded, for what was read to reach the disk: `_flush`); sweeping the
cache dir in the background once serving; renewing the leases a running mount holds in the cache dir; removing the
mount's temporary files at the end. Never imports pyfuse3: a face that has no FUSE uses this module
as it is. Nothing here waits on the cache dir without a deadline: a hung cache dir delays no start.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from zarrfs import config as cfg
from zarrfs.archive.catalog import Catalog
from zarrfs.base.resources import raise_descriptor_limit
from zarrfs.config import Config
from zarrfs.errors import UserError, report_bug, unwrap_single_exception
from zarrfs.fs.filesystem import Filesystem
from zarrfs.io.disk_gate import CacheDirStalled, DiskGate
from zarrfs.io.disk_store import DiskBlockCache, default_size
from zarrfs.io.disk_tier import DiskTier
from zarrfs.io.remote import Remote
from zarrfs.io.stack import ReadStack
from zarrfs.manifest_cache import ManifestCache, import_index_format

if TYPE_CHECKING:
    from zarrfs.fs.virtual_zarrs import VirtualZarrs

log = logging.getLogger(__name__)


@asynccontextmanager
async def open_filesystem(config: Config) -> AsyncIterator[Filesystem]:
    """A started `Filesystem` for `config.source` (VersionNotFound, NotFound... when the source
    does not exist), with its service nursery running; everything is closed on exit. Exceptions
    leave as themselves, not wrapped in an exception group."""
    raise_descriptor_limit()
    async with Remote.open(config.s3) as remote:
        roots = config.manifest_roots or cfg.default_manifest_roots(config.s3.bucket)
        gate = DiskGate(config.cache_dir)
        catalog = Catalog(
            remote,
            bucket=config.s3.bucket,
            api_url=config.api_url,
            manifest_roots=roots,
            cache_dir=config.cache_dir,
            gate=gate,
        )
        manifests = ManifestCache(
            remote,
            roots=roots,
            cache_dir=config.cache_dir,
            memory_budget=config.manifest_memory,
            disk_budget=config.manifest_disk_size,
            cpu_limiter=trio.CapacityLimiter(cfg.CPU_THREADS),
            gate=gate,
        )
        disk, disk_note = await _disk_tier(config, gate)
        stack = ReadStack(
            remote.s3,
            memory_bytes=config.memory_cache_size,
            block_size=config.block_size,
            disk=disk,
        )
        fs = Filesystem(
            config.source,
            catalog,
            manifests,
            stack,
            remote.s3,
            cache_dir=config.cache_dir,
            version_memory=config.version_memory,
            consolidate=config.consolidate,
            gate=gate,
            virtual=_virtual_zarrs(config, stack, gate),
        )
        try:
            description = await fs.start()  # before the nursery: its errors stay plain
            log.info("serving %s; %s", description, disk_note)
            with unwrap_single_exception():
                async with trio.open_nursery() as outer:
                    writes, write_scope = await outer.start(_write_nursery)
                    try:
                        manifests.write_nursery = writes
                        if disk is not None:
                            disk.nursery = writes
                        async with trio.open_nursery() as service:
                            manifests.service_nursery = fs.service_nursery = stack.nursery = service
                            _start_services(service, fs, disk, gate)
                            try:
                                yield fs
                            finally:
                                await _flush(manifests, disk, gate)
                                service.cancel_scope.cancel()
                    finally:  # the service tasks have ended: nothing queues writes any more
                        write_scope.cancel()  # flushed, or out of time: the rest is abandoned
        finally:
            with trio.move_on_after(cfg.DISK_CACHE_STALL_TIMEOUT, shield=True):
                await fs.volumes.remove_pins()


async def _write_nursery(
    *,
    task_status: trio.TaskStatus[tuple[trio.Nursery, trio.CancelScope]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a nursery for the background writes to the cache dir (disk blocks, indexes) that a stop
    does not cancel (an unmount cancels everything else the core runs), so that `_flush` can wait
    for them; it ends when the core cancels the scope reported with it."""
    with trio.CancelScope(shield=True) as scope:
        async with trio.open_nursery() as writes:
            task_status.started((writes, scope))
            await trio.sleep_forever()


def _start_services(
    service: trio.Nursery, fs: Filesystem, disk: DiskTier | None, gate: DiskGate
) -> None:
    """The core's background tasks, in its service nursery."""
    service.start_soon(guarded, "sweep of the cache dir", fs.manifests.sweep_in_background)
    service.start_soon(guarded, "renewal of leases", _renew_leases, fs)
    service.start_soon(guarded, "descriptor count", _count_descriptors, fs)
    if disk is not None:
        service.start_soon(guarded, "disk cache eviction", disk.keep_within_bounds)
    if fs.holds_zarrs:
        service.start_soon(guarded, "import", _import_manifest_machinery, fs.manifests, gate)
    if fs.virtual is not None:
        service.start_soon(
            guarded, "sweep of the virtual Zarr store", fs.virtual.cache.sweep_in_background
        )


async def _flush(manifests: ManifestCache, disk: DiskTier | None, gate: DiskGate) -> None:
    """At close, shielded from the stop: wait for the indexes still being written (bounded by the
    gate's deadline for the largest of them: a stalled cache dir is given up anyway), then for the
    blocks read but not yet on disk (bounded likewise for the most that may be pending), and log
    what reached the disk."""
    with trio.move_on_after(gate.write_timeout(cfg.INDEX_MAP_MIN), shield=True):
        await manifests.flush()
    if disk is not None:
        with trio.move_on_after(gate.write_timeout(cfg.DISK_CACHE_PENDING_MAX), shield=True):
            await disk.flush()
        _log_disk_tier_at_close(disk)


def _virtual_zarrs(config: Config, stack: ReadStack, gate: DiskGate) -> VirtualZarrs | None:
    """With `--virtual-zarr`, what shows HDF5 blobs as virtual Zarrs (imported only then: numpy
    and the extractor's parent side); UserError when the extractor cannot run here (no h5py)."""
    if not config.virtual_zarr:
        return None
    if any(importlib.util.find_spec(name) is None for name in ("h5py", "numcodecs")):
        raise UserError(
            "--virtual-zarr needs h5py and numcodecs in zarrfs's environment: "
            "pip install 'zarrfs[virtual]'"
        )
    from zarrfs.fs.virtual_zarrs import VirtualZarrs
    from zarrfs.virtual_cache import VirtualCache

    cache = VirtualCache(stack, bucket=config.s3.bucket, cache_dir=config.cache_dir, gate=gate)
    return VirtualZarrs(cache)


async def guarded(what: str, task: Callable[..., Awaitable[object]], *args: object) -> None:
    """Run a background task of the service nursery; a bug in it is reported by the last resort
    (`errors.report_bug`) and ends that task only, never the nursery (which would unmount)."""
    try:
        await task(*args)
    except Exception as e:
        report_bug(what, e)


async def _count_descriptors(fs: Filesystem) -> None:
    """Forever: count the open descriptors every `config.FD_SAMPLE_INTERVAL` (the peak is shown
    by `zarrfs stats`)."""
    while True:
        fs.descriptors.sample()
        await trio.sleep(cfg.FD_SAMPLE_INTERVAL)


async def _renew_leases(fs: Filesystem) -> None:
    """Forever: renew the leases this process holds in the cache dir (mapped manifest indexes,
    the pins directory) every `config.INDEX_LEASE_RENEW` seconds."""
    while True:
        await trio.sleep(cfg.INDEX_LEASE_RENEW)
        await fs.manifests.renew_leases()
        await fs.volumes.renew_pins()


async def _import_manifest_machinery(manifests: ManifestCache, gate: DiskGate) -> None:
    """Import numpy (what serving an index needs) in a thread now that the mount serves, so that
    entering a Zarr does not wait for it; then pyarrow (what reading an Arrow index file needs), but
    only when the cache dir holds such files (big manifests; small ones are kept as documents, which
    need no pyarrow): with none stored, pyarrow is imported in the background when the first big
    index is written, and importing it ahead would only take CPU from the first reads (~0.1 s, more
    on a cold page cache). Only for versions that hold Zarrs: they cost ~40 MB of memory, which a
    mount of NWB files alone never needs."""
    await trio.to_thread.run_sync(
        importlib.import_module, "zarrfs.manifests.parse", abandon_on_cancel=True
    )
    try:
        stored = await gate.run(manifests.holds_stored_indexes)
    except CacheDirStalled:
        return
    if stored:
        await import_index_format()


def _log_disk_tier_at_close(disk: DiskTier) -> None:
    """One line on what this process gave the disk block cache (a remount that still goes to S3
    can then be told apart: blocks dropped, refused, failed, or left unwritten at exit)."""
    store, tier = disk.disk.stats(), disk.stats
    lost = tier["writes_dropped"] + tier["write_errors"] + store["puts_skipped"] + store["errors"]
    level = logging.WARNING if disk.pending or disk.owed or lost else logging.INFO
    log.log(
        level,
        "disk block cache at close: %d blocks written; %d owed over the pending bound (written "
        "from memory in their turn); %d dropped (gone from memory by then, or over the bounds), "
        "%d skipped (no room), %d disk errors, %d write bugs; %d bytes and %d owed blocks left "
        "unwritten",
        store["puts"],
        tier["writes_deferred"],
        tier["writes_dropped"],
        store["puts_skipped"],
        store["errors"],
        tier["write_errors"],
        disk.pending,
        disk.owed,
    )


async def _disk_tier(config: Config, gate: DiskGate) -> tuple[DiskTier | None, str]:
    """The disk block cache of `config` (None when its size is 0, or when the cache dir does not
    answer at start), and a line for the log."""
    size = config.disk_cache_size
    how = "--cache-size"
    if size is None:
        try:
            size = await gate.run(default_size, config.cache_dir)
        except OSError as e:
            return None, f"no disk block cache (the cache dir {config.cache_dir}: {e})"
        how = "default: a tenth of the free space"
    if size <= 0:
        return None, f"no disk block cache ({how} is 0)"
    disk = DiskBlockCache(config.cache_dir, max_bytes=size, block_size=config.block_size)
    note = f"disk block cache in {disk.cache_dir}, up to {size >> 20} MiB ({how})"
    return DiskTier(disk, config.s3.bucket, gate), note
