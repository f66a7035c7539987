"""Where a running mount says what it is and what it has done, for `zarrfs info`, `verify` and
`stats`.

Owns: one private directory per user (`$XDG_RUNTIME_DIR/zarrfs`, else `/tmp/zarrfs-<uid>`, mode
0700), and in it, per live mount, `<key>.json` (its pid, mountpoint and the configuration it runs
with, enough to rebuild its `Config`) and `<key>.stats.json` (its latest `stats.snapshot`, rewritten
every `STATS_INTERVAL` seconds), where `<key>` is a hash of the mountpoint; finding the zarrfs mount
a local path is under (from `/proc/self/mounts`) and the device number of a mount (from
`/proc/self/mountinfo`). Files are written atomically and removed at unmount;
a file whose pid is gone is stale and ignored. Synchronous and small.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from hashlib import sha1
from pathlib import Path
from typing import Any

from .cache_dir import create_private_file, make_private_dir
from .config import Config, MountSource, S3Settings

#: Seconds between two stats files of a running mount.
STATS_INTERVAL = 2.0


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.access(base, os.W_OK):
        return Path(base) / "zarrfs"
    return Path("/tmp") / f"zarrfs-{os.getuid()}"


def _key(mountpoint: Path) -> str:
    return sha1(str(Path(mountpoint).absolute()).encode()).hexdigest()[:16]


def state_path(mountpoint: Path) -> Path:
    return runtime_dir() / f"{_key(mountpoint)}.json"


def stats_path(mountpoint: Path) -> Path:
    return runtime_dir() / f"{_key(mountpoint)}.stats.json"


def _write(path: Path, doc: Any) -> None:
    make_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(create_private_file(tmp), "w") as f:
        json.dump(doc, f, default=str)
    os.replace(tmp, path)


def write_state(config: Config) -> None:
    """Say that this process serves `config` at its mountpoint."""
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
    }
    _write(state_path(config.mountpoint), doc)


def write_stats(mountpoint: Path, snapshot: dict[str, Any]) -> None:
    _write(stats_path(mountpoint), {"pid": os.getpid(), **snapshot})


def remove(mountpoint: Path) -> None:
    for path in (state_path(mountpoint), stats_path(mountpoint)):
        path.unlink(missing_ok=True)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(mountpoint: Path) -> dict[str, Any] | None:
    """The state a live mount at `mountpoint` wrote, or None."""
    return _read_live(state_path(mountpoint))


def read_stats(mountpoint: Path) -> dict[str, Any] | None:
    """The latest stats snapshot a live mount at `mountpoint` wrote, or None."""
    return _read_live(stats_path(mountpoint))


def _read_live(path: Path) -> dict[str, Any] | None:
    """A JSON document written by a mount whose process still runs, else None."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and _alive(doc.get("pid")) else None


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
    )


def zarrfs_mount_of(path: Path) -> tuple[Path, str] | None:
    """(mountpoint, path relative to it) of the zarrfs mount `path` is in, or None."""
    target = Path(os.path.abspath(path))
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
