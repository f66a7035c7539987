"""The Zarr checksum as a string: `<md5>-<file count>--<total bytes>`. Recognising and reading it.

Owns: the format of the checksum DANDI names every Zarr state by, the checksum of the empty Zarr, and
one directory's checksum from its files and subdirectories (`directory_digest`, what `parse` computes
bottom-up while it decodes a manifest). Pure and light: imported at start-up by everything that only
needs to recognise a checksum, so that the manifest machinery (numpy, pyarrow, zarr_checksum) is
imported only when a Zarr is first entered.
"""

from __future__ import annotations

import hashlib
import re
from json.encoder import encode_basestring_ascii

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


def directory_digest(
    files: list[tuple[str, str, int]], dirs: list[tuple[str, str, int, int]]
) -> tuple[str, int]:
    """A directory's Zarr checksum `<md5>-<count>--<size>` and its file count, from its files
    (name, ETag, size) and subdirectories (name, checksum, size, file count), each sorted by name.

    Byte for byte what `zarr_checksum`'s `ZarrChecksumManifest.generate_digest` computes (the MD5 of
    `{"directories":[...],"files":[...]}`, each item `{"digest":..,"name":..,"size":..}`, compact and
    ASCII-escaped), written directly instead of through `dataclasses.asdict` and `json.dumps`, which
    cost 40% of a big conversion. `zarr_checksum` stays the reference: the tests compare the two on
    many random trees, and `ManifestIndex.recompute_checksum` uses it.
    """
    enc = encode_basestring_ascii
    text = "".join(
        (
            '{"directories":[',
            ",".join(
                f'{{"digest":{enc(digest)},"name":{enc(name)},"size":{size}}}'
                for name, digest, size, _ in dirs
            ),
            '],"files":[',
            ",".join(
                f'{{"digest":{enc(etag)},"name":{enc(name)},"size":{size}}}'
                for name, etag, size in files
            ),
            "]}",
        )
    )
    count = len(files) + sum(d[3] for d in dirs)
    size = sum(f[2] for f in files) + sum(d[2] for d in dirs)
    md5 = hashlib.md5(text.encode("ascii"), usedforsecurity=False).hexdigest()
    return f"{md5}-{count}--{size}", count
