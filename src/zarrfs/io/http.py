"""Plain HTTP(S) GETs of documents: the DANDI API, DataLad's manifest mirror, other metadata.

Owns: the `httpx.AsyncClient` of documents (httpx runs on trio; `s3_reader` has its own for
objects), how much httpcore reads from a socket at a time (`widen_socket_reads`, for both),
retries of transient failures through `retry.retry` (transport errors, timeouts, 5xx, 429) and the translation of HTTP failures
into zarrfs errors (404/410 -> `ObjectMissing`, any other 4xx -> `RemoteError`).

Never does: S3 object versions (see `s3_reader`), caching, writing to disk, or interpretation of
what it fetched beyond JSON decoding.

Concurrency: one client (one connection pool) per `HttpClient`, shared by all tasks of the trio run
that opened it; a `scheduler.RequestSlots` bounds the requests in flight (every request here is one
a lookup waits for: demand priority). API answers are bounded in size
(`config.MAX_API_RESPONSE_BYTES`), documents by the caller's `max_bytes`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import trio

from zarrfs import config
from zarrfs.errors import DocumentTooLarge, ObjectMissing, RemoteError
from zarrfs.io.retry import retry
from zarrfs.io.scheduler import Priority, RequestSlots, Ticket

log = logging.getLogger(__name__)

T = TypeVar("T")


class HttpStatusError(Exception):
    """A retryable HTTP status (5xx, 429); never leaves this module (it becomes a `RemoteError`)."""

    def __init__(self, url: str, status: int) -> None:
        super().__init__(f"HTTP {status} from {url}")
        self.status = status


def widen_socket_reads(size: int = config.HTTP_READ_SIZE) -> None:
    """Let httpcore read up to `size` bytes from a socket at a time (its default is 64 KiB):
    every read costs a pass through httpcore, h11 and trio, so a body at 100+ MB/s costs the event
    loop a fifth less CPU in reads of 256 KiB. Process-wide (httpcore has no per-client setting;
    the value is a class attribute its HTTP/1.1 connections read on every receive), it only raises
    the ceiling of a read and never lowers one somebody else raised. Called before a client of
    zarrfs is made."""
    try:
        from httpcore._async.http11 import AsyncHTTP11Connection
    except ImportError:  # httpcore reorganised: keep its default
        log.debug("httpcore has no AsyncHTTP11Connection: socket reads stay at its default")
        return
    if getattr(AsyncHTTP11Connection, "READ_NUM_BYTES", size) < size:
        AsyncHTTP11Connection.READ_NUM_BYTES = size


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
        self.slots = RequestSlots(max_concurrency, background_max=max(1, max_concurrency - 2))

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        *,
        max_attempts: int = config.MAX_ATTEMPTS,
        timeout: float = config.REQUEST_TIMEOUT,
        max_concurrency: int = config.MAX_CONCURRENT_HTTP,
    ) -> AsyncIterator[HttpClient]:
        """`timeout` bounds one attempt of a small GET and each connect/read/write wait (a stall)
        of a download, which has no total deadline."""
        widen_socket_reads()
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

    async def get_bytes(
        self,
        url: str,
        *,
        max_bytes: int = config.MAX_API_RESPONSE_BYTES,
        document: bool = False,
    ) -> bytes:
        """The whole body of `url`, at most `max_bytes` (more is refused at once: DocumentTooLarge,
        not retried). An API call's attempt has a deadline of `timeout`; a `document` (a manifest,
        which may be big) has no total deadline, only a bound on each wait for bytes (a stall)."""

        async def attempt() -> bytes:
            async with self._client.stream("GET", url) as response:
                _check_status(url, response)
                _check_size(url, _content_length(response), max_bytes)
                chunks = []
                size = 0
                async for chunk in response.aiter_bytes(config.DOWNLOAD_CHUNK):
                    size += len(chunk)
                    _check_size(url, size, max_bytes)
                    chunks.append(chunk)
                return b"".join(chunks)

        timeout = None if document else self.timeout
        return await self._retry(attempt, f"GET {url}", timeout, Priority.DEMAND)

    async def get_json(self, url: str) -> Any:
        """`url` decoded as JSON; a body that is not JSON is a `RemoteError`."""
        data = await self.get_bytes(url)
        try:
            if len(data) > config.JSON_IN_THREAD:
                return await trio.to_thread.run_sync(json.loads, data, abandon_on_cancel=True)
            return json.loads(data)
        except ValueError as exc:
            raise RemoteError(f"GET {url}: response is not JSON: {exc}") from exc

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
            except (httpx.InvalidURL, UnicodeError) as e:  # not HTTPErrors: a malformed URL (the
                # API's own `next` link, say) is an answer we cannot use: EIO, never a crash
                raise RemoteError(f"{what}: invalid URL: {e}") from e

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
