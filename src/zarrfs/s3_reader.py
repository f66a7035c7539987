"""Ranged GETs of exact S3 object versions, verified, retried, with errors translated.

Owns: the only aiobotocore client of zarrfs (on trio, through aiobotocore's httpx backend;
botocore's own retries are off because `retry.retry` retries), the verification of every response
against the `ObjectRef` it was asked for (length, Content-Range total, VersionId, ETag), and the
translation of S3 and transport failures into `ObjectMissing`, `IntegrityError` and `RemoteError`.

Never does: let botocore types or errors escape (callers see bytes and zarrfs errors), inode or path
logic, caching (see `chunk_cache`), or return bytes that failed a check. It never reads the newest
version of a key when a VersionId was given.

Concurrency: one `trio.CapacityLimiter(settings.max_concurrency)` per reader bounds the requests in
flight (a slot is held for one attempt, body included, never during a back-off sleep); the client is
shared by all tasks of the one trio run that opened it.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import botocore
import botocore.exceptions
import trio
from aiobotocore.config import AioConfig
from aiobotocore.httpxsession import HttpxSession
from aiobotocore.session import get_session

from zarrfs import config
from zarrfs.config import S3Settings
from zarrfs.errors import DataError, IntegrityError, ObjectMissing, RemoteError, ZarrfsError
from zarrfs.refs import ObjectRef
from zarrfs.retry import retry

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Bytes per read of a streamed download body (and per file write).
DOWNLOAD_CHUNK = 1 << 20

#: S3 error codes worth another attempt (besides any 5xx status and 429).
RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequestsException",
        "PriorRequestNotComplete",
    }
)
#: S3 error codes meaning "that object (version) does not exist".
MISSING_CODES = frozenset({"NoSuchKey", "NoSuchVersion", "NotFound", "NoSuchBucket", "404"})

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_ETAG = re.compile(r"^[0-9a-f]{32}-[0-9]+$")


class _HttpxSession(HttpxSession):  # type: ignore[misc]
    """aiobotocore's httpx backend, minus its warning that the `httpx2` fork is preferred.

    Both packages work on trio; zarrfs depends on `httpx`. The constructor is synchronous, so the
    temporary warning filter cannot leak into other tasks.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*prefers httpx2", category=DeprecationWarning
            )
            super().__init__(*args, **kwargs)


def etag_form(etag: str) -> str:
    """`md5` (single-part), `multipart` (`<md5>-<parts>`) or `other`."""
    if _MD5_ETAG.match(etag):
        return "md5"
    if _MULTIPART_ETAG.match(etag):
        return "multipart"
    return "other"


def _strip_etag(etag: str) -> str:
    etag = etag.strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag.strip('"').lower()


def _describe(bucket: str, key: str, version_id: str | None) -> str:
    return f"s3://{bucket}/{key} (version {version_id or 'current'})"


def _error_code(exc: botocore.exceptions.ClientError) -> tuple[str, int]:
    err = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    return str(err.get("Code", "")), int(meta.get("HTTPStatusCode") or 0)


def is_retryable(exc: BaseException) -> bool:
    """Transient failures: 5xx/429 and throttling codes, transport errors, truncated bodies."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code, status = _error_code(exc)
        return code in RETRYABLE_CODES or status >= 500 or status == 429
    if isinstance(exc, botocore.exceptions.SSLError):
        return False
    return isinstance(
        exc,
        (
            botocore.exceptions.HTTPClientError,  # includes read timeouts and broken bodies
            botocore.exceptions.ConnectionError,  # includes connect timeouts
            botocore.exceptions.IncompleteReadError,
        ),
    )


def _translate(exc: Exception, what: str, version_id: str | None) -> Exception:
    """A non-retryable botocore error as a zarrfs error (retryable ones are returned unchanged)."""
    if is_retryable(exc) or isinstance(exc, ZarrfsError):
        return exc
    if isinstance(exc, botocore.exceptions.ClientError):
        code, status = _error_code(exc)
        message = str(exc.response.get("Error", {}).get("Message", ""))
        headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        if code in MISSING_CODES or status == 404:
            return ObjectMissing(f"{what}: no such object or version ({code or status})")
        if status == 405 and str(headers.get("x-amz-delete-marker", "")).lower() == "true":
            return ObjectMissing(f"{what}: that version is a delete marker")
        if code == "InvalidArgument" and version_id is not None and "version" in message.lower():
            return ObjectMissing(f"{what}: invalid version id ({message})")
        if code == "InvalidRange" or status == 416:
            return IntegrityError(
                f"{what}: range not satisfiable: the object is shorter ({message})"
            )
        if code == "AccessDenied" or status == 403:
            return RemoteError(f"{what}: access denied ({code or status})")
        return RemoteError(f"{what}: S3 error {code or '?'} (HTTP {status}): {message}")
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return RemoteError(f"{what}: {type(exc).__name__}: {exc}")
    return exc


class S3Reader:
    """Reads exact object versions from one bucket: `async with S3Reader.open(settings) as r`."""

    def __init__(self, client: Any, settings: S3Settings) -> None:
        self._client = client
        self.settings = settings
        self.bucket = settings.bucket
        self._limiter = trio.CapacityLimiter(settings.max_concurrency)

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: S3Settings) -> AsyncIterator[S3Reader]:
        """An anonymous (unless `settings.unsigned` is false) S3 client running on trio."""
        aio_config = AioConfig(
            http_session_cls=_HttpxSession,
            signature_version=botocore.UNSIGNED if settings.unsigned else None,
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=settings.max_concurrency,
            connect_timeout=settings.request_timeout,
            read_timeout=settings.request_timeout,
        )
        session = get_session()
        async with session.create_client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            config=aio_config,
        ) as client:
            yield cls(client, settings)

    # --- public API -------------------------------------------------------------------------------

    async def read_range(self, ref: ObjectRef, start: int, end: int) -> bytes:
        """Bytes [start, end) of exactly the object version `ref`, verified against `ref`."""
        if not 0 <= start <= end <= ref.size:
            raise ValueError(f"bad range [{start}, {end}) for {ref.key} of size {ref.size}")
        if start == end:
            return b""
        name = _describe(self.bucket, ref.key, ref.version_id)
        what = f"GET {name} bytes={start}-{end - 1}"
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": ref.key,
            "Range": f"bytes={start}-{end - 1}",
        }
        if ref.version_id is not None:
            params["VersionId"] = ref.version_id

        async def attempt() -> bytes:
            resp = await self._client.get_object(**params)
            body = resp["Body"]
            async with body:
                self._verify_headers(ref, start, end, resp, name)
                data: bytes = await body.read()
            self._check(name, "body length", end - start, len(data))
            return data

        return await self._retry(attempt, what, ref.version_id, self.settings.request_timeout)

    async def get_bytes(self, key: str, version_id: str | None = None) -> bytes:
        """A whole (small) object; the current version unless `version_id` is given."""
        name = _describe(self.bucket, key, version_id)
        what = f"GET {name}"
        params = self._params(key, version_id)

        async def attempt() -> bytes:
            resp = await self._client.get_object(**params)
            body = resp["Body"]
            async with body:
                self._verify_version(name, version_id, resp)
                data: bytes = await body.read()
            self._check(name, "body length", resp.get("ContentLength", len(data)), len(data))
            return data

        return await self._retry(attempt, what, version_id, self.settings.request_timeout)

    async def download(
        self,
        key: str,
        dest: Path,
        version_id: str | None = None,
        *,
        timeout: float = config.DOCUMENT_TIMEOUT,
    ) -> int:
        """Stream a whole object to `dest` (via `dest.part`, then atomic rename); return its size.

        The body is read in `DOWNLOAD_CHUNK` pieces, never held whole in memory. `timeout` bounds
        one attempt. Concurrent downloads to the same `dest` are the caller's to prevent.
        """
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        name = _describe(self.bucket, key, version_id)
        what = f"GET {name} -> {dest}"
        params = self._params(key, version_id)

        async def attempt() -> int:
            resp = await self._client.get_object(**params)
            body = resp["Body"]
            done = False
            written = 0
            try:
                async with body:
                    self._verify_version(name, version_id, resp)
                    async with await trio.open_file(part, "wb") as f:
                        while chunk := await body.read(DOWNLOAD_CHUNK):
                            await f.write(chunk)
                            written += len(chunk)
                self._check(name, "size", resp.get("ContentLength", written), written)
                os.replace(part, dest)
                done = True
            except OSError as e:  # the local disk, not S3: not retried, but never a raw OSError
                raise DataError(f"{what}: cannot write {part}: {e}") from e
            finally:
                if not done:
                    part.unlink(missing_ok=True)
            return written

        return await self._retry(attempt, what, version_id, timeout)

    # --- internals --------------------------------------------------------------------------------

    def _params(self, key: str, version_id: str | None) -> dict[str, Any]:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id is not None:
            params["VersionId"] = version_id
        return params

    async def _retry(
        self,
        attempt: Callable[[], Awaitable[T]],
        what: str,
        version_id: str | None,
        timeout: float,
    ) -> T:
        async def translated_attempt() -> T:
            try:
                return await attempt()
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                translated = _translate(exc, what, version_id)
                if translated is exc:
                    raise
                raise translated from exc

        return await retry(
            translated_attempt,
            what=what,
            max_attempts=self.settings.max_attempts,
            timeout=timeout,
            is_retryable=is_retryable,
            limiter=self._limiter,
        )

    def _fail(self, name: str, field: str, expected: object, got: object) -> IntegrityError:
        message = f"{name}: {field} mismatch: expected {expected!r}, got {got!r}"
        log.error("integrity check failed: %s", message)
        return IntegrityError(message)

    def _check(self, name: str, field: str, expected: object, got: object) -> None:
        if expected != got:
            raise self._fail(name, field, expected, got)

    def _verify_version(self, name: str, version_id: str | None, resp: Mapping[str, Any]) -> None:
        got = resp.get("VersionId")
        if version_id is not None and got != version_id:
            # absent counts as a mismatch: an endpoint that ignored ?versionId= served the live object
            raise self._fail(name, "VersionId", version_id, got)

    def _verify_headers(
        self, ref: ObjectRef, start: int, end: int, resp: Mapping[str, Any], name: str
    ) -> None:
        """Check a ranged GET's headers against `ref` before any body byte is read."""
        self._verify_version(name, ref.version_id, resp)
        got_etag = resp.get("ETag")
        if ref.etag is not None and ref.version_id is not None:
            # a pinned version's ETag was recorded from this very object: it must match exactly
            got = None if got_etag is None else _strip_etag(str(got_etag))
            if got != _strip_etag(ref.etag):
                raise self._fail(name, "ETag", _strip_etag(ref.etag), got)
        elif ref.etag is not None and got_etag is not None:
            # blobs: the record's dandi-etag is comparable only to an ETag of the same form
            expected, got = _strip_etag(ref.etag), _strip_etag(str(got_etag))
            if etag_form(expected) == etag_form(got) and expected != got:
                raise self._fail(name, "ETag", expected, got)
        content_range = resp.get("ContentRange")
        if content_range is None:
            # A 200 with the whole object: only acceptable when the whole object was asked for.
            self._check(name, "object size (Content-Length)", ref.size, resp.get("ContentLength"))
            if (start, end) != (0, ref.size):
                raise RemoteError(f"{name}: the server ignored the Range header")
            return
        m = _CONTENT_RANGE.match(str(content_range).strip())
        if m is None:
            raise self._fail(
                name, "Content-Range", f"bytes {start}-{end - 1}/{ref.size}", content_range
            )
        total = m.group(3)
        self._check(
            name,
            "object size (Content-Range total)",
            ref.size,
            int(total) if total != "*" else total,
        )
        self._check(name, "Content-Range", (start, end - 1), (int(m.group(1)), int(m.group(2))))
        self._check(name, "Content-Length", end - start, resp.get("ContentLength"))
