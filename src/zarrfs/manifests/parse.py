"""Zarr manifest (schema 2) -> a verified `ManifestIndex`: parsing untrusted JSON into columns.

Owns: reading a manifest document, validating it, recomputing its Zarr checksum while it is decoded
(`checksums.directory_digest`, byte for byte what the `zarr_checksum` reference computes; the tests
compare the two), and building the index's columns in canonical order. Never fetches anything and
never decides where files live: `zarrfs.manifest_cache` does.

Node ids are canonical: they depend only on the Zarr's entries, never on the key order of the JSON
copy they were parsed from. Rows are numbered breadth-first with each directory's children in bytewise
name order (the root is 0, its children 1..k, then the children of node 1, ...), so every copy of one
manifest checksum gives the same ids: the kernel remembers name -> inode for a day.

Input is untrusted: every number is range-checked while parsing (sizes up to `MAX_OBJECT_SIZE`, totals
and mtimes within int64), every name must pass `base.names.name_problem`, and anything malformed is a
`ManifestError` with one clear message, never another exception.

Conversion runs in a worker thread (callers use `trio.to_thread.run_sync`); the JSON decoder's
`object_pairs_hook` consumes every directory as soon as it is decoded, so the decoded Python objects
for entries are freed while parsing proceeds and peak memory is about the JSON text plus the columns.
The hook checks a cancellation flag once per directory, so an abandoned conversion stops promptly.
Empty directories (which cannot exist in S3) are dropped, exactly as the checksum ignores them.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from array import array
from collections.abc import Callable
from datetime import datetime
from operator import itemgetter
from typing import Any

import numpy as np

from zarrfs.base.names import NAME_MAX, name_problem
from zarrfs.base.refs import INT64_MAX, MD5_RE, MULTIPART_ETAG_RE
from zarrfs.errors import IntegrityError, ManifestError
from zarrfs.manifests.checksums import EMPTY_CHECKSUM, directory_digest
from zarrfs.manifests.index import KIND_DIR, KIND_FILE, ManifestIndex

log = logging.getLogger(__name__)

SUPPORTED_SCHEMA = 2
#: Largest object S3 stores (5 TiB): a bigger size in a manifest is refused.
MAX_OBJECT_SIZE = 5 << 40
#: Longest VersionId or ETag accepted (S3's are 32 to a few dozen characters).
MAX_TOKEN_LENGTH = 1024
FIELDS = ["versionId", "lastModified", "size", "ETag"]
_SCHEMA_RE = re.compile(rb'"schemaVersion"\s*:\s*([0-9]+)')
_FIELDS_RE = re.compile(rb'"fields"\s*:\s*(\[[^\]]*\])')
_FIELDS_STRING_RE = re.compile(rb'"fields"\s*:\s*"')


def check_name(name: str) -> None:
    """Reject names that cannot be a path component (would escape or corrupt the tree)."""
    if (why := name_problem(name)) is not None:
        raise ManifestError(f"invalid entry name: {why}")


class ConversionCancelled(Exception):
    """The caller gave up on a conversion (raised inside the worker thread; never shown to users)."""


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
        if MD5_RE.match(etag):
            self.etag += bytes.fromhex(etag)
            self.etag_parts.append(0)
            return
        m = MULTIPART_ETAG_RE.match(etag)
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
