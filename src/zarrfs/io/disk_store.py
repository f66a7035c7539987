"""A persistent, content-addressed block cache on disk, safe to share between mounts and nodes.

Owns: the files under `<cache dir>/blocks/` (their layout, format, verification, publication and
eviction), the free-space floor of that filesystem, and the default size of the cache
(`default_size`). Never does: trio, S3, FUSE, or deciding when to fetch; the caller runs every
method in a worker thread and fetches on a miss. Knows nothing of the in-memory `io.blocks`.

Layout. `<cache dir>/blocks/v1/<h[:3]>/<h>.<index>`, where `h` is the hex sha256 of the identity
of an object version, `[format, bucket, key, version_id, etag, size, block_size]` as compact JSON
(version_id is None for immutable blob keys; the block size is part of the identity because it
decides what "block 3" is), and `index` the block number in decimal. Everything zarrfs serves is
immutable per (key, VersionId), so a name always means the same bytes: there is no invalidation,
and two processes or nodes writing one block write identical bytes, so a race between them is
harmless. One level of 4096 fan-out directories keeps every directory small (2,500 files per
directory at 10 million blocks) without the 256 MiB that 65,536 empty directories cost on ext4;
blocks of one object share no directory of their own, so eviction never has to remove one.

Format. Each file is an 80-byte header, then the data:
magic `ZFSBLOCK`, format version (u16), header size (u16), flags (u32, 0), the 32-byte identity
digest, block index (u64), data length (u64), xxh3-64 of the data (u64), xxh3-64 of the preceding
72 header bytes (u64); little-endian. `get` checks all of it against what it asked for, and that
the file holds exactly that many bytes: a block of another object moved to this name, a truncated
or extended file, a flipped bit in header or data are each counted, logged (rate-limited), deleted
and answered as a miss, never served. xxh3-64 rather than crc32c: both are installed and far
faster than the disk (crc32c about 28 GB/s with SSE4.2, xxh3 about 60 GB/s here), but xxh3 is
fast on every CPU without a hardware instruction and its 64 bits make an undetected random
corruption a 2^-64 event instead of 2^-32. Neither is a defence against someone who can write the
cache dir: whoever can write it can serve anything through it, which is why its directories are
0700 and its files 0600 (regardless of umask), and why a cache dir shared between users would have
to be trusted by all of them.

Writes. A temp file in the block's own directory, named `.<name>.<host>.<pid>.<random>.tmp` (no
two writers on any NFS client collide), written, optionally fsynced (`config.DISK_CACHE_FSYNC`:
a block torn by a crash fails its checksum and is refetched, so it buys nothing but latency),
closed (which flushes an NFS client's writes to the server, close-to-open), then `os.replace`d onto
its name: readers on any node see the whole old file, the whole new one, or none. (An NFS client
may not see a block another node published a few seconds ago, its directory attributes being
cached: a miss and a duplicate write of identical bytes, never wrong bytes.)

Failures. The disk cache is an optimisation: no local disk problem (missing, unwritable or full
directory, a file where a directory should be, EIO, ESTALE) ever raises out of `get`, `put`,
`evict`, `usage` or `clear`. Each is logged at most once a minute per kind (with the count of those
suppressed) and behaves as a miss or a skipped write; files and directories may vanish at any
moment (another process or node evicting). Only caller bugs raise ValueError (a block index past
the end of the object, data of the wrong length). The constructor touches no disk at all.

Eviction. LRU-ish, with no shared index (SQLite-style locking is unsafe on NFS): the mtime of a
block is its last use. A hit sets it to now when it is older than `touch_interval` (atime is
often `noatime`), so a warm block costs one `utime` per interval, not one per read. `evict` stats
every file and deletes the oldest blocks first:
- when they exceed `high_water` x `max_bytes`, down to `low_water` x `max_bytes`;
- when the filesystem has less than `min_free_fraction` of its size free, until it has that much
  plus `high_water - low_water` of the cache's size free;
- when a write failed with ENOSPC or EDQUOT (a quota, which statvfs does not show),
  `1 - low_water` of what the cache holds.
It also deletes temp files older than `stale_temp_age`. Usage counts each file at the larger of
its apparent and allocated sizes. Eviction never runs on the read path: `needs_eviction` tells the
caller without any I/O when this process's writes call for a scan (none yet, the estimated usage
over the high-water mark, or a `put` refused for lack of room); other processes' writes are
caught by calling `evict` periodically. `put` refuses (returns False) a block that would take the
estimated usage over `max_bytes` or the free space under the floor; the estimates are the last
scan and the last statvfs (at most one a second), corrected by what this process wrote since,
each file counted in whole 4 KiB blocks.

Concurrency: every method may run in several threads at once and in several processes or nodes on
one directory. Counters and estimates are guarded by one lock that is never held across I/O; two
`evict` calls in one process do not overlap (the second returns None at once). Nothing relies on
file locks.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from zarrfs import config
from zarrfs.base.refs import ObjectRef
from zarrfs.io.cache_dir import make_private_dir

log = logging.getLogger(__name__)

#: Format of the files; a new format gets a new directory (`blocks/v2`), so versions never mix.
FORMAT_VERSION = 1
LAYOUT_DIR = ("blocks", "v1")
MAGIC = b"ZFSBLOCK"
#: magic, format version, header size, flags, identity digest, block index, data length, data xxh3
_FIELDS = struct.Struct("<8sHHI32sQQQ")
_CHECK = struct.Struct("<Q")
HEADER_SIZE = _FIELDS.size + _CHECK.size
#: Hex digits of the identity digest naming the fan-out directory (4096 directories).
FANOUT_DIGITS = 3

_BLOCK_NAME = re.compile(r"[0-9a-f]{64}\.[0-9]+")
_TEMP_SUFFIX = ".tmp"
#: Errors meaning "another process or node removed it": a miss, not a problem.
_VANISHED = (errno.ENOENT, errno.ESTALE)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_COUNTERS = (
    "hits",
    "misses",
    "bad_blocks",
    "puts",
    "put_bytes",
    "puts_skipped",
    "errors",
    "touches",
)


@dataclass(frozen=True, slots=True)
class DiskUsage:
    """What the cache holds on disk (for `zarrfs cache info`)."""

    bytes: int
    blocks: int
    #: Temp files of writers in progress or killed.
    temp_files: int


@dataclass(frozen=True, slots=True)
class EvictionReport:
    """What one `evict` scan found and did."""

    scanned_blocks: int
    scanned_bytes: int
    removed_blocks: int
    removed_bytes: int
    removed_temp_files: int
    #: Free bytes of the cache dir's filesystem before the scan; -1 when unknown.
    free_bytes: int
    seconds: float

    @property
    def remaining_bytes(self) -> int:
        return self.scanned_bytes - self.removed_bytes


@dataclass(frozen=True, slots=True)
class _Entry:
    mtime: float
    size: int
    path: str


def identity_digest(bucket: str, ref: ObjectRef, block_size: int) -> bytes:
    """sha256 of what names an object version's blocks (unambiguous: compact JSON of a list)."""
    identity = [FORMAT_VERSION, bucket, ref.key, ref.version_id, ref.etag, ref.size, block_size]
    return hashlib.sha256(json.dumps(identity, separators=(",", ":")).encode("ascii")).digest()


def _statvfs_nearest(path: str) -> os.statvfs_result:
    """statvfs of `path`, or of its nearest existing ancestor (the cache dir may not exist yet)."""
    while True:
        try:
            return os.statvfs(path)
        except (FileNotFoundError, NotADirectoryError):
            parent = os.path.dirname(path)
            if parent == path:
                raise
            path = parent


def default_size(cache_dir: Path) -> int:
    """Default `--cache-size` for `cache_dir` (`config.default_disk_cache_size` of its free space).

    0 (disabled) when the free space cannot be read, with a warning: no cache dir problem ever
    stops a mount.
    """
    try:
        st = _statvfs_nearest(os.fspath(cache_dir))
    except OSError as e:
        log.warning("disk block cache disabled: cannot read the free space of %s: %s", cache_dir, e)
        return 0
    return config.default_disk_cache_size(st.f_bavail * st.f_frsize)


def _process_umask() -> int:
    """The umask, read without changing it (Linux ≥ 4.7); assumes 022 where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _host_tag() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64]
    return host or "host"


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """Up to `size` bytes at `offset`, fewer only at the end of the file."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _write_all(fd: int, header: bytes, data: bytes) -> None:
    total = len(header) + len(data)
    written = os.writev(fd, [header, data])
    if written < total:
        rest = memoryview(header + data)[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]


def _file_bytes(st: os.stat_result) -> int:
    """What a file takes on disk: the larger of its apparent and allocated sizes."""
    return max(st.st_size, st.st_blocks * 512)


def _estimated_file_bytes(size: int) -> int:
    """What a new file of `size` bytes will take, until a scan tells: whole 4 KiB blocks."""
    return -(-size // 4096) * 4096


class _RateLimitedLog:
    """At most one warning per kind per `interval` seconds; the ones in between are counted."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self._interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += " (and %d similar in the last %.0f s)"
            args = (*args, suppressed, self._interval)
        log.warning(message, *args)


class DiskBlockCache:
    """Verified, immutable blocks of object versions in files under `<cache dir>/blocks/v1/`."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        max_bytes: int,
        block_size: int,
        min_free_fraction: float = config.DISK_CACHE_MIN_FREE_FRACTION,
        high_water: float = config.DISK_CACHE_HIGH_WATER,
        low_water: float = config.DISK_CACHE_LOW_WATER,
        touch_interval: float = config.DISK_CACHE_TOUCH_INTERVAL,
        stale_temp_age: float = config.STALE_TEMP_AGE,
        fsync: bool = config.DISK_CACHE_FSYNC,
        log_interval: float = config.DISK_CACHE_LOG_INTERVAL,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(
                f"max_bytes must be positive (a disabled cache is none), got {max_bytes}"
            )
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if not 0.0 <= min_free_fraction < 1.0:
            raise ValueError(f"min_free_fraction must be in [0, 1), got {min_free_fraction}")
        if not 0.0 <= low_water <= high_water <= 1.0:
            raise ValueError(
                f"need 0 <= low_water <= high_water <= 1, got {low_water}, {high_water}"
            )
        self.cache_dir = Path(cache_dir)
        self.max_bytes = max_bytes
        self.block_size = block_size
        self.min_free_fraction = min_free_fraction
        self.high_water = high_water
        self.low_water = low_water
        self.touch_interval = touch_interval
        self.stale_temp_age = stale_temp_age
        self.fsync = fsync
        self._root = os.path.join(os.fspath(cache_dir), *LAYOUT_DIR)
        self._host = _host_tag()
        #: fchmod each new file only when the umask would take read or write from its owner.
        self._fix_file_mode = bool(_process_umask() & 0o600)
        self._warn = _RateLimitedLog(log_interval)
        self._lock = threading.Lock()
        self._evicting = threading.Lock()
        # estimates, under self._lock
        self._written = 0  # bytes this process published, ever
        self._scanned_usage: int | None = None  # bytes found by the last scan (None: no scan yet)
        self._written_at_scan = 0
        self._free: int | None = None  # free bytes at the last statvfs (None: unknown)
        self._floor = 0  # min_free_fraction of the filesystem's size, at the last statvfs
        self._free_checked = -float("inf")  # monotonic time of the last statvfs
        self._written_at_free = 0
        self._out_of_space = False  # a write failed with ENOSPC/EDQUOT since the last scan
        self._refused = False  # a put was refused or failed for lack of room since the last scan
        self._stats = dict.fromkeys(_COUNTERS, 0)

    # --- the read path ----------------------------------------------------------------------------

    def get(
        self, bucket: str, ref: ObjectRef, index: int, block_size: int | None = None
    ) -> bytes | None:
        """The verified bytes of block `index` of that object version, or None: a miss, or a bad
        block that was just deleted, or a disk problem (logged, rate-limited). `block_size`
        overrides the cache's for this object (the block cache fetches small verifiable objects
        whole); it is part of the block's identity."""
        block_size = block_size or self.block_size
        length = self._block_length(ref, index, block_size)
        digest = identity_digest(bucket, ref, block_size)
        path = self._block_path(digest.hex(), index)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            if e.errno not in _VANISHED:
                self._problem("read", "cannot read the disk block cache (%s): %s", path, e)
            self._count("misses")
            return None
        try:
            header = _pread_all(fd, HEADER_SIZE, 0)
            problem = self._check_header(header, digest, index, length)
            data = b""
            if problem is None:
                data = _pread_all(fd, length + 1, HEADER_SIZE)  # one more: catch extended files
                if len(data) != length:
                    problem = f"holds {len(data)}{'+' if len(data) > length else ''} data bytes"
                elif xxhash.xxh3_64_intdigest(data) != _FIELDS.unpack_from(header)[7]:
                    problem = "data checksum mismatch"
            if problem is None:
                self._touch(fd, path)
        except OSError as e:
            if e.errno not in _VANISHED:
                self._problem("read", "cannot read the disk block cache (%s): %s", path, e)
            self._count("misses")
            return None
        finally:
            os.close(fd)
        if problem is not None:
            self._discard(path, problem)
            self._count("misses")
            return None
        self._count("hits")
        return data

    # --- the write path ---------------------------------------------------------------------------

    def put(
        self,
        bucket: str,
        ref: ObjectRef,
        index: int,
        data: bytes,
        block_size: int | None = None,
    ) -> bool:
        """Publish block `index` of that object version atomically. False when skipped: over the
        size budget, under the free-space floor, or the disk failed (logged, rate-limited)."""
        block_size = block_size or self.block_size
        length = self._block_length(ref, index, block_size)
        if len(data) != length:
            raise ValueError(
                f"block {index} of {ref.key} has {length} bytes, {len(data)} were given"
            )
        size = _estimated_file_bytes(HEADER_SIZE + length)
        if not self._has_room(size):
            with self._lock:
                self._refused = True
                self._stats["puts_skipped"] += 1
            return False
        digest = identity_digest(bucket, ref, block_size)
        name = f"{digest.hex()}.{index}"
        directory = os.path.join(self._root, name[:FANOUT_DIGITS])
        path = os.path.join(directory, name)
        temp = os.path.join(
            directory, f".{name}.{self._host}.{os.getpid()}.{secrets.token_hex(4)}{_TEMP_SUFFIX}"
        )
        fields = _FIELDS.pack(
            MAGIC,
            FORMAT_VERSION,
            HEADER_SIZE,
            0,
            digest,
            index,
            length,
            xxhash.xxh3_64_intdigest(data),
        )
        header = fields + _CHECK.pack(xxhash.xxh3_64_intdigest(fields))
        try:
            self._publish(directory, temp, path, header, data)
        except OSError as e:
            if e.errno in _VANISHED:
                pass  # a clear() or another node's eviction raced with this write: skip it
            elif e.errno in _NO_SPACE:
                with self._lock:
                    self._out_of_space = self._refused = True
                self._problem("space", "disk block cache %s is out of space: %s", self._root, e)
            else:
                self._problem("write", "cannot write the disk block cache (%s): %s", path, e)
            self._count("puts_skipped")
            return False
        with self._lock:
            self._written += size
            self._stats["puts"] += 1
            self._stats["put_bytes"] += HEADER_SIZE + length
        return True

    @property
    def needs_eviction(self) -> bool:
        """Whether this process's writes call for an `evict` scan (no I/O): no scan yet, the
        estimated usage is over the high-water mark, or a `put` was refused or failed for lack of
        room since the last scan. Other processes' writes are caught by calling `evict`
        periodically. When eviction cannot help (the floor is breached by other files and the
        cache is empty), every refused `put` makes this True again: space the scans out."""
        with self._lock:
            if self._scanned_usage is None or self._refused:
                return True
            written = self._written - self._written_at_scan
            return self._scanned_usage + written > self.high_water * self.max_bytes

    def stats(self) -> dict[str, int]:
        """Counters of this process: hits, misses, bad_blocks (discarded), puts, put_bytes,
        puts_skipped, errors (disk problems), touches (mtime refreshes)."""
        with self._lock:
            return dict(self._stats)

    # --- maintenance ------------------------------------------------------------------------------

    def evict(self) -> EvictionReport | None:
        """Scan the cache; delete the least recently used blocks when over the high-water mark or
        the free-space floor (down to the low-water mark), and stale temp files. Safe while other
        processes and nodes read, write and evict the same directory. None when another `evict`
        of this object is already running."""
        if not self._evicting.acquire(blocking=False):
            return None
        try:
            return self._evict()
        finally:
            self._evicting.release()

    def usage(self) -> DiskUsage:
        """Bytes and blocks on disk, by a scan (zero when the directory is missing or
        unreadable)."""
        entries, temp_files, _ = self._scan(remove_temp_older_than=None)
        return DiskUsage(sum(e.size for e in entries), len(entries), temp_files)

    def clear(self) -> DiskUsage:
        """Delete every block and temp file (and the emptied fan-out directories); what was
        deleted. Writers racing with it at most lose their write."""
        entries, _, _ = self._scan(remove_temp_older_than=-float("inf"))
        removed, removed_bytes = self._remove(entries, None)
        for directory in self._fanout_dirs():
            with contextlib.suppress(OSError):  # not empty (a writer is busy) or already gone
                os.rmdir(directory)
        with self._lock:
            self._scanned_usage = 0
            self._written_at_scan = self._written
        return DiskUsage(removed_bytes, removed, 0)

    # --- internals --------------------------------------------------------------------------------

    @staticmethod
    def _block_length(ref: ObjectRef, index: int, block_size: int) -> int:
        start = index * block_size
        if index < 0 or start >= ref.size:
            raise ValueError(f"{ref.key} ({ref.size} bytes) has no block {index}")
        return min(block_size, ref.size - start)

    def _block_path(self, hexdigest: str, index: int) -> str:
        return os.path.join(self._root, hexdigest[:FANOUT_DIGITS], f"{hexdigest}.{index}")

    @staticmethod
    def _check_header(header: bytes, digest: bytes, index: int, length: int) -> str | None:
        """Why this header is not the one of (digest, index, length), or None."""
        if len(header) < HEADER_SIZE:
            return f"truncated header ({len(header)} bytes)"
        magic, version, header_size, flags, got_digest, got_index, got_length, _ = (
            _FIELDS.unpack_from(header)
        )
        if magic != MAGIC:
            return "bad magic"
        (check,) = _CHECK.unpack_from(header, _FIELDS.size)
        if check != xxhash.xxh3_64_intdigest(header[: _FIELDS.size]):
            return "header checksum mismatch"
        if version != FORMAT_VERSION or header_size != HEADER_SIZE or flags != 0:
            return f"unknown format {version} (header {header_size} bytes, flags {flags:#x})"
        if got_digest != digest:
            return "belongs to another object version"
        if got_index != index:
            return f"is block {got_index}"
        if got_length != length:
            return f"says {got_length} data bytes, {length} expected"
        return None

    def _touch(self, fd: int, path: str) -> None:
        """Refresh the block's mtime (its LRU age) if it is older than touch_interval."""
        try:
            if time.time() - os.fstat(fd).st_mtime < self.touch_interval:
                return
            os.utime(fd)
        except OSError as e:  # another user's file, a read-only mount: the hit still counts
            if e.errno not in _VANISHED:
                self._problem("touch", "cannot refresh %s in the disk block cache: %s", path, e)
            return
        self._count("touches")

    def _discard(self, path: str, problem: str) -> None:
        """Delete a bad block. (If another writer published a good one in between, that one goes:
        a miss later, never bad bytes.)"""
        self._count("bad_blocks")
        self._warn.warning("bad", "discarding bad block %s of the disk cache: %s", path, problem)
        try:
            os.unlink(path)
        except OSError as e:
            if e.errno not in _VANISHED:
                self._problem("write", "cannot delete %s from the disk block cache: %s", path, e)

    def _has_room(self, size: int) -> bool:
        """Whether `size` more bytes keep the estimated usage within max_bytes and the estimated
        free space above the floor (refreshing the free space at most once a second)."""
        now = time.monotonic()
        with self._lock:
            refresh = now - self._free_checked >= config.DISK_CACHE_FREE_SPACE_INTERVAL
            if refresh:
                self._free_checked = now  # one thread asks; the others use the last answer
        if refresh:
            self._check_free_space()
        with self._lock:
            if self._scanned_usage is not None:
                usage = self._scanned_usage + self._written - self._written_at_scan
                if usage + size > self.max_bytes:
                    return False
            if self._free is not None:
                free = self._free - (self._written - self._written_at_free)
                if free - size < self._floor:
                    return False
            return True

    def _check_free_space(self) -> int:
        """statvfs now: update the free-space estimate; the free bytes, or -1 when unknown."""
        try:
            st = _statvfs_nearest(self._root)
        except OSError as e:
            self._problem("statvfs", "cannot read the free space of %s: %s", self._root, e)
            with self._lock:
                self._free = None
            return -1
        free = st.f_bavail * st.f_frsize
        with self._lock:
            self._free = free
            self._floor = int(self.min_free_fraction * st.f_blocks * st.f_frsize)
            self._written_at_free = self._written
            self._free_checked = time.monotonic()
        return free

    def _publish(self, directory: str, temp: str, path: str, header: bytes, data: bytes) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(temp, flags, 0o600)
        except (FileNotFoundError, NotADirectoryError):
            make_private_dir(directory)  # first block in this directory, or a clear() raced
            fd = os.open(temp, flags, 0o600)
        try:
            try:
                if self._fix_file_mode:
                    os.fchmod(fd, 0o600)
                _write_all(fd, header, data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)  # before the rename: NFS flushes on close (close-to-open)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise

    def _fanout_dirs(self) -> list[str]:
        try:
            with os.scandir(self._root) as it:
                return [e.path for e in it if len(e.name) == FANOUT_DIGITS and e.is_dir()]
        except OSError as e:
            if e.errno not in _VANISHED:
                self._problem("scan", "cannot list the disk block cache %s: %s", self._root, e)
            return []

    def _scan(self, *, remove_temp_older_than: float | None) -> tuple[list[_Entry], int, int]:
        """Every block file (mtime, size, path), how many temp files remain and how many were
        deleted: those older than `remove_temp_older_than` seconds (None: none)."""
        entries: list[_Entry] = []
        temp_files = temp_removed = 0
        now = time.time()
        for directory in self._fanout_dirs():
            for name, st, path in self._stat_dir(directory):
                if _BLOCK_NAME.fullmatch(name):
                    entries.append(_Entry(st.st_mtime, _file_bytes(st), path))
                elif name.startswith(".") and name.endswith(_TEMP_SUFFIX):
                    if remove_temp_older_than is not None and (
                        now - st.st_mtime > remove_temp_older_than
                    ):
                        try:
                            os.unlink(path)
                            temp_removed += 1
                            continue
                        except OSError:
                            pass  # its writer renamed it meanwhile, or another evict was first
                    temp_files += 1
        return entries, temp_files, temp_removed

    def _stat_dir(self, directory: str) -> Iterator[tuple[str, os.stat_result, str]]:
        """(name, stat, path) of the regular files in `directory`; vanished ones are skipped."""
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # evicted by someone else meanwhile
                    if st.st_mode & 0o170000 == 0o100000:
                        yield entry.name, st, entry.path
        except OSError as e:
            if e.errno not in _VANISHED:
                self._problem("scan", "cannot list %s in the disk block cache: %s", directory, e)

    def _evict(self) -> EvictionReport:
        started = time.monotonic()
        with self._lock:
            written_before = self._written
            out_of_space, self._out_of_space = self._out_of_space, False
            self._refused = False
        free = self._check_free_space()
        entries, _, temp_removed = self._scan(remove_temp_older_than=self.stale_temp_age)
        usage = sum(e.size for e in entries)
        excess = 0
        if usage > self.high_water * self.max_bytes:
            excess = usage - int(self.low_water * self.max_bytes)
        with self._lock:
            floor = self._floor
        if free >= 0 and free < floor:
            band = int((self.high_water - self.low_water) * min(self.max_bytes, usage))
            excess = max(excess, floor - free + band)
        if out_of_space:
            excess = max(excess, usage - int(self.low_water * usage))
        removed, removed_bytes = (0, 0)
        if excess > 0:
            entries.sort(key=lambda e: e.mtime)
            removed, removed_bytes = self._remove(entries, excess)
        with self._lock:
            self._scanned_usage = usage - removed_bytes
            self._written_at_scan = written_before
            if removed_bytes:
                self._free_checked = -float("inf")  # the next put sees the space just freed
        return EvictionReport(
            scanned_blocks=len(entries),
            scanned_bytes=usage,
            removed_blocks=removed,
            removed_bytes=removed_bytes,
            removed_temp_files=temp_removed,
            free_bytes=free,
            seconds=time.monotonic() - started,
        )

    def _remove(self, entries: list[_Entry], excess: int | None) -> tuple[int, int]:
        """Delete entries in order until `excess` bytes (None: all) are gone; (files, bytes) gone.
        A file someone else deleted first counts as gone."""
        removed = removed_bytes = 0
        for entry in entries:
            if excess is not None and removed_bytes >= excess:
                break
            try:
                os.unlink(entry.path)
            except OSError as e:
                if e.errno not in _VANISHED:
                    self._problem("evict", "cannot evict %s from the disk cache: %s", entry.path, e)
                    continue
            removed += 1
            removed_bytes += entry.size
        return removed, removed_bytes

    def _count(self, counter: str) -> None:
        with self._lock:
            self._stats[counter] += 1

    def _problem(self, kind: str, message: str, *args: object) -> None:
        self._count("errors")
        self._warn.warning(kind, message, *args)
