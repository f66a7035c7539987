"""`ObjectRef`: the value object naming one immutable object version in the bucket.

Owns only that type, so that the pure namespace (`tree`) and the block cache can name objects without
importing the S3 client. No I/O, no dependencies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The largest size or time (ns) a file may show: what an int64 holds.
INT64_MAX = (1 << 63) - 1
_MD5 = re.compile(r"^[0-9a-f]{32}\Z")


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """One immutable object version in the configured bucket."""

    key: str
    #: None: the key itself is immutable (blobs), so the current version is read.
    version_id: str | None
    size: int
    #: Expected ETag without quotes; None skips the ETag check.
    etag: str | None

    def md5(self) -> str | None:
        """The MD5 of the whole object when the ETag is a plain MD5 (a single-part upload), which
        lets a GET of the whole object be verified byte for byte; else None."""
        if self.etag is None:
            return None
        etag = self.etag.strip().strip('"').lower()
        return etag if _MD5.match(etag) else None
