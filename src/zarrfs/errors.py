"""The exception hierarchy of zarrfs and its single errno table.

Owns: every domain error type and the one mapping from error type to errno (`errno_for`). Other modules
raise these typed errors; only `fuse_ops` converts them to `pyfuse3.FUSEError`, and only `cli` turns
`UserError` into an exit code and a one-line message. Unknown exceptions are bugs and are not mapped.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager


class ZarrfsError(Exception):
    """Base of every error zarrfs raises on purpose."""


# --- namespace errors -------------------------------------------------------------------------


class NotFound(ZarrfsError):
    """No entry with that name (or inode) exists in the published version. `ttl`: how long the
    kernel may remember that (None: as long as it likes: the name can never exist)."""

    def __init__(self, *args: object, ttl: float | None = None) -> None:
        super().__init__(*args)
        self.ttl = ttl


class NotADirectory(ZarrfsError):
    """A directory operation was attempted on a file."""


class IsADirectory(ZarrfsError):
    """A file operation was attempted on a directory."""


class ReadOnly(ZarrfsError):
    """Any write-like operation: the mounted version is immutable."""


class NoAttribute(ZarrfsError):
    """getxattr of an attribute that does not exist."""


# --- data errors (all EIO: never serve bytes that are not the published version) -----------------


class DataError(ZarrfsError):
    """Something prevents serving the exact published bytes; maps to EIO."""


class IntegrityError(DataError):
    """Data or metadata does not match what was published (checksum, size, ETag, VersionId)."""


class ManifestError(DataError):
    """A Zarr manifest is missing, unreadable, of an unsupported schema, or malformed."""


class ManifestMissing(ManifestError):
    """No manifest root has the manifest (and it could not be built from the bucket)."""


class RemoteError(DataError):
    """S3 or HTTP failed after retries (timeouts, 5xx, access denied, missing object version)."""


class ObjectMissing(RemoteError):
    """The object (or the pinned version of it) does not exist in the bucket."""


class DocumentTooLarge(RemoteError):
    """A downloaded document grew past the size it may have (an untrusted source); not retried."""


# --- user errors (the CLI prints one line and exits non-zero) ------------------------------------


class UserError(ZarrfsError):
    """A problem the user can fix: bad arguments, unknown dandiset or version, bad mountpoint."""

    exit_code = 2


class SourceError(UserError):
    """SOURCE is not `DANDISET@VERSION`, `DANDI:DANDISET/VERSION` or a dandiarchive.org URL."""


class VersionNotFound(UserError):
    """The dandiset or version does not exist where it was looked up."""

    exit_code = 3


class MountError(UserError):
    """The mountpoint is unusable, or the FUSE mount itself failed."""

    exit_code = 4


_ERRNO: tuple[tuple[type[ZarrfsError], int], ...] = (
    (NotFound, errno.ENOENT),
    (NotADirectory, errno.ENOTDIR),
    (IsADirectory, errno.EISDIR),
    (ReadOnly, errno.EROFS),
    (NoAttribute, errno.ENODATA),
    (DataError, errno.EIO),
)


def errno_for(exc: ZarrfsError) -> int:
    """The errno a FUSE request failing with `exc` returns. The one errno table of zarrfs."""
    for cls, code in _ERRNO:
        if isinstance(exc, cls):
            return code
    return errno.EIO


@contextmanager
def unwrap_single_exception() -> Iterator[None]:
    """Let an exception that a nursery wrapped alone in a group leave as itself."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
