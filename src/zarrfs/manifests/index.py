"""Zarr manifest (schema 2) -> compact, immutable, columnar `ManifestIndex`; checksum verification.

Owns: parsing a manifest document, validating it, recomputing its Zarr checksum with the
`zarr_checksum` reference implementation, and the in-memory/on-disk (Arrow IPC) representation of the
resulting index. Never fetches anything and never decides where files live: `manifest_cache` does.

Layout of the index. Every entry of the Zarr (file or directory) is a *node*; node 0 is the Zarr root.
The children of each directory occupy one contiguous run of node ids, sorted bytewise by UTF-8 name
(equal to code point order, which is the order `zarr_checksum` sorts in), so a lookup is a binary
search in that run and `readdir` is a slice of it. Per node there is one row in a handful of numpy
columns (names and VersionIds as offsets + one byte buffer, ETags as 16 raw MD5 bytes plus a part count,
sizes and mtimes as int64): no Python object per entry. The same columns are written to and
memory-mapped from an Arrow IPC file, so a reload costs no parsing.

Node ids are canonical: they depend only on the Zarr's entries, never on the key order of the JSON
copy they were parsed from. Rows are numbered breadth-first with each directory's children in bytewise
name order (the root is 0, its children 1..k, then the children of node 1, ...), so every copy of one
manifest checksum, and every reload, gives the same ids: the kernel remembers name -> inode for a day.

Input is untrusted: every number is range-checked while parsing (sizes up to `MAX_OBJECT_SIZE`, totals
and mtimes within int64), every name must pass `names.name_problem`, and anything malformed is a
`ManifestError` with one clear message, never another exception. The Arrow file carries an xxh3-128
checksum over its columns, checked (with the columns' structure) on every load.

Conversion runs in a worker thread (callers use `trio.to_thread.run_sync`); the JSON decoder's
`object_pairs_hook` consumes every directory as soon as it is decoded, so the decoded Python objects
for entries are freed while parsing proceeds and peak memory is about the JSON text plus the columns.
The hook checks a cancellation flag once per directory, so an abandoned conversion stops promptly.
Empty directories (which cannot exist in S3) are dropped, exactly as the checksum ignores them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import uuid
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from json.encoder import encode_basestring_ascii
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import xxhash
from zarr_checksum.checksum import (
    ZarrChecksum,
    ZarrChecksumManifest,
    ZarrDirectoryDigest,
)

from zarrfs import config
from zarrfs.base.names import NAME_MAX, name_problem
from zarrfs.base.refs import INT64_MAX, ObjectRef
from zarrfs.errors import IntegrityError, ManifestError
from zarrfs.io.cache_dir import create_private_file
from zarrfs.manifests.checksums import EMPTY_CHECKSUM

log = logging.getLogger(__name__)

#: Bump when the on-disk index layout changes; older files are then rebuilt from the JSON.
#: 2: canonical (breadth-first) node order and a content checksum.
INDEX_FORMAT_VERSION = 2
SUPPORTED_SCHEMA = 2
#: Largest object S3 stores (5 TiB): a bigger size in a manifest is refused.
MAX_OBJECT_SIZE = 5 << 40
#: Longest VersionId or ETag accepted (S3's are 32 to a few dozen characters).
MAX_TOKEN_LENGTH = 1024
FIELDS = ["versionId", "lastModified", "size", "ETag"]
KIND_FILE = 0
KIND_DIR = 1
_SCHEMA_RE = re.compile(rb'"schemaVersion"\s*:\s*([0-9]+)')
_FIELDS_RE = re.compile(rb'"fields"\s*:\s*(\[[^\]]*\])')
_FIELDS_STRING_RE = re.compile(rb'"fields"\s*:\s*"')
_MD5_RE = re.compile(r"^[0-9a-f]{32}\Z")
_MULTIPART_RE = re.compile(r"^([0-9a-f]{32})-([0-9]+)\Z")


def check_name(name: str) -> None:
    """Reject names that cannot be a path component (would escape or corrupt the tree)."""
    if (why := name_problem(name)) is not None:
        raise ManifestError(f"invalid entry name: {why}")


class ConversionCancelled(Exception):
    """The caller gave up on a conversion (raised inside the worker thread; never shown to users)."""


@dataclass(frozen=True, slots=True)
class EntryStat:
    """What `stat` shows for one node."""

    is_dir: bool
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class EntryObject:
    """Where the bytes of one file node live: `zarr/<zarr_id>/<path>` at `version_id`."""

    path: str
    version_id: str
    size: int
    etag: str


class _Dir:
    """A decoded directory during conversion: its child run and Merkle digest (internal)."""

    __slots__ = ("count", "digest", "first_row", "mtime_ns", "n_children", "size")

    def __init__(
        self, first_row: int, n_children: int, digest: str, count: int, size: int, mtime_ns: int
    ) -> None:
        self.first_row = first_row
        self.n_children = n_children
        self.digest = digest
        self.count = count
        self.size = size
        self.mtime_ns = mtime_ns


class _Builder:
    """Column builders fed by the JSON decoder's object hook, one directory at a time (internal)."""

    def __init__(self, cancel: threading.Event | None = None) -> None:
        # Row 0 is the root; its values are filled in at the end.
        self.name_data = bytearray()
        self.name_off = array("q", [0, 0])
        self.vid_data = bytearray()
        self.vid_off = array("q", [0, 0])
        self.etag = bytearray(16)
        self.etag_parts = array("H", [0])
        self.size = array("q", [0])
        self.mtime = array("q", [0])
        self.kind = array("B", [KIND_DIR])
        self.child_start = array("Q", [0])
        self.child_count = array("Q", [0])
        self.odd_etags: dict[int, str] = {}
        self._mtimes: dict[str, int] = {}
        self.n_files = 0
        self._cancel = cancel

    def mtime_ns(self, text: str) -> int:
        cached = self._mtimes.get(text)
        if cached is None:
            try:
                dt = datetime.fromisoformat(text)
            except ValueError:
                raise ManifestError(f"bad lastModified {text!r:.80}") from None
            if dt.tzinfo is None:
                raise ManifestError(f"lastModified without UTC offset: {text!r:.80}")
            try:
                cached = int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000
            except (OverflowError, ValueError, OSError):
                raise ManifestError(f"lastModified out of range: {text!r:.80}") from None
            if not -INT64_MAX <= cached <= INT64_MAX:
                raise ManifestError(f"lastModified out of range (past year 2262): {text!r:.80}")
            if len(self._mtimes) < 100_000:
                self._mtimes[text] = cached
        return cached

    def _append_row(self, name: bytes, kind: int, size: int, mtime: int) -> int:
        row = len(self.kind)
        self.name_data += name
        self.name_off.append(len(self.name_data))
        self.kind.append(kind)
        self.size.append(size)
        self.mtime.append(mtime)
        return row

    def hook(self, pairs: list[tuple[str, Any]]) -> Any:
        """`object_pairs_hook`: turn a decoded directory object into a `_Dir`, else keep a dict."""
        if self._cancel is not None and self._cancel.is_set():
            raise ConversionCancelled
        for _, value in pairs:
            if type(value) is _Dir:
                continue
            if (
                type(value) is list
                and len(value) == 4
                and type(value[2]) is int
                and type(value[0]) is str
                and type(value[1]) is str
                and type(value[3]) is str
            ):
                continue
            return dict(pairs)
        return self._add_dir(pairs)

    def _add_dir(self, pairs: list[tuple[str, Any]]) -> _Dir:
        pairs.sort(key=itemgetter(0))
        files: list[tuple[str, str, int]] = []  # (name, ETag, size)
        dirs: list[tuple[str, str, int, int]] = []  # (name, digest, size, file count)
        first_row = len(self.kind)
        newest = 0
        total = 0
        previous = None
        for name, value in pairs:
            if name == previous:
                raise ManifestError(f"duplicate entry name {name!r:.80}")
            previous = name
            encoded = _valid_name(name)
            if type(value) is _Dir:
                if value.count == 0:
                    continue  # empty directory: not an S3 state; ignored like the checksum does
                self._append_row(encoded, KIND_DIR, value.size, value.mtime_ns)
                self.vid_off.append(len(self.vid_data))
                self.etag += bytes(16)
                self.etag_parts.append(0)
                self.child_start.append(value.first_row)
                self.child_count.append(value.n_children)
                dirs.append((name, value.digest, value.size, value.count))
                newest = max(newest, value.mtime_ns)
                total += value.size
                continue
            version_id, last_modified, size, etag = value
            if not 0 <= size <= MAX_OBJECT_SIZE:
                raise ManifestError(f"size {size} of {name!r:.80} is out of range")
            vid = _token(version_id, "versionId", name)
            mtime = self.mtime_ns(last_modified)
            row = self._append_row(encoded, KIND_FILE, size, mtime)
            self.vid_data += vid
            self.vid_off.append(len(self.vid_data))
            self._append_etag(row, etag)
            self.child_start.append(0)
            self.child_count.append(0)
            files.append((name, etag, size))
            newest = max(newest, mtime)
            total += size
            self.n_files += 1
        if total > INT64_MAX:
            raise ManifestError(f"total size {total} of a directory is out of range")
        digest, count = directory_digest(files, dirs)
        n_children = len(self.kind) - first_row
        return _Dir(first_row, n_children, digest, count, total, newest)

    def _append_etag(self, row: int, etag: str) -> None:
        if _MD5_RE.match(etag):
            self.etag += bytes.fromhex(etag)
            self.etag_parts.append(0)
            return
        m = _MULTIPART_RE.match(etag)
        if m and 0 < int(m.group(2)) < 65535:
            self.etag += bytes.fromhex(m.group(1))
            self.etag_parts.append(int(m.group(2)))
            return
        _token(etag, "ETag", self.name(row))  # the fast paths above are valid ASCII already
        self.etag += bytes(16)
        self.etag_parts.append(65535)
        self.odd_etags[row] = etag

    def name(self, row: int) -> str:
        """The name of a row appended so far (for messages)."""
        start, end = self.name_off[row], self.name_off[row + 1]
        return bytes(self.name_data[start:end]).decode("utf-8", "replace")


def directory_digest(
    files: list[tuple[str, str, int]], dirs: list[tuple[str, str, int, int]]
) -> tuple[str, int]:
    """A directory's Zarr checksum `<md5>-<count>--<size>` and its file count, from its files
    (name, ETag, size) and subdirectories (name, checksum, size, file count), each sorted by name.

    Byte for byte what `zarr_checksum`'s `ZarrChecksumManifest.generate_digest` computes (the MD5 of
    `{"directories":[...],"files":[...]}`, each item `{"digest":..,"name":..,"size":..}`, compact and
    ASCII-escaped), written directly instead of through `dataclasses.asdict` and `json.dumps`, which
    cost 40% of a big conversion. `zarr_checksum` stays the reference: the tests compare the two on
    many random trees, and `ManifestIndex.recompute_checksum` uses it.
    """
    enc = encode_basestring_ascii
    text = "".join(
        (
            '{"directories":[',
            ",".join(
                f'{{"digest":{enc(digest)},"name":{enc(name)},"size":{size}}}'
                for name, digest, size, _ in dirs
            ),
            '],"files":[',
            ",".join(
                f'{{"digest":{enc(etag)},"name":{enc(name)},"size":{size}}}'
                for name, etag, size in files
            ),
            "]}",
        )
    )
    count = len(files) + sum(d[3] for d in dirs)
    size = sum(f[2] for f in files) + sum(d[2] for d in dirs)
    md5 = hashlib.md5(text.encode("ascii"), usedforsecurity=False).hexdigest()
    return f"{md5}-{count}--{size}", count


def _valid_name(name: str) -> bytes:
    """`name` as UTF-8 if it may be a path component (the rule of `names.name_problem`, inlined
    for speed: this runs once per entry of million-entry manifests), else ManifestError."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        encoded = b""
    if (
        0 < len(encoded) <= NAME_MAX
        and encoded not in (b".", b"..")
        and b"/" not in encoded
        and b"\0" not in encoded
    ):
        return encoded
    check_name(name)  # says exactly what is wrong
    raise AssertionError(f"name {name!r} passed the full check but not the fast one")


def _token(value: str, what: str, name: str) -> bytes:
    """A VersionId or ETag as UTF-8: non-empty, not too long, no NUL, no lone surrogate."""
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"{what} of {name!r:.80} is not valid Unicode") from None
    if not data or len(data) > MAX_TOKEN_LENGTH or b"\0" in data:
        raise ManifestError(f"{what} of {name!r:.80} is empty, too long or contains NUL")
    return data


class ManifestIndex:
    """An immutable, columnar index of one Zarr manifest. Thread-safe for reads; never mutated."""

    ROOT = 0

    def __init__(
        self,
        *,
        zarr_id: str,
        checksum: str,
        columns: dict[str, np.ndarray[Any, Any]],
        odd_etags: dict[int, str],
        n_files: int,
        keepalive: object = None,
        mapped: Path | None = None,
    ) -> None:
        self.zarr_id = zarr_id
        self.checksum = checksum
        self.n_files = n_files
        self._c = columns
        self._name_off = columns["name_off"]
        self._name_data = columns["name_data"]
        self._vid_off = columns["vid_off"]
        self._vid_data = columns["vid_data"]
        self._etag = columns["etag"]
        self._etag_parts = columns["etag_parts"]
        self._size = columns["size"]
        self._mtime = columns["mtime"]
        self._kind = columns["kind"]
        self._child_start = columns["child_start"]
        self._child_count = columns["child_count"]
        self._parent = columns["parent"]
        self._odd_etags = odd_etags
        self._keepalive = keepalive  # the table whose buffers back the columns, if any
        #: The file whose memory map backs the columns (None: they are in memory). Whoever keeps
        #: such an index loaded renews its lease (the file's mtime), so no process sharing the
        #: cache dir deletes it meanwhile (`manifest_cache`).
        self.mapped = mapped
        self.n_nodes = len(self._kind)

    # --- queries ----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes held by the columns (the weight of this index in the manifest LRU)."""
        return sum(int(c.nbytes) for c in self._c.values()) + 200 * len(self._odd_etags)

    def is_dir(self, node: int) -> bool:
        return bool(self._kind[node] == KIND_DIR)

    def name(self, node: int) -> bytes:
        return bytes(self._name_data[self._name_off[node] : self._name_off[node + 1]])

    def parent(self, node: int) -> int:
        return int(self._parent[node])

    def child_range(self, node: int) -> range:
        """Node ids of the children of directory `node`, in bytewise name order."""
        start = int(self._child_start[node])
        return range(start, start + int(self._child_count[node]))

    def children(
        self, node: int, start: int = 0, count: int = 256
    ) -> list[tuple[int, bytes, bool, int, int]]:
        """Up to `count` children of directory `node` from position `start`, in name order, as
        (node id, name, is_dir, size, mtime_ns): one bulk conversion per call, for readdir."""
        first = int(self._child_start[node])
        end = first + int(self._child_count[node])
        lo = min(first + start, end)
        hi = min(lo + count, end)
        if lo == hi:
            return []
        offsets = self._name_off[lo : hi + 1].tolist()
        base = offsets[0]
        blob = self._name_data[base : offsets[-1]].tobytes()
        names = [blob[a - base : b - base] for a, b in pairwise(offsets)]
        kinds = (self._kind[lo:hi] == KIND_DIR).tolist()
        sizes = self._size[lo:hi].tolist()
        mtimes = self._mtime[lo:hi].tolist()
        return list(zip(range(lo, hi), names, kinds, sizes, mtimes, strict=True))

    def lookup(self, node: int, name: bytes) -> int | None:
        """The child of directory `node` called `name`, or None. Binary search over its child run."""
        if self._kind[node] != KIND_DIR:
            return None
        lo = int(self._child_start[node])
        hi = lo + int(self._child_count[node])
        off = self._name_off
        data = self._name_data
        while lo < hi:
            mid = (lo + hi) // 2
            candidate = data[off[mid] : off[mid + 1]].tobytes()
            if candidate < name:
                lo = mid + 1
            elif candidate > name:
                hi = mid
            else:
                return mid
        return None

    def resolve(self, path: str) -> int | None:
        """Node id of a `/`-separated path relative to the Zarr root ('' is the root)."""
        node = self.ROOT
        for part in path.split("/") if path else ():
            found = self.lookup(node, part.encode("utf-8"))
            if found is None:
                return None
            node = found
        return node

    def stat(self, node: int) -> EntryStat:
        return EntryStat(
            is_dir=bool(self._kind[node] == KIND_DIR),
            size=int(self._size[node]),
            mtime_ns=int(self._mtime[node]),
        )

    def path(self, node: int) -> str:
        """Path of `node` relative to the Zarr root."""
        parts: list[bytes] = []
        while node != self.ROOT:
            parts.append(self.name(node))
            node = int(self._parent[node])
        return b"/".join(reversed(parts)).decode("utf-8")

    def etag(self, node: int) -> str:
        parts = int(self._etag_parts[node])
        if parts == 65535:
            return self._odd_etags[node]
        hexdigest = self._etag[node].tobytes().hex()
        return f"{hexdigest}-{parts}" if parts else hexdigest

    def version_id(self, node: int) -> str:
        return bytes(self._vid_data[self._vid_off[node] : self._vid_off[node + 1]]).decode("utf-8")

    def entry_object(self, node: int) -> EntryObject:
        """Where the bytes of file `node` live."""
        return EntryObject(
            path=self.path(node),
            version_id=self.version_id(node),
            size=int(self._size[node]),
            etag=self.etag(node),
        )

    def object_ref(self, node: int) -> ObjectRef:
        """The pinned object version holding file `node`: `zarr/<zarr_id>/<path>` at its VersionId."""
        obj = self.entry_object(node)
        return ObjectRef(
            key=f"zarr/{self.zarr_id}/{obj.path}",
            version_id=obj.version_id,
            size=obj.size,
            etag=obj.etag,
        )

    def iter_files(self) -> Iterator[EntryObject]:
        """Every file, depth-first in name order (tests and tools; not used on hot paths)."""
        stack = [self.ROOT]
        while stack:
            node = stack.pop()
            for child in reversed(self.child_range(node)):
                if self._kind[child] == KIND_DIR:
                    stack.append(child)
            for child in self.child_range(node):
                if self._kind[child] == KIND_FILE:
                    yield self.entry_object(child)

    def recompute_checksum(self) -> str:
        """Recompute the Zarr checksum from the index with `zarr_checksum` (slow; for checks)."""

        def digest(node: int) -> ZarrDirectoryDigest:
            files, dirs = [], []
            for child in self.child_range(node):
                name = self.name(child).decode("utf-8")
                if self._kind[child] == KIND_DIR:
                    d = digest(child)
                    dirs.append(ZarrChecksum(digest=d.digest, name=name, size=d.size))
                else:
                    size = int(self._size[child])
                    files.append(ZarrChecksum(digest=self.etag(child), name=name, size=size))
            return ZarrChecksumManifest(directories=dirs, files=files).generate_digest()

        return digest(self.ROOT).digest

    # --- persistence --------------------------------------------------------------------------

    def _checksum(self) -> str:
        """xxh3-128 over every column's bytes and the odd ETags (what `write` stores, `load` checks)."""
        h = xxhash.xxh3_128()
        for name in _COLUMN_ORDER:
            column = self._c[name]
            h.update(name.encode())
            h.update(len(column).to_bytes(8, "little"))
            h.update(np.ascontiguousarray(column).data)
        h.update(json.dumps(sorted(self._odd_etags.items())).encode())
        return h.hexdigest()

    def write(self, path: Path) -> int:
        """Write the index as an Arrow IPC file, atomically (temp file 0600, rename); its size in
        bytes. The directory must exist. Not fsynced (that cost 0.2 s per index here): a file torn
        by a crash fails the content checksum on load and is rebuilt, like a torn disk cache
        block."""
        n = self.n_nodes

        def binary(off: np.ndarray[Any, Any], data: np.ndarray[Any, Any]) -> pa.Array:
            return pa.Array.from_buffers(
                pa.large_binary(), n, [None, pa.py_buffer(off), pa.py_buffer(data)]
            )

        def prim(values: np.ndarray[Any, Any]) -> pa.Array:
            # from the buffer, not `pa.array`: that imports pandas when it is installed (0.3 s)
            data = np.ascontiguousarray(values)
            return pa.Array.from_buffers(
                pa.from_numpy_dtype(data.dtype), n, [None, pa.py_buffer(data)]
            )

        columns = {
            "name": binary(self._name_off, self._name_data),
            "version_id": binary(self._vid_off, self._vid_data),
            "etag": pa.Array.from_buffers(
                pa.binary(16), n, [None, pa.py_buffer(self._etag.reshape(-1))]
            ),
            "etag_parts": prim(self._etag_parts),
            "size": prim(self._size),
            "mtime_ns": prim(self._mtime),
            "kind": prim(self._kind),
            "child_start": prim(self._child_start),
            "child_count": prim(self._child_count),
            "parent": prim(self._parent),
        }
        table = pa.Table.from_arrays(list(columns.values()), names=list(columns))
        meta = {
            "zarrfs_format": str(INDEX_FORMAT_VERSION),
            "zarr_id": self.zarr_id,
            "checksum": self.checksum,
            "n_nodes": str(n),
            "n_files": str(self.n_files),
            "odd_etags": json.dumps({str(k): v for k, v in self._odd_etags.items()}),
            "content_xxh3_128": self._checksum(),
        }
        table = table.replace_schema_metadata(meta)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique across containers
        try:
            os.close(create_private_file(tmp))
            with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=max(n, 1))
            size = tmp.stat().st_size
            os.replace(tmp, path)
            return size
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(
        cls, path: Path, *, zarr_id: str, checksum: str, map_min: int | None = None
    ) -> ManifestIndex:
        """Load an index written by `write`, checking its header, its content checksum and the
        structure of its columns. Raises ManifestError if it is not exactly the expected index.

        Holds no file descriptor afterwards: an index smaller than `map_min` bytes is read into
        memory (nothing of it stays mapped, so another process may delete the file at once); a
        bigger one (`map_min`: `config.INDEX_MAP_MIN` by default) is memory-mapped and its descriptor closed at once (the mapping keeps the pages
        reachable, and the columns keep the mapping). So the number of loaded indexes never counts
        against the descriptor limit (`config.FD_BUDGET`)."""
        if map_min is None:
            map_min = config.INDEX_MAP_MIN
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < map_min:
                    data = f.read()
            if size < map_min:
                table = ipc.open_file(pa.py_buffer(data)).read_all()
                return cls._from_table(table, None, path, zarr_id=zarr_id, checksum=checksum)
            source = pa.memory_map(str(path), "r")
            try:
                table = ipc.open_file(source).read_all()
            finally:
                source.close()  # the descriptor; the mapping lives on with the table's buffers
            return cls._from_table(table, True, path, zarr_id=zarr_id, checksum=checksum)
        except ManifestError:
            raise
        except (OSError, pa.ArrowException, ValueError, TypeError, KeyError, IndexError) as e:
            raise ManifestError(f"unreadable index {path}: {type(e).__name__}: {e}") from e

    @classmethod
    def _from_table(
        cls, table: pa.Table, mapped: object, path: Path, *, zarr_id: str, checksum: str
    ) -> ManifestIndex:
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        expected = {
            "zarrfs_format": str(INDEX_FORMAT_VERSION),
            "zarr_id": zarr_id,
            "checksum": checksum,
        }
        for key, value in expected.items():
            if meta.get(key) != value:
                raise ManifestError(f"index {path}: {key} is {meta.get(key)!r}, expected {value!r}")
        n = table.num_rows
        if str(n) != meta.get("n_nodes") or n < 1:
            raise ManifestError(f"index {path}: row count {n} does not match its header")
        if any(table.column(name).num_chunks != 1 for name in table.column_names):
            raise ManifestError(f"index {path}: columns are not single chunks")

        def prim(name: str, dtype: str) -> np.ndarray[Any, Any]:
            # from the buffer, not `to_numpy`: that imports pandas when it is installed (0.3 s)
            chunk = table.column(name).chunk(0)
            wanted = np.dtype(dtype)
            if chunk.type != pa.from_numpy_dtype(wanted) or chunk.null_count or chunk.offset:
                raise ManifestError(f"index {path}: column {name} has the wrong type")
            return np.frombuffer(chunk.buffers()[1], dtype=wanted, count=n)

        def binary(name: str) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
            chunk = table.column(name).chunk(0)
            if chunk.type != pa.large_binary() or chunk.offset != 0:
                raise ManifestError(f"index {path}: column {name} has the wrong type")
            _, off, data = chunk.buffers()
            offsets = np.frombuffer(off, dtype=np.int64, count=n + 1)
            values = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, "u1")
            return offsets, values

        name_off, name_data = binary("name")
        vid_off, vid_data = binary("version_id")
        etag_chunk = table.column("etag").chunk(0)
        if etag_chunk.type != pa.binary(16) or etag_chunk.offset != 0:
            raise ManifestError(f"index {path}: column etag has the wrong type")
        etag = np.frombuffer(etag_chunk.buffers()[1], dtype=np.uint8, count=16 * n).reshape(n, 16)
        columns = {
            "name_off": name_off,
            "name_data": name_data,
            "vid_off": vid_off,
            "vid_data": vid_data,
            "etag": etag,
            "etag_parts": prim("etag_parts", "uint16"),
            "size": prim("size", "int64"),
            "mtime": prim("mtime_ns", "int64"),
            "kind": prim("kind", "uint8"),
            "child_start": prim("child_start", "uint64"),
            "child_count": prim("child_count", "uint64"),
            "parent": prim("parent", "uint64"),
        }
        odd = {int(k): str(v) for k, v in json.loads(meta.get("odd_etags", "{}")).items()}
        index = cls(
            zarr_id=zarr_id,
            checksum=checksum,
            columns=columns,
            odd_etags=odd,
            n_files=int(meta["n_files"]),
            keepalive=table,
            mapped=path if mapped else None,
        )
        if index._checksum() != meta.get("content_xxh3_128"):
            raise ManifestError(f"index {path}: content checksum mismatch (corrupt file)")
        if (why := index._structure_problem()) is not None:
            raise ManifestError(f"index {path}: {why}")
        return index

    def _structure_problem(self) -> str | None:
        """Why the columns cannot be a well-formed tree (every access would stay in bounds), or
        None. Cheap (vectorized); run on every load besides the checksum."""
        n = self.n_nodes
        for off, data, what in (
            (self._name_off, self._name_data, "name"),
            (self._vid_off, self._vid_data, "versionId"),
        ):
            if off[0] != 0 or off[-1] > len(data) or bool(np.any(np.diff(off) < 0)):
                return f"{what} offsets are not monotonic within their data"
        kind = self._kind
        if bool(np.any(kind > KIND_DIR)) or kind[0] != KIND_DIR:
            return "bad node kinds"
        dirs = kind == KIND_DIR
        starts, counts = self._child_start[dirs], self._child_count[dirs]
        if bool(np.any((counts > 0) & (starts < 1))) or bool(np.any(starts + counts > n)):
            return "a child run points outside the index"
        if int(counts.sum()) != n - 1 or bool(np.any(self._child_count[~dirs] != 0)):
            return "child runs do not partition the nodes"
        if bool(np.any(self._parent >= n)) or bool(np.any(self._size < 0)):
            return "bad parents or sizes"
        odd_rows = set(np.flatnonzero(self._etag_parts == 65535).tolist())
        if odd_rows != set(self._odd_etags) or any(kind[r] != KIND_FILE for r in odd_rows):
            return "bad ETags"
        return None


_COLUMN_ORDER = (
    "name_off",
    "name_data",
    "vid_off",
    "vid_data",
    "etag",
    "etag_parts",
    "size",
    "mtime",
    "kind",
    "child_start",
    "child_count",
    "parent",
)


def _prescan(head: bytes) -> None:
    """Refuse known-unsupported documents before paying for a full parse (the full parse checks
    everything again: a copy whose keys come in another order is not refused here)."""
    if _FIELDS_STRING_RE.search(head):
        raise ManifestError(
            "unsupported manifest variant: 'fields' is a string and entries are bare VersionIds "
            "(the .versionid.json form has no sizes or ETags, so it cannot be verified against the "
            "Zarr checksum)"
        )
    m = _SCHEMA_RE.search(head)
    if m is not None and int(m.group(1)) != SUPPORTED_SCHEMA:
        raise ManifestError(
            f"unsupported manifest schemaVersion {int(m.group(1))} (only {SUPPORTED_SCHEMA} is served)"
        )
    f = _FIELDS_RE.search(head)
    if f is not None:
        try:
            fields = json.loads(f.group(1))
        except ValueError:
            fields = None
        if fields != FIELDS:
            raise ManifestError(f"unsupported manifest fields {fields!r:.200} (expected {FIELDS})")


def parse_manifest(
    data: bytes,
    *,
    zarr_id: str,
    expected_checksum: str,
    progress: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> ManifestIndex:
    """Parse and verify one schema-2 manifest document; CPU-heavy, call it in a worker thread.

    The recomputed checksum must equal `expected_checksum` (the manifest's file name, which the
    caller has already matched to the asset's published checksum) and the manifest's own statistics.
    Raises ManifestError for documents that are not valid schema-2 manifests, IntegrityError when
    the entries do not add up to the expected checksum, and ConversionCancelled once `cancel` is set.
    """
    _prescan(data[:4096])
    try:
        holder = [data.decode("utf-8")]
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest is not UTF-8: {e}") from None
    return _parse_text(
        holder,
        zarr_id=zarr_id,
        expected_checksum=expected_checksum,
        progress=progress,
        cancel=cancel,
    )


def parse_manifest_file(
    path: Path,
    *,
    zarr_id: str,
    expected_checksum: str,
    progress: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> ManifestIndex:
    """`parse_manifest` of a file, holding only the decoded text (not also its bytes) while parsing."""
    with open(path, "rb") as f:
        _prescan(f.read(4096))
    try:
        holder = [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest is not UTF-8: {e}") from None
    return _parse_text(
        holder,
        zarr_id=zarr_id,
        expected_checksum=expected_checksum,
        progress=progress,
        cancel=cancel,
    )


def _parse_text(
    holder: list[str],
    *,
    zarr_id: str,
    expected_checksum: str,
    progress: Callable[[str], None] | None,
    cancel: threading.Event | None,
) -> ManifestIndex:
    builder = _Builder(cancel)
    try:
        # pop: nothing else references the text, so it is freed as soon as json.loads returns,
        # before the columns are assembled (the peak of a conversion)
        doc = json.loads(holder.pop(), object_pairs_hook=builder.hook)
    except RecursionError:
        raise ManifestError("manifest is nested too deeply") from None
    except ValueError as e:
        raise ManifestError(f"manifest is not valid JSON: {e}") from None
    if progress is not None:
        progress("parsed")
    if not isinstance(doc, dict) or doc.get("schemaVersion") != SUPPORTED_SCHEMA:
        version = doc.get("schemaVersion") if isinstance(doc, dict) else None
        raise ManifestError(f"not a schema-2 Zarr manifest (schemaVersion {version!r:.40})")
    if doc.get("fields", FIELDS) != FIELDS:
        raise ManifestError(f"unsupported manifest fields {doc.get('fields')!r:.200}")
    root = doc.get("entries")
    if not isinstance(root, _Dir):
        raise ManifestError("manifest entries are malformed (" + _first_bad_entry(root) + ")")
    computed = root.digest if root.count else EMPTY_CHECKSUM
    stats = doc.get("statistics")
    if not isinstance(stats, dict):
        stats = {}
    problems = []
    if computed != expected_checksum:
        problems.append(f"entries recompute to {computed}, expected {expected_checksum}")
    stated = stats.get("zarrChecksum")
    if stated is not None and stated != computed:
        problems.append(
            f"statistics.zarrChecksum is {stated!r:.80}, entries recompute to {computed}"
        )
    if stats.get("entries") is not None and stats.get("entries") != builder.n_files:
        problems.append(
            f"statistics.entries is {stats.get('entries')!r:.40}, found {builder.n_files}"
        )
    if stats.get("totalSize") is not None and stats.get("totalSize") != root.size:
        problems.append(
            f"statistics.totalSize is {stats.get('totalSize')!r:.40}, found {root.size}"
        )
    if problems:
        raise IntegrityError("; ".join(problems))
    return _finish(builder, root, zarr_id=zarr_id, checksum=computed)


def _first_bad_entry(value: object, path: str = "", depth: int = 0) -> str:
    if not isinstance(value, dict) or depth > 100:
        return f"{path or 'entries'} is {type(value).__name__}"
    for name, child in value.items():
        if isinstance(child, dict):
            return _first_bad_entry(child, f"{path}/{name}", depth + 1)
        if not isinstance(child, _Dir):
            return (
                f"entry {path}/{name} is not [versionId, lastModified, size, ETag]: {child!r:.80}"
            )
    return f"{path or 'entries'} is malformed"


def canonical_order(
    kind: np.ndarray[Any, Any], child_start: np.ndarray[Any, Any], child_count: np.ndarray[Any, Any]
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The breadth-first order of a tree stored as contiguous, name-sorted child runs.

    Returns (perm, run_src, run_len): `perm[new] = old` row; the runs (root first, then each
    directory's children, directories taken breadth-first) as old start rows and lengths, in new order.
    Depends only on the tree, not on where its runs happened to be stored.
    """
    n = len(kind)
    perm = np.empty(n, dtype=np.int64)
    perm[0] = 0
    run_src: list[np.ndarray[Any, Any]] = [np.zeros(1, dtype=np.int64)]
    run_len: list[np.ndarray[Any, Any]] = [np.ones(1, dtype=np.int64)]
    level = np.zeros(1, dtype=np.int64)  # old rows of this level's directories, in new order
    pos = 1
    while level.size:
        starts = child_start[level].astype(np.int64)
        counts = child_count[level].astype(np.int64)
        offsets = np.cumsum(counts) - counts
        total = int(counts.sum())
        if pos + total > n:
            raise ManifestError("internal: child runs overlap")  # a bug, not bad input
        run_of = np.repeat(np.arange(level.size), counts)
        old_rows = starts[run_of] + (np.arange(total) - offsets[run_of])
        perm[pos : pos + total] = old_rows
        run_src.append(starts)
        run_len.append(counts)
        pos += total
        level = old_rows[kind[old_rows] == KIND_DIR]
    if pos != n:
        raise ManifestError("internal: child runs do not cover every node")  # a bug, not bad input
    return perm, np.concatenate(run_src), np.concatenate(run_len)


def _gather_bytes(
    off: np.ndarray[Any, Any],
    data: bytes | bytearray,
    perm: np.ndarray[Any, Any],
    run_src: np.ndarray[Any, Any],
    run_len: np.ndarray[Any, Any],
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """A variable-width column (offsets + bytes) in the order `perm`, copying whole runs."""
    lengths = np.diff(off)[perm]
    new_off = np.zeros(len(perm) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_off[1:])
    view = memoryview(data)
    begins = off[run_src].tolist()
    ends = off[run_src + run_len].tolist()
    blob = b"".join([view[a:b] for a, b in zip(begins, ends, strict=True)])
    return new_off, np.frombuffer(blob, dtype=np.uint8)


def _finish(builder: _Builder, root: _Dir, *, zarr_id: str, checksum: str) -> ManifestIndex:
    b = builder
    n = len(b.kind)
    # Fill in the root row, then renumber canonically, then derive parents.
    b.child_start[0] = root.first_row
    b.child_count[0] = root.n_children
    b.size[0] = root.size
    b.mtime[0] = root.mtime_ns
    kind_old = np.frombuffer(b.kind, dtype=np.uint8)
    start_old = np.frombuffer(b.child_start, dtype=np.uint64)
    count_old = np.frombuffer(b.child_count, dtype=np.uint64)
    perm, run_src, run_len = canonical_order(kind_old, start_old, count_old)
    inverse = np.empty(n, dtype=np.int64)
    inverse[perm] = np.arange(n, dtype=np.int64)
    kind = kind_old[perm]
    child_count = count_old[perm]
    # a directory's children start where its first child landed (0 for files, like before)
    child_start = np.where(
        (kind == KIND_DIR) & (child_count > 0),
        inverse[np.minimum(start_old[perm].astype(np.int64), n - 1)],
        0,
    ).astype(np.uint64)
    dirs = np.flatnonzero(kind == KIND_DIR)
    parent = np.zeros(n, dtype=np.uint64)
    counts = child_count[dirs].astype(np.int64)
    parent[1:] = np.repeat(dirs.astype(np.uint64), counts)[: n - 1]
    if int(counts.sum()) != n - 1:
        raise ManifestError("internal: child runs do not cover every node")  # a bug, not bad input
    name_off, name_data = _gather_bytes(
        np.frombuffer(b.name_off, dtype=np.int64), b.name_data, perm, run_src, run_len
    )
    vid_off, vid_data = _gather_bytes(
        np.frombuffer(b.vid_off, dtype=np.int64), b.vid_data, perm, run_src, run_len
    )
    columns: dict[str, np.ndarray[Any, Any]] = {
        "name_off": name_off,
        "name_data": name_data,
        "vid_off": vid_off,
        "vid_data": vid_data,
        "etag": np.frombuffer(b.etag, dtype=np.uint8).reshape(n, 16)[perm],
        "etag_parts": np.frombuffer(b.etag_parts, dtype=np.uint16)[perm],
        "size": np.frombuffer(b.size, dtype=np.int64)[perm],
        "mtime": np.frombuffer(b.mtime, dtype=np.int64)[perm],
        "kind": kind,
        "child_start": child_start,
        "child_count": child_count,
        "parent": parent,
    }
    return ManifestIndex(
        zarr_id=zarr_id,
        checksum=checksum,
        columns=columns,
        odd_etags={int(inverse[row]): etag for row, etag in b.odd_etags.items()},
        n_files=b.n_files,
    )
