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

Conversion runs in a worker thread (callers use `trio.to_thread.run_sync`); the JSON decoder's
`object_pairs_hook` consumes every directory as soon as it is decoded, so the decoded Python objects
for entries are freed while parsing proceeds and peak memory is about the JSON text plus the columns.
Empty directories (which cannot exist in S3) are dropped, exactly as the checksum ignores them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
from zarr_checksum.checksum import (
    ZARR_DIGEST_PATTERN,
    ZarrChecksum,
    ZarrChecksumManifest,
    ZarrDirectoryDigest,
)

from .errors import IntegrityError, ManifestError

log = logging.getLogger(__name__)

#: Bump when the on-disk index layout changes; older files are then rebuilt from the JSON.
INDEX_FORMAT_VERSION = 1
SUPPORTED_SCHEMA = 2
FIELDS = ["versionId", "lastModified", "size", "ETag"]
KIND_FILE = 0
KIND_DIR = 1
EMPTY_CHECKSUM = ZarrChecksumManifest().generate_digest().digest
_CHECKSUM_RE = re.compile(f"^{ZARR_DIGEST_PATTERN}$")
_SCHEMA_RE = re.compile(rb'"schemaVersion"\s*:\s*(\d+)')
_FIELDS_RE = re.compile(rb'"fields"\s*:\s*(\[[^\]]*\])')
_MD5_RE = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_RE = re.compile(r"^([0-9a-f]{32})-([0-9]+)$")


def is_checksum(text: str) -> bool:
    """True if `text` has the form `<md5>-<count>--<size>`."""
    return bool(_CHECKSUM_RE.match(text))


def check_name(name: str) -> None:
    """Reject names that cannot be a path component (would escape or corrupt the tree)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ManifestError(f"invalid entry name {name!r}")


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

    def __init__(self) -> None:
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

    def mtime_ns(self, text: str) -> int:
        cached = self._mtimes.get(text)
        if cached is None:
            try:
                dt = datetime.fromisoformat(text)
            except ValueError:
                raise ManifestError(f"bad lastModified {text!r}") from None
            if dt.tzinfo is None:
                raise ManifestError(f"lastModified without UTC offset: {text!r}")
            cached = int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000
            if len(self._mtimes) < 100_000:
                self._mtimes[text] = cached
        return cached

    def _append_row(self, name: str, kind: int, size: int, mtime: int) -> int:
        row = len(self.kind)
        self.name_data += name.encode("utf-8")
        self.name_off.append(len(self.name_data))
        self.kind.append(kind)
        self.size.append(size)
        self.mtime.append(mtime)
        return row

    def hook(self, pairs: list[tuple[str, Any]]) -> Any:
        """`object_pairs_hook`: turn a decoded directory object into a `_Dir`, else keep a dict."""
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
        files: list[ZarrChecksum] = []
        dirs: list[ZarrChecksum] = []
        first_row = len(self.kind)
        newest = 0
        previous = None
        for name, value in pairs:
            if name == previous:
                raise ManifestError(f"duplicate entry name {name!r}")
            previous = name
            check_name(name)
            if type(value) is _Dir:
                if value.count == 0:
                    continue  # empty directory: not an S3 state; ignored like the checksum does
                row = self._append_row(name, KIND_DIR, value.size, value.mtime_ns)
                self.vid_off.append(len(self.vid_data))
                self.etag += bytes(16)
                self.etag_parts.append(0)
                self.child_start.append(value.first_row)
                self.child_count.append(value.n_children)
                dirs.append(ZarrChecksum(digest=value.digest, name=name, size=value.size))
                newest = max(newest, value.mtime_ns)
                continue
            version_id, last_modified, size, etag = value
            if size < 0:
                raise ManifestError(f"negative size for {name!r}")
            if not version_id:
                raise ManifestError(f"empty versionId for {name!r}")
            mtime = self.mtime_ns(last_modified)
            row = self._append_row(name, KIND_FILE, size, mtime)
            self.vid_data += version_id.encode("utf-8")
            self.vid_off.append(len(self.vid_data))
            self._append_etag(row, etag)
            self.child_start.append(0)
            self.child_count.append(0)
            files.append(ZarrChecksum(digest=etag, name=name, size=size))
            newest = max(newest, mtime)
            self.n_files += 1
        digest = ZarrChecksumManifest(directories=dirs, files=files).generate_digest()
        n_children = len(self.kind) - first_row
        return _Dir(first_row, n_children, digest.digest, digest.count, digest.size, newest)

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
        self.etag += bytes(16)
        self.etag_parts.append(65535)
        self.odd_etags[row] = etag


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
        self._keepalive = keepalive  # the memory map backing the columns, if any
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

    def write(self, path: Path) -> None:
        """Write the index as an Arrow IPC file, atomically (temp file, fsync, rename)."""
        n = self.n_nodes

        def binary(off: np.ndarray[Any, Any], data: np.ndarray[Any, Any]) -> pa.Array:
            return pa.Array.from_buffers(
                pa.large_binary(), n, [None, pa.py_buffer(off), pa.py_buffer(data)]
            )

        table = pa.table(
            {
                "name": binary(self._name_off, self._name_data),
                "version_id": binary(self._vid_off, self._vid_data),
                "etag": pa.Array.from_buffers(
                    pa.binary(16), n, [None, pa.py_buffer(self._etag.reshape(-1))]
                ),
                "etag_parts": pa.array(self._etag_parts),
                "size": pa.array(self._size),
                "mtime_ns": pa.array(self._mtime),
                "kind": pa.array(self._kind),
                "child_start": pa.array(self._child_start),
                "child_count": pa.array(self._child_count),
                "parent": pa.array(self._parent),
            }
        )
        meta = {
            "zarrfs_format": str(INDEX_FORMAT_VERSION),
            "zarr_id": self.zarr_id,
            "checksum": self.checksum,
            "n_nodes": str(n),
            "n_files": str(self.n_files),
            "odd_etags": json.dumps({str(k): v for k, v in self._odd_etags.items()}),
        }
        table = table.replace_schema_metadata(meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique across containers
        try:
            with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=max(n, 1))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, *, zarr_id: str, checksum: str) -> ManifestIndex:
        """Memory-map an index written by `write`. Raises ManifestError if it is not the expected one."""
        try:
            source = pa.memory_map(str(path), "r")
            table = ipc.open_file(source).read_all()
        except (OSError, pa.ArrowException) as e:
            raise ManifestError(f"unreadable index {path}: {e}") from e
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
        if str(n) != meta.get("n_nodes") or table.column("name").num_chunks > 1:
            raise ManifestError(f"index {path}: row count {n} does not match its header")

        def prim(name: str) -> np.ndarray[Any, Any]:
            chunk = table.column(name).chunk(0)
            array: np.ndarray[Any, Any] = chunk.to_numpy(zero_copy_only=True)
            return array

        def binary(name: str) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
            chunk = table.column(name).chunk(0)
            _, off, data = chunk.buffers()
            offsets = np.frombuffer(off, dtype=np.int64, count=n + 1)
            values = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, "u1")
            return offsets, values

        name_off, name_data = binary("name")
        vid_off, vid_data = binary("version_id")
        etag_chunk = table.column("etag").chunk(0)
        etag = np.frombuffer(etag_chunk.buffers()[1], dtype=np.uint8, count=16 * n).reshape(n, 16)
        columns = {
            "name_off": name_off,
            "name_data": name_data,
            "vid_off": vid_off,
            "vid_data": vid_data,
            "etag": etag,
            "etag_parts": prim("etag_parts"),
            "size": prim("size"),
            "mtime": prim("mtime_ns"),
            "kind": prim("kind"),
            "child_start": prim("child_start"),
            "child_count": prim("child_count"),
            "parent": prim("parent"),
        }
        odd = {int(k): v for k, v in json.loads(meta.get("odd_etags", "{}")).items()}
        return cls(
            zarr_id=zarr_id,
            checksum=checksum,
            columns=columns,
            odd_etags=odd,
            n_files=int(meta["n_files"]),
            keepalive=(source, table),
        )


def _prescan(head: bytes) -> None:
    """Check the schema version and field order before paying for a full parse."""
    m = _SCHEMA_RE.search(head)
    if m is None:
        raise ManifestError("not a Zarr manifest: no schemaVersion near the start")
    if int(m.group(1)) != SUPPORTED_SCHEMA:
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
            raise ManifestError(f"unsupported manifest fields {fields!r} (expected {FIELDS})")


def parse_manifest(
    data: bytes,
    *,
    zarr_id: str,
    expected_checksum: str,
    progress: Callable[[str], None] | None = None,
) -> ManifestIndex:
    """Parse and verify one schema-2 manifest document; CPU-heavy, call it in a worker thread.

    The recomputed checksum must equal `expected_checksum` (the manifest's file name, which the
    caller has already matched to the asset's published checksum) and the manifest's own statistics.
    Raises ManifestError for documents that are not valid schema-2 manifests and IntegrityError when
    the entries do not add up to the expected checksum.
    """
    _prescan(data[:4096])
    try:
        holder = [data.decode("utf-8")]
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest is not UTF-8: {e}") from None
    return _parse_text(
        holder, zarr_id=zarr_id, expected_checksum=expected_checksum, progress=progress
    )


def parse_manifest_file(
    path: Path,
    *,
    zarr_id: str,
    expected_checksum: str,
    progress: Callable[[str], None] | None = None,
) -> ManifestIndex:
    """`parse_manifest` of a file, holding only the decoded text (not also its bytes) while parsing."""
    with open(path, "rb") as f:
        _prescan(f.read(4096))
    try:
        holder = [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest is not UTF-8: {e}") from None
    return _parse_text(
        holder, zarr_id=zarr_id, expected_checksum=expected_checksum, progress=progress
    )


def _parse_text(
    holder: list[str],
    *,
    zarr_id: str,
    expected_checksum: str,
    progress: Callable[[str], None] | None,
) -> ManifestIndex:
    builder = _Builder()
    try:
        # pop: nothing else references the text, so it is freed as soon as json.loads returns,
        # before the columns are assembled (the peak of a conversion)
        doc = json.loads(holder.pop(), object_pairs_hook=builder.hook)
    except ValueError as e:
        raise ManifestError(f"manifest is not valid JSON: {e}") from None
    if progress is not None:
        progress("parsed")
    if not isinstance(doc, dict) or doc.get("schemaVersion") != SUPPORTED_SCHEMA:
        raise ManifestError("not a schema-2 Zarr manifest")
    if doc.get("fields", FIELDS) != FIELDS:
        raise ManifestError(f"unsupported manifest fields {doc.get('fields')!r}")
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
        problems.append(f"statistics.zarrChecksum is {stated}, entries recompute to {computed}")
    if stats.get("entries") is not None and stats.get("entries") != builder.n_files:
        problems.append(f"statistics.entries is {stats.get('entries')}, found {builder.n_files}")
    if stats.get("totalSize") is not None and stats.get("totalSize") != root.size:
        problems.append(f"statistics.totalSize is {stats.get('totalSize')}, found {root.size}")
    if problems:
        raise IntegrityError("; ".join(problems))
    return _finish(builder, root, zarr_id=zarr_id, checksum=computed)


def _first_bad_entry(value: object, path: str = "") -> str:
    if not isinstance(value, dict):
        return f"{path or 'entries'} is {type(value).__name__}"
    for name, child in value.items():
        if isinstance(child, dict):
            return _first_bad_entry(child, f"{path}/{name}")
        if not isinstance(child, _Dir):
            return (
                f"entry {path}/{name} is not [versionId, lastModified, size, ETag]: {child!r:.80}"
            )
    return f"{path or 'entries'} is malformed"


def _finish(builder: _Builder, root: _Dir, *, zarr_id: str, checksum: str) -> ManifestIndex:
    b = builder
    n = len(b.kind)
    # Fill in the root row, then derive parents: the children runs partition rows 1..n-1.
    b.child_start[0] = root.first_row
    b.child_count[0] = root.n_children
    b.size[0] = root.size
    b.mtime[0] = root.mtime_ns
    kind = np.frombuffer(b.kind, dtype=np.uint8).copy()
    child_start = np.frombuffer(b.child_start, dtype=np.uint64).copy()
    child_count = np.frombuffer(b.child_count, dtype=np.uint64).copy()
    dirs = np.flatnonzero(kind == KIND_DIR)
    order = dirs[np.argsort(child_start[dirs], kind="stable")]
    parent = np.zeros(n, dtype=np.uint64)
    counts = child_count[order].astype(np.int64)
    parent[1:] = np.repeat(order.astype(np.uint64), counts)[: n - 1]
    if int(counts.sum()) != n - 1:
        raise ManifestError("internal: child runs do not cover every node")  # a bug, not bad input
    columns: dict[str, np.ndarray[Any, Any]] = {
        "name_off": np.frombuffer(b.name_off, dtype=np.int64).copy(),
        "name_data": np.frombuffer(bytes(b.name_data), dtype=np.uint8),
        "vid_off": np.frombuffer(b.vid_off, dtype=np.int64).copy(),
        "vid_data": np.frombuffer(bytes(b.vid_data), dtype=np.uint8),
        "etag": np.frombuffer(bytes(b.etag), dtype=np.uint8).reshape(n, 16),
        "etag_parts": np.frombuffer(b.etag_parts, dtype=np.uint16).copy(),
        "size": np.frombuffer(b.size, dtype=np.int64).copy(),
        "mtime": np.frombuffer(b.mtime, dtype=np.int64).copy(),
        "kind": kind,
        "child_start": child_start,
        "child_count": child_count,
        "parent": parent,
    }
    return ManifestIndex(
        zarr_id=zarr_id,
        checksum=checksum,
        columns=columns,
        odd_etags=b.odd_etags,
        n_files=b.n_files,
    )
