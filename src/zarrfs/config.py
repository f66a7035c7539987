"""Every tunable of zarrfs as a documented constant, and the frozen `Config` a mount runs with.

Owns: defaults, the `Config` value object, and the one mapping from the connection options (the
command line's `--endpoint-url`, ... and the fsspec face's storage options, under the same names) to a
`Config` (`config_from_options`). `faces.cli` and `faces.fsspec` build a `Config` with it; everything else
only reads one. No I/O here (the environment and the user's cache dir are read for defaults).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

#: Bucket holding DANDI data (blobs, zarr, dandiset metadata, published manifests).
DEFAULT_BUCKET = "dandiarchive"
#: Region of the public bucket; irrelevant for custom endpoints but botocore wants one.
DEFAULT_REGION = "us-east-2"
#: DANDI REST API: for `draft` versions, the list of dandisets (an archive mount), and a draft Zarr's
#: current checksum; published versions and `latest` come from the bucket alone.
DEFAULT_API_URL = "https://api.dandiarchive.org/api"
#: Manifest roots tried after `s3://<bucket>/zarr-manifest/` (see DANDI-FORMATS: Zarr manifests).
DATALAD_MANIFEST_ROOT = (
    "https://datasets.datalad.org/dandi/zarr-manifests/zarr-manifests-v2-sorted/"
)

#: Reads are served in aligned blocks of this size (one cache item each); a read's missing blocks
#: that are contiguous are one ranged GET. Small, so that a random pread moves little more than it
#: asks for; sequential readers get long streamed GETs instead (`prefetch`).
BLOCK_SIZE = 256 << 10
#: An object with a plain-MD5 ETag up to this size is fetched whole, by one GET whose body is checked
#: against the MD5 before any byte is served (most Zarr chunks), whatever the memory cache's size.
#: Larger ones go by blocks, unverified.
VERIFY_WHOLE_OBJECT_MAX = 16 << 20
#: Sequential prefetch (`prefetch`): how many bytes a run of reads that continue each other must
#: have read before prefetch starts (random preads up to this size never start it); how far ahead of
#: the reader it fetches, as a multiple of what the run has read (mountpoint-s3's multiplier), and
#: at most; how far a read may land from where the previous one ended and still count as sequential;
#: the share of the memory cache that bytes fetched ahead of readers and not yet read may take,
#: across all open files. The window is topped up a part at a time as the reader reads on, so its
#: parts overlap instead of arriving together and leaving a gap before the next window. A cold 128 MiB
#: blob read in 0.41 s against 0.44-0.46 s paced and 0.34 s against 0.42 s unpaced (medians) with the
#: doubling windows this replaced, each started when half the last one was read (benchmarks/RESULTS.md,
#: "a prefetch window topped up").
PREFETCH_TRIGGER = 1 << 20
PREFETCH_MULTIPLIER = 8
PREFETCH_MAX_WINDOW = 64 << 20
PREFETCH_TOLERANCE = 1 << 20
PREFETCH_MEMORY_SHARE = 0.5
#: A prefetch window longer than this is fetched as parts of this size streamed in parallel (one
#: S3 connection carries some 100 MB/s; the AWS CRT client under mountpoint-s3 splits its GETs into
#: parts fetched in parallel too).
PREFETCH_PART = 8 << 20
#: Where the kernel opens files without asking (zero-message open, `fs.streams`): a file's reads go
#: through at most this many readers, each with its own sequential prefetch (several processes, or
#: several descriptors of one, reading one file at different places: 16 threads of one job reading
#: their parts of a blob took 0.43-0.72 s and 63-132 GETs with 8, against 0.39 s and 51-54 with a
#: descriptor each, as every read beyond the eighth place restarted another's prefetch;
#: benchmarks/RESULTS.md, "zero-message open"); a reader with no read in progress and none for this
#: many seconds is closed at the next read (its prefetch stops and gives its budget back), as is the
#: least recently read idle one beyond the mount's total. A RELEASE would have closed it; nothing
#: comes instead.
STREAMS_PER_FILE = 64
STREAM_IDLE_CLOSE = 5.0
STREAMS_MAX = 1024
#: Readahead across the chunk files of an array (`fs.readahead`): chunks fetched ahead of a reader
#: that opens them in row-major order, first and at most (the window doubles while the order
#: holds); arrays followed at once; a chunk larger than READAHEAD_FILE_MAX ends a window.
READAHEAD_FIRST_FILES = 4
READAHEAD_MAX_FILES = 64
READAHEAD_ARRAYS = 1024
READAHEAD_FILE_MAX = 16 << 20
#: A block served from the memory cache is checked against the xxh3-64 it was stored with when its
#: last check is older than this (seconds): a long stay in RAM is where a flipped bit would hide.
BLOCK_RECHECK_AGE = 60.0
#: Default byte budget of the in-memory block cache.
DEFAULT_MEMORY_CACHE_SIZE = 512 << 20
#: Default byte budget for loaded manifest indexes (evicted ones reload from the disk cache).
DEFAULT_MANIFEST_MEMORY = 1 << 30
#: Concurrent S3 requests at most, across the whole mount.
MAX_CONCURRENT_REQUESTS = 32
#: Concurrent HTTP requests at most (the API, manifest mirrors: documents are few and large).
MAX_CONCURRENT_HTTP = 8
#: FUSE requests handled concurrently at most.
MAX_FUSE_TASKS = 64
#: Descriptors a process of zarrfs may need at once, whatever the archive's size (what makes it up:
#: `resources`); the soft limit is raised to the hard one at start, and a limit below this is logged.
FD_BUDGET = 256
#: Seconds between two counts of the open descriptors (their peak is in `zarrfs stats`).
FD_SAMPLE_INTERVAL = 1.0
#: Attempts per S3/HTTP request (first try included) for retryable failures.
MAX_ATTEMPTS = 5
#: First retry back-off in seconds; doubles each attempt, with full jitter, capped by RETRY_MAX_DELAY.
RETRY_BASE_DELAY = 0.1
RETRY_MAX_DELAY = 5.0
#: Per-attempt deadline for one request (cancel scope around the whole request, body included; for
#: a demand request the wait for a connection slot too). For downloads: the longest wait for bytes.
REQUEST_TIMEOUT = 30.0
#: Rows per page asked of the API's paginated lists (its maximum), and API calls at once while the
#: Zarrs of a draft are pinned.
API_PAGE_SIZE = 1000
API_CONCURRENCY = 16
#: Largest API response (one page of up to 1000 asset rows with metadata is a few MB).
MAX_API_RESPONSE_BYTES = 64 << 20
#: Largest `assets.jsonld` accepted (the biggest dandisets list ~100k assets in a few hundred MB).
MAX_ASSET_LIST_BYTES = 4 << 30
#: Kernel entry/attribute cache lifetimes. Content is immutable, so these are long (one day).
ENTRY_TIMEOUT = 86400.0
ATTR_TIMEOUT = 86400.0
#: Lifetime of cached negative lookups (Zarr readers probe many missing keys).
NEGATIVE_TIMEOUT = 86400.0
#: Lifetimes of what an archive mount learns about the archive (seconds): the list of dandisets;
#: a dandiset's published versions, hence `latest`, and whether it exists; listings of the manifest
#: roots (the zarrs/ levels); a Zarr's current checksum (API); a failed query. A resolved published
#: version never changes and is kept without a lifetime (in an LRU bounded by VERSION_MEMORY).
DANDISET_LIST_TTL = 600.0
VERSION_LIST_TTL = 300.0
ZARR_LIST_TTL = 600.0
ZARR_CHECKSUM_TTL = 60.0
FAILED_LIST_TTL = 10.0
#: How long the kernel may remember that a name does not exist at a level that can change (a new
#: dandiset, version or manifest may appear); names that can never exist are remembered a day.
NEGATIVE_MUTABLE_TTL = 60.0
#: Default byte budget (roughly) for resolved versions kept in memory by an archive or dandiset
#: mount; the least recently used are dropped and resolved again when entered.
DEFAULT_VERSION_MEMORY = 256 << 20
#: Bytes of synthesized `.zmetadata` documents (`--consolidate`) kept in memory at most; one that is
#: dropped is built again (from its metadata objects, usually still in the block cache) when needed.
CONSOLIDATED_MEMORY = 64 << 20
#: Default `--umask`: applied to 0777 for directories and 0666 for files (as rclone does), and the
#: write bits are always cleared (the mount is read-only), so directories show 0555 and files 0444.
DEFAULT_UMASK = 0o022
#: Default `--read-ahead`: the kernel's readahead for the mount (its `read_ahead_kb`), which zarrfs
#: sets when it may (as root). The kernel's own 128 KiB splits a 256 KiB pread into two round trips
#: to the daemon, one after the other, plus 256 KiB of readahead nobody asked for, and sends a
#: sequential reader's requests 128 KiB at a time (benchmarks/RESULTS.md, "Kernel readahead").
DEFAULT_READ_AHEAD = 1 << 20
#: Threads used for CPU-heavy work (manifest parsing and conversion).
CPU_THREADS = 2
#: Size bound of a manifest download: an honest manifest of a Zarr with N files (the checksum
#: `<md5>-<N>--<size>` says N) has at most MANIFEST_BASE_BYTES + N * MANIFEST_BYTES_PER_FILE bytes
#: (real ones: about 122 bytes per file; a file's line is at most ~2 KiB even with a 255-byte
#: \u-escaped name, and directories add at most as much again).
MANIFEST_BASE_BYTES = 1 << 20
MANIFEST_BYTES_PER_FILE = 4096
#: Default cap of the on-disk store of converted manifest indexes (least recently loaded go first).
DEFAULT_MANIFEST_DISK_BUDGET = 8 << 30
#: A manifest that could not be served (missing, malformed, not matching its checksum: an answer
#: about the data, never an outage) is remembered this many seconds, so a broken Zarr is not
#: downloaded again by every probe; at most FAILURES_REMEMBERED of them.
FAILURE_TTL = 30.0
FAILURES_REMEMBERED = 10_000
#: Conversions slower than this (seconds) get progress lines in the log.
SLOW_CONVERSION = 2.0
#: Seconds between two tries of the cross-process lock while another process loads a manifest, and
#: the longest wait for it (then the load goes on anyway: a hung holder must not hold everyone).
LOCK_POLL = 0.1
MANIFEST_LOCK_WAIT = 120.0
#: Seconds between two sweeps of the manifest index store caused by this process's writes, at least
#: (a sweep lists the whole store).
MANIFEST_SWEEP_MIN_GAP = 60.0
#: The longest a sweep of the cache dir (stale temporary files, the index store's cap) may take
#: before the cache dir counts as stalled.
SWEEP_TIMEOUT = 300.0
#: Temporary files, lock files and lapsed pins directories older than this (seconds) in the cache
#: dir were left by a killed process: removed by the sweeps (a write takes seconds; a running
#: mount renews its pins far more often).
STALE_TEMP_AGE = 3600.0
#: Indexes at least this big (bytes on disk) are memory-mapped when loaded (their descriptor closed
#: at once); smaller ones are read into memory. Most Zarrs' indexes are tens of KB; the largest
#: DANDI Zarr's is some 150 MB.
INDEX_MAP_MIN = 8 << 20
#: A manifest of at most this many files (its checksum says how many) is kept in the index store as
#: its verified document (`<checksum>.json`), not converted to an Arrow index file: writing it and
#: reading it back need no pyarrow, whose import holds the GIL for 20-100 ms and stalled the first
#: reads after a Zarr was entered (a cold walk of 5,118 entries took 0.16-0.18 s with the index
#: written, 0.11 s without). Parsing it again on every load from disk (a later mount, or after the
#: memory LRU evicted it), its checksum verified as on download, costs about 2 µs per file (10.5 ms
#: for 5,118 files, 20.5 ms for 10,000), against 0.2-0.6 ms per Arrow load plus that import once per
#: process (`benchmarks/manifest_forms.py`). Bigger manifests are stored as Arrow indexes: the
#: largest parses in seconds, and loads memory-mapped in milliseconds.
MANIFEST_DOCUMENT_MAX_FILES = 10_000
#: Loaded manifest indexes kept at most, whatever their bytes (each mapped one is a memory map:
#: the kernel allows some 65,000 per process).
MANIFEST_MAX_LOADED = 4096
#: A process that keeps a memory-mapped index loaded renews its lease on the file (its mtime)
#: this often; no process sharing the cache dir deletes an index whose lease is younger than
#: INDEX_LEASE (deleting a file another node has mapped gives that node SIGBUS on NFS).
INDEX_LEASE_RENEW = 600.0
INDEX_LEASE = 3600.0
#: A draft Zarr whose current checksum has no manifest anywhere is listed from the bucket; a listing
#: that does not add up to the checksum the API reports (the Zarr changed meanwhile) is retried this
#: many times in all, LISTING_RETRY_DELAY seconds apart.
LISTING_ATTEMPTS = 3
LISTING_RETRY_DELAY = 2.0
#: Seconds between progress lines of a long listing.
LISTING_PROGRESS_INTERVAL = 10.0
#: The longest a read syscall may take before it fails with EIO, whatever happens (faults, waits
#: behind other requests): every attempt of its requests plus every back-off sleep between them.
READ_DEADLINE = MAX_ATTEMPTS * REQUEST_TIMEOUT + sum(
    min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2.0 ** (a - 1)) for a in range(1, MAX_ATTEMPTS)
)
#: Seconds `zarrfs mount` waits for a background mount to become live.
MOUNT_READY_TIMEOUT = 120.0
#: Seconds `zarrfs mount` waits for the daemon it stops (it failed to get ready, or the command was
#: interrupted) to exit, before unmounting what may be left itself.
CHILD_STOP_WAIT = 10.0

# --- the disk block cache (`io.disk_store`) -----------------------------------------------------
#: Default `--cache-size` when none is given: this fraction of the free space of the cache dir's
#: filesystem at start, at most DISK_CACHE_DEFAULT_MAX (see `default_disk_cache_size`).
#: `--cache-size 0` disables the disk block cache.
DISK_CACHE_DEFAULT_FRACTION = 0.1
DISK_CACHE_DEFAULT_MAX = 50 << 30
#: Blocks are not written, and old ones are evicted, while the cache dir's filesystem has less than
#: this fraction of its size free (the disk cache yields to everything else on that disk).
DISK_CACHE_MIN_FREE_FRACTION = 0.05
#: Eviction starts when the cache holds more than HIGH_WATER x its size and trims to LOW_WATER x.
DISK_CACHE_HIGH_WATER = 0.95
DISK_CACHE_LOW_WATER = 0.85
#: A hit refreshes its block's mtime (the LRU clock) when that mtime is older than this (seconds).
DISK_CACHE_TOUCH_INTERVAL = 600.0
#: Seconds between two eviction scans even when this process writes nothing (others may).
DISK_CACHE_EVICT_INTERVAL = 300.0
#: Threads doing disk cache reads and writes (a limiter of their own, apart from S3 and CPU work).
DISK_CACHE_THREADS = 4
#: A disk cache read or write slower than this (seconds) is given up (a miss / a skipped write) and
#: the disk cache is bypassed for DISK_CACHE_STALL_PAUSE seconds: a hung NFS server must not hang
#: reads that S3 could serve.
DISK_CACHE_STALL_TIMEOUT = 5.0
DISK_CACHE_STALL_PAUSE = 60.0
#: Writes of a known size (a manifest index) get DISK_CACHE_STALL_TIMEOUT plus a second per this
#: many bytes before the cache dir counts as stalled.
DISK_WRITE_MIN_RATE = 10 << 20
#: Bytes of fetched blocks waiting to be written to disk at most. Blocks beyond it are *owed*: only
#: their names are kept, and each is written from the memory cache when its turn comes (dropped,
#: counted, if the memory cache no longer holds it).
DISK_CACHE_PENDING_MAX = 64 << 20
#: Blocks owed to the disk at most (names only, some 100 bytes each); more are dropped (counted).
DISK_CACHE_OWED_MAX = 1 << 16
#: Blocks read from or written to disk in one trip to a worker thread. A trip costs the event loop
#: some 0.2 ms whatever it carries; one per 256 KiB block cost a sequential read of a 128 MiB blob
#: 0.3 s (0.45 -> 0.75 s) on a 2-core machine. Bounded so that a reader waiting for the first
#: block of a batch does not wait for much more than it.
DISK_CACHE_BATCH = 16
#: Background writer tasks (each writes one batch at a time on the disk cache's threads).
DISK_CACHE_WRITERS = 1
#: Seconds between two eviction scans at least, however many writes ask for one.
DISK_CACHE_EVICT_MIN_GAP = 10.0
#: fsync each block before publishing it. Off: a block torn by a crash fails its checksum and is
#: fetched again, so durability buys nothing (see benchmarks/disk_cache.py for the cost).
DISK_CACHE_FSYNC = False

# --- moved beside the other tunables: transfer sizes, limits and intervals of each part ------------
#: Bytes per read of a downloaded document's body (S3 and HTTP alike).
DOWNLOAD_CHUNK = 1 << 20
#: Bytes per read of a streamed (prefetch) body: at least what the HTTP stack reads from the socket
#: at a time (HTTP_READ_SIZE), so that a read returns the chunk as it came, without a join.
STREAM_CHUNK = 1 << 20
#: The most httpcore asks of a socket per read (its own default is 64 KiB). A body moves through
#: httpcore, h11 and trio in one pass per read, and that pass, not the copy, is most of the event
#: loop's cost per byte: 256 KiB reads cut the daemon's CPU for a 128 MiB blob read by about a
#: fifth (benchmarks/RESULTS.md, "HTTP read size"). A read returns what the socket holds, up to this.
HTTP_READ_SIZE = 256 << 10
#: Bodies at least this large are hashed in a worker thread (hashlib releases the GIL) when they
#: were not hashed as they arrived: S3's CRC/SHA checksums, a signed client's bodies, and whole
#: objects larger than HASH_AS_IT_ARRIVES_MAX.
HASH_IN_THREAD = 1 << 18
#: Whole objects up to this size from zarrfs's own HTTP client are MD5-hashed on the event loop
#: piece by piece as their body arrives, which saves the hop to a worker thread after the last byte
#: (a cold zarr-python read of 256 chunks of 256 KiB: 0.82-0.96 s against 0.86-1.00 s,
#: benchmarks/RESULTS.md). Bigger ones are hashed in a thread, where the hash (25 ms per 16 MiB) does
#: not hold up the event loop of concurrent readers.
HASH_AS_IT_ARRIVES_MAX = 1 << 20
#: API answers larger than this are JSON-decoded in a worker thread.
JSON_IN_THREAD = 1 << 20
#: A whole-object unit may take at most 1/WHOLE_OBJECT_SHARE of the memory cache; a bigger object
#: fetched whole (its MD5 checked: VERIFY_WHOLE_OBJECT_MAX) is kept in memory by blocks instead.
WHOLE_OBJECT_SHARE = 8
#: How many objects' service counts the request scheduler remembers (least recently served forgotten).
FLOWS_REMEMBERED = 1 << 16
#: The disk block cache logs one warning per kind of problem at most this often (seconds), and asks
#: statvfs for the free space at most this often.
DISK_CACHE_LOG_INTERVAL = 60.0
DISK_CACHE_FREE_SPACE_INTERVAL = 1.0
#: A Zarr's metadata objects fetched when it is first entered: directories walked, objects found and
#: the largest object, at most.
METADATA_MAX_DIRECTORIES = 5000
METADATA_MAX_OBJECTS = 2000
METADATA_MAX_OBJECT_BYTES = 16 << 20
#: Bytes of memory one node of a resolved version's tree costs (its weight in the LRU of versions):
#: measured RSS per node is up to ~750 B (benchmarks/archive.py, 200 versions entered).
NODE_BYTES = 768
#: Seconds in-flight FUSE requests get after a stop signal before they are cancelled.
SHUTDOWN_GRACE = 5.0
#: Seconds between two stats files of a running mount (`zarrfs stats`).
STATS_INTERVAL = 2.0
#: Symbolic links followed in one path at most (the runtime dir's real path; the fsspec face).
MAX_LINKS = 40
FSSPEC_MAX_LINKS = 8
#: The fsspec face: sources (versions, dandisets, the archive, per set of options) a process keeps
#: open at most (the least recently used idle one closes beyond); the largest piece one read asks of
#: the block cache (a big `cat_file` reads piece by piece, so prefetch streams ahead); ranges of one
#: `cat_ranges` read at once; seconds to wait for its loop to start, and to close at exit.
FSSPEC_MAX_SOURCES = 8
FSSPEC_READ_PIECE = 8 << 20
FSSPEC_RANGE_CONCURRENCY = 64
FSSPEC_START_TIMEOUT = 60.0
FSSPEC_CLOSE_TIMEOUT = 10.0
#: `zarrfs verify` and `cache warm --data`: bytes read at a time, files read at once (warm), and
#: seconds between plain progress lines when stderr is not a terminal.
VERB_READ_CHUNK = 4 << 20
WARM_CONCURRENCY = 8
PROGRESS_INTERVAL = 5.0

# --- virtual Zarr views of HDF5 blobs (`--virtual-zarr`, `fs.virtual_zarrs`, `virtual_cache`) -------
#: Blobs that get a `<name>.zarr` sibling: names ending in one of these (case-insensitive), or whose
#: asset record's `encodingFormat` is one of these media types. Whether the blob is HDF5 is checked
#: (its signature) when the sibling is first entered; listing a directory opens nothing.
VIRTUAL_ZARR_SUFFIXES = (".nwb", ".h5", ".hdf5", ".hdf", ".he5")
VIRTUAL_ZARR_MEDIA_TYPES = ("application/x-nwb", "application/x-hdf5", "application/x-hdf")
#: The HDF5 metadata an extraction reads goes through a block cache of its own with blocks this
#: small (a 256 KiB block per scattered B-tree node would move a tenth of a 64 MiB file), sharing
#: the disk tier with the main one; its memory budget; a blob with a plain-MD5 ETag up to
#: VIRTUAL_METADATA_WHOLE_MAX bytes is read whole instead, checked against its MD5.
VIRTUAL_METADATA_BLOCK = 64 << 10
VIRTUAL_METADATA_MEMORY = 64 << 20
VIRTUAL_METADATA_WHOLE_MAX = 4 << 20
#: B-tree nodes an extraction fetches ahead of the HDF5 library at once, and in all at most.
VIRTUAL_METADATA_AHEAD = 16
VIRTUAL_METADATA_AHEAD_MAX = 200_000
#: Seconds one extraction may take (then its worker is killed and the entry fails with EIO; the
#: next entry tries again), extractions running at once (each is a worker process), and the
#: address space a worker may use.
VIRTUAL_EXTRACT_DEADLINE = 600.0
VIRTUAL_EXTRACTIONS = 2
VIRTUAL_WORKER_MEMORY = 4 << 30
#: Bytes of loaded views kept in memory at most (about 24 bytes per chunk plus the inline files);
#: one dropped is loaded again from the cache dir.
VIRTUAL_MEMORY = 256 << 20
#: Cap of the views stored in the cache dir (`virtual/`, least recently loaded removed first).
VIRTUAL_DISK_BUDGET = 2 << 30
#: A chunk file of a virtual array up to this size is fetched whole, in the background, when it is
#: opened (readers read chunk files whole); a larger one is read as asked.
VIRTUAL_CHUNK_FETCH_MAX = 16 << 20


def default_cache_dir() -> Path:
    """The per-user cache dir (XDG on Linux), e.g. ~/.cache/zarrfs."""
    return Path(platformdirs.user_cache_dir("zarrfs", appauthor=False))


def default_disk_cache_size(free_bytes: int) -> int:
    """Default `--cache-size` for a cache dir whose filesystem has `free_bytes` free at start:
    DISK_CACHE_DEFAULT_FRACTION of it, at most DISK_CACHE_DEFAULT_MAX, in whole MiB (0: disabled).

    The cache's own blocks are not free space, so a remount over a full cache of size s computes
    f x (F - s) for the free space F without it; that settles at s = F x f / (1 + f) (F/11 for 10%)
    rather than shrinking remount after remount. `io.disk_store.default_size` measures `free_bytes`.
    """
    size = min(int(max(free_bytes, 0) * DISK_CACHE_DEFAULT_FRACTION), DISK_CACHE_DEFAULT_MAX)
    return size - size % (1 << 20)


def env_endpoint_url() -> str | None:
    """S3 endpoint from the environment, as AWS tools read it."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


#: Environment variable that, set to `0`, keeps directory listings out of the kernel's cache even when
#: pyfuse3 can ask for it (see `fuse_ops.kernel_readdir_cache_supported`). An escape hatch: it lets the
#: test suite exercise the stock-pyfuse3 path on a patched build, and rules the cache out when
#: debugging. Any other value, or none, leaves the cache on where supported.
KERNEL_READDIR_CACHE_ENV = "ZARRFS_KERNEL_READDIR_CACHE"
#: Environment variable that, set to `0`, keeps a mount from asking the kernel to open
#: files without a request (FUSE's zero-message open, `fuse_ops.ZarrfsOperations.no_open`) even
#: where pyfuse3 and the kernel support it. Like `KERNEL_READDIR_CACHE_ENV`, an escape hatch: the
#: test suite uses it to run the path with OPEN and RELEASE on a patched build.
ZERO_MESSAGE_OPEN_ENV = "ZARRFS_ZERO_MESSAGE_OPEN"


def env_switch(variable: str) -> bool:
    """An escape hatch's state (`KERNEL_READDIR_CACHE_ENV`, `ZERO_MESSAGE_OPEN_ENV`): False when
    `variable` is `0` (spaces aside), True for any other value or none."""
    return os.environ.get(variable, "").strip() != "0"


@dataclass(frozen=True, slots=True)
class Source:
    """One dandiset version: a dandiset id and a version (`0.YYMMDD.HHMM`, `draft` or `latest`)."""

    dandiset_id: str
    version: str

    def __str__(self) -> str:
        return f"{self.dandiset_id}@{self.version}"


@dataclass(frozen=True, slots=True)
class MountSource:
    """What a mount shows: the whole archive (no dandiset), every version of one dandiset (no
    version), or one version; with a `path`, only that directory of the version (possibly inside a
    Zarr)."""

    dandiset_id: str | None = None
    version: str | None = None
    path: str = ""

    @property
    def kind(self) -> str:
        """`archive`, `dandiset` or `version`."""
        if self.dandiset_id is None:
            return "archive"
        return "dandiset" if self.version is None else "version"

    def version_source(self) -> Source:
        """The one version a `version` mount shows."""
        if self.dandiset_id is None or self.version is None:
            raise ValueError(f"{self} is not one version")
        return Source(self.dandiset_id, self.version)

    def __str__(self) -> str:
        if self.dandiset_id is None:
            return "dandi"
        text = self.dandiset_id if self.version is None else f"{self.dandiset_id}@{self.version}"
        return f"{text}/{self.path}" if self.path else text


@dataclass(frozen=True, slots=True)
class S3Settings:
    """How to reach the bucket."""

    endpoint_url: str | None = None
    bucket: str = DEFAULT_BUCKET
    region: str = DEFAULT_REGION
    unsigned: bool = True
    max_concurrency: int = MAX_CONCURRENT_REQUESTS
    max_attempts: int = MAX_ATTEMPTS
    request_timeout: float = REQUEST_TIMEOUT


@dataclass(frozen=True, slots=True)
class Config:
    """Everything one mount runs with. Built once by `cli`, never mutated."""

    source: MountSource
    mountpoint: Path
    s3: S3Settings = field(default_factory=S3Settings)
    manifest_roots: tuple[str, ...] = ()
    api_url: str = DEFAULT_API_URL
    cache_dir: Path = field(default_factory=default_cache_dir)
    memory_cache_size: int = DEFAULT_MEMORY_CACHE_SIZE
    manifest_memory: int = DEFAULT_MANIFEST_MEMORY
    manifest_disk_size: int = DEFAULT_MANIFEST_DISK_BUDGET
    version_memory: int = DEFAULT_VERSION_MEMORY
    #: Bytes the disk block cache may hold: None for the default (a fraction of the free space at
    #: start, see `default_disk_cache_size`), 0 for no disk cache.
    disk_cache_size: int | None = None
    #: Serve a synthesized consolidated `.zmetadata` in Zarr format 2 hierarchies that have none
    #: (it changes what the mount shows, so it is off by default).
    consolidate: bool = False
    #: Show each HDF5 blob (an NWB file) also as a virtual Zarr store, `<name>.zarr` beside it, whose
    #: chunks are byte ranges of the pinned blob (it changes what the mount shows: off by default).
    virtual_zarr: bool = False
    #: Serve Prometheus metrics on http://127.0.0.1:PORT/metrics (a mount only).
    metrics_port: int | None = None
    block_size: int = BLOCK_SIZE
    foreground: bool = False
    debug: bool = False
    allow_other: bool = False
    #: Owner and group of every entry (None: the user and group that mounted), and the umask applied
    #: to 0777 (directories) and 0666 (files); write bits are always cleared (`-o uid=,gid=,umask=`).
    uid: int | None = None
    gid: int | None = None
    umask: int = DEFAULT_UMASK
    #: Serve `user.zarrfs.*` extended attributes. Off by default: with xattrs the kernel must ask the
    #: daemon for every `getxattr` (`ls -l` makes three per entry), without them it stops asking.
    xattrs: bool = False
    #: Let the kernel cache directory listings for the life of the mount, where the running pyfuse3
    #: supports it (the tree never changes). Off only through `KERNEL_READDIR_CACHE_ENV`.
    kernel_readdir_cache: bool = True
    #: Let the kernel open files without asking the daemon (no OPEN or RELEASE
    #: per open file), where the running pyfuse3 and kernel support it. Off only through
    #: `ZERO_MESSAGE_OPEN_ENV`. (FLUSH is turned off on every mount, whatever this says.)
    zero_message_open: bool = True
    #: The kernel's readahead for the mount in bytes (`/sys/class/bdi/<dev>/read_ahead_kb`), set at
    #: mount when permitted; 0 leaves the kernel's default.
    read_ahead: int = DEFAULT_READ_AHEAD
    fsname: str = "zarrfs"


def default_manifest_roots(bucket: str) -> tuple[str, ...]:
    """`s3://<bucket>/zarr-manifest/`, then the DataLad mirror of manifests."""
    return (f"s3://{bucket}/zarr-manifest/", DATALAD_MANIFEST_ROOT)


_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse `512M`, `2G`, `1.5GiB`, `1048576` into bytes. Raises ValueError on anything else."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS and t[-1:] else ""
    number = t[: len(t) - len(unit)] if unit else t
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 2G)") from None
    if value < 0:
        raise ValueError(f"size must not be negative: {text!r}")
    return int(value * _SIZE_UNITS[unit])


#: The options saying where the archive is and how much a process may cache: the command line's
#: connection options (`--endpoint-url`, `--manifest-root`, ...) and the fsspec face's storage
#: options, one name each (the option's long name with underscores). `config_from_options` takes
#: exactly these, with the defaults both faces share.
CONNECTION_OPTIONS = (
    "endpoint_url",
    "bucket",
    "region",
    "manifest_root",
    "api_url",
    "cache_dir",
    "memory_cache_size",
    "cache_size",
    "manifest_memory",
    "manifest_cache_size",
    "version_memory",
    "signed",
)
#: Schemes a manifest root may have.
MANIFEST_ROOT_SCHEMES = ("s3://", "https://", "http://", "file:///")


def config_from_options(
    source: MountSource,
    *,
    endpoint_url: str | None = None,
    bucket: str = DEFAULT_BUCKET,
    region: str = DEFAULT_REGION,
    manifest_root: str | Sequence[str] | None = None,
    api_url: str = DEFAULT_API_URL,
    cache_dir: str | os.PathLike[str] | None = None,
    memory_cache_size: int | str = DEFAULT_MEMORY_CACHE_SIZE,
    cache_size: int | str | None = None,
    manifest_memory: int | str = DEFAULT_MANIFEST_MEMORY,
    manifest_cache_size: int | str = DEFAULT_MANIFEST_DISK_BUDGET,
    version_memory: int | str = DEFAULT_VERSION_MEMORY,
    signed: bool = False,
) -> Config:
    """The `Config` for `source` under the connection options (`CONNECTION_OPTIONS`); whatever only
    a mount has keeps its default (`dataclasses.replace` sets it). `endpoint_url` None reads the
    environment (`env_endpoint_url`); `manifest_root` is one URL or several, tried in order (None:
    `default_manifest_roots`); sizes are bytes or strings such as `"512M"` (`parse_size`);
    `cache_size` None is the default disk block cache, 0 none. Raises ValueError naming the option.
    """
    if manifest_root is None or manifest_root == []:
        roots = default_manifest_roots(bucket)
    elif isinstance(manifest_root, str):
        roots = (manifest_root,)
    else:
        roots = tuple(manifest_root)
    for root in roots:
        if not isinstance(root, str) or not root.startswith(MANIFEST_ROOT_SCHEMES):
            raise ValueError(f"bad manifest root {root!r}: use s3://, https:// or file:///")
    s3 = S3Settings(
        endpoint_url=endpoint_url or env_endpoint_url(),
        bucket=bucket,
        region=region,
        unsigned=not signed,
    )
    return Config(
        source=source,
        mountpoint=Path("/"),
        s3=s3,
        manifest_roots=roots,
        api_url=api_url.rstrip("/"),
        cache_dir=Path(cache_dir if cache_dir is not None else default_cache_dir()).absolute(),
        memory_cache_size=size_option("memory_cache_size", memory_cache_size),
        manifest_memory=size_option("manifest_memory", manifest_memory),
        manifest_disk_size=size_option("manifest_cache_size", manifest_cache_size),
        version_memory=size_option("version_memory", version_memory),
        disk_cache_size=None if cache_size is None else size_option("cache_size", cache_size),
    )


def size_option(name: str, value: int | str) -> int:
    """A size option's bytes: an int as it is, a string through `parse_size`. Raises ValueError
    naming the option."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name} must not be negative: {value}")
        return value
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    raise ValueError(f"{name}: expected bytes (an int) or a size such as '512M', not {value!r}")
