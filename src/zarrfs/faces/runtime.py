"""Where a running mount says what it is and what it has done, for `zarrfs info`, `verify` and
`stats`; the real path a mount is known by.

Owns: one private directory per user (`$XDG_RUNTIME_DIR/zarrfs`, else `/tmp/zarrfs-<uid>`), and in
it, per live mount, `<key>.json` (its pid, mountpoint and the configuration it runs with, enough to
rebuild its `Config`) and `<key>.stats.json` (its latest `stats.snapshot`, rewritten every
`config.STATS_INTERVAL` seconds), where `<key>` is a hash of the mountpoint's real path (`real_path`:
symbolic links resolved, as /proc/self/mounts shows mountpoints, so that a mount made or asked about
through a symlinked `$HOME` is one key); finding the zarrfs mount a local path is under (from
`/proc/self/mounts`) and the device number of a mount (from `/proc/self/mountinfo`).

Trust: the directory is used only when it is a real directory (opened with O_NOFOLLOW, never a
symbolic link) owned by this uid; one of ours that others may enter is narrowed to 0700 before
anything is written (nobody else can then add an entry), one that is not ours, a link or a file is
refused (`UnsafeRuntimeDir`, naming the path and why). There is no fallback elsewhere: any other
name the verbs could find again is a name another user could take first. A file in it is read only
when it is a regular file owned by this uid (O_NOFOLLOW, O_NONBLOCK: a planted link or FIFO is
ignored). Writing never raises: a mount whose state cannot be published logs a warning and serves,
and the verbs then say its state is unavailable, and why. Files are written atomically, relative to
the checked directory's descriptor, and removed at unmount; a file whose pid is gone is stale and
ignored. Synchronous and small.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import asdict
from hashlib import sha1
from pathlib import Path
from typing import Any

from zarrfs import config
from zarrfs.base.resources import pid_running
from zarrfs.config import Config, MountSource, S3Settings
from zarrfs.errors import UserError

log = logging.getLogger(__name__)

#: The runtime dir without a usable `$XDG_RUNTIME_DIR` is `<TMP_BASE>/zarrfs-<uid>` (not `$TMPDIR`:
#: a batch job's differs from the login shell's). Tests point it elsewhere.
TMP_BASE = Path("/tmp")

_DIR_MODE = 0o700
_FILE_MODE = 0o600
_NOT_TRUSTED = (
    "not trusted (have it removed, or set XDG_RUNTIME_DIR to a private directory of yours)"
)
#: Runtime dirs whose refusal was logged already (a mount tries every `config.STATS_INTERVAL`).
_warned: set[str] = set()


class UnsafeRuntimeDir(UserError):
    """The runtime directory is not a private directory of this user's; nothing in it is used."""


def runtime_dir() -> Path:
    """`$XDG_RUNTIME_DIR/zarrfs` when that variable names a writable absolute directory, else
    `/tmp/zarrfs-<uid>` (see `TMP_BASE`). Not checked here: see `UnsafeRuntimeDir`."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base) and os.access(base, os.W_OK):
        return Path(base) / "zarrfs"
    return TMP_BASE / f"zarrfs-{os.getuid()}"


@contextlib.contextmanager
def _open_runtime_dir(*, create: bool) -> Iterator[int]:
    """A descriptor of the runtime dir, checked (see the module's docstring); with `create`, made
    (0700) if missing, and narrowed to 0700 if others may enter it. Raises UnsafeRuntimeDir, or
    FileNotFoundError when it does not exist and `create` is false."""
    path = runtime_dir()
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, _DIR_MODE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):  # Linux says ENOTDIR for a link too
            link = os.path.islink(path)
            what = "a symbolic link" if link else "not a directory"
            raise UnsafeRuntimeDir(f"{path} is {what}: {_NOT_TRUSTED}") from None
        raise UnsafeRuntimeDir(f"cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        uid = os.getuid()
        if st.st_uid != uid:
            raise UnsafeRuntimeDir(
                f"{path} is owned by uid {st.st_uid}, not by you (uid {uid}): {_NOT_TRUSTED}"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077 and not create:
            raise UnsafeRuntimeDir(
                f"{path} has mode {mode:04o}: others may add files to it (a mount narrows it to "
                f"{_DIR_MODE:04o})"
            )
        if create and mode != _DIR_MODE:  # ours: narrowed before anything is written
            os.fchmod(fd, _DIR_MODE)
        yield fd
    finally:
        os.close(fd)


def real_path(path: os.PathLike[str] | str) -> Path:
    """`path` absolute, with every symbolic link resolved, as /proc/self/mounts shows mountpoints.

    A mountpoint is never looked at itself (a dead FUSE mount answers ENOTCONN, a hung one never
    answers): the parent is resolved and the last component joined, which is followed only when it
    is a symbolic link and not a mountpoint. `/dev/fd/N` (a FUSE descriptor) is returned as is."""
    text = os.fspath(path)
    if re.fullmatch(r"/dev/fd/\d+", text):
        return Path(text)
    text = os.path.join(os.getcwd(), text)
    for _ in range(config.MAX_LINKS):
        text = text.rstrip("/") or "/"
        parent, name = os.path.split(text)
        if name in ("", ".", ".."):
            return Path(os.path.realpath(text))
        candidate = os.path.join(os.path.realpath(parent), name)
        if candidate in mounted_paths():
            return Path(candidate)
        try:
            target = os.readlink(candidate)
        except OSError:  # not a link (EINVAL), missing, or under a dead mount
            return Path(candidate)
        text = os.path.join(os.path.dirname(candidate), target)
    return Path(os.path.realpath(text))


def mounted_paths() -> set[str]:
    """Every mountpoint in /proc/self/mounts (escapes undone)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as mounts:
            return {
                unescape_mount_field(fields[1])
                for line in mounts
                if len(fields := line.split(" ")) > 2
            }
    except OSError:
        return set()


def _key(mountpoint: os.PathLike[str] | str) -> str:
    return sha1(str(real_path(mountpoint)).encode()).hexdigest()[:16]


def state_path(mountpoint: Path) -> Path:
    return runtime_dir() / f"{_key(mountpoint)}.json"


def stats_path(mountpoint: Path) -> Path:
    return runtime_dir() / f"{_key(mountpoint)}.stats.json"


def _write(name: str, doc: Any) -> bool:
    """Write `doc` as `name` in the runtime dir, atomically; False (logged) if it cannot be."""
    try:
        with _open_runtime_dir(create=True) as dir_fd:
            tmp = f".{name}.{os.getpid()}.tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, _FILE_MODE, dir_fd=dir_fd)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(doc, f, default=str)
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
    except (UnsafeRuntimeDir, OSError) as e:
        reason = str(e) if isinstance(e, UnsafeRuntimeDir) else f"{runtime_dir()}: {e}"
        if reason not in _warned:
            _warned.add(reason)
            log.warning(
                "cannot publish this mount's state and statistics (zarrfs info, verify and "
                "stats will not see it; it serves all the same): %s",
                reason,
            )
        return False
    return True


def write_state(config: Config) -> bool:
    """Say that this process serves `config` at its mountpoint. Never raises: False (and a
    warning in the log) when the state cannot be published."""
    doc = {
        "pid": os.getpid(),
        "mountpoint": str(config.mountpoint),
        "source": str(config.source),
        "source_parts": asdict(config.source),
        "s3": asdict(config.s3),
        "manifest_roots": list(config.manifest_roots),
        "api_url": config.api_url,
        "cache_dir": str(config.cache_dir),
        "memory_cache_size": config.memory_cache_size,
        "manifest_memory": config.manifest_memory,
        "manifest_disk_size": config.manifest_disk_size,
        "disk_cache_size": config.disk_cache_size,
        "consolidate": config.consolidate,
        "virtual_zarr": config.virtual_zarr,
    }
    return _write(state_path(config.mountpoint).name, doc)


def write_stats(mountpoint: Path, snapshot: dict[str, Any]) -> bool:
    """Publish the latest statistics; never raises (False when they cannot be published)."""
    return _write(stats_path(mountpoint).name, {"pid": os.getpid(), **snapshot})


def remove(mountpoint: Path) -> None:
    """Remove what this mount published (never raises)."""
    names = (state_path(mountpoint).name, stats_path(mountpoint).name)
    with contextlib.suppress(UnsafeRuntimeDir, OSError), _open_runtime_dir(create=False) as fd:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)


def read_state(mountpoint: Path) -> dict[str, Any] | None:
    """The state a live mount at `mountpoint` wrote, or None. Raises UnsafeRuntimeDir."""
    return _read_live(state_path(mountpoint))


def read_stats(mountpoint: Path) -> dict[str, Any] | None:
    """The latest stats snapshot a live mount at `mountpoint` wrote, or None. Raises
    UnsafeRuntimeDir."""
    return _read_live(stats_path(mountpoint))


def _read_live(path: Path) -> dict[str, Any] | None:
    """A JSON document written by a mount whose process still runs, else None (also for anything
    but a regular file of this user's). Raises UnsafeRuntimeDir."""
    try:
        with _open_runtime_dir(create=False) as dir_fd:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(path.name, flags, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                    log.warning("ignored %s: not a regular file of yours", path)
                    return None
                doc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and pid_running(doc.get("pid")) else None


def config_from_state(state: dict[str, Any]) -> Config:
    """The `Config` of the mount that wrote `state` (to serve its data without FUSE)."""
    return Config(
        source=MountSource(**state["source_parts"]),
        mountpoint=Path(state["mountpoint"]),
        s3=S3Settings(**state["s3"]),
        manifest_roots=tuple(state["manifest_roots"]),
        api_url=state["api_url"],
        cache_dir=Path(state["cache_dir"]),
        memory_cache_size=state["memory_cache_size"],
        manifest_memory=state["manifest_memory"],
        manifest_disk_size=state["manifest_disk_size"],
        disk_cache_size=state["disk_cache_size"],
        consolidate=state["consolidate"],
        virtual_zarr=bool(state.get("virtual_zarr", False)),
    )


def zarrfs_mount_of(path: Path) -> tuple[Path, str] | None:
    """(mountpoint, path relative to it) of the zarrfs mount `path` is in, or None."""
    target = real_path(path)
    best: Path | None = None
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split(" ")
                if len(fields) < 3 or fields[2] != "fuse.zarrfs":
                    continue
                mnt = Path(unescape_mount_field(fields[1]))
                if (target == mnt or mnt in target.parents) and (
                    best is None or len(mnt.parts) > len(best.parts)
                ):
                    best = mnt
    except OSError:
        return None
    if best is None:
        return None
    relative = target.relative_to(best).as_posix()
    return best, "" if relative == "." else relative


def mount_device(mountpoint: os.PathLike[str] | str) -> str | None:
    """`major:minor` of the FUSE mount at `mountpoint` (the newest one there; give the real path,
    as mountinfo shows mountpoints with symlinks resolved), from /proc/self/mountinfo: asking the
    kernel with stat() would wait for this very daemon."""
    target = os.path.abspath(os.fspath(mountpoint))
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields, _, rest = line.partition(" - ")
                parts = fields.split()
                if len(parts) < 5 or not rest.startswith("fuse"):
                    continue
                if unescape_mount_field(parts[4]) == target:
                    found = parts[2]
    except OSError:
        return None
    return found


def unescape_mount_field(field: str) -> str:
    """A path as /proc/self/mounts and mountinfo show it, octal escapes (`\\040`) undone."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)
