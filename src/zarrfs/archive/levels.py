"""The archive's levels above the dandiset versions: which names can exist where. Pure.

Owns: the layout of an archive mount (the WebDAV service's, so that old paths keep working), of a
dandiset mount, and the rule for every name at every level, as `NodeKey`s:

    <archive>/dandisets/<id>/draft/...                    a version (pinned when first entered)
    <archive>/dandisets/<id>/latest -> releases/<newest>   a symbolic link
    <archive>/dandisets/<id>/releases/<version>/...        every published version
    <archive>/zarrs/<z[0:3]>/<z[3:6]>/<zarr_id>/<checksum>.zarr/...   any Zarr at any checksum
    <dandiset>/<version>/... and <dandiset>/draft/...      a dandiset mount

`child_key` says what a name would be (None: it can never exist: a permanent ENOENT); whether it
does exist is the catalog's question. Which levels may change (their listings and negative lookups
are cached for a bounded time, never by the kernel for the life of the mount) and which are volumes
(a resolved version, or one Zarr) is said here too. No I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from zarrfs.archive.sources import DANDISET_ID_RE, PUBLISHED_VERSION_RE
from zarrfs.base.refs import UUID_RE
from zarrfs.manifests.checksums import is_checksum

_HEX3 = re.compile(r"^[0-9a-f]{3}\Z")
ZARR_SUFFIX = ".zarr"


class Level(Enum):
    ARCHIVE = "archive"  # root of a `dandi` mount: dandisets/, zarrs/
    DANDISETS = "dandisets"  # one directory per dandiset
    DANDISET = "dandiset"  # draft/, latest, releases/
    DANDISET_VERSIONS = "dandiset-versions"  # root of a `000123` mount: every version, and draft/
    RELEASES = "releases"  # one directory per published version
    LATEST = "latest"  # a symbolic link to releases/<newest>
    VERSION = "version"  # a volume: one dandiset version
    ZARRS = "zarrs"  # z[0:3]
    ZARRS_PREFIX = "zarrs-prefix"  # z[3:6]
    ZARRS_IDS = "zarrs-ids"  # one directory per Zarr id
    ZARR_CHECKSUMS = "zarr-checksums"  # <checksum>.zarr
    ZARR = "zarr"  # a volume: one Zarr at one checksum


@dataclass(frozen=True, slots=True)
class NodeKey:
    """A node of the levels: its level and what it names (a prefix, for the zarrs/ levels)."""

    level: Level
    dandiset_id: str = ""
    version: str = ""
    zarr: str = ""  # z[0:3], z[0:6] or the Zarr id
    checksum: str = ""

    @property
    def is_volume(self) -> bool:
        return self.level in (Level.VERSION, Level.ZARR)


ARCHIVE = NodeKey(Level.ARCHIVE)


def child_key(parent: NodeKey, name: str) -> NodeKey | None:
    """What `name` in `parent` would be, or None when it can never exist there."""
    level = parent.level
    if level == Level.ARCHIVE:
        return {"dandisets": NodeKey(Level.DANDISETS), "zarrs": NodeKey(Level.ZARRS)}.get(name)
    if level == Level.DANDISETS:
        return NodeKey(Level.DANDISET, name) if DANDISET_ID_RE.match(name) else None
    if level == Level.DANDISET:
        if name == "draft":
            return NodeKey(Level.VERSION, parent.dandiset_id, "draft")
        if name == "releases":
            return NodeKey(Level.RELEASES, parent.dandiset_id)
        if name == "latest":
            return NodeKey(Level.LATEST, parent.dandiset_id)
        return None
    if level in (Level.DANDISET_VERSIONS, Level.RELEASES):
        if PUBLISHED_VERSION_RE.match(name) or (
            name == "draft" and level == Level.DANDISET_VERSIONS
        ):
            return NodeKey(Level.VERSION, parent.dandiset_id, name)
        return None
    if level == Level.ZARRS:
        return NodeKey(Level.ZARRS_PREFIX, zarr=name) if _HEX3.match(name) else None
    if level == Level.ZARRS_PREFIX:
        return NodeKey(Level.ZARRS_IDS, zarr=parent.zarr + name) if _HEX3.match(name) else None
    if level == Level.ZARRS_IDS:
        if UUID_RE.match(name) and name[:3] + name[3:6] == parent.zarr:
            return NodeKey(Level.ZARR_CHECKSUMS, zarr=name)
        return None
    if level == Level.ZARR_CHECKSUMS:
        checksum = name.removesuffix(ZARR_SUFFIX)
        if name.endswith(ZARR_SUFFIX) and is_checksum(checksum):
            return NodeKey(Level.ZARR, zarr=parent.zarr, checksum=checksum)
        return None
    return None  # volumes are served by their namespaces; a symbolic link has no children


def static_children(key: NodeKey) -> list[str] | None:
    """The names of a level whose listing needs no I/O, else None."""
    if key.level == Level.ARCHIVE:
        return ["dandisets", "zarrs"]
    return None


def latest_target(version: str) -> bytes:
    """What `latest` points to: a path relative to the dandiset's directory."""
    return f"releases/{version}".encode()


def publication_time_ns(version: str) -> int:
    """The publication time a version's name records (`0.YYMMDD.HHMM`, UTC), else 0."""
    if not PUBLISHED_VERSION_RE.match(version):
        return 0
    try:  # the pattern admits impossible dates and times, such as 0.231399.9999
        stamp = datetime.strptime(version[2:], "%y%m%d.%H%M").replace(tzinfo=UTC)
    except ValueError:
        return 0
    return int(stamp.timestamp()) * 1_000_000_000


def zarr_path(zarr_id: str, checksum: str) -> str:
    """Where a Zarr at a checksum lives in an archive mount (for log lines)."""
    return f"zarrs/{zarr_id[:3]}/{zarr_id[3:6]}/{zarr_id}/{checksum}{ZARR_SUFFIX}"
