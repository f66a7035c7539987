"""Mount lifecycle: one AsyncExitStack, one nursery, pyfuse3 init/main/close, signals.

Owns: mounting, then starting the core (`core.open_filesystem`: remote clients, catalog, caches,
the filesystem) behind the FUSE operations, telling the waiting parent process when the mount serves
(or why it failed), signals, and tearing everything down on a stop signal or an external unmount. No
domain logic lives here.

Fast start: the mount is made first (the mountpoint is live as soon as pyfuse3 and trio are imported)
and the core starts behind it; requests that arrive meanwhile wait for it (the root answers `stat` at
once). The parent of a background mount still returns only once the core is ready, so a SOURCE that
does not resolve is an error exit, not a mount that answers EIO.

Signals: SIGTERM and SIGINT stop the mount: in-flight requests get `SHUTDOWN_GRACE` seconds, then
everything is cancelled (work in worker threads is abandoned, never waited for); a second stop signal
cancels at once. Either way the daemon unmounts and exits 0 well within `docker stop`'s 10 s. SIGHUP
reopens the log file of a mount that logs to a file (logrotate), and stops a mount that logs to a
terminal (the terminal hung up). SIGUSR1 dumps the stack of every thread to stderr (faulthandler, works
even if the event loop is stuck); SIGUSR2 logs the tree of trio tasks with their await stacks.
The mount is made with libfuse's `auto_unmount`, so even `kill -9` of the daemon leaves no dead mount.
Once the kernel has the answer to INIT, the mount's kernel readahead is raised to `--read-ahead`
where permitted (`set_read_ahead`).

MOUNTPOINT may also be `/dev/fd/N`, an open `/dev/fuse` descriptor that the caller (Apptainer's
`--fusemount`, a Kubernetes FUSE plugin, a test) has already mounted somewhere: libfuse (>= 3.3) then
serves that descriptor and mounts nothing, so `auto_unmount` is not requested, and unmounting is the
caller's business (at exit the daemon only closes the descriptor; when the caller unmounts, the daemon
ends by itself). systemd is told when the mount is live and when it stops (`systemd.notify`).
"""

from __future__ import annotations

import errno
import faulthandler
import logging
import math
import os
import re
import signal
import stat
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import TYPE_CHECKING

import pyfuse3
import trio

from zarrfs import config as cfg
from zarrfs.config import Config
from zarrfs.errors import MountError, unwrap_single_exception
from zarrfs.faces import runtime, systemd
from zarrfs.faces.stats import prometheus_text, snapshot
from zarrfs.fuse_ops import ZarrfsOperations, internal_errors

if TYPE_CHECKING:  # the core is imported once the mount is made (fast start)
    from zarrfs.fs.filesystem import Filesystem

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Device numbers of /dev/fuse (the kernel's MISC_MAJOR and FUSE_MINOR).
_FUSE_DEVICE = (10, 229)


def fuse_fd(mountpoint: os.PathLike[str] | str) -> int | None:
    """N when MOUNTPOINT is `/dev/fd/N` (libfuse's own test: such a mountpoint is an open, already
    mounted `/dev/fuse` descriptor), else None."""
    match = re.fullmatch(r"/dev/fd/(\d+)", os.fspath(mountpoint))
    return int(match[1]) if match else None


def fuse_options(config: Config) -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {f"fsname={config.fsname}", "subtype=zarrfs", "ro"}
    if fuse_fd(config.mountpoint) is None:
        # fusermount3 keeps a watchdog that unmounts if this process dies, even by SIGKILL. With a
        # /dev/fd/N mountpoint nothing is mounted here: there is nothing for it to unmount.
        options.add("auto_unmount")
    if config.allow_other:
        options.add("allow_other")
    return options


async def _set_read_ahead_once_initialized(
    ops: ZarrfsOperations, config: Config, real_mountpoint: str
) -> None:
    # The kernel sets the mount's readahead when it gets the answer to INIT (to the smaller of
    # its own and the daemon's): a value written before that is overwritten.
    await ops.initialized.wait()
    set_read_ahead(config, real_mountpoint)


def set_read_ahead(config: Config, real_mountpoint: str) -> None:
    """Set the kernel's readahead of the new mount to `config.read_ahead` (`read_ahead_kb` of its
    backing device in sysfs, which only root may write; the FUSE protocol lets a daemon lower the
    kernel's 128 KiB, never raise it). Best effort: a mount without it works, only slower. Call it
    once the kernel has the answer to INIT, with the mountpoint's real path (symlinks resolved, as
    mountinfo shows it) found before mounting."""
    if config.read_ahead <= 0 or fuse_fd(config.mountpoint) is not None:
        return  # /dev/fd/N: whoever mounted it knows where (and may set it)
    device = runtime.mount_device(real_mountpoint)
    if device is None:
        log.info("no mountinfo entry for %s: kernel readahead left as it is", real_mountpoint)
        return
    path = f"/sys/class/bdi/{device}/read_ahead_kb"
    kib = max(1, config.read_ahead // 1024)
    try:
        with open(path, "w") as f:
            f.write(f"{kib}\n")
    except OSError as e:
        log.info(
            "kernel readahead of %s left at its default (%s: %s); as root: echo %d > %s",
            config.mountpoint,
            path,
            e.strerror or e,
            kib,
            path,
        )
    else:
        log.debug("kernel readahead of %s: %d KiB (%s)", config.mountpoint, kib, path)


async def serve(
    config: Config,
    *,
    on_ready: Callable[[], None] | None = None,
    reopen_log: Callable[[], None] | None = None,
) -> None:
    """Mount, start the core and serve until a stop signal or an external unmount; always unmounts.

    `reopen_log` is called on SIGHUP (a mount logging to a file); without it SIGHUP stops the mount.
    """
    async with AsyncExitStack() as stack:
        ops = ZarrfsOperations(
            None,  # attached below, once the core is ready
            uid=config.uid,
            gid=config.gid,
            umask=config.umask,
            xattrs=config.xattrs,
            kernel_readdir_cache=config.kernel_readdir_cache,
            zero_message_open=config.zero_message_open,
            # a version's tree is fixed for the mount; the archive's levels can change
            fixed_tree=config.source.kind == "version",
        )
        # mountinfo shows the resolved path; resolving it after the mount would stat this daemon
        real_mountpoint = os.path.realpath(config.mountpoint)
        try:
            pyfuse3.init(ops, str(config.mountpoint), fuse_options(config))
        except RuntimeError as e:
            raise MountError(f"cannot mount at {config.mountpoint}: {e}") from None
        stack.callback(_close)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        stack.callback(faulthandler.unregister, signal.SIGUSR1)
        with unwrap_single_exception():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_handle_signals, nursery.cancel_scope, reopen_log)
                nursery.start_soon(_run_fuse, nursery.cancel_scope)
                nursery.start_soon(_set_read_ahead_once_initialized, ops, config, real_mountpoint)
                # The mountpoint is live from here on; requests wait for the core, which starts
                # now. Its imports (its HTTP client's: ~25 ms warm) run in a thread so that the
                # event loop answers the kernel meanwhile (a `stat` of the mountpoint, for one).
                open_filesystem = await trio.to_thread.run_sync(_import_core)
                try:
                    async with open_filesystem(config) as fs:
                        ops.attach(fs)
                        await _announce(fs, ops, config, stack, nursery, on_ready)
                        await trio.sleep_forever()  # until a stop signal or an unmount
                except BaseException:
                    ops.fail()  # requests still waiting for the core get EIO
                    raise
        log.info("unmounted %s", config.mountpoint)


def _import_core() -> Callable[[Config], AbstractAsyncContextManager[Filesystem]]:
    from zarrfs.fs.core import open_filesystem

    return open_filesystem


async def _announce(
    fs: Filesystem,
    ops: ZarrfsOperations,
    config: Config,
    stack: AsyncExitStack,
    nursery: trio.Nursery,
    on_ready: Callable[[], None] | None,
) -> None:
    """The core is ready: publish state and stats, and tell whoever waits that the mount serves."""
    await ops.initialized.wait()  # what the kernel supports is known from INIT
    _log_kernel_modes(ops, config)
    await trio.to_thread.run_sync(runtime.write_state, config)
    stack.callback(runtime.remove, config.mountpoint)
    nursery.start_soon(_publish_stats, fs, config)
    if config.metrics_port is not None:
        await nursery.start(_serve_metrics, fs, config.metrics_port)
    if fuse_fd(config.mountpoint) is None:
        log.info("mounted %s at %s", config.source, config.mountpoint)
    else:
        log.info("serving %s on %s (mounted by the caller)", config.source, config.mountpoint)
    systemd.notify(f"READY=1\nSTATUS=serving {config.source} at {config.mountpoint}")
    if on_ready is not None:
        on_ready()


async def _run_fuse(scope: trio.CancelScope) -> None:
    """Serve FUSE requests until the filesystem is unmounted (or the mount is stopped)."""
    try:
        await pyfuse3.main(min_tasks=1, max_tasks=cfg.MAX_FUSE_TASKS)
    finally:
        systemd.notify("STOPPING=1")
    scope.cancel()


def _log_kernel_modes(ops: ZarrfsOperations, config: Config) -> None:
    if ops.no_open:
        log.info("the kernel opens files without asking")
    if ops.no_opendir:
        log.info("the kernel caches directory listings, and opens directories without asking")
    elif ops.kernel_readdir_cache:
        log.info("the kernel caches directory listings")
    elif config.kernel_readdir_cache:
        log.info(
            "the kernel does not cache directory listings: this pyfuse3 cannot ask it to "
            "(see patches/README.md)"
        )
    else:
        log.info("kernel caching of directory listings is off (%s=0)", cfg.KERNEL_READDIR_CACHE_ENV)


def _snapshot(fs: Filesystem) -> dict[str, object]:
    return snapshot(fs, {"internal_errors": sum(internal_errors.values())})


async def _publish_stats(fs: Filesystem, config: Config) -> None:
    """Keep `zarrfs stats MOUNTPOINT` current (cfg.STATS_INTERVAL)."""
    while True:
        try:
            await trio.to_thread.run_sync(
                runtime.write_stats, config.mountpoint, _snapshot(fs), abandon_on_cancel=True
            )
        except OSError as e:
            log.debug("cannot write the stats file: %s", e)
        await trio.sleep(cfg.STATS_INTERVAL)


async def _serve_metrics(
    fs: Filesystem, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Prometheus text on http://127.0.0.1:PORT/metrics (local only)."""

    async def answer(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    request += chunk
                line = request.split(b"\r\n", 1)[0].split()
                if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] == b"/metrics":
                    body = prometheus_text(_snapshot(fs)).encode()
                    head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                else:
                    body, head = b"not found\n", b"HTTP/1.0 404 Not Found\r\n"
                await stream.send_all(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await stream.aclose()

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    log.info("metrics on http://127.0.0.1:%d/metrics", listeners[0].socket.getsockname()[1])
    task_status.started()
    await trio.serve_listeners(answer, listeners)


def _close() -> None:
    try:
        pyfuse3.close(unmount=True)
    except Exception as e:
        log.warning("while unmounting: %s", e)


async def _handle_signals(scope: trio.CancelScope, reopen_log: Callable[[], None] | None) -> None:
    """Stop on SIGTERM/SIGINT (a second one cancels at once), reopen logs on SIGHUP, dump tasks on
    SIGUSR2. Cancels `scope` once the grace period after the first stop signal is over."""
    signals_wanted = (*_STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR2)
    cancel_at = math.inf
    with trio.open_signal_receiver(*signals_wanted) as signals:
        while True:
            with trio.move_on_at(cancel_at):
                signum = await signals.__anext__()
                name = signal.Signals(signum).name
                if signum == signal.SIGUSR2:
                    log.warning("%s: trio tasks:\n%s", name, describe_tasks())
                    continue
                if signum == signal.SIGHUP and reopen_log is not None:
                    reopen_log()
                    log.info("SIGHUP: log file reopened")
                    continue
                if cancel_at == math.inf:
                    log.info("received %s, unmounting", name)
                    pyfuse3.terminate()
                    cancel_at = trio.current_time() + cfg.SHUTDOWN_GRACE
                    continue
                log.warning("received %s again: cancelling in-flight requests now", name)
                scope.cancel()
                return
            log.warning(
                "requests still running %.0f s after the stop signal: cancelling them",
                cfg.SHUTDOWN_GRACE,
            )
            scope.cancel()
            return


def describe_tasks() -> str:
    """Every trio task of this run with where it waits (for SIGUSR2 and hang reports)."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        frames = [f"{f.f_code.co_name}:{lineno}" for f, lineno in task.iter_await_frames()]
        lines.append(f"{'  ' * depth}{task.name} <- {' <- '.join(reversed(frames)) or '?'}")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    root = trio.lowlevel.current_root_task()
    if root is not None:
        walk(root, 0)
    return "\n".join(lines)


def check_mountpoint(path: os.PathLike[str] | str) -> None:
    """Raise MountError unless `path` is an existing directory that is not already a mount, or
    `/dev/fd/N` with N an open /dev/fuse descriptor (mounted by the caller)."""
    p = os.fspath(path)
    fd = fuse_fd(p)
    if fd is not None:
        try:
            st = os.fstat(fd)
        except OSError:
            raise MountError(
                f"{p}: descriptor {fd} is not open (a /dev/fd/N mountpoint is a /dev/fuse "
                "descriptor that the caller opened, mounted and passed on)"
            ) from None
        if not stat.S_ISCHR(st.st_mode) or (
            (os.major(st.st_rdev), os.minor(st.st_rdev)) != _FUSE_DEVICE
        ):
            raise MountError(f"{p}: descriptor {fd} is not /dev/fuse")
        return
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
