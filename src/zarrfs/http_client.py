"""Plain HTTP(S) GETs of documents: the DANDI API, DataLad's manifest mirror, other metadata.

Owns: the only `httpx.AsyncClient` of zarrfs (httpx runs on trio), retries of transient failures
through `retry.retry` (transport errors, timeouts, 5xx, 429) and the translation of HTTP failures
into zarrfs errors (404/410 -> `ObjectMissing`, any other 4xx -> `RemoteError`).

Never does: S3 object versions (see `s3_reader`), caching, or interpretation of what it fetched
beyond JSON decoding. A download is written to `dest.part` and renamed into place only when
complete.

Concurrency: one client (one connection pool) per `HttpClient`, shared by all tasks of the trio run
that opened it; a `scheduler.RequestSlots` bounds the requests in flight and serves small GETs (API
calls a lookup waits for) before document downloads. Small GETs are bounded in size
(`config.MAX_API_RESPONSE_BYTES`), downloads by the caller's `max_bytes`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import trio

from zarrfs import config
from zarrfs.cache_dir import create_private_file
from zarrfs.errors import DataError, DocumentTooLarge, ObjectMissing, RemoteError
from zarrfs.retry import retry
from zarrfs.scheduler import Priority, RequestSlots, Ticket

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Bytes per chunk of a streamed download.
DOWNLOAD_CHUNK = 1 << 20
#: Bodies larger than this are JSON-decoded in a worker thread.
THREAD_DECODE_THRESHOLD = 1 << 20
#: Concurrent HTTP requests at most per client (documents are few and large).
MAX_CONCURRENT_HTTP = 8


class HttpStatusError(Exception):
    """A retryable HTTP status (5xx, 429); never leaves this module (it becomes a `RemoteError`)."""

    def __init__(self, url: str, status: int) -> None:
        super().__init__(f"HTTP {status} from {url}")
        self.status = status


def is_retryable(exc: BaseException) -> bool:
    """Transport errors (connect, read, protocol, timeouts) and 5xx/429 statuses."""
    return isinstance(exc, httpx.TransportError | HttpStatusError)


def _check_status(url: str, response: httpx.Response) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    if status in (404, 410):
        raise ObjectMissing(f"GET {url}: HTTP {status} (not found)")
    if status >= 500 or status == 429:
        raise HttpStatusError(url, status)
    raise RemoteError(f"GET {url}: HTTP {status} {response.reason_phrase}")


class HttpClient:
    """GETs documents over HTTP(S). Create with `async with HttpClient.open()`."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        max_attempts: int,
        timeout: float,
        max_concurrency: int,
    ) -> None:
        self._client = client
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.slots = RequestSlots(
            max_concurrency,
            background_max=max(1, max_concurrency - 2),
            document_max=max(1, min(4, max_concurrency - 2)),
        )

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        *,
        max_attempts: int = config.MAX_ATTEMPTS,
        timeout: float = config.REQUEST_TIMEOUT,
        max_concurrency: int = MAX_CONCURRENT_HTTP,
    ) -> AsyncIterator[HttpClient]:
        """`timeout` bounds one attempt of a small GET and each connect/read/write wait (a stall)
        of a download, which has no total deadline."""
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            follow_redirects=True,
            headers={"User-Agent": "zarrfs"},
        ) as client:
            yield cls(
                client,
                max_attempts=max_attempts,
                timeout=timeout,
                max_concurrency=max_concurrency,
            )

    async def get_bytes(self, url: str, *, max_bytes: int = config.MAX_API_RESPONSE_BYTES) -> bytes:
        """The whole body of `url` (a small document: at most `max_bytes`)."""

        async def attempt() -> bytes:
            async with self._client.stream("GET", url) as response:
                _check_status(url, response)
                _check_size(url, _content_length(response), max_bytes)
                chunks = []
                size = 0
                async for chunk in response.aiter_bytes(DOWNLOAD_CHUNK):
                    size += len(chunk)
                    _check_size(url, size, max_bytes)
                    chunks.append(chunk)
                return b"".join(chunks)

        return await self._retry(attempt, f"GET {url}", self.timeout, Priority.DEMAND)

    async def get_json(self, url: str) -> Any:
        """`url` decoded as JSON; a body that is not JSON is a `RemoteError`."""
        data = await self.get_bytes(url)
        try:
            if len(data) > THREAD_DECODE_THRESHOLD:
                return await trio.to_thread.run_sync(json.loads, data, abandon_on_cancel=True)
            return json.loads(data)
        except ValueError as exc:
            raise RemoteError(f"GET {url}: response is not JSON: {exc}") from exc

    async def download(self, url: str, dest: Path, *, max_bytes: int | None = None) -> int:
        """Stream `url` to `dest` (via `dest.part`, 0600, then an atomic rename); returns its size.
        No total deadline (each wait for bytes is bounded instead); more than `max_bytes` is refused
        at once (DocumentTooLarge, not retried)."""
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")

        async def attempt() -> int:
            async with self._client.stream("GET", url) as response:
                _check_status(url, response)
                _check_size(url, _content_length(response), max_bytes)
                done = False
                written = 0
                try:
                    part.unlink(missing_ok=True)
                    fd = create_private_file(part)
                    async with trio.wrap_file(os.fdopen(fd, "wb")) as f:
                        async for chunk in response.aiter_bytes(DOWNLOAD_CHUNK):
                            written += len(chunk)
                            _check_size(url, written, max_bytes)
                            await f.write(chunk)
                    os.replace(part, dest)
                    done = True
                except OSError as e:  # the local disk: not retried, never a raw OSError
                    raise DataError(f"GET {url}: cannot write {part}: {e}") from e
                finally:
                    if not done:
                        part.unlink(missing_ok=True)
                return written

        return await self._retry(attempt, f"GET {url} -> {dest}", None, Priority.DOCUMENT)

    async def _retry(
        self,
        attempt: Callable[[], Awaitable[T]],
        what: str,
        timeout: float | None,
        priority: Priority,
    ) -> T:
        async def translated() -> T:
            try:
                return await attempt()
            except httpx.HTTPError as e:
                if is_retryable(e):
                    raise
                # redirect loops, undecodable bodies, bad URLs: not worth retrying, still EIO
                raise RemoteError(f"{what}: {type(e).__name__}: {e}") from e

        return await retry(
            translated,
            what=what,
            max_attempts=self.max_attempts,
            timeout=timeout,
            is_retryable=is_retryable,
            slots=self.slots,
            ticket=Ticket(priority),
        )


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _check_size(url: str, size: int | None, max_bytes: int | None) -> None:
    if max_bytes is not None and size is not None and size > max_bytes:
        raise DocumentTooLarge(f"GET {url}: {size} bytes is more than the {max_bytes} allowed")
