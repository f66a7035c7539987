"""Fetch a document named by URL, whatever its scheme: `s3://`, `http(s)://` or `file://`.

Owns: the dispatch of a URL to the one `S3Reader` (`s3://BUCKET/KEY`, BUCKET must be the configured
bucket), the one `HttpClient` (`http://`, `https://`) or the local filesystem (`file:///abs/path`,
read in a worker thread), with the same error types for all three (`ObjectMissing` when absent,
`DocumentTooLarge` past the caller's bound); and a best-effort listing of a "directory" at a URL (an
S3 prefix, a local directory, an autoindex page).

Never does: caching, parsing, retries of its own (the two clients retry), or talking to a second S3
endpoint.

Concurrency: the clients it holds bound their own requests; local file work runs in
`trio.to_thread.run_sync`, so the event loop never blocks on disk.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

import trio

from zarrfs.config import S3Settings
from zarrfs.errors import DocumentTooLarge, ObjectMissing, RemoteError
from zarrfs.io.http import HttpClient
from zarrfs.s3_reader import S3Reader


class Remote:
    """One `S3Reader` and one `HttpClient` behind URL-based `get_bytes` and `list_dir`."""

    def __init__(self, s3: S3Reader, http: HttpClient) -> None:
        self.s3 = s3
        self.http = http

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: S3Settings) -> AsyncIterator[Remote]:
        async with S3Reader.open(settings) as s3, HttpClient.open() as http:
            yield cls(s3, http)

    async def get_bytes(self, url: str, *, max_bytes: int) -> bytes:
        """The whole document at `url` (in memory; nothing is written to disk), at most
        `max_bytes` (more is refused with DocumentTooLarge). No total deadline: a big manifest on a
        slow link still arrives; a stall fails an attempt."""
        scheme = urlsplit(url).scheme.lower()
        if scheme == "s3":
            return await self.s3.get_bytes(self._s3_key(url), max_bytes=max_bytes)
        if scheme in ("http", "https"):
            return await self.http.get_bytes(url, max_bytes=max_bytes, document=True)
        if scheme == "file":
            path = _file_path(url)
            return await trio.to_thread.run_sync(
                _read_local, path, url, max_bytes, abandon_on_cancel=True
            )
        raise RemoteError(f"unsupported URL scheme {scheme!r}: {url}")

    async def list_dir(self, url: str, *, limit: int | None = None) -> list[str]:
        """Best effort: the names in the directory at `url` (a prefix for `s3://`, a directory for
        `file://`, an autoindex page's links for `http(s)://`), subdirectories with a trailing `/`;
        for `s3://`, at most about `limit` of them (enough to tell whether there are any). Raises
        ObjectMissing (or gives nothing) when there is no such directory, RemoteError when it
        cannot be listed."""
        scheme = urlsplit(url).scheme.lower()
        if scheme == "s3":
            prefix = self._s3_key(url.rstrip("/") + "/x")[:-1]
            listing = await self.s3.list_prefixes(prefix, max_keys=limit)
            return [p[len(prefix) :] for p in listing.prefixes] + [
                k[len(prefix) :] for k in listing.keys
            ]
        if scheme in ("http", "https"):
            page = await self.http.get_bytes(url.rstrip("/") + "/")
            links = _HREF.findall(page.decode("utf-8", "replace"))
            return sorted(
                {unquote(h) for h in links if "/" not in h.rstrip("/") and h[:1] not in "?#."}
            )
        if scheme == "file":
            path = _file_path(url)
            return await trio.to_thread.run_sync(_list_local, path, url, abandon_on_cancel=True)
        raise RemoteError(f"unsupported URL scheme {scheme!r}: {url}")

    def _s3_key(self, url: str) -> str:
        parts = urlsplit(url)
        bucket, key = parts.netloc, unquote(parts.path.lstrip("/"))
        if bucket != self.s3.bucket:
            raise RemoteError(
                f"{url}: bucket {bucket!r} is not the configured bucket {self.s3.bucket!r} "
                "(zarrfs talks to one S3 endpoint and bucket)"
            )
        if not key:
            raise RemoteError(f"{url}: no object key")
        return key


def _file_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise RemoteError(f"{url}: file URLs must be local (file:///abs/path)")
    path = Path(unquote(parts.path))
    if not path.is_absolute():
        raise RemoteError(f"{url}: file URLs need an absolute path")
    return path


_HREF = re.compile(r'href="([^"]+)"')


def _list_local(path: Path, url: str) -> list[str]:
    try:
        return sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except FileNotFoundError as exc:
        raise ObjectMissing(f"{url}: no such directory") from exc
    except OSError as exc:
        raise RemoteError(f"{url}: {exc}") from exc


def _read_local(path: Path, url: str, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DocumentTooLarge(f"{url}: {size} bytes is more than the {max_bytes} allowed")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise ObjectMissing(f"{url}: no such file") from exc
    except OSError as exc:
        raise RemoteError(f"{url}: {exc}") from exc
    if len(data) > max_bytes:  # it grew meanwhile
        raise DocumentTooLarge(f"{url}: more than the {max_bytes} bytes allowed")
    return data
