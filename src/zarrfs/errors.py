"""The exception hierarchy of zarrfs and its single errno table.

Owns: every domain error type and the one mapping from error type to errno (`errno_for`). Other modules
raise these typed errors; only `fuse_ops` converts them to `pyfuse3.FUSEError`, and only `cli` turns
`UserError` into an exit code and a one-line message. Unknown exceptions are bugs and are not mapped;
also owned here is the one last resort for them (`report_bug`): the FUSE handlers and every background
task (resolutions, manifest loads, prefetch, disk writes) log a bug's traceback once, marked
`INTERNAL_ERROR`, count it, and fail only the work it happened in.
"""

from __future__ import annotations

import copy
import errno
import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


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
    """S3 or HTTP failed after retries (timeouts, 5xx, access denied, missing object version).
    `transient`: the remote may answer another time (an outage, not an answer about the data): such
    a failure is never remembered as if it were an answer."""

    transient = True


class ObjectMissing(RemoteError):
    """The object (or the pinned version of it) does not exist in the bucket."""

    transient = False


class DocumentTooLarge(RemoteError):
    """A downloaded document grew past the size it may have (an untrusted source); not retried."""

    transient = False


class NotVirtualizable(DataError):
    """A blob cannot be shown as a virtual Zarr (`--virtual-zarr`): it is not HDF5, the HDF5
    library refused it, or its extraction failed for good (an answer about the data, remembered)."""


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


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` says nothing about the data, only that it could not be had now (a remote
    outage, a local disk problem): never to be remembered as an answer."""
    return isinstance(exc, RemoteError | OSError) and getattr(exc, "transient", True)


def copy_error(exc: Exception) -> Exception:
    """A fresh copy of `exc` (type, args and attributes such as `NotFound.ttl`) to raise in one more
    task: re-raising one exception object from many tasks would grow its traceback without end."""
    try:
        fresh = copy.copy(exc)
    except Exception:  # a constructor that wants more than its args
        return DataError(f"{type(exc).__name__}: {exc}")
    fresh.__traceback__ = None
    return fresh


#: Marker of every log line about an unexpected exception (a bug); the test fixtures fail on it.
INTERNAL_ERROR = "INTERNAL_ERROR"
#: How many unexpected exceptions were answered with EIO, by where they were raised.
internal_errors: dict[tuple[str, str, int], int] = {}


def report_bug(where: str, exc: BaseException) -> None:
    """The last resort for an unexpected exception in `where` (a FUSE handler, a background task):
    log its traceback the first time it is raised at its place (type, file, line), a one-line count
    the later times, always marked `INTERNAL_ERROR`. The caller then fails only the work it was
    doing (EIO for the request, or for the requests waiting on the task)."""
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    place = (type(exc).__name__, last.filename if last else "?", (last.lineno or 0) if last else 0)
    seen = internal_errors.get(place, 0)
    internal_errors[place] = seen + 1
    if seen == 0:
        log.error(
            "%s in %s (answered EIO; the mount keeps serving): %r",
            INTERNAL_ERROR,
            where,
            exc,
            exc_info=exc,
        )
    else:
        log.error(
            "%s in %s again (%d times so far, traceback logged the first time): %r",
            INTERNAL_ERROR,
            where,
            seen + 1,
            exc,
        )


@contextmanager
def unwrap_single_exception() -> Iterator[None]:
    """Let an exception that a nursery wrapped alone in a group leave as itself."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
