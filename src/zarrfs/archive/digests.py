"""The digests DANDI publishes, recomputed from bytes: for `zarrfs verify`.

Owns: DANDI's multipart part sizing (`dandi_part_sizes`: 64 MiB parts, at most 10,000 of them, as
dandischema's `PartGenerator`), a streaming hasher that yields the S3 ETag an object of those bytes
has (`EtagHasher`: the MD5 of the bytes for a single-part upload, `md5(concat(part md5s))-N` for a
multipart one), so that a file read through the mount can be checked against its published ETag or
`dandi:dandi-etag`. Pure; hashing is the caller's to run in a thread.
"""

from __future__ import annotations

import hashlib
import math

DEFAULT_PART_SIZE = 64 << 20
MAX_PARTS = 10_000


def dandi_part_sizes(size: int) -> list[int]:
    """Part sizes DANDI uses to upload `size` bytes (64 MiB parts, at most 10,000 of them)."""
    if size == 0:
        return []
    part_size = DEFAULT_PART_SIZE
    if math.ceil(size / part_size) >= MAX_PARTS:
        part_size = math.ceil(size / MAX_PARTS)
    quantity, final = divmod(size, part_size)
    if final == 0:
        final = part_size
    else:
        quantity += 1
    return [part_size] * (quantity - 1) + [final]


class EtagHasher:
    """Feed the bytes of an object in order; `etag(multipart)` is the ETag they make as one part
    (plain MD5) or as DANDI-sized parts (`<md5>-<parts>`)."""

    def __init__(self, size: int) -> None:
        self._whole = hashlib.md5(usedforsecurity=False)
        self._parts = dandi_part_sizes(size)
        self._part = hashlib.md5(usedforsecurity=False)
        self._part_left = self._parts[0] if self._parts else 0
        self._digests = b""

    def update(self, data: bytes) -> None:
        self._whole.update(data)
        view = memoryview(data)
        while view:
            take = min(len(view), self._part_left)
            self._part.update(view[:take])
            self._part_left -= take
            view = view[take:]
            if self._part_left == 0:
                self._digests += self._part.digest()
                self._part = hashlib.md5(usedforsecurity=False)
                done = len(self._digests) // 16
                self._part_left = self._parts[done] if done < len(self._parts) else 1 << 62

    def etag(self, multipart: bool) -> str:
        if not multipart:
            return self._whole.hexdigest()
        digest = hashlib.md5(self._digests, usedforsecurity=False).hexdigest()
        return f"{digest}-{len(self._digests) // 16}"
