"""SOURCE: what the user asks to mount or list, in every spelling the ecosystem uses.

Owns: the patterns of dandiset ids and published versions, the DANDI instance names, and
`parse_source` (`dandi`, `000123`, `000123@0.251101.1200`, `DANDI:000123/draft`, dandiarchive.org
URLs, the dandi CLI's `dandi://dandi/000123@VERSION/PATH`) into a `config.MountSource`. Pure: no
I/O; nothing is normalized (a PATH with `.`/`..` is refused).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from zarrfs.base.names import path_problem
from zarrfs.config import MountSource
from zarrfs.errors import SourceError

DANDISET_ID_RE = re.compile(r"^[0-9]{6}\Z")
PUBLISHED_VERSION_RE = re.compile(r"^0\.[0-9]{6}\.[0-9]{4}\Z")


#: The dandi CLI's instance name of the public archive (`dandi://dandi/...`).
INSTANCE_NAMES = ("dandi",)
_ACCEPTED = (
    "expected dandi (the whole archive), DANDISET (every version: 000123), DANDISET@VERSION "
    "(000123@0.251101.1200, 000123@draft, 000123@latest), DANDI:DANDISET[/VERSION], "
    "https://dandiarchive.org/dandiset/DANDISET/VERSION, or the dandi CLI's "
    "dandi://dandi[/DANDISET[@VERSION][/PATH]]"
)


def parse_source(text: str) -> MountSource:
    """Parse what to mount: `dandi` or `dandi://dandi` (the whole archive), `000123` or
    `DANDI:000123` (every version), `000123@0.251101.1200`, `DANDI:000123/0.251101.1200`, a
    dandiarchive.org URL, or the dandi CLI's `dandi://dandi/000123@VERSION/PATH` (PATH: a directory
    of the version, possibly inside a Zarr; it needs a version).

    VERSION is a published version (`0.YYMMDD.HHMM`), `draft` or `latest`. Raises SourceError with a
    message showing the accepted forms. Nothing is normalized: a PATH with `.`/`..` is refused.
    """
    t = text.strip()
    dandiset: str | None = None
    version: str | None = None
    path = ""
    if t.lower() in INSTANCE_NAMES:
        return MountSource()
    if t.lower().startswith("dandi://"):
        instance, _, rest = t[len("dandi://") :].partition("/")
        if instance.lower() not in INSTANCE_NAMES:
            raise SourceError(
                f"unknown DANDI instance {instance!r} in {text!r}: zarrfs knows "
                f"{', '.join(INSTANCE_NAMES)} (point --bucket and --api-url at another instance)"
            )
        rest = rest.strip("/")
        if not rest:
            return MountSource()
        head, _, path = rest.partition("/")
        dandiset, _, version_text = head.partition("@")
        version = version_text if "@" in head else None
        if path and version is None:
            raise SourceError(
                f"{text!r} names a path but no version: use dandi://dandi/{dandiset}@VERSION/{path}"
            )
    elif (m := re.match(r"^(?:dandi:)?([0-9]+)(?:@([^/@\s]+)(/.*)?)?\Z", t, re.IGNORECASE)) or (
        m := re.match(r"^DANDI:([0-9]+)(?:/([^/\s]+)(/.*)?)?\Z", t, re.IGNORECASE)
    ):
        dandiset, version, path = m.group(1), m.group(2), (m.group(3) or "")[1:].rstrip("/")
    elif t.startswith(("https://", "http://")):
        try:
            url = urlsplit(t)
            host = url.hostname or ""
        except ValueError:  # e.g. a malformed IPv6 host
            url, host = urlsplit(""), ""
        parts = [p for p in url.path.split("/") if p]
        if host.endswith("dandiarchive.org") and len(parts) >= 3 and parts[0] == "dandiset":
            dandiset, version = parts[1], parts[2]
        elif host.endswith("dandiarchive.org") and len(parts) == 2 and parts[0] == "dandiset":
            raise SourceError(
                f"{text!r} names no version: append /<version>, /draft or /latest (or mount "
                f"{parts[1]} for every version)"
            )
    if dandiset is None:
        raise SourceError(f"cannot parse SOURCE {text!r}: {_ACCEPTED}")
    if not DANDISET_ID_RE.match(dandiset):
        raise SourceError(
            f"bad dandiset id {dandiset!r} in {text!r}: expected six digits, e.g. 000123"
        )
    if version is not None:
        version = version.lower() if version.lower() in ("draft", "latest") else version
        if version not in ("draft", "latest") and not PUBLISHED_VERSION_RE.match(version):
            raise SourceError(
                f"bad version {version!r} in {text!r}: expected 0.YYMMDD.HHMM, 'draft' or 'latest'"
            )
    if path and (why := path_problem(path)) is not None:
        raise SourceError(f"bad path {path!r} in {text!r}: {why}")
    return MountSource(dandiset, version, path)
