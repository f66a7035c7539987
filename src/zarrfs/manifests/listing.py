"""A Zarr's manifest built from the bucket itself, for a draft Zarr whose current checksum no manifest
root has yet.

Owns: turning the live objects under `zarr/<zarr_id>/` (ListObjectVersions: the latest version of
each key that is not deleted, with its VersionId, size, ETag and LastModified) into a schema-2
manifest document, built in memory as the listing streams in, in key order (about 150 bytes per key:
the document itself, no Python object per entry), and progress lines in the log for long listings
(keys listed, rate). No disk I/O: the caller keeps the document where it likes.

Never does: decide whether the result may be served. The caller (`manifest_cache`) parses it
like any downloaded manifest, which recomputes the Zarr checksum (`manifests.checksums`, checked
against the reference `zarr_checksum` package by the tests) and refuses it unless it equals the checksum the API reports for the Zarr (a Zarr edited while it
was listed does not add up, and is listed again).

Why streaming works: S3 lists keys in UTF-8 byte order, so all keys under one directory `d/` are
contiguous, and every JSON object of the nested manifest can be opened and closed exactly once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC

from zarrfs import config
from zarrfs.s3_reader import LiveObject, S3Reader

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ListingStats:
    """What one listing produced."""

    keys: int
    total_size: int
    requests: int
    seconds: float


def zarr_prefix(zarr_id: str) -> str:
    return f"zarr/{zarr_id}/"


async def manifest_from_listing(
    reader: S3Reader, zarr_id: str, *, what: str = ""
) -> tuple[bytes, ListingStats]:
    """List `zarr/<zarr_id>/`: its live state as a schema-2 manifest document (UTF-8 JSON)."""
    prefix = zarr_prefix(zarr_id)
    started = last_report = time.monotonic()
    keys = total = pages = 0
    parts: list[str] = []
    writer = _NestedWriter(parts.append)
    parts.append('{"schemaVersion": 2, "fields": ["versionId", "lastModified", "size", "ETag"], ')
    parts.append('"entries": {')
    async for page in reader.iter_live_versions(prefix):
        pages += 1
        for obj in page:
            writer.add(obj.key[len(prefix) :], _entry(obj))
            keys += 1
            total += obj.size
        now = time.monotonic()
        if now - last_report >= config.LISTING_PROGRESS_INTERVAL:
            last_report = now
            log.info(
                "listing %s (zarr %s): %d keys so far, %.0f keys/s",
                what or prefix,
                zarr_id,
                keys,
                keys / (now - started),
            )
    writer.close_all()
    statistics = {"entries": keys, "totalSize": total}
    parts.append('}, "statistics": ' + json.dumps(statistics) + "}")
    document = "".join(parts).encode("utf-8")
    del parts
    seconds = time.monotonic() - started
    log.info(
        "listed %s (zarr %s): %d keys, %d bytes, %d requests in %.1f s (%.0f keys/s)",
        what or prefix,
        zarr_id,
        keys,
        total,
        pages,
        seconds,
        keys / seconds if seconds else 0.0,
    )
    return document, ListingStats(keys=keys, total_size=total, requests=pages, seconds=seconds)


def _entry(obj: LiveObject) -> list[object]:
    modified = obj.last_modified.astimezone(UTC).isoformat()
    return [obj.version_id, modified, obj.size, obj.etag]


class _NestedWriter:
    """Writes `path -> value` pairs, given in S3 key order, as nested JSON objects (internal)."""

    def __init__(self, write: Callable[[str], object]) -> None:
        self._write = write
        self._open: list[str] = []  # directories currently open, outermost first
        self._first: list[bool] = [True]  # per open level: nothing written in it yet

    def add(self, path: str, value: list[object]) -> None:
        *dirs, name = path.split("/")
        common = 0
        while (
            common < len(self._open) and common < len(dirs) and self._open[common] == dirs[common]
        ):
            common += 1
        while len(self._open) > common:
            self._close()
        for directory in dirs[common:]:
            self._item(json.dumps(directory) + ": {")
            self._open.append(directory)
            self._first.append(True)
        self._item(json.dumps(name) + ": " + json.dumps(value))

    def close_all(self) -> None:
        while self._open:
            self._close()

    def _item(self, text: str) -> None:
        self._write(text if self._first[-1] else ", " + text)
        self._first[-1] = False

    def _close(self) -> None:
        self._write("}")
        self._open.pop()
        self._first.pop()
