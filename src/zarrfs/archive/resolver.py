"""Resolving a dandiset version to the pinned list of its assets, and the archive's lists.

Owns: resolving a version (a published one only from `dandisets/<id>/<version>/assets.jsonld` in the
bucket; `latest`, the newest version the bucket holds; `draft` through the REST API, each Zarr pinned
to the checksum it has at resolution time), its JSON form (for stored versions and draft pins), and
the archive's lists: the dandisets (API, with the bucket as fallback), a dandiset's published
versions and existence (bucket), a Zarr's current checksum (API). Parsing SOURCE is `sources`',
parsing asset records `assets`'. Never touches FUSE; reads remote data only through `io.remote.Remote`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit

import trio

from zarrfs import config
from zarrfs.archive.assets import (
    ZARR_MEDIA_TYPE,
    AssetRecord,
    parse_asset_records,
    read_asset_records,
)
from zarrfs.archive.sources import DANDISET_ID_RE, PUBLISHED_VERSION_RE
from zarrfs.config import MAX_API_RESPONSE_BYTES, MAX_ASSET_LIST_BYTES, Source
from zarrfs.errors import ObjectMissing, RemoteError, VersionNotFound, unwrap_single_exception
from zarrfs.manifests.checksums import is_checksum

if TYPE_CHECKING:  # the resolver is handed a Remote; importing it would pull in aiobotocore
    from zarrfs.io.remote import Remote

log = logging.getLogger(__name__)


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
    url: str | None = f"{api_url}/dandisets/?{urlencode({'page_size': config.API_PAGE_SIZE})}"
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
    query = urlencode({"metadata": "true", "page_size": config.API_PAGE_SIZE})
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
    limiter = trio.CapacityLimiter(config.API_CONCURRENCY)

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
