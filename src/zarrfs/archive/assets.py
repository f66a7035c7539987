"""Asset records: one published file (a blob) or Zarr of a dandiset version, parsed as untrusted.

Owns: `AssetRecord`, parsing `assets.jsonld` items and API rows into it (every number range-checked,
every path checked by `base.names`, S3 URLs mapped onto the configured bucket's keys), and reading a
big JSON array of records incrementally (`iter_json_array`). Pure: no network (reading a local file
of records is the caller's to run in a worker thread).
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from zarrfs.base.names import path_problem
from zarrfs.base.refs import INT64_MAX, UUID_PATTERN
from zarrfs.manifests.checksums import is_checksum

log = logging.getLogger(__name__)

ZARR_MEDIA_TYPE = "application/x-zarr"
_BLOB_KEY_RE = re.compile(rf"^blobs/[0-9a-f]{{3}}/[0-9a-f]{{3}}/{UUID_PATTERN}\Z")
_ZARR_KEY_RE = re.compile(rf"^zarr/(?P<zarr_id>{UUID_PATTERN})/?\Z")
_VIRTUAL_HOST_RE = re.compile(r"^(?P<bucket>.+)\.s3(?:[.-][a-z0-9-]+)?\.amazonaws\.com\Z")
_PATH_STYLE_HOST_RE = re.compile(r"^s3(?:[.-][a-z0-9-]+)?\.amazonaws\.com\Z")


@dataclass(frozen=True, slots=True)
class AssetRecord:
    """One asset of a resolved version: a blob (one file) or a Zarr (a directory tree).

    `problem` is set when the asset is listed but cannot be served exactly (no S3 URL, no checksum
    yet, ...); opening or listing it then fails with EIO and the problem is logged.
    """

    asset_id: str
    path: str
    size: int
    mtime_ns: int
    blob_key: str | None = None
    blob_etag: str | None = None
    zarr_id: str | None = None
    zarr_checksum: str | None = None
    problem: str | None = None
    #: The checksum is the Zarr's live one (a draft pinned through the API): with no manifest
    #: anywhere, the manifest may be built from the bucket's listing and verified against it.
    live: bool = False
    #: The record's `encodingFormat` (a blob's media type, e.g. `application/x-nwb`), if it is a
    #: short string.
    media_type: str | None = None

    @property
    def is_zarr(self) -> bool:
        return self.zarr_id is not None


def s3_key_from_url(url: str) -> str | None:
    """The object key of an `https://<bucket>.s3[.<region>].amazonaws.com/<key>` URL, else None.

    The bucket of the URL is deliberately dropped: keys are re-targeted at the configured bucket.
    """
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:  # e.g. a malformed IPv6 host
        return None
    if parts.scheme not in ("https", "http") or parts.query:
        return None
    path = unquote(parts.path)
    if _VIRTUAL_HOST_RE.match(host) and not _PATH_STYLE_HOST_RE.match(host):
        key = path.lstrip("/")
    elif _PATH_STYLE_HOST_RE.match(host):
        _, _, key = path.lstrip("/").partition("/")
    else:
        return None
    return key or None


def check_asset_path(path: str) -> str | None:
    """Why `path` cannot be an asset path (see `names.path_problem`: absolute, empty components,
    `.`/`..`, NUL, not valid Unicode, a component over 255 bytes), or None. Never normalized."""
    return path_problem(path)


def _timestamp_ns(value: object) -> int:
    """Nanoseconds since the epoch of an ISO 8601 time with offset; 0 when unusable or out of the
    range a file time can have (int64 nanoseconds)."""
    if not isinstance(value, str):
        return 0
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if dt.tzinfo is None:
            return 0
        ns = int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000
    except (ValueError, OverflowError, OSError):
        return 0
    return ns if -INT64_MAX <= ns <= INT64_MAX else 0


def parse_asset_record(record: dict[str, Any]) -> AssetRecord:
    """Parse one `assets.jsonld` item (the `metadata` of an API asset row).

    Raises ValueError when the record cannot name a path at all; problems that still allow showing the
    asset (no usable S3 URL, missing checksum) are recorded in `problem`.
    """
    path = record.get("path")
    why = check_asset_path(path) if isinstance(path, str) else "not a string"
    if why or not isinstance(path, str):
        raise ValueError(f"asset record with unusable path {path!r:.120} ({why})")
    identifier = record.get("identifier") or str(record.get("id", "")).removeprefix("dandiasset:")
    asset_id = str(identifier)[:200]
    size = record.get("contentSize")
    if type(size) is not int or not 0 <= size <= INT64_MAX:
        raise ValueError(f"asset {path!r} has no valid contentSize ({size!r:.40})")
    urls = record.get("contentUrl") or []
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list):
        urls = []
    keys = [k for k in (s3_key_from_url(u) for u in urls if isinstance(u, str)) if k]
    digest = record.get("digest")
    if not isinstance(digest, dict):
        digest = {}
    is_zarr = record.get("encodingFormat") == ZARR_MEDIA_TYPE or any(
        k.startswith("zarr/") for k in keys
    )
    if is_zarr:
        zarr_id = next((m.group("zarr_id") for k in keys if (m := _ZARR_KEY_RE.match(k))), None)
        checksum = digest.get("dandi:dandi-zarr-checksum")
        problem = None
        if zarr_id is None:
            problem = f"no S3 URL of the form zarr/<zarr id>/ in contentUrl {urls!r}"
        elif not isinstance(checksum, str) or not is_checksum(checksum):
            problem = f"no valid dandi:dandi-zarr-checksum ({checksum!r})"
            checksum = None
        return AssetRecord(
            asset_id=asset_id,
            path=path,
            size=size,
            mtime_ns=_timestamp_ns(record.get("dateModified")),
            zarr_id=zarr_id or "",
            zarr_checksum=checksum,
            problem=problem,
        )
    blob_key = next((k for k in keys if _BLOB_KEY_RE.match(k)), None)
    etag = digest.get("dandi:dandi-etag")
    media_type = record.get("encodingFormat")
    return AssetRecord(
        asset_id=asset_id,
        path=path,
        size=size,
        mtime_ns=_timestamp_ns(record.get("blobDateModified") or record.get("dateModified")),
        blob_key=blob_key,
        blob_etag=etag if isinstance(etag, str) else None,
        problem=None if blob_key else f"no S3 URL of the form blobs/... in contentUrl {urls!r}",
        media_type=media_type if isinstance(media_type, str) and len(media_type) <= 200 else None,
    )


def parse_asset_records(records: Iterable[object]) -> list[AssetRecord]:
    """Parse many records, logging (one line each) and skipping those that cannot be shown."""
    assets = []
    for record in records:
        if not isinstance(record, dict):
            log.warning("skipping an asset record that is not an object: %.80r", record)
            continue
        try:
            assets.append(parse_asset_record(record))
        except ValueError as e:
            log.warning("skipping asset: %s", e)
    return assets


def iter_json_array(stream: BinaryIO, chunk_size: int = 1 << 20) -> Iterator[Any]:
    """Yield the items of a JSON array one at a time, reading `stream` incrementally.

    Memory is bounded by the largest item plus one chunk, however long the array. Raises ValueError
    on anything that is not a well-formed JSON array.
    """
    text = io.TextIOWrapper(stream, encoding="utf-8")
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def fill() -> bool:
        nonlocal buf, pos, eof
        more = text.read(max(chunk_size, len(buf) - pos))
        eof = not more
        buf, pos = buf[pos:] + more, 0
        return not eof

    def skip_ws() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not fill():
                return ""

    if skip_ws() != "[":
        raise ValueError("not a JSON array")
    pos += 1
    if skip_ws() == "]":
        return
    while True:
        try:
            item, end = decoder.raw_decode(buf, pos)
            if end == len(buf) and not eof:
                raise json.JSONDecodeError("item may continue", buf, end)
        except json.JSONDecodeError:
            if eof or not fill():
                raise ValueError("truncated or malformed JSON array") from None
            continue
        pos = end
        yield item
        sep = skip_ws()
        if sep == "]":
            return
        if sep != ",":
            raise ValueError(f"expected ',' or ']' in JSON array, found {sep!r}")
        pos += 1
        skip_ws()


def read_asset_records(path: Path) -> list[AssetRecord]:
    """Parse an `assets.jsonld` file item by item (it can be large); CPU-bound, run in a thread."""
    with open(path, "rb") as f:
        return parse_asset_records(iter_json_array(f))
