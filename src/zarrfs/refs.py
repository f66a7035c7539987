"""`ObjectRef`: the value object naming one immutable object version in the bucket.

Owns only that type, so that the pure namespace (`tree`) and the block cache can name objects without
importing the S3 client. No I/O, no dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """One immutable object version in the configured bucket."""

    key: str
    #: None: the key itself is immutable (blobs), so the current version is read.
    version_id: str | None
    size: int
    #: Expected ETag without quotes; None skips the ETag check.
    etag: str | None
