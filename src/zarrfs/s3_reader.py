"""Ranged GETs of exact S3 object versions, verified, retried, scheduled, with errors translated;
and the two listings the archive needs (one level of a prefix; the live versions under a prefix).

Owns: the S3 protocol of zarrfs. Anonymous access (the public DANDI bucket, the default) reads
objects with plain GET and HEAD requests over one `httpx` client on trio (`AnonymousObjects`): a
request is a URL and a Range header, so botocore's per-request machinery (parameter validation,
endpoint rules, event hooks, response parsing: about 1 ms of CPU per GET here) is not paid for every
block, and aiobotocore is not even imported until a listing needs it (it is most of a mount's
start-up). Listings, and every request of a signed mount (`--signed`), go through the one aiobotocore
client (its httpx backend; botocore's own retries off because `retry.retry` retries), created on
first use. Also owned: the verification of every response
against the `ObjectRef` it was asked for (length, Content-Range total, VersionId, ETag, and the MD5 of
the body whenever a GET covers a whole object whose ETag is a plain MD5, hashed piece by piece as the
body arrives when our own HTTP client fetched a small one, and of a whole object's
CRC32, SHA-1 or SHA-256 when S3 has one for it, as botocore checks them), and the translation of S3
and transport failures into `ObjectMissing`, `IntegrityError` and `RemoteError`.

Never does: let botocore or httpx types or errors escape (callers see bytes and zarrfs errors), inode or path
logic, caching (see `io.blocks`), or return bytes that failed a check. It never reads the newest
version of a key when a VersionId was given. A body whose MD5 does not match is retried (it was
damaged in transit) and never returned.

Concurrency: every request holds one slot of a `scheduler.RequestSlots` shared by the whole reader
(its `Ticket` says demand or prefetch); a slot is held for one attempt, body included, never
during a back-off sleep. Downloads of documents have no total deadline but fail an attempt when the
body stalls for `request_timeout`, and stop at `max_bytes`. The client is shared by all tasks of the one
trio run that opened it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import logging
import os
import re
import ssl
import sys
import time
import urllib.parse
import warnings
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import trio

from zarrfs import config
from zarrfs.base.refs import ObjectRef, etag_form, strip_etag
from zarrfs.config import S3Settings
from zarrfs.errors import (
    DataError,
    DocumentTooLarge,
    IntegrityError,
    ObjectMissing,
    RemoteError,
    ZarrfsError,
)
from zarrfs.io.cache_dir import create_private_file
from zarrfs.io.http import widen_socket_reads
from zarrfs.io.retry import retry
from zarrfs.io.scheduler import Priority, RequestSlots, Ticket

log = logging.getLogger(__name__)

T = TypeVar("T")


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

_CONTENT_RANGE = re.compile(r"^bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)\Z")


#: Modules the aiobotocore client needs, imported in a worker thread before it is first created.
BOTOCORE_MODULES = ("aiobotocore.session", "aiobotocore.config", "aiobotocore.httpxsession")
#: Bytes of an S3 error response read at most (its XML names the error).
ERROR_BODY_MAX = 64 << 10
_XML_CODE = re.compile(rb"<Code>([^<]{1,200})</Code>")
_XML_MESSAGE = re.compile(rb"<Message>([^<]{0,2000})</Message>")


def _describe(bucket: str, key: str, version_id: str | None) -> str:
    return f"s3://{bucket}/{key} (version {version_id or 'current'})"


def _error_code(exc: Any) -> tuple[str, int]:
    """(code, HTTP status) of a botocore ClientError."""
    err = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    return str(err.get("Code", "")), int(meta.get("HTTPStatusCode") or 0)


#: `botocore.exceptions` once `import_botocore` has finished (a listing, or a signed mount), else
#: None: an anonymous mount that never listed has no botocore errors to recognise. Set on the trio
#: thread after the import, never read from `sys.modules`, where a module being imported in a worker
#: thread is half-initialized.
_botocore: Any = None


def _botocore_exceptions() -> Any:
    return _botocore


class S3ErrorResponse(Exception):
    """An error answer of S3 to a request made without botocore (`AnonymousObjects`). Never leaves
    this module (`_translate` turns it into a zarrfs error)."""

    def __init__(self, code: str, status: int, message: str, headers: Mapping[str, str]) -> None:
        super().__init__(f"{code or status}: {message}")
        self.code = code
        self.status = status
        self.message = message
        self.headers = headers


class CorruptBody(Exception):
    """A whole-object body whose MD5 is not its ETag: damaged in transit, worth another attempt.
    Never leaves this module (after the last attempt it becomes a `RemoteError`)."""


class Stalled(Exception):
    """No body bytes for `request_timeout` seconds; worth another attempt (stays in this module)."""


class Truncated(Exception):
    """A streamed body ended before its range did; worth another attempt (stays in this module)."""


def is_retryable(exc: BaseException) -> bool:
    """Transient failures: 5xx/429 and throttling codes, transport errors, truncated, stalled or
    damaged bodies."""
    if isinstance(exc, ZarrfsError):
        return False  # already an answer
    if isinstance(exc, CorruptBody | Stalled | Truncated):
        return True
    if isinstance(exc, S3ErrorResponse):
        return exc.code in RETRYABLE_CODES or exc.status >= 500 or exc.status == 429
    if isinstance(exc, httpx.TransportError):  # timeouts, resets, bodies cut short
        return not _is_tls_failure(exc)
    bce = _botocore_exceptions()
    if bce is None:
        return False
    if isinstance(exc, bce.ClientError):
        code, status = _error_code(exc)
        return code in RETRYABLE_CODES or status >= 500 or status == 429
    if isinstance(exc, bce.SSLError):
        return False
    return isinstance(
        exc,
        (
            bce.HTTPClientError,  # includes read timeouts and broken bodies
            bce.ConnectionError,  # includes connect timeouts
            bce.IncompleteReadError,
            bce.FlexibleChecksumError,  # a body damaged in transit, as CorruptBody
        ),
    )


def _is_tls_failure(exc: BaseException) -> bool:
    """A certificate the endpoint's TLS cannot be verified with: another attempt would fail the
    same way. (Other TLS errors, such as a record damaged in transit mid-body, are retried.)"""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLCertVerificationError | ssl.CertificateError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _translate(exc: Exception, what: str, version_id: str | None) -> Exception:
    """A non-retryable S3, transport or botocore error as a zarrfs error (retryable ones are
    returned unchanged)."""
    if is_retryable(exc) or isinstance(exc, ZarrfsError):
        return exc
    if isinstance(exc, S3ErrorResponse):
        return _s3_error(exc.code, exc.status, exc.message, exc.headers, what, version_id)
    if isinstance(exc, httpx.HTTPError):
        return RemoteError(f"{what}: {type(exc).__name__}: {exc}")
    bce = _botocore_exceptions()
    if bce is None:
        return exc
    if isinstance(exc, bce.ClientError):
        code, status = _error_code(exc)
        message = str(exc.response.get("Error", {}).get("Message", ""))
        headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        return _s3_error(code, status, message, headers, what, version_id)
    if isinstance(exc, bce.BotoCoreError):
        return RemoteError(f"{what}: {type(exc).__name__}: {exc}")
    return exc


def _s3_error(
    code: str,
    status: int,
    message: str,
    headers: Mapping[str, str],
    what: str,
    version_id: str | None,
) -> Exception:
    """An S3 error answer (not worth another attempt) as a zarrfs error."""
    if code in MISSING_CODES or status == 404:
        return ObjectMissing(f"{what}: no such object or version ({code or status})")
    if status == 405 and str(headers.get("x-amz-delete-marker", "")).lower() == "true":
        return ObjectMissing(f"{what}: that version is a delete marker")
    if code == "InvalidArgument" and version_id is not None and "version" in message.lower():
        return ObjectMissing(f"{what}: invalid version id ({message})")
    if code == "InvalidRange" or status == 416:
        return IntegrityError(f"{what}: range not satisfiable: the object is shorter ({message})")
    if code == "AccessDenied" or status == 403:
        return RemoteError(f"{what}: access denied ({code or status})")
    return RemoteError(f"{what}: S3 error {code or '?'} (HTTP {status}): {message}")


@dataclass(frozen=True, slots=True)
class ListResult:
    """One level of a prefix: full keys and common prefixes (each ending in `/`)."""

    keys: list[str]
    prefixes: list[str]


@dataclass(frozen=True, slots=True)
class LiveObject:
    """The live (latest, not deleted) version of one key, as ListObjectVersions reports it."""

    key: str
    version_id: str
    size: int
    etag: str
    last_modified: datetime


def parse_s3_timestamp(value: str) -> datetime:
    """A timestamp from an S3 response: the ISO 8601 form of XML listings by `fromisoformat` (about
    2.5× faster on a page of 1,000 versions than botocore's dateutil parser, which keeps the other
    forms, e.g. HTTP dates)."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is not None:
                return parsed
    import botocore.utils  # only listings parse timestamps, and they run on botocore

    result: datetime = botocore.utils.parse_timestamp(value)
    return result


def object_url(
    settings: S3Settings, key: str, version_id: str | None = None, *, regional: bool = True
) -> str:
    """The HTTPS URL of an object version: path-style under a configured endpoint, else the bucket's
    own AWS address (regional: what requests go to; `regional=False`: the global form DANDI's asset
    records use), pinned by `?versionId=` when given. Keys are percent-encoded as botocore does."""
    # `.` and `..` segments would be resolved away by any URL library: encoded, they name the key
    quoted = "/".join(
        segment.replace(".", "%2E") if segment in (".", "..") else segment
        for segment in urllib.parse.quote(key, safe="/~").split("/")
    )
    if settings.endpoint_url:
        url = f"{settings.endpoint_url.rstrip('/')}/{settings.bucket}/{quoted}"
    elif "." in settings.bucket:  # no wildcard certificate covers it: path-style, as botocore
        host = f"s3.{settings.region}.amazonaws.com" if regional else "s3.amazonaws.com"
        url = f"https://{host}/{settings.bucket}/{quoted}"
    elif regional:
        url = f"https://{settings.bucket}.s3.{settings.region}.amazonaws.com/{quoted}"
    else:
        url = f"https://{settings.bucket}.s3.amazonaws.com/{quoted}"
    if version_id is not None:
        url += "?versionId=" + urllib.parse.quote(version_id, safe="")
    return url


class _RunningMd5:
    """The MD5 of a body fed piece by piece as it arrives, on the event loop, with the nanoseconds
    it took: for small whole objects (`config.HASH_AS_IT_ARRIVES_MAX`), whose hash (some 0.4 ms per
    256 KiB) costs less than a hop to a worker thread after the last byte."""

    __slots__ = ("_hash", "ns")

    def __init__(self) -> None:
        self._hash = hashlib.md5(usedforsecurity=False)
        self.ns = 0

    def update(self, data: bytes) -> None:
        started = time.perf_counter_ns()
        self._hash.update(data)
        self.ns += time.perf_counter_ns() - started

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _Body:
    """A streamed response body as S3Reader reads it (`read(amt)`: at most `amt` bytes as they
    come; `read()`: the rest, fed to `md5` piece by piece as it arrives when one is given), closing
    the response on exit."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._chunks = response.aiter_raw()
        self._buffer = b""

    async def __aenter__(self) -> _Body:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._chunks.aclose()  # type: ignore[attr-defined]
        finally:
            await self._response.aclose()

    async def read(self, amt: int | None = None, *, md5: _RunningMd5 | None = None) -> bytes:
        if amt is not None and md5 is not None:
            raise ValueError("a body is hashed as it arrives only when read whole")
        if amt is None:
            parts = [self._buffer]
            self._buffer = b""
            if md5 is not None:
                md5.update(parts[0])  # what read(amt) left, if anything: it comes first
            async for chunk in self._chunks:
                parts.append(chunk)
                if md5 is not None:
                    md5.update(chunk)
            return b"".join(parts)
        if not self._buffer:
            self._buffer = await anext(self._chunks, b"")
        if len(self._buffer) <= amt:
            out, self._buffer = self._buffer, b""
        else:
            out, self._buffer = self._buffer[:amt], self._buffer[amt:]
        return out


class AnonymousObjects:
    """GetObject and HeadObject of a public bucket as plain HTTP requests (no signature), answered
    in the shape of aiobotocore's client (the keys S3Reader reads: `Body`, `ContentLength`,
    `ContentRange`, `ETag`, `VersionId`, `ChecksumCRC32`...); an S3 error answer is raised as
    `S3ErrorResponse`, a transport failure as httpx's error."""

    def __init__(self, http: httpx.AsyncClient, settings: S3Settings) -> None:
        self.http = http
        self.settings = settings

    async def get_object(
        self,
        *,
        Bucket: str,
        Key: str,
        VersionId: str | None = None,
        Range: str | None = None,
        ChecksumMode: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Accept-Encoding": "identity"}  # the stored bytes, exactly
        if Range is not None:
            headers["Range"] = Range
        if ChecksumMode is not None:
            headers["x-amz-checksum-mode"] = ChecksumMode
        response = await self._send("GET", Bucket, Key, VersionId, headers)
        return {**self._fields(response), "Body": _Body(response)}

    async def head_object(
        self,
        *,
        Bucket: str,
        Key: str,
        VersionId: str | None = None,
    ) -> dict[str, Any]:
        response = await self._send("HEAD", Bucket, Key, VersionId, {"Accept-Encoding": "identity"})
        await response.aclose()
        return self._fields(response)

    async def _send(
        self, method: str, bucket: str, key: str, version_id: str | None, headers: dict[str, str]
    ) -> httpx.Response:
        if bucket != self.settings.bucket:
            raise ValueError(f"bucket {bucket!r} is not the configured {self.settings.bucket!r}")
        request = self.http.build_request(
            method, object_url(self.settings, key, version_id), headers=headers
        )
        response = await self.http.send(request, stream=True)
        if response.status_code < 300:
            return response
        try:
            body = b""
            if method != "HEAD":
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) >= ERROR_BODY_MAX:
                        break
        finally:
            await response.aclose()
        code = _XML_CODE.search(body)
        message = _XML_MESSAGE.search(body)
        text = message.group(1).decode("utf-8", "replace") if message else ""
        region = response.headers.get("x-amz-bucket-region")
        if region and region != self.settings.region:
            text += f" (the bucket is in {region}: use --region {region})"
        raise S3ErrorResponse(
            code.group(1).decode("utf-8", "replace")
            if code
            else _status_code(response.status_code),
            response.status_code,
            text,
            dict(response.headers),
        )

    @staticmethod
    def _fields(response: httpx.Response) -> dict[str, Any]:
        h = response.headers
        length = h.get("content-length")
        fields: dict[str, Any] = {
            "ContentLength": int(length) if length is not None and length.isdigit() else None,
            "ContentRange": h.get("content-range"),
            "ETag": h.get("etag"),
            "VersionId": h.get("x-amz-version-id"),
            "ChecksumType": h.get("x-amz-checksum-type"),
        }
        for algorithm in CHECKSUMS:
            value = h.get(f"x-amz-checksum-{algorithm.lower()}")
            if value is not None:
                fields[f"Checksum{algorithm}"] = value
        return fields


def _status_code(status: int) -> str:
    """The code botocore gives an error answer without a body (a HEAD): its status."""
    return {404: "NotFound", 403: "Forbidden", 405: "MethodNotAllowed"}.get(status, str(status))


#: The checksums of a whole object S3 may keep (besides the ETag), that zarrfs checks as botocore
#: does without the AWS CRT: CRC32 with zlib, SHA-1 and SHA-256 with hashlib (CRC32C and CRC64NVME
#: need the CRT; an object with only those is checked by its ETag alone, as before).
CHECKSUMS: dict[str, Callable[[], Any]] = {
    "CRC32": lambda: _Crc32(),
    "SHA1": lambda: hashlib.sha1(usedforsecurity=False),
    "SHA256": hashlib.sha256,
}


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


class _WholeObjectChecksum:
    """The first checksum S3 sent for a whole object that zarrfs can check, computed as the body
    arrives. Composite checksums (of parts: `...-N`, or `x-amz-checksum-type: COMPOSITE`) describe
    no byte stream and are skipped."""

    def __init__(self, resp: Mapping[str, Any]) -> None:
        self.algorithm: str | None = None
        self.expected = ""
        self._hash: Any = None
        if str(resp.get("ChecksumType") or "FULL_OBJECT").upper() != "FULL_OBJECT":
            return
        for algorithm, make in CHECKSUMS.items():
            value = resp.get(f"Checksum{algorithm}")
            if isinstance(value, str) and value and "-" not in value:
                self.algorithm, self.expected, self._hash = algorithm, value, make()
                return

    def update(self, data: bytes) -> None:
        if self._hash is not None:
            self._hash.update(data)

    def check(self, name: str) -> None:
        """CorruptBody (another attempt) when the body does not hash to what S3 said."""
        if self._hash is None:
            return
        got = base64.b64encode(self._hash.digest()).decode()
        if got != self.expected:
            log.warning(
                "%s: body %s %s is not S3's %s (damaged in transit)",
                name,
                self.algorithm,
                got,
                self.expected,
            )
            raise CorruptBody(f"{name}: body {self.algorithm} does not match S3's checksum")


class _HttpxSessionFactory:
    """aiobotocore's httpx backend, minus its warning that the `httpx2` fork is preferred (both work
    on trio; zarrfs depends on `httpx`). Built on first use: aiobotocore is imported lazily."""

    @staticmethod
    def make() -> type:
        from aiobotocore.httpxsession import HttpxSession

        class _HttpxSession(HttpxSession):  # type: ignore[misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                with warnings.catch_warnings():
                    warnings.filterwarnings(
                        "ignore", message=r".*prefers httpx2", category=DeprecationWarning
                    )
                    super().__init__(*args, **kwargs)

        return _HttpxSession


async def import_botocore() -> None:
    """Import aiobotocore (some 0.3 s) in a worker thread, so that the event loop goes on serving."""
    global _botocore
    for name in BOTOCORE_MODULES:
        await trio.to_thread.run_sync(importlib.import_module, name)
    _botocore = sys.modules["botocore.exceptions"]


@asynccontextmanager
async def botocore_client(settings: S3Settings) -> AsyncIterator[Any]:
    """The aiobotocore S3 client of `settings` (anonymous unless `settings.unsigned` is false), on
    trio through its httpx backend, with botocore's retries off. Call `import_botocore` first."""
    import botocore
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    aio_config = AioConfig(
        http_session_cls=_HttpxSessionFactory.make(),
        signature_version=botocore.UNSIGNED if settings.unsigned else None,
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=settings.max_concurrency,
        connect_timeout=settings.request_timeout,
        read_timeout=settings.request_timeout,
    )
    session = get_session()
    session.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=parse_s3_timestamp
    )
    async with session.create_client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        config=aio_config,
    ) as client:
        yield client


class S3Reader:
    """Reads exact object versions from one bucket: `async with S3Reader.open(settings) as r`."""

    def __init__(
        self,
        client: Any,
        settings: S3Settings,
        slots: RequestSlots | None = None,
        *,
        listing: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        #: GetObject and HeadObject (`AnonymousObjects`, or the aiobotocore client).
        self._client = client
        #: Makes the client listings go through (None: `client` lists too), once.
        self._listing = listing
        self._lister: Any = None if listing is not None else client
        self._lister_lock = trio.Lock()
        self.settings = settings
        self.bucket = settings.bucket
        self.slots = slots or RequestSlots(
            settings.max_concurrency, background_max=max(1, settings.max_concurrency * 3 // 4)
        )
        self.stats = {
            "requests": 0,
            "bytes": 0,
            "md5_verified": 0,
            "md5_mismatches": 0,
            "md5_bytes": 0,  # hashed to verify bodies
            "md5_ns": 0,  # time spent hashing them (what verification costs)
            "checksums_verified": 0,  # whole objects checked against S3's CRC32/SHA checksum
        }

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: S3Settings) -> AsyncIterator[S3Reader]:
        """A reader of `settings`' bucket on trio: anonymous objects over httpx, the aiobotocore
        client made when a listing first needs it; with `settings.unsigned` false (signed
        requests), everything through aiobotocore, made now."""
        widen_socket_reads()  # both ways below read bodies through httpcore
        async with AsyncExitStack() as stack:
            if not settings.unsigned:
                await import_botocore()
                client = await stack.enter_async_context(botocore_client(settings))
                yield cls(client, settings)
                return
            timeout = httpx.Timeout(settings.request_timeout, pool=None)
            limits = httpx.Limits(
                max_connections=settings.max_concurrency,
                max_keepalive_connections=settings.max_concurrency,
            )
            # the CA bundle botocore would use; else httpx's (certifi, or SSL_CERT_FILE)
            bundle = os.environ.get("AWS_CA_BUNDLE")
            verify: ssl.SSLContext | bool = (
                ssl.create_default_context(cafile=bundle) if bundle else True
            )
            http = await stack.enter_async_context(
                httpx.AsyncClient(
                    timeout=timeout, limits=limits, follow_redirects=False, verify=verify
                )
            )

            async def lister() -> Any:
                await import_botocore()
                return await stack.enter_async_context(botocore_client(settings))

            yield cls(AnonymousObjects(http, settings), settings, listing=lister)

    # --- public API -------------------------------------------------------------------------------

    async def read_range(
        self, ref: ObjectRef, start: int, end: int, ticket: Ticket | None = None
    ) -> bytes:
        """Bytes [start, end) of exactly the object version `ref`, verified against `ref` (and by
        MD5 when the range is the whole object and its ETag is a plain MD5). Demand priority unless
        a `ticket` says otherwise."""
        if not 0 <= start <= end <= ref.size:
            raise ValueError(f"bad range [{start}, {end}) for {ref.key} of size {ref.size}")
        if start == end:
            return b""
        name = _describe(self.bucket, ref.key, ref.version_id)
        what = f"GET {name} bytes={start}-{end - 1}"
        params = self._range_params(ref, start, end)
        md5 = whole_object_md5(ref, start, end)
        # S3's own checksum of a whole object when its MD5 cannot be checked (a multipart ETag)
        whole = (start, end) == (0, ref.size) and md5 is None
        if whole:
            params["ChecksumMode"] = "ENABLED"

        async def attempt() -> bytes:
            self.stats["requests"] += 1
            resp = await self._client.get_object(**params)
            body = resp["Body"]
            # hashed on the event loop as it arrives from our own HTTP client, up to a size; a
            # bigger body, or a signed client's, after the fact (in a thread: `_verify_md5`)
            running = (
                _RunningMd5()
                if md5 is not None
                and isinstance(body, _Body)
                and end - start <= config.HASH_AS_IT_ARRIVES_MAX
                else None
            )
            async with body:
                self._verify_headers(ref, start, end, resp, name)
                data: bytes = await (body.read(md5=running) if running else body.read())
            self.stats["bytes"] += len(data)
            self._check(name, "body length", end - start, len(data))
            if md5 is not None and running is not None:
                self._check_md5(name, md5, running.hexdigest(), len(data), running.ns)
            elif md5 is not None:
                await self._verify_md5(name, md5, data)
            if whole:
                await self._verify_checksum(name, resp, data)
            return data

        ticket = ticket or Ticket(Priority.DEMAND, flow=ref.key)
        return await self._retry(
            attempt, what, ref.version_id, self.settings.request_timeout, ticket
        )

    def https_url(self, key: str, version_id: str | None) -> str:
        """The HTTPS URL anyone can GET the object version at (the configured endpoint's,
        path-style, or the bucket's public AWS address), pinned by `?versionId=` when given."""
        return object_url(self.settings, key, version_id, regional=False)

    async def head(self, ref: ObjectRef) -> str | None:
        """The S3 VersionId (None in an unversioned bucket) of the object version `ref` names (for
        a blob, the current version of its immutable key), checked against `ref`'s size,
        VersionId and ETag as a GET's headers are."""
        name = _describe(self.bucket, ref.key, ref.version_id)
        params = self._params(ref.key, ref.version_id)

        async def attempt() -> str | None:
            self.stats["requests"] += 1
            resp = await self._client.head_object(**params)
            self._verify_version(name, ref.version_id, resp)
            self._verify_etag(name, ref, resp)
            self._check(name, "object size (Content-Length)", ref.size, resp.get("ContentLength"))
            version_id = resp.get("VersionId")
            return None if version_id is None else str(version_id)

        ticket = Ticket(Priority.DEMAND, flow=ref.key)
        return await self._retry(
            attempt, f"HEAD {name}", ref.version_id, self.settings.request_timeout, ticket
        )

    def _range_params(self, ref: ObjectRef, start: int, end: int) -> dict[str, Any]:
        """GetObject arguments for bytes [start, end) of exactly the version `ref` pins."""
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": ref.key,
            "Range": f"bytes={start}-{end - 1}",
        }
        if ref.version_id is not None:
            params["VersionId"] = ref.version_id
        return params

    async def stream_range(
        self,
        ref: ObjectRef,
        start: int,
        end: int,
        ticket: Ticket,
        sink: Callable[[bytes], None],
    ) -> None:
        """Stream bytes [start, end) of exactly the object version `ref` into `sink`, in order, as
        they arrive: one long ranged GET (a new one resumes where a failed attempt stopped). Headers
        are verified as for `read_range` before any byte is passed on; an attempt fails when the
        body stalls for `request_timeout` or ends early. For prefetching: `ticket` is normally
        prefetch priority."""
        if not 0 <= start < end <= ref.size:
            raise ValueError(f"bad range [{start}, {end}) for {ref.key} of size {ref.size}")
        name = _describe(self.bucket, ref.key, ref.version_id)
        what = f"GET {name} bytes={start}-{end - 1} (streamed)"
        stall = self.settings.request_timeout
        position = start

        async def attempt() -> None:
            nonlocal position
            params = self._range_params(ref, position, end)
            with trio.CancelScope(deadline=trio.current_time() + stall) as watchdog:
                self.stats["requests"] += 1
                resp = await self._client.get_object(**params)
                body = resp["Body"]
                async with body:
                    self._verify_headers(ref, position, end, resp, name)
                    while position < end:
                        chunk = await body.read(config.STREAM_CHUNK)
                        if not chunk:
                            break
                        watchdog.deadline = trio.current_time() + stall
                        if position + len(chunk) > end:
                            raise self._fail(
                                name, "body length", end - start, position + len(chunk)
                            )
                        self.stats["bytes"] += len(chunk)
                        sink(chunk)
                        position += len(chunk)
            if watchdog.cancelled_caught:
                raise Stalled(f"no data for {stall:g} s")
            if position < end:
                raise Truncated(f"{name}: the body ended at byte {position} of {end}")

        await self._retry(attempt, what, ref.version_id, None, ticket)

    async def get_bytes(
        self,
        key: str,
        version_id: str | None = None,
        *,
        max_bytes: int | None = None,
        priority: Priority = Priority.DEMAND,
    ) -> bytes:
        """A whole document (a manifest, `dandiset.yaml`): the current version of `key` unless
        `version_id` is given, read into memory as it streams in (see `_whole_object`). Demand
        priority by default: whoever asks for a document is waiting for it."""
        chunks: list[bytes] = []

        @asynccontextmanager
        async def into_memory() -> AsyncIterator[Callable[[bytes], Awaitable[None]]]:
            chunks.clear()  # a new attempt starts over

            async def put(chunk: bytes) -> None:
                chunks.append(chunk)

            yield put

        name = _describe(self.bucket, key, version_id)
        await self._whole_object(key, version_id, f"GET {name}", max_bytes, priority, into_memory)
        return b"".join(chunks)

    async def download(
        self,
        key: str,
        dest: Path,
        version_id: str | None = None,
        *,
        max_bytes: int | None = None,
        priority: Priority = Priority.DEMAND,
    ) -> int:
        """Stream a whole object to `dest` (via `dest.part`, 0600, then atomic rename: only a
        complete, checked body is ever at `dest`); return its size. For documents too big for
        memory (an asset list). Concurrent downloads to the same `dest` are the caller's to
        prevent."""
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        what = f"GET {_describe(self.bucket, key, version_id)} -> {dest}"

        @asynccontextmanager
        async def into_file() -> AsyncIterator[Callable[[bytes], Awaitable[None]]]:
            try:
                fd = await trio.to_thread.run_sync(create_private_file_replacing, part)
                async with trio.wrap_file(os.fdopen(fd, "wb")) as f:

                    async def put(chunk: bytes) -> None:
                        await f.write(chunk)

                    yield put
                await trio.to_thread.run_sync(os.replace, part, dest)
            except OSError as e:  # the local disk, not S3: not retried, but never a raw OSError
                raise DataError(f"{what}: cannot write {part}: {e}") from e
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(partial(part.unlink, missing_ok=True))

        return await self._whole_object(key, version_id, what, max_bytes, priority, into_file)

    async def _whole_object(
        self,
        key: str,
        version_id: str | None,
        what: str,
        max_bytes: int | None,
        priority: Priority,
        sink: Callable[[], AbstractAsyncContextManager[Callable[[bytes], Awaitable[None]]]],
    ) -> int:
        """Stream a whole object into a fresh `sink()` per attempt, in `config.DOWNLOAD_CHUNK`
        pieces; its size. The sink is left by an exception unless the body arrived whole and
        checked. No total deadline (a big document on a slow link still arrives), but an attempt
        fails (and is retried) when no byte arrives for `request_timeout`; a body larger than
        `max_bytes` is refused at once (DocumentTooLarge, not retried)."""
        name = _describe(self.bucket, key, version_id)
        params = {**self._params(key, version_id), "ChecksumMode": "ENABLED"}
        stall = self.settings.request_timeout

        async def attempt() -> int:
            size = 0
            with trio.CancelScope(deadline=trio.current_time() + stall) as watchdog:
                self.stats["requests"] += 1
                resp = await self._client.get_object(**params)
                body = resp["Body"]
                async with body, sink() as put:
                    self._verify_version(name, version_id, resp)
                    _check_size(what, resp.get("ContentLength"), max_bytes)
                    checksum = _WholeObjectChecksum(resp)
                    while chunk := await body.read(config.DOWNLOAD_CHUNK):
                        watchdog.deadline = trio.current_time() + stall
                        size += len(chunk)
                        self.stats["bytes"] += len(chunk)
                        _check_size(what, size, max_bytes)
                        checksum.update(chunk)
                        await put(chunk)
                    length = resp.get("ContentLength")
                    self._check(name, "body length", size if length is None else length, size)
                    checksum.check(name)
            if watchdog.cancelled_caught:
                raise Stalled(f"no data for {stall:g} s")
            return size

        return await self._retry(attempt, what, version_id, None, Ticket(priority, flow=key))

    async def list_prefixes(self, prefix: str, *, max_keys: int | None = None) -> ListResult:
        """The keys and common prefixes (one level, delimiter `/`) directly under `prefix`, over every
        page (or only until `max_keys` keys and prefixes were seen). Demand priority: a lookup or a
        listing waits for it."""
        what = f"LIST s3://{self.bucket}/{prefix}"
        keys: list[str] = []
        prefixes: list[str] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
            if max_keys is not None:
                params["MaxKeys"] = max(1, min(1000, max_keys - len(keys) - len(prefixes)))
            if token:
                params["ContinuationToken"] = token

            page = await self._list_page("list_objects_v2", params, what, Priority.DEMAND)
            keys += [str(item["Key"]) for item in page.get("Contents") or []]
            prefixes += [str(item["Prefix"]) for item in page.get("CommonPrefixes") or []]
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token or (max_keys is not None and len(keys) + len(prefixes) >= max_keys):
                return ListResult(keys=keys, prefixes=prefixes)

    async def iter_live_versions(self, prefix: str) -> AsyncIterator[list[LiveObject]]:
        """Pages of the live objects under `prefix` (the latest version of each key that is not a
        delete marker), with VersionId, size, ETag and LastModified, in key order (ListObjectVersions;
        1,000 versions a page). Demand priority (a lookup waits for it), one page at a time: a long
        listing holds one connection."""
        what = f"LIST VERSIONS s3://{self.bucket}/{prefix}"
        key_marker: str | None = None
        version_marker: str | None = None
        while True:
            params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if key_marker is not None:
                params["KeyMarker"] = key_marker
                if version_marker:
                    params["VersionIdMarker"] = version_marker

            page = await self._list_page("list_object_versions", params, what, Priority.DEMAND)
            live = [
                LiveObject(
                    key=str(v["Key"]),
                    version_id=str(v["VersionId"]),
                    size=int(v["Size"]),
                    etag=strip_etag(str(v["ETag"])),
                    last_modified=v["LastModified"],
                )
                for v in page.get("Versions") or []
                if v.get("IsLatest")
            ]
            yield live
            if not page.get("IsTruncated"):
                return
            key_marker = page.get("NextKeyMarker")
            version_marker = page.get("NextVersionIdMarker")
            if key_marker is None:
                raise RemoteError(f"{what}: truncated listing without a next marker")

    # --- internals --------------------------------------------------------------------------------

    async def _list_page(
        self, operation: str, params: dict[str, Any], what: str, priority: Priority
    ) -> dict[str, Any]:
        """One page of a listing, retried like any request (with the per-request timeout)."""
        lister = await self._listing_client()

        async def attempt() -> dict[str, Any]:
            self.stats["requests"] += 1
            page: dict[str, Any] = await getattr(lister, operation)(**params)
            return page

        return await self._retry(
            attempt, what, None, self.settings.request_timeout, Ticket(priority)
        )

    async def _listing_client(self) -> Any:
        """The client listings go through, made on first use (once). RemoteError when it cannot be
        made (no such AWS profile, a broken botocore install): tried again by the next listing."""
        if self._lister is None:
            async with self._lister_lock:
                if self._lister is None:
                    assert self._listing is not None
                    try:
                        self._lister = await self._listing()
                    except Exception as e:
                        raise RemoteError(
                            f"cannot create the S3 client for listings: {type(e).__name__}: {e}"
                        ) from e
        return self._lister

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
        timeout: float | None,
        ticket: Ticket | None,
    ) -> T:
        async def translated_attempt() -> T:
            try:
                return await attempt()
            except Exception as exc:
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
            slots=self.slots,
            ticket=ticket,
        )

    async def _verify_checksum(self, name: str, resp: Mapping[str, Any], data: bytes) -> None:
        """A whole object's body against the CRC32/SHA checksum S3 keeps for it, if any."""
        checksum = _WholeObjectChecksum(resp)
        if checksum.algorithm is None:
            return
        if len(data) >= config.HASH_IN_THREAD:
            await trio.to_thread.run_sync(checksum.update, data, abandon_on_cancel=True)
        else:
            checksum.update(data)
        self.stats["checksums_verified"] += 1
        checksum.check(name)

    async def _verify_md5(self, name: str, expected: str, data: bytes) -> None:
        if len(data) >= config.HASH_IN_THREAD:
            got, spent = await trio.to_thread.run_sync(_md5_hex, data, abandon_on_cancel=True)
        else:
            got, spent = _md5_hex(data)
        self._check_md5(name, expected, got, len(data), spent)

    def _check_md5(self, name: str, expected: str, got: str, nbytes: int, spent_ns: int) -> None:
        """Count a body's MD5 (its bytes and the time hashing took) and refuse it unless it is
        `expected` (its ETag)."""
        self.stats["md5_bytes"] += nbytes
        self.stats["md5_ns"] += spent_ns
        if got != expected:
            self.stats["md5_mismatches"] += 1
            log.warning(
                "%s: body MD5 %s is not its ETag %s (damaged in transit)", name, got, expected
            )
            raise CorruptBody(f"{name}: body MD5 {got} does not match the ETag {expected}")
        self.stats["md5_verified"] += 1

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

    def _verify_etag(self, name: str, ref: ObjectRef, resp: Mapping[str, Any]) -> None:
        got_etag = resp.get("ETag")
        if ref.etag is not None and ref.version_id is not None:
            # a pinned version's ETag was recorded from this very object: it must match exactly
            got = None if got_etag is None else strip_etag(str(got_etag))
            if got != strip_etag(ref.etag):
                raise self._fail(name, "ETag", strip_etag(ref.etag), got)
        elif ref.etag is not None and got_etag is not None:
            # blobs: the record's dandi-etag is comparable only to an ETag of the same form
            expected, got = strip_etag(ref.etag), strip_etag(str(got_etag))
            if etag_form(expected) == etag_form(got) and expected != got:
                raise self._fail(name, "ETag", expected, got)

    def _verify_headers(
        self, ref: ObjectRef, start: int, end: int, resp: Mapping[str, Any], name: str
    ) -> None:
        """Check a ranged GET's headers against `ref` before any body byte is read."""
        self._verify_version(name, ref.version_id, resp)
        self._verify_etag(name, ref, resp)
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


def whole_object_md5(ref: ObjectRef, start: int, end: int) -> str | None:
    """The MD5 a GET of [start, end) must hash to: the ETag, when the range is the whole object and
    the ETag is a plain MD5 (single-part upload); else None (nothing to compare with)."""
    return ref.md5() if start == 0 and end == ref.size else None


def _md5_hex(data: bytes) -> tuple[str, int]:
    """The MD5 of `data` in hex, and the nanoseconds it took."""
    started = time.perf_counter_ns()
    digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return digest, time.perf_counter_ns() - started


def _check_size(what: str, size: object, max_bytes: int | None) -> None:
    if max_bytes is not None and isinstance(size, int) and size > max_bytes:
        raise DocumentTooLarge(f"{what}: {size} bytes is more than the {max_bytes} allowed")


def create_private_file_replacing(path: Path) -> int:
    """A fresh 0600 file at `path` (a leftover from an earlier attempt is replaced)."""
    path.unlink(missing_ok=True)
    return create_private_file(path)
