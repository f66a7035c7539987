"""stallfs: a passthrough FUSE filesystem over a backing directory that can be made to stop answering.

    python benchmarks/stallfs.py BACKING MOUNTPOINT

Test infrastructure for `soak.py --archive`: it serves the cache dir of the zarrfs mount under test, and
on command every request it receives waits until the stall ends, then completes normally, as a hung
NFS server does. Nothing fails: a stall only delays.

Control: its standard input takes one command a line and each gets one line on standard output:
`stall` (-> `stalled`), `resume` (-> `resumed <seconds stalled> <requests that waited>`), `stats`
(-> one JSON object: requests by operation, requests that waited, the longest wait, whether stalled
now). It prints `MOUNTED <mountpoint>` once the mount is live, and unmounts and exits when its
standard input closes, on SIGTERM or SIGINT (a stall in progress ends first). From a shell,
SIGUSR1 stalls and SIGUSR2 resumes.

Operations: lookup, getattr, setattr (mode, size, atime/mtime, uid/gid), readlink, symlink, mkdir,
rmdir, unlink, rename (with RENAME_NOREPLACE and RENAME_EXCHANGE), link, open, create, read, write,
flush, fsync, release, opendir, readdir, releasedir, fsyncdir, statfs: each waits while stalled.
`forget` never waits (it has no reply). Extended attributes and device nodes are not supported
(ENOSYS, which the kernel remembers, and EPERM). Locks: pyfuse3 implements neither getlk/setlk nor flock, so the kernel does not
negotiate FUSE_POSIX_LOCKS/FUSE_FLOCK_LOCKS and handles `flock` and `fcntl` locks on this mount
locally (between processes of this machine only); they never reach the daemon and never wait for a
stall (the `open` before them does).

Inode numbers are the backing files' own (the backing root is inode 1), mapped to the names they were
seen under; every change goes through this mount, so the map stays true. The kernel may remember names
and attributes for 1 s (as an NFS client caches attributes for a few seconds) and keeps no file pages
across opens (no `keep_cache`): every `open` reaches this process, and within a second of a stall so
does every path lookup and `stat`. Mounted with `default_permissions` (the kernel checks modes),
without `allow_other`. Backing I/O is synchronous (a local disk) on trio's one thread: small, not fast.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import stat
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
#: Seconds the kernel may remember a name or attributes (NFS clients cache attributes 3-60 s).
CACHE_TIMEOUT = 1.0
P = ParamSpec("P")
T = TypeVar("T")


class StallFS(pyfuse3.Operations):
    """Passthrough to `backing`; every operation but `forget` waits while `stalled` is set."""

    def __init__(self, backing: str) -> None:
        super().__init__()
        self.backing = os.path.realpath(backing)
        self.root_ino = os.lstat(self.backing).st_ino
        self.paths: dict[int, dict[str, None]] = {ROOT: {self.backing: None}}  # ordered sets
        self.counts: Counter[str] = Counter()
        self.waited = 0  # requests that waited for a stall to end
        self.longest_wait = 0.0
        self._resumed: trio.Event | None = None  # set while stalled
        self._stalled_at = 0.0
        self._stall_waited = 0

    # --- stalls -----------------------------------------------------------------------------------

    @property
    def stalled(self) -> bool:
        return self._resumed is not None

    def stall(self) -> None:
        if self._resumed is None:
            self._resumed = trio.Event()
            self._stalled_at = trio.current_time()
            self._stall_waited = 0

    def resume(self) -> tuple[float, int]:
        """End the stall: (seconds it lasted, requests that waited for it)."""
        if self._resumed is None:
            return 0.0, 0
        self._resumed.set()
        self._resumed = None
        return trio.current_time() - self._stalled_at, self._stall_waited

    async def _enter(self, op: str) -> None:
        self.counts[op] += 1
        resumed = self._resumed
        if resumed is not None:
            self.waited += 1
            self._stall_waited += 1
            start = trio.current_time()
            await resumed.wait()
            self.longest_wait = max(self.longest_wait, trio.current_time() - start)

    def stats(self) -> dict[str, Any]:
        return {
            "requests": sum(self.counts.values()),
            "by_operation": dict(sorted(self.counts.items())),
            "waited": self.waited,
            "longest_wait_s": round(self.longest_wait, 3),
            "stalled": self.stalled,
        }

    # --- names ------------------------------------------------------------------------------------

    def _path(self, inode: int) -> str:
        names = self.paths.get(inode)
        if not names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return next(reversed(names))  # the most recent name

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _ino(self, st: os.stat_result) -> int:
        return ROOT if st.st_ino == self.root_ino else st.st_ino

    def _remember(self, path: str, st: os.stat_result) -> int:
        ino = self._ino(st)
        self.paths.setdefault(ino, {})[path] = None
        return ino

    def _forget_name(self, path: str) -> None:
        for names in self.paths.values():
            names.pop(path, None)

    def _renamed(self, old: str, new: str) -> None:
        """`old` is now `new`, and so is everything below it (a directory)."""
        prefix = old + os.sep
        for names in self.paths.values():
            for path in [p for p in names if p == old or p.startswith(prefix)]:
                del names[path]
                names[new + path[len(old) :]] = None

    def _attr(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self._ino(st)
        entry.generation = 0
        entry.entry_timeout = CACHE_TIMEOUT
        entry.attr_timeout = CACHE_TIMEOUT
        entry.st_mode = st.st_mode
        entry.st_nlink = st.st_nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = st.st_blksize
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    def _entry(self, path: str) -> pyfuse3.EntryAttributes:
        st = _os(os.lstat, path)
        self._remember(path, st)
        return self._attr(st)

    # --- operations -------------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._enter("lookup")
        if name == b".":
            return self._entry(self._path(parent_inode))
        if name == b"..":
            path = self._path(parent_inode)
            return self._entry(path if path == self.backing else os.path.dirname(path))
        return self._entry(self._child(parent_inode, name))

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        await self._enter("getattr")
        return self._attr(_os(os.lstat, self._path(inode)))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        await self._enter("setattr")
        target: int | str = fh if fh is not None else self._path(inode)
        if fields.update_size:
            _os(os.truncate, target, attr.st_size)
        if fields.update_mode:
            _os(os.chmod, target, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            _os(os.chown, target, uid, gid)
        if fields.update_atime or fields.update_mtime:
            st = _os(os.stat, target)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            _os(os.utime, target, ns=(atime, mtime))
        if fh is not None:
            return self._attr(_os(os.fstat, fh))
        return self._attr(_os(os.lstat, self._path(inode)))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        await self._enter("readlink")
        return os.fsencode(_os(os.readlink, self._path(inode)))

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._enter("symlink")
        path = self._child(parent_inode, name)
        _os(os.symlink, os.fsdecode(target), path)
        return self._entry(path)

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._enter("mknod")
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._enter("mkdir")
        path = self._child(parent_inode, name)
        _os(os.mkdir, path, mode)
        return self._entry(path)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._enter("rmdir")
        path = self._child(parent_inode, name)
        _os(os.rmdir, path)
        self._forget_name(path)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._enter("unlink")
        path = self._child(parent_inode, name)
        _os(os.unlink, path)
        self._forget_name(path)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self._enter("rename")
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            _os(_renameat2, old, new, _RENAME_EXCHANGE)
            swap = new + "\0"
            self._renamed(old, swap)
            self._renamed(new, old)
            self._renamed(swap, new)
            return
        if flags & pyfuse3.RENAME_NOREPLACE:
            _os(_renameat2, old, new, _RENAME_NOREPLACE)
        else:
            _os(os.rename, old, new)
        self._forget_name(new)
        self._renamed(old, new)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._enter("link")
        path = self._child(new_parent_inode, new_name)
        _os(os.link, self._path(inode), path, follow_symlinks=False)
        return self._entry(path)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        await self._enter("open")
        fd = _os(os.open, self._path(inode), (flags & ~os.O_CREAT) | os.O_CLOEXEC)
        return pyfuse3.FileInfo(fh=fd)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        await self._enter("create")
        path = self._child(parent_inode, name)
        fd = _os(os.open, path, flags | os.O_CREAT | os.O_CLOEXEC, mode)
        st = os.fstat(fd)
        self._remember(path, st)
        return pyfuse3.FileInfo(fh=fd), self._attr(st)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        await self._enter("read")
        return _os(os.pread, fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        await self._enter("write")
        return _os(os.pwrite, fh, buf, off)

    async def flush(self, fh: int) -> None:
        await self._enter("flush")

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._enter("fsync")
        _os(os.fdatasync if datasync else os.fsync, fh)

    async def release(self, fh: int) -> None:
        await self._enter("release")
        os.close(fh)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        await self._enter("opendir")
        path = self._path(inode)
        if not stat.S_ISDIR(_os(os.lstat, path).st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await self._enter("readdir")
        path = self._path(fh)
        names = sorted(_os(os.listdir, path))  # offsets are positions in the sorted listing
        for i in range(start_id, len(names)):
            child = os.path.join(path, names[i])
            try:
                st = os.lstat(child)
            except FileNotFoundError:
                continue  # removed meanwhile
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), self._attr(st), i + 1):
                break
            self._remember(child, st)  # readdirplus: the kernel now knows this inode

    async def releasedir(self, fh: int) -> None:
        await self._enter("releasedir")

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self._enter("fsyncdir")

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        await self._enter("statfs")
        st = _os(os.statvfs, self.backing)
        out = pyfuse3.StatvfsData()
        for name in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(out, name, getattr(st, name))
        return out

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pass  # inode numbers are the backing ones and names are kept: nothing to drop

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        await self._enter("getxattr")
        raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel stops asking (security.capability)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        await self._enter("listxattr")
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self._enter("setxattr")
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._enter("removexattr")
        raise pyfuse3.FUSEError(errno.ENOSYS)


def _os(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args)`, an OSError answered with its errno."""
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        raise pyfuse3.FUSEError(e.errno or errno.EIO) from None


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(old: str, new: str, flags: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), old)


# --- the process --------------------------------------------------------------------------------------


async def serve(fs: StallFS, mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        nursery.start_soon(_signals, fs)
        print(f"MOUNTED {mountpoint}", flush=True)
        await _commands(fs)  # returns when stdin closes
        fs.resume()
        nursery.cancel_scope.cancel()


async def _commands(fs: StallFS) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    while True:
        data = await stdin.receive_some()
        if not data:
            return
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            command = line.decode().strip()
            if command == "stall":
                fs.stall()
                reply = "stalled"
            elif command == "resume":
                seconds, waited = fs.resume()
                reply = f"resumed {seconds:.3f} {waited}"
            elif command == "stats":
                reply = json.dumps(fs.stats())
            else:
                reply = f"unknown command {command!r}"
            print(reply, flush=True)


async def _signals(fs: StallFS) -> None:
    with trio.open_signal_receiver(
        signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT
    ) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR1:
                fs.stall()
            elif signum == signal.SIGUSR2:
                fs.resume()
            else:
                fs.resume()
                raise SystemExit(0)  # leaves the nursery; the mount is closed below


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backing", help="the directory served")
    parser.add_argument("mountpoint")
    args = parser.parse_args()
    os.umask(0)  # the kernel has applied the caller's umask to the modes it sends
    fs = StallFS(args.backing)
    options = set(pyfuse3.default_options) | {"fsname=stallfs", "subtype=stallfs"}
    pyfuse3.init(fs, args.mountpoint, options)
    try:
        trio.run(serve, fs, args.mountpoint)
    except SystemExit:
        pass
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
