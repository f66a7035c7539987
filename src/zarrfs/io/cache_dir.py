"""The cache directory: its layout, and the private creation of everything zarrfs writes there.

Owns: where each kind of cached data lives below the cache dir (`CacheLayout`), creating
directories with mode 0700 (every component zarrfs creates, not only the last) and files with mode
0600, whatever the umask (the cache holds what a user read, which is nobody else's business), and
documents stored with a checksum (`write_checked`/`read_checked`, and their JSON forms: written
atomically, their xxh3-128 on the first line; a damaged one is logged, removed when it can be, and
reads as absent). A cache dir shared on purpose (several mounts of one user, many nodes of one
account on NFS) works as long as the same user writes it. Synchronous; callers run it in worker
threads on the serving path.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """Paths below one cache dir."""

    root: Path

    @property
    def manifests(self) -> Path:
        """The manifest index store: `manifests/<z[0:3]>/<z>/<checksum>.arrow` (converted
        indexes) and `<checksum>.json` (small manifests, kept as their verified documents)."""
        return self.root / "manifests"

    @property
    def built_manifests(self) -> Path:
        """Manifests built from the bucket's listing, laid out like a manifest root."""
        return self.root / "manifests-built"

    @property
    def versions(self) -> Path:
        """Resolved published versions (immutable): `versions/<bucket>/<id>/<version>.json`."""
        return self.root / "versions"

    @property
    def virtual(self) -> Path:
        """Virtual Zarr views of HDF5 blobs (immutable): `virtual/<h[:3]>/<h>.vzarr`."""
        return self.root / "virtual"

    @property
    def blocks(self) -> Path:
        """The disk block cache."""
        return self.root / "blocks"

    @property
    def tmp(self) -> Path:
        """The pins of running mounts' drafts (`pins-<host>-<pid>-<tag>/`, leased) and what killed
        processes left behind; swept."""
        return self.root / "tmp"

    @property
    def logs(self) -> Path:
        """Logs of background mounts."""
        return self.root / "logs"

    @property
    def locks(self) -> Path:
        """Lock files that let processes sharing the dir fetch each manifest once."""
        return self.root / "locks"


def make_private_dir(path: Path | str) -> None:
    """Create `path` and its missing parents as 0700 directories, whatever the umask.

    Directories that already exist are left as they are, whoever owns them (someone chose their
    mode: a group's cache on NFS is shared on purpose). Not for what must be private to this user
    (the runtime dir: `runtime` checks its owner and mode itself). Tolerates another process
    creating the same directories at the same time. Raises OSError (also when a file stands where a
    directory should be).
    """
    current = os.fspath(path)
    missing: list[str] = []
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue
        os.chmod(directory, DIR_MODE)  # mkdir's mode is narrowed by the umask, never widened


def create_private_file(path: Path) -> int:
    """Create `path` exclusively with mode 0600 and return a writable descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd


def trim_to_budget(files: list[Path], budget: int, now: float) -> tuple[int, int, int]:
    """Remove the least recently used of `files` (oldest mtime first) until what is left fits
    `budget` bytes, never one whose mtime is in the future (leased: a process somewhere has it
    mapped). Returns (files removed, bytes left, bytes leased). Files vanishing meanwhile (another
    process trimming the same store) are fine. Synchronous: run it through the gate."""
    found: list[tuple[float, int, Path]] = []
    for path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        found.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in found)
    removed = leased = 0
    for mtime, size, path in sorted(found):
        if total <= budget:
            break
        if mtime > now:
            leased += size
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        removed += 1
    return removed, total, leased


def write_new_file(path: Path, data: bytes) -> None:
    """`data` at `path`, atomically (a 0600 temp file beside it, renamed onto it): readers on any
    node see the whole file or none."""
    make_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with os.fdopen(create_private_file(tmp), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_if_exists(path: Path) -> bytes | None:
    """The bytes of `path`, or None when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def write_checked(path: Path, body: bytes) -> None:
    """Write `body` to `path` atomically (0600 temp file, rename), its xxh3-128 on the first line."""
    write_new_file(path, xxhash.xxh3_128_hexdigest(body).encode() + b"\n" + body)


def read_checked(path: Path) -> bytes | None:
    """The body `write_checked` wrote, or None when absent or damaged (then logged and removed)."""
    data = read_if_exists(path)
    if data is None:
        return None
    digest, _, body = data.partition(b"\n")
    if xxhash.xxh3_128_hexdigest(body).encode() == digest:
        return body
    log.warning("discarding %s: its content does not match its checksum (damaged)", path)
    with suppress(OSError):  # a read-only cache dir: it stays, and still reads as absent
        path.unlink(missing_ok=True)
    return None


def write_checked_json(path: Path, doc: Any) -> None:
    """`write_checked` of `doc` as compact JSON."""
    write_checked(path, json.dumps(doc, separators=(",", ":")).encode())


def read_checked_json(path: Path) -> Any | None:
    """The document `write_checked_json` wrote, or None when absent or damaged (then removed)."""
    body = read_checked(path)
    if body is not None:
        try:
            return json.loads(body)
        except ValueError:
            log.warning("discarding %s: not JSON", path)
            with suppress(OSError):
                path.unlink(missing_ok=True)
    return None
