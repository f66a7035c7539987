"""The Zarr checksum as a string: `<md5>-<file count>--<total bytes>`. Recognising and reading it.

Owns: the format of the checksum DANDI names every Zarr state by (see `manifest` for computing one)
and the checksum of the empty Zarr. Pure and light: imported at start-up by everything that only
needs to recognise a checksum, so that the manifest machinery (numpy, pyarrow, zarr_checksum) is
imported only when a Zarr is first entered.
"""

from __future__ import annotations

import re

#: The checksum of a Zarr with no files (what `zarr_checksum` computes for an empty tree).
EMPTY_CHECKSUM = "481a2f77ab786a0f45aafd5db0971caa-0--0"
_CHECKSUM_RE = re.compile(r"^([0-9a-f]{32})-([0-9]+)--([0-9]+)\Z")


def is_checksum(text: str) -> bool:
    """True if `text` has the form `<md5>-<count>--<size>`."""
    return bool(_CHECKSUM_RE.match(text))


def parse_checksum(text: str) -> tuple[int, int]:
    """(file count, total size) of a Zarr checksum; ValueError if malformed."""
    m = _CHECKSUM_RE.match(text)
    if m is None:
        raise ValueError(f"not a Zarr checksum: {text!r:.80}")
    return int(m.group(2)), int(m.group(3))
