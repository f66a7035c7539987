"""The cache directory: its layout, and the private creation of everything zarrfs writes there.

Owns: where each kind of cached data lives below the cache dir (`CacheLayout`), and creating
directories with mode 0700 (every component zarrfs creates, not only the last) and files with mode
0600, whatever the umask: the cache holds what a user read, which is nobody else's business. A cache
dir shared on purpose (several mounts of one user, many nodes of one account on NFS) works as long
as the same user writes it. Synchronous; callers run it in worker threads on the serving path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """Paths below one cache dir."""

    root: Path

    @property
    def manifests(self) -> Path:
        """Converted manifest indexes: `manifests/<z[0:3]>/<z>/<checksum>.arrow`."""
        return self.root / "manifests"

    @property
    def built_manifests(self) -> Path:
        """Manifests built from the bucket's listing, laid out like a manifest root."""
        return self.root / "manifests-built"

    @property
    def blocks(self) -> Path:
        """The disk block cache."""
        return self.root / "blocks"

    @property
    def tmp(self) -> Path:
        """Downloads in progress (manifests before conversion)."""
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

    Directories that already exist are left as they are (someone chose their mode). Tolerates
    another process creating the same directories at the same time. Raises OSError (also when a
    file stands where a directory should be).
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
