"""`ObjectRef`: the value object naming one immutable object version in the bucket; and the forms the
archive's identifiers take (ETags, UUIDs), each written once here.

Owns that type, so that the pure namespace and the block cache can name objects without importing
the S3 client, and the patterns every parser and check shares: a plain-MD5 ETag (a single-part
upload), a multipart ETag (`<md5>-<parts>`), a UUID (asset, blob and Zarr ids). No I/O, no
dependencies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The largest size or time (ns) a file may show: what an int64 holds.
INT64_MAX = (1 << 63) - 1
#: A plain MD5 in hex: the ETag of a single-part upload.
MD5_RE = re.compile(r"^[0-9a-f]{32}\Z")
#: A multipart ETag: the MD5 of the parts' MD5s, and the number of parts.
MULTIPART_ETAG_RE = re.compile(r"^([0-9a-f]{32})-([0-9]+)\Z")
#: A UUID as DANDI writes them (lower case, dashed), for use inside other patterns.
UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
UUID_RE = re.compile(rf"^{UUID_PATTERN}\Z")


def strip_etag(etag: str) -> str:
    """An ETag as compared: without `W/`, quotes and surrounding space, in lower case."""
    etag = etag.strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag.strip('"').lower()


def etag_form(etag: str) -> str:
    """`md5` (single-part), `multipart` (`<md5>-<parts>`) or `other`."""
    if MD5_RE.match(etag):
        return "md5"
    if MULTIPART_ETAG_RE.match(etag):
        return "multipart"
    return "other"


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
        etag = strip_etag(self.etag)
        return etag if MD5_RE.match(etag) else None
