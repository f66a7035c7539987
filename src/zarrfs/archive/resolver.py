"""The DANDI resolver: `SOURCE` strings -> `Source`, and a `Source` -> the pinned list of its assets.

Owns: parsing the user's SOURCE spellings, parsing asset records (`assets.jsonld` items or API rows),
mapping their S3 URLs onto the configured bucket, resolving a version, and the archive's lists (the
dandisets, a dandiset's published versions, a Zarr's current checksum). A published version comes only
from `dandisets/<id>/<version>/assets.jsonld` in the bucket, and `latest` is the newest version the
bucket holds; the REST API is used for `draft` (whose Zarrs are pinned to the checksum each has at
resolution time), for the list of dandisets (with the bucket as fallback) and for a Zarr's current
checksum. Never touches FUSE, and reads remote data only through `remote.Remote`.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import trio

from zarrfs.base.names import path_problem
from zarrfs.base.refs import INT64_MAX
from zarrfs.config import MAX_API_RESPONSE_BYTES, MAX_ASSET_LIST_BYTES, MountSource, Source
from zarrfs.errors import (
    ObjectMissing,
    RemoteError,
    SourceError,
    VersionNotFound,
    unwrap_single_exception,
)
from zarrfs.manifests.checksums import is_checksum

if TYPE_CHECKING:  # the resolver is handed a Remote; importing it would pull in aiobotocore
    from zarrfs.io.remote import Remote

log = logging.getLogger(__name__)

DANDISET_ID_RE = re.compile(r"^[0-9]{6}\Z")
PUBLISHED_VERSION_RE = re.compile(r"^0\.[0-9]{6}\.[0-9]{4}\Z")
ZARR_MEDIA_TYPE = "application/x-zarr"
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_BLOB_KEY_RE = re.compile(rf"^blobs/[0-9a-f]{{3}}/[0-9a-f]{{3}}/{_UUID}\Z")
_ZARR_KEY_RE = re.compile(rf"^zarr/(?P<zarr_id>{_UUID})/?\Z")
_VIRTUAL_HOST_RE = re.compile(r"^(?P<bucket>.+)\.s3(?:[.-][a-z0-9-]+)?\.amazonaws\.com\Z")
_PATH_STYLE_HOST_RE = re.compile(r"^s3(?:[.-][a-z0-9-]+)?\.amazonaws\.com\Z")
#: Concurrent API calls while pinning the Zarrs of a draft.
_API_CONCURRENCY = 16
API_PAGE_SIZE = 1000


# --- SOURCE parsing ---------------------------------------------------------------------------------


#: The dandi CLI's instance name of the public archive (`dandi://dandi/...`).
INSTANCE_NAMES = ("dandi",)
_ACCEPTED = (
    "expected dandi (the whole archive), DANDISET (every version: 000123), DANDISET@VERSION "
    "(000123@0.251101.1200, 000123@draft, 000123@latest), DANDI:DANDISET[/VERSION], "
    "https://dandiarchive.org/dandiset/DANDISET/VERSION, or the dandi CLI's "
    "dandi://dandi[/DANDISET[@VERSION][/PATH]]"
)


def parse_source(text: str) -> MountSource:
    """Parse what to mount: `dandi` or `dandi://dandi` (the whole archive), `000123` or
    `DANDI:000123` (every version), `000123@0.251101.1200`, `DANDI:000123/0.251101.1200`, a
    dandiarchive.org URL, or the dandi CLI's `dandi://dandi/000123@VERSION/PATH` (PATH: a directory
    of the version, possibly inside a Zarr; it needs a version).

    VERSION is a published version (`0.YYMMDD.HHMM`), `draft` or `latest`. Raises SourceError with a
    message showing the accepted forms. Nothing is normalized: a PATH with `.`/`..` is refused.
    """
    t = text.strip()
    dandiset: str | None = None
    version: str | None = None
    path = ""
    if t.lower() in INSTANCE_NAMES:
        return MountSource()
    if t.lower().startswith("dandi://"):
        instance, _, rest = t[len("dandi://") :].partition("/")
        if instance.lower() not in INSTANCE_NAMES:
            raise SourceError(
                f"unknown DANDI instance {instance!r} in {text!r}: zarrfs knows "
                f"{', '.join(INSTANCE_NAMES)} (point --bucket and --api-url at another instance)"
            )
        rest = rest.strip("/")
        if not rest:
            return MountSource()
        head, _, path = rest.partition("/")
        dandiset, _, version_text = head.partition("@")
        version = version_text if "@" in head else None
        if path and version is None:
            raise SourceError(
                f"{text!r} names a path but no version: use dandi://dandi/{dandiset}@VERSION/{path}"
            )
    elif (m := re.match(r"^(?:dandi:)?([0-9]+)(?:@([^/@\s]+)(/.*)?)?\Z", t, re.IGNORECASE)) or (
        m := re.match(r"^DANDI:([0-9]+)(?:/([^/\s]+)(/.*)?)?\Z", t, re.IGNORECASE)
    ):
        dandiset, version, path = m.group(1), m.group(2), (m.group(3) or "")[1:].rstrip("/")
    elif t.startswith(("https://", "http://")):
        try:
            url = urlsplit(t)
            host = url.hostname or ""
        except ValueError:  # e.g. a malformed IPv6 host
            url, host = urlsplit(""), ""
        parts = [p for p in url.path.split("/") if p]
        if host.endswith("dandiarchive.org") and len(parts) >= 3 and parts[0] == "dandiset":
            dandiset, version = parts[1], parts[2]
        elif host.endswith("dandiarchive.org") and len(parts) == 2 and parts[0] == "dandiset":
            raise SourceError(
                f"{text!r} names no version: append /<version>, /draft or /latest (or mount "
                f"{parts[1]} for every version)"
            )
    if dandiset is None:
        raise SourceError(f"cannot parse SOURCE {text!r}: {_ACCEPTED}")
    if not DANDISET_ID_RE.match(dandiset):
        raise SourceError(
            f"bad dandiset id {dandiset!r} in {text!r}: expected six digits, e.g. 000123"
        )
    if version is not None:
        version = version.lower() if version.lower() in ("draft", "latest") else version
        if version not in ("draft", "latest") and not PUBLISHED_VERSION_RE.match(version):
            raise SourceError(
                f"bad version {version!r} in {text!r}: expected 0.YYMMDD.HHMM, 'draft' or 'latest'"
            )
    if path and (why := path_problem(path)) is not None:
        raise SourceError(f"bad path {path!r} in {text!r}: {why}")
    return MountSource(dandiset, version, path)


# --- asset records ----------------------------------------------------------------------------------


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
    return AssetRecord(
        asset_id=asset_id,
        path=path,
        size=size,
        mtime_ns=_timestamp_ns(record.get("blobDateModified") or record.get("dateModified")),
        blob_key=blob_key,
        blob_etag=etag if isinstance(etag, str) else None,
        problem=None if blob_key else f"no S3 URL of the form blobs/... in contentUrl {urls!r}",
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


# --- resolution -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResolvedVersion:
    """A dandiset version with every asset pinned: what a mount shows."""

    source: Source
    assets: tuple[AssetRecord, ...]
    dandiset_yaml: bytes | None
    published: bool


def resolved_to_json(resolved: ResolvedVersion) -> dict[str, Any]:
    """A resolved version as JSON (for pins of drafts and the store of published versions)."""
    yaml = resolved.dandiset_yaml
    return {
        "dandiset_id": resolved.source.dandiset_id,
        "version": resolved.source.version,
        "published": resolved.published,
        "yaml": yaml.decode("latin-1") if yaml is not None else None,
        "assets": [asdict(a) for a in resolved.assets],
    }


def resolved_from_json(doc: dict[str, Any]) -> ResolvedVersion:
    """The inverse of `resolved_to_json`; ValueError/KeyError/TypeError when malformed."""
    yaml = doc["yaml"]
    return ResolvedVersion(
        source=Source(str(doc["dandiset_id"]), str(doc["version"])),
        assets=tuple(AssetRecord(**a) for a in doc["assets"]),
        dandiset_yaml=yaml.encode("latin-1") if yaml is not None else None,
        published=bool(doc["published"]),
    )


def version_prefix(source: Source) -> str:
    return f"dandisets/{source.dandiset_id}/{source.version}/"


async def resolve(source: Source, remote: Remote, *, bucket: str, api_url: str) -> ResolvedVersion:
    """Resolve `source` to its pinned assets. Raises VersionNotFound when it does not exist.

    A published version (and `latest`, the newest of them) comes from the bucket alone; only `draft`
    needs the API."""
    if source.version == "latest":
        source = Source(source.dandiset_id, await _latest_version(source, remote, api_url))
    found: list[bytes | None] = []
    failed: list[Exception] = []

    async def fetch_yaml() -> None:  # at the same time as the assets: one round trip less
        try:
            found.append(await _dandiset_yaml(source, remote))
        except Exception as e:  # reported after the assets' own error, which comes first
            failed.append(e)

    with unwrap_single_exception():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch_yaml)
            if source.version == "draft":
                assets = await _draft_assets(source, remote, api_url)
            else:
                assets = await _published_assets(source, remote, bucket)
    if failed:
        raise failed[0]
    yaml = found[0]
    if yaml is None:
        log.warning(
            "no %s: the mount will not show dandiset.yaml", version_prefix(source) + "dandiset.yaml"
        )
    return ResolvedVersion(
        source=source, assets=tuple(assets), dandiset_yaml=yaml, published=source.version != "draft"
    )


async def _published_assets(source: Source, remote: Remote, bucket: str) -> list[AssetRecord]:
    key = version_prefix(source) + "assets.jsonld"
    with tempfile.TemporaryDirectory(prefix="zarrfs-assets-") as tmp:
        local = Path(tmp) / "assets.jsonld"
        try:
            await remote.s3.download(key, local, max_bytes=MAX_ASSET_LIST_BYTES)
        except ObjectMissing:
            raise VersionNotFound(
                f"dandiset {source.dandiset_id} version {source.version} not found: "
                f"no s3://{bucket}/{key}"
            ) from None
        try:
            return await trio.to_thread.run_sync(read_asset_records, local, abandon_on_cancel=True)
        except (ValueError, RecursionError) as e:
            raise RemoteError(
                f"s3://{bucket}/{key} is not a JSON array of asset records: {e}"
            ) from None


async def _dandiset_yaml(source: Source, remote: Remote) -> bytes | None:
    try:
        return await remote.s3.get_bytes(
            version_prefix(source) + "dandiset.yaml", max_bytes=MAX_API_RESPONSE_BYTES
        )
    except ObjectMissing:
        return None


async def _api_json(remote: Remote, url: str, what: str) -> dict[str, Any]:
    try:
        doc = await remote.http.get_json(url)
    except ObjectMissing:
        raise VersionNotFound(f"{what} not found ({url})") from None
    if not isinstance(doc, dict):
        raise RemoteError(f"{url}: expected a JSON object from the API, got {type(doc).__name__}")
    return doc


async def _latest_version(source: Source, remote: Remote, api_url: str) -> str:
    versions = await list_published_versions(source.dandiset_id, remote)
    if not versions:
        raise VersionNotFound(f"dandiset {source.dandiset_id} has no published version")
    log.info("latest published version of %s is %s", source.dandiset_id, versions[-1])
    return versions[-1]


# --- the archive's lists ----------------------------------------------------------------------------


async def list_published_versions(dandiset_id: str, remote: Remote) -> list[str]:
    """The published versions of a dandiset, oldest first, from the bucket (`dandisets/<id>/<v>/`
    prefixes): no API needed. `0.YYMMDD.HHMM` sorts by publication time."""
    listing = await remote.s3.list_prefixes(f"dandisets/{dandiset_id}/")
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in listing.prefixes)
    return sorted(v for v in names if PUBLISHED_VERSION_RE.match(v))


async def dandiset_exists(dandiset_id: str, remote: Remote) -> bool:
    """Whether the bucket holds anything under `dandisets/<id>/` (every dandiset has a draft there)."""
    listing = await remote.s3.list_prefixes(f"dandisets/{dandiset_id}/", max_keys=1)
    return bool(listing.keys or listing.prefixes)


async def list_dandisets(remote: Remote, api_url: str) -> list[str]:
    """Every dandiset id, paging through the API (`/dandisets/`, 1,000 a page); when the API cannot
    be reached, from the bucket's `dandisets/` prefixes instead (logged)."""
    url: str | None = f"{api_url}/dandisets/?{urlencode({'page_size': API_PAGE_SIZE})}"
    ids: list[str] = []
    seen: set[str] = set()
    try:
        while url:
            if url in seen:
                raise RemoteError(f"API pagination loops at {url}")
            seen.add(url)
            page = await _api_json(remote, url, "the list of dandisets")
            for row in page.get("results") or []:
                identifier = row.get("identifier") if isinstance(row, dict) else None
                if isinstance(identifier, str) and DANDISET_ID_RE.match(identifier):
                    ids.append(identifier)
            url = _next_page(page, url)
    except (RemoteError, VersionNotFound) as e:
        log.warning("cannot list dandisets through the API (%s); listing the bucket instead", e)
        listing = await remote.s3.list_prefixes("dandisets/")
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in listing.prefixes)
        return sorted(n for n in names if DANDISET_ID_RE.match(n))
    return sorted(set(ids))


def _next_page(page: dict[str, Any], url: str) -> str | None:
    """The `next` link of a page of the API's paginated lists (None on the last page); a link that
    is not an http(s) URL is a RemoteError (EIO), never a crash."""
    nxt = page.get("next")
    if nxt is None or nxt == "":
        return None
    try:
        parts = urlsplit(nxt) if isinstance(nxt, str) else None
        valid = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        valid = False
    if not valid:
        raise RemoteError(f"{url}: the API's next page is not an http(s) URL: {nxt!r:.200}")
    assert isinstance(nxt, str)
    return nxt


async def zarr_current_checksum(zarr_id: str, remote: Remote, api_url: str) -> str | None:
    """The checksum of a Zarr's live state as the API reports it, when the Zarr is finalized."""
    info = await _api_json(remote, f"{api_url}/zarr/{zarr_id}/", f"zarr {zarr_id}")
    checksum = info.get("checksum")
    if (
        info.get("status") != "Complete"
        or not isinstance(checksum, str)
        or not is_checksum(checksum)
    ):
        return None
    return checksum


async def _draft_assets(source: Source, remote: Remote, api_url: str) -> list[AssetRecord]:
    query = urlencode({"metadata": "true", "page_size": API_PAGE_SIZE})
    url: str | None = f"{api_url}/dandisets/{source.dandiset_id}/versions/draft/assets/?{query}"
    what = f"dandiset {source.dandiset_id} version draft"
    records: list[object] = []
    seen_pages: set[str] = set()
    while url:
        if url in seen_pages:
            raise RemoteError(f"API pagination loops at {url}")
        seen_pages.add(url)
        page = await _api_json(remote, url, what)
        for row in page.get("results") or []:
            if not isinstance(row, dict):
                raise RemoteError(f"{url}: an asset row is not a JSON object: {row!r:.80}")
            records.append(_record_from_api_row(row))
        url = _next_page(page, url)
        if url and "metadata" not in parse_qs(urlsplit(url).query):
            url += ("&" if "?" in url else "?") + "metadata=true"
    assets = parse_asset_records(records)
    pinned: dict[int, AssetRecord] = {}
    limiter = trio.CapacityLimiter(_API_CONCURRENCY)

    async def pin(i: int, asset: AssetRecord) -> None:
        async with limiter:
            pinned[i] = await _pin_draft_zarr(asset, remote, api_url)

    async with trio.open_nursery() as nursery:
        for i, asset in enumerate(assets):
            if asset.is_zarr and asset.zarr_id:
                nursery.start_soon(pin, i, asset)
    return [pinned.get(i, a) for i, a in enumerate(assets)]


def _record_from_api_row(row: dict[str, Any]) -> dict[str, Any]:
    """An API asset row -> an `assets.jsonld`-shaped record (its metadata, completed from the row)."""
    metadata = row.get("metadata")
    record = dict(metadata) if isinstance(metadata, dict) else {}
    record.setdefault("path", row.get("path"))
    record.setdefault("identifier", row.get("asset_id"))
    record.setdefault("contentSize", row.get("size"))
    record.setdefault("dateModified", row.get("modified"))
    if row.get("zarr") and not record.get("contentUrl"):
        record["encodingFormat"] = ZARR_MEDIA_TYPE
        record["contentUrl"] = [f"https://dandiarchive.s3.amazonaws.com/zarr/{row['zarr']}/"]
    return record


async def _pin_draft_zarr(asset: AssetRecord, remote: Remote, api_url: str) -> AssetRecord:
    """Pin a draft Zarr to the checksum the API reports for it now."""
    url = f"{api_url}/zarr/{asset.zarr_id}/"
    try:
        info = await remote.http.get_json(url)
    except (ObjectMissing, RemoteError) as e:
        return replace(asset, zarr_checksum=None, problem=f"cannot pin draft Zarr ({url}): {e}")
    if not isinstance(info, dict):
        return replace(asset, zarr_checksum=None, problem=f"{url} did not return a JSON object")
    status, checksum = info.get("status"), info.get("checksum")
    if status != "Complete" or not isinstance(checksum, str) or not is_checksum(checksum):
        return replace(
            asset,
            zarr_checksum=None,
            problem=f"draft Zarr is not finalized (status {status!r}, checksum {checksum!r})",
        )
    return replace(asset, zarr_checksum=checksum, problem=None, live=True)
