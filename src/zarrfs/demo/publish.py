"""Publishing data of one's own as a dandiset version in a `LocalS3`, for tests and benchmarks that
need what the sample does not have (an xarray dataset, a real NWB file, a bigger array).

Owns: uploading each Zarr's files under `zarr/<new id>/` and writing its schema-2 manifest (named by
its checksum, as the archive does), uploading each blob under `blobs/...` as DANDI does (multipart,
DANDI's part sizes), and the two files a published version is resolved from
(`dandisets/<id>/<version>/assets.jsonld` and `dandiset.yaml`). Never overwrites a key it did not
create; builds nothing else of the archive (no draft, no API rows: `sample` does that). Uploads run
in a private thread pool.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from zarrfs.demo.sample import (
    PUBLIC_S3_URL,
    ManifestLeaf,
    blob_key,
    build_manifest,
    format_iso_seconds,
    format_manifest,
    manifest_key,
    to_yaml,
    upload_as_dandi,
)

if TYPE_CHECKING:
    from zarrfs.demo.locals3 import LocalS3

#: Concurrent uploads.
UPLOAD_THREADS = 16


@dataclass(frozen=True, slots=True)
class PublishedZarr:
    """One Zarr as published: where its objects and its manifest are."""

    path: str
    zarr_id: str
    checksum: str
    manifest_key: str
    files: dict[str, bytes]

    @property
    def prefix(self) -> str:
        """`zarr/<zarr id>/`: the live objects."""
        return f"zarr/{self.zarr_id}/"


def publish_zarrs(
    s3: LocalS3,
    dandiset_id: str,
    version: str,
    zarrs: Mapping[str, Mapping[str, bytes]],
    blobs: Mapping[str, bytes] | None = None,
) -> dict[str, PublishedZarr]:
    """Publish `version` of `dandiset_id` holding the Zarrs `zarrs` (asset path -> its files) and
    the blobs `blobs` (asset path -> bytes): each Zarr is uploaded under a new Zarr id and gets its
    manifest; the version's `assets.jsonld` and `dandiset.yaml` are written last."""
    client, bucket = s3.client, s3.bucket
    now = format_iso_seconds(datetime.now(UTC))
    published: dict[str, PublishedZarr] = {}
    records = [_upload_blob(s3, path, data, now) for path, data in sorted((blobs or {}).items())]
    for path, files in sorted(zarrs.items()):
        zarr_id = str(uuid.uuid4())

        def put(item: tuple[str, bytes], zarr_id: str = zarr_id) -> ManifestLeaf:
            name, body = item
            r = client.put_object(Bucket=bucket, Key=f"zarr/{zarr_id}/{name}", Body=body)
            return ManifestLeaf(name, r["VersionId"], now, len(body), r["ETag"].strip('"'))

        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            leaves = list(pool.map(put, files.items()))
        manifest = build_manifest(leaves)
        checksum = manifest["statistics"]["zarrChecksum"]
        key = manifest_key(zarr_id, checksum)
        client.put_object(Bucket=bucket, Key=key, Body=format_manifest(manifest).encode())
        published[path] = PublishedZarr(path, zarr_id, checksum, key, dict(files))
        records.append(
            {
                "identifier": str(uuid.uuid4()),
                "path": path,
                "contentSize": manifest["statistics"]["totalSize"],
                "encodingFormat": "application/x-zarr",
                "contentUrl": [f"{PUBLIC_S3_URL}/zarr/{zarr_id}/"],
                "digest": {"dandi:dandi-zarr-checksum": checksum},
                "dateModified": now,
            }
        )
    prefix = f"dandisets/{dandiset_id}/{version}/"
    metadata = {"identifier": f"DANDI:{dandiset_id}", "name": "published Zarrs", "version": version}
    client.put_object(Bucket=bucket, Key=prefix + "dandiset.yaml", Body=to_yaml(metadata).encode())
    client.put_object(
        Bucket=bucket, Key=prefix + "assets.jsonld", Body=json.dumps(records).encode()
    )
    return published


def _upload_blob(s3: LocalS3, path: str, data: bytes, now: str) -> dict[str, object]:
    """Upload `data` as DANDI uploads a blob; its asset record."""
    key = blob_key(str(uuid.uuid4()))
    etag, _ = upload_as_dandi(s3.client, s3.bucket, key, data)
    return {
        "identifier": str(uuid.uuid4()),
        "path": path,
        "contentSize": len(data),
        "encodingFormat": "application/x-nwb",
        "contentUrl": [f"{PUBLIC_S3_URL}/{key}"],
        "digest": {"dandi:dandi-etag": etag},
        "dateModified": now,
    }
