"""The pyfuse3 adapter: translates FUSE requests to `Filesystem` calls and domain errors to errno.

Owns: `pyfuse3.Operations` handlers, attribute structs (owner, modes, timeouts), file and directory
handles, and the one place where `ZarrfsError` becomes `FUSEError` (`_errors`). Thin by design: no S3,
no parsing, no cache policy. Every write-like request fails with EROFS (the mount is also made with the
`ro` option, so the kernel usually answers those itself).

The mount is made before the core is ready (so that the mountpoint is live at once); requests that
arrive meanwhile wait for `attach` (or get EIO after `fail`). Only `FUSEError` may leave a pyfuse3
handler: anything else ends `pyfuse3.main` and unmounts for every
user. So every handler runs inside `_errors`, whose last resort turns an unexpected exception (a bug)
into EIO for that one request, logs its traceback once per distinct place it was raised (later
occurrences get a one-line count) with the marker `INTERNAL_ERROR`, and counts it; the daemon keeps
serving every other path. The test fixtures fail on that marker, so a bug still fails tests loudly.
`trio.Cancelled` (a BaseException) is never caught.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Sequence
from itertools import count
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from zarrfs import config
from zarrfs.base.names import NAME_MAX
from zarrfs.errors import (
    INTERNAL_ERROR,
    NoAttribute,
    NotFound,
    ReadOnly,
    ZarrfsError,
    errno_for,
    internal_errors,
    report_bug,
)
from zarrfs.fs.namespace import Entry

if TYPE_CHECKING:  # the core (and its S3 client) is imported after the mount is made
    from zarrfs.fs.filesystem import Filesystem, OpenDir, OpenFile

log = logging.getLogger(__name__)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
#: Extended attributes (with --xattr): `Filesystem.provenance` under this prefix, e.g.
#: `user.zarrfs.s3_url`, `user.zarrfs.etag`, `user.zarrfs.version_id`, `user.zarrfs.asset_id`,
#: `user.zarrfs.zarr_checksum` (a Zarr's root), `user.zarrfs.version` (a version's root).
XATTR_PREFIX = b"user.zarrfs."
XATTR_URL = XATTR_PREFIX + b"s3_url"


def kernel_readdir_cache_supported() -> bool:
    """Whether the running pyfuse3 lets `opendir` ask the kernel to cache directory listings.

    The only feature test for it. Stock pyfuse3 (3.5 and earlier) takes a plain file handle from
    `opendir`; the build that `scripts/setup.sh` makes with `patches/pyfuse3-*-cache-readdir.patch`
    also takes a `pyfuse3.FileInfo`, whose `cache_readdir` and `keep_cache` become
    FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE in the reply: the kernel then serves repeated listings of a
    directory from its cache for the life of the mount without calling `readdir`. Such a pyfuse3
    is recognised by `FileInfo` having a `cache_readdir` attribute.
    """
    return hasattr(pyfuse3.FileInfo, "cache_readdir")


class _errors:  # lower case: used as `with _errors(handler):`, like a function
    """Map a domain error to FUSEError; the only translation point of zarrfs, and the last resort
    that keeps a bug in one request from unmounting the filesystem. A class rather than a
    `contextmanager` generator: every request enters one, and a generator costs four times more."""

    __slots__ = ("handler",)

    def __init__(self, handler: str) -> None:
        self.handler = handler

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, e: BaseException | None, tb: object) -> None:
        if e is None or isinstance(e, pyfuse3.FUSEError) or not isinstance(e, Exception):
            return  # no error, already an errno, or trio.Cancelled and the like: as they are
        if isinstance(e, ZarrfsError):
            raise pyfuse3.FUSEError(errno_for(e)) from e
        report_bug(self.handler, e)
        raise pyfuse3.FUSEError(errno.EIO) from e


__all__ = ["INTERNAL_ERROR", "ZarrfsOperations", "internal_errors"]


class ZarrfsOperations(pyfuse3.Operations):
    """Read-only FUSE operations over one `Filesystem`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        fs: Filesystem | None,
        *,
        uid: int | None = None,
        gid: int | None = None,
        umask: int = config.DEFAULT_UMASK,
        entry_timeout: float = config.ENTRY_TIMEOUT,
        attr_timeout: float = config.ATTR_TIMEOUT,
        negative_timeout: float = config.NEGATIVE_TIMEOUT,
        xattrs: bool = False,
        kernel_readdir_cache: bool = True,
        zero_message_open: bool = True,
        fixed_tree: bool = False,
    ) -> None:
        super().__init__()
        #: Ask the kernel to cache listings (only where pyfuse3 can; the tree never changes).
        self.kernel_readdir_cache = kernel_readdir_cache and kernel_readdir_cache_supported()
        #: No directory of the mount can change while it is mounted (a version mount: no level of
        #: the archive), so every listing may be cached, which zero-message opendir implies.
        self.fixed_tree = fixed_tree
        #: Zero-message opendir is in effect: `opendir` replies ENOSYS, and `readdir` receives
        #: inodes, not handles. Decided in `init`, once the kernel has said what it supports: the
        #: pyfuse3 that `patches/` builds sets `pyfuse3.no_opendir_support` while answering INIT
        #: (Linux 5.1 and libfuse 3.5 or newer); stock pyfuse3 has no such attribute.
        self.no_opendir = False
        #: Ask for zero-message open where pyfuse3 and the kernel can (see `init`).
        self.zero_message_open = zero_message_open
        #: Zero-message open is in effect: `open` replies ENOSYS, the kernel then opens every file
        #: without asking (no OPEN, no RELEASE) and keeps its page cache across opens, and `read`
        #: receives inodes, not handles (`Filesystem.read_unopened` keeps the read state per file).
        #: Decided in `init`, like `no_opendir`, from `pyfuse3.no_open_support` (the patched build).
        self.no_open = False
        self._fs = fs
        self._ready = trio.Event()  # the core is attached (or failed): requests may proceed
        #: Set once the kernel's INIT request is answered: the mount's settings are final then.
        self.initialized = trio.Event()
        self._started_ns = time.time_ns()
        if fs is not None:
            self._ready.set()
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        #: Modes as rclone derives them: the umask applied to 0777 / 0666, never a write bit.
        self.dir_mode = 0o777 & ~umask & ~0o222
        self.file_mode = 0o666 & ~umask & ~0o222
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.negative_timeout = negative_timeout
        self.xattrs = xattrs
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, OpenDir] = {}
        self._handles = count(1)

    # --- the core, attached once it is ready -------------------------------------------------

    @property
    def fs(self) -> Filesystem:
        if self._fs is None:
            raise RuntimeError("the filesystem is not attached yet")
        return self._fs

    def init(self) -> None:
        """pyfuse3 calls this while answering the kernel's INIT request; the answer is sent when
        it returns, before any waiter on `initialized` runs."""
        self.no_opendir = (
            self.kernel_readdir_cache
            and self.fixed_tree
            and bool(getattr(pyfuse3, "no_opendir_support", False))
        )
        # Every mount: a file's bytes never change while it is mounted (a draft stays pinned), so
        # its page cache may be kept across opens, which zero-message open implies.
        self.no_open = self.zero_message_open and bool(getattr(pyfuse3, "no_open_support", False))
        self.initialized.set()

    def attach(self, fs: Filesystem) -> None:
        """The core is ready: requests that arrived since the mount was made proceed."""
        self._fs = fs
        self._ready.set()

    def fail(self) -> None:
        """The core could not start: waiting requests are answered EIO (the mount is going away)."""
        self._ready.set()

    async def _core(self) -> Filesystem:
        fs = self._fs
        # no checkpoint here: one trip through trio's scheduler costs more than a lookup
        if fs is not None:
            return fs
        await self._ready.wait()
        if self._fs is None:
            raise pyfuse3.FUSEError(errno.EIO)
        return self._fs

    # --- attributes -----------------------------------------------------------------------------

    def attributes(self, entry: Entry) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = entry.ino
        attr.generation = 0
        attr.entry_timeout = self.entry_timeout if entry.ttl is None else entry.ttl
        attr.attr_timeout = self.attr_timeout if entry.ttl is None else entry.ttl
        if entry.is_dir:
            attr.st_mode = stat.S_IFDIR | self.dir_mode
            attr.st_nlink = 2
            attr.st_size = 0
        elif entry.link is not None:
            attr.st_mode = stat.S_IFLNK | 0o777
            attr.st_nlink = 1
            attr.st_size = len(entry.link)
        else:
            attr.st_mode = stat.S_IFREG | self.file_mode
            attr.st_nlink = 1
            attr.st_size = entry.size
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_rdev = 0
        attr.st_blksize = 1 << 17
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = entry.mtime_ns
        return attr

    def _negative(self, ttl: float | None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = 0  # cached by the kernel for entry_timeout
        attr.entry_timeout = self.negative_timeout if ttl is None else ttl
        return attr

    # --- reading ----------------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with _errors("lookup"):
            try:
                entry = await (await self._core()).lookup(parent_inode, name)
            except NotFound as e:
                return self._negative(e.ttl)
            return self.attributes(entry)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        with _errors("getattr"):
            if inode == pyfuse3.ROOT_INODE and not self._ready.is_set():
                # the core is starting: the root is a directory already (so the mountpoint is
                # live at once), but its times are not known yet: the kernel must not keep them
                return self.attributes(Entry(inode, True, 0, self._started_ns, ttl=0.0))
            return self.attributes(await (await self._core()).getattr(inode))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # inode numbers are derived, never reused: nothing to release

    # The stock pyfuse3 stubs declare `-> int`; the patched ones allow a FileInfo too.
    async def opendir(  # type: ignore[override, unused-ignore]
        self, inode: int, ctx: pyfuse3.RequestContext
    ) -> int | pyfuse3.FileInfo:
        log.debug("opendir %d", inode)
        if self.no_opendir:  # the kernel opens this and every later directory without asking
            raise pyfuse3.FUSEError(errno.ENOSYS)
        with _errors("opendir"):
            handle = await (await self._core()).opendir(inode)
            fh = next(self._handles)
            self._dirs[fh] = handle
            if not (self.kernel_readdir_cache and handle.cacheable):
                return fh
            # A listing never changes: the kernel may keep it, across opens, for the life of the
            # mount. (Levels of the archive that can change are never cached this way.)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True, cache_readdir=True)  # type: ignore[call-arg, unused-ignore]

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """`fh` is a handle from `opendir`, or with zero-message opendir the directory's inode."""
        with _errors("readdir"):
            fs = await self._core()
            # Without opendir, the checks it makes (a directory, a Zarr that can be served) are
            # made here, and fail the listing instead of the open.
            handle = await fs.opendir(fh) if self.no_opendir else self._dirs[fh]
            log.debug("readdir %d from %d", handle.ino, start_id)
            entries = await fs.readdir(handle, start_id)
            for name, entry, next_id in entries:
                if not pyfuse3.readdir_reply(token, name, self.attributes(entry), next_id):
                    break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        with _errors("readlink"):
            return await (await self._core()).readlink(inode)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        log.debug("open %d", inode)
        with _errors("open"):
            if flags & _WRITE_FLAGS:
                raise ReadOnly("opened for writing")
            if self.no_open:  # the kernel opens this and every later file without asking
                raise pyfuse3.FUSEError(errno.ENOSYS)
            handle = await (await self._core()).open(inode)
            fh = next(self._handles)
            self._files[fh] = handle
            # Content is immutable: the kernel may keep its page cache across opens.
            return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        """`fh` is a handle from `open`, or with zero-message open the file's inode."""
        log.debug("read %d", fh)
        with _errors("read"):
            fs = await self._core()
            if self.no_open:
                return await fs.read_unopened(fh, off, size)
            return await fs.read(self._files[fh], off, size)

    async def release(self, fh: int) -> None:
        with _errors("release"):
            handle = self._files.pop(fh, None)
            if handle is not None:
                await (await self._core()).release(handle)

    async def flush(self, fh: int) -> None:
        log.debug("flush %d", fh)
        # Nothing is ever written, so a close has nothing to flush. ENOSYS (not success) makes the
        # kernel stop sending FLUSH for good (`fc->no_flush`): every close(2) of a file waits for
        # its FLUSH reply, one round trip to this daemon per close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None  # nothing is ever dirty

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        with _errors("statfs"):
            stats = (await self._core()).statfs()
            data = pyfuse3.StatvfsData()
            data.f_bsize = data.f_frsize = 4096
            data.f_blocks = (stats.total_bytes + 4095) // 4096
            data.f_bfree = data.f_bavail = 0
            data.f_files = stats.files
            data.f_ffree = data.f_favail = 0
            data.f_namemax = (
                NAME_MAX  # longer names are refused when manifests and assets are parsed
            )
            return data

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return not mode & os.W_OK

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel then stops asking (fast `ls -l`)
        with _errors("listxattr"):
            return [
                XATTR_PREFIX + name.encode()
                for name in await (await self._core()).provenance(inode)
            ]

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        with _errors("getxattr"):
            if not name.startswith(XATTR_PREFIX):
                raise NoAttribute(name.decode("utf-8", "replace"))
            value = (await (await self._core()).provenance(inode)).get(
                name[len(XATTR_PREFIX) :].decode("utf-8", "replace")
            )
            if value is None:
                raise NoAttribute(name.decode("utf-8", "replace"))
            return value.encode()

    # --- everything that would write: EROFS -------------------------------------------------------

    async def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    write = setxattr = removexattr = create = _read_only
