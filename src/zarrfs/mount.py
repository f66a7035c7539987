"""Mount lifecycle: one AsyncExitStack, one nursery, pyfuse3 init/main/close, signals.

Owns: wiring a `Config` into a running mount (remote clients, resolver, namespace, caches, FUSE
operations), telling the waiting parent process when the mount is live (or why it failed), and tearing
everything down on SIGINT/SIGTERM/SIGHUP or an external unmount. No domain logic lives here.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack

import pyfuse3
import trio

from . import config as cfg
from .chunk_cache import BlockCache
from .config import Config
from .dandi import resolve
from .errors import MountError
from .filesystem import Filesystem
from .fuse_ops import ZarrfsOperations
from .manifest_cache import ManifestCache
from .remote import Remote
from .tree import Namespace

log = logging.getLogger(__name__)

#: Most FUSE requests handled concurrently.
MAX_FUSE_TASKS = 64
#: Seconds in-flight requests get to finish after a stop signal before they are cancelled.
SHUTDOWN_GRACE = 5.0


def fuse_options(config: Config) -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {f"fsname={config.fsname}", "subtype=zarrfs", "ro"}
    if config.allow_other:
        options.add("allow_other")
    return options


async def serve(config: Config, *, on_ready: Callable[[], None] | None = None) -> None:
    """Resolve, mount and serve until a signal or an external unmount; always unmounts."""
    async with AsyncExitStack() as stack:
        remote = await stack.enter_async_context(Remote.open(config.s3))
        resolved = await resolve(
            config.source, remote, bucket=config.s3.bucket, api_url=config.api_url
        )
        namespace = Namespace(resolved, bucket=config.s3.bucket)
        for asset in resolved.assets:
            if asset.problem:
                log.warning(
                    "asset %s is listed but cannot be served (EIO): %s", asset.path, asset.problem
                )
        log.info(
            "resolved %s: %d assets (%d Zarrs)",
            resolved.source,
            len(resolved.assets),
            len(namespace.zarr_assets()),
        )
        manifests = ManifestCache(
            remote,
            roots=config.manifest_roots or cfg.default_manifest_roots(config.s3.bucket),
            cache_dir=config.cache_dir,
            memory_budget=config.manifest_memory,
            cpu_limiter=trio.CapacityLimiter(cfg.CPU_THREADS),
        )
        if swept := await trio.to_thread.run_sync(manifests.sweep_stale_temp_files):
            log.info("removed %d stale temporary files from %s", swept, config.cache_dir)
        blocks = BlockCache(config.memory_cache_size, config.block_size)
        fs = Filesystem(namespace, manifests, blocks, remote.s3)
        ops = ZarrfsOperations(
            fs, xattrs=config.xattrs, kernel_readdir_cache=config.kernel_readdir_cache
        )
        if ops.kernel_readdir_cache:
            log.info("the kernel caches directory listings")
        elif config.kernel_readdir_cache:
            log.info(
                "the kernel does not cache directory listings: this pyfuse3 cannot ask it to "
                "(see patches/README.md)"
            )
        else:
            log.info(
                "kernel caching of directory listings is off (%s=0)", cfg.KERNEL_READDIR_CACHE_ENV
            )
        try:
            pyfuse3.init(ops, str(config.mountpoint), fuse_options(config))
        except RuntimeError as e:
            raise MountError(f"cannot mount at {config.mountpoint}: {e}") from None
        stack.callback(_close)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_wait_for_signals, nursery.cancel_scope)
            fs.readahead_nursery = nursery
            log.info("mounted %s at %s", resolved.source, config.mountpoint)
            if on_ready is not None:
                on_ready()
            await pyfuse3.main(min_tasks=1, max_tasks=MAX_FUSE_TASKS)
            nursery.cancel_scope.cancel()
        log.info("unmounted %s", config.mountpoint)


def _close() -> None:
    try:
        pyfuse3.close(unmount=True)
    except Exception as e:
        log.warning("while unmounting: %s", e)


async def _wait_for_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            break
    await trio.sleep(SHUTDOWN_GRACE)
    log.warning(
        "requests still running %.0f s after the stop signal: cancelling them", SHUTDOWN_GRACE
    )
    scope.cancel()


def check_mountpoint(path: os.PathLike[str] | str) -> None:
    """Raise MountError unless `path` is an existing directory that is not already a mount."""
    p = os.fspath(path)
    try:
        os.stat(p)
    except FileNotFoundError:
        raise MountError(f"mountpoint {p} does not exist") from None
    except OSError as e:
        hint = f" (a stale mount? zarrfs unmount -z {p})" if e.errno == errno.ENOTCONN else ""
        raise MountError(f"cannot access mountpoint {p}: {e.strerror}{hint}") from None
    if not os.path.isdir(p):
        raise MountError(f"mountpoint {p} is not a directory")
    if os.path.ismount(p):
        raise MountError(
            f"{p} is already a mount point (unmount it first: zarrfs unmount {p}; "
            f"if its daemon died: zarrfs unmount -z {p})"
        )
    if not os.access(p, os.W_OK | os.X_OK) and os.getuid() != 0:
        raise MountError(f"mountpoint {p} is not writable by you (FUSE needs that)")
