"""Ranged GETs of exact S3 object versions, verified, retried, scheduled, with errors translated;
and the two listings the archive needs (one level of a prefix; the live versions under a prefix).

Owns: the only aiobotocore client of zarrfs (on trio, through aiobotocore's httpx backend;
botocore's own retries are off because `retry.retry` retries), the verification of every response
against the `ObjectRef` it was asked for (length, Content-Range total, VersionId, ETag, and the MD5 of
the body whenever a GET covers a whole object whose ETag is a plain MD5), and the translation of S3 and
transport failures into `ObjectMissing`, `IntegrityError` and `RemoteError`.

Never does: let botocore types or errors escape (callers see bytes and zarrfs errors), inode or path
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

import hashlib
import logging
import os
import re
import time
import urllib.parse
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import botocore
import botocore.exceptions
import botocore.utils
import trio
from aiobotocore.config import AioConfig
from aiobotocore.httpxsession import HttpxSession
from aiobotocore.session import get_session

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


def _describe(bucket: str, key: str, version_id: str | None) -> str:
    return f"s3://{bucket}/{key} (version {version_id or 'current'})"


def _error_code(exc: botocore.exceptions.ClientError) -> tuple[str, int]:
    err = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    return str(err.get("Code", "")), int(meta.get("HTTPStatusCode") or 0)


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
    if isinstance(exc, CorruptBody | Stalled | Truncated):
        return True
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
    result: datetime = botocore.utils.parse_timestamp(value)
    return result


class S3Reader:
    """Reads exact object versions from one bucket: `async with S3Reader.open(settings) as r`."""

    def __init__(
        self, client: Any, settings: S3Settings, slots: RequestSlots | None = None
    ) -> None:
        self._client = client
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
        }

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
        session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=parse_s3_timestamp
        )
        async with session.create_client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            config=aio_config,
        ) as client:
            yield cls(client, settings)

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

        async def attempt() -> bytes:
            self.stats["requests"] += 1
            resp = await self._client.get_object(**params)
            body = resp["Body"]
            async with body:
                self._verify_headers(ref, start, end, resp, name)
                data: bytes = await body.read()
            self.stats["bytes"] += len(data)
            self._check(name, "body length", end - start, len(data))
            if md5 is not None:
                await self._verify_md5(name, md5, data)
            return data

        ticket = ticket or Ticket(Priority.DEMAND, flow=ref.key)
        return await self._retry(
            attempt, what, ref.version_id, self.settings.request_timeout, ticket
        )

    def https_url(self, key: str, version_id: str | None) -> str:
        """The HTTPS URL anyone can GET the object version at (the configured endpoint's,
        path-style, or the bucket's public AWS address), pinned by `?versionId=` when given."""
        quoted = urllib.parse.quote(key)
        if self.settings.endpoint_url:
            url = f"{self.settings.endpoint_url.rstrip('/')}/{self.bucket}/{quoted}"
        else:
            url = f"https://{self.bucket}.s3.amazonaws.com/{quoted}"
        if version_id is not None:
            url += "?versionId=" + urllib.parse.quote(version_id, safe="")
        return url

    async def head(self, ref: ObjectRef) -> tuple[str | None, str | None]:
        """The S3 VersionId (None in an unversioned bucket) and ETag of the object version `ref`
        names (for a blob, the current version of its immutable key), checked against `ref`'s
        size, VersionId and ETag as a GET's headers are."""
        name = _describe(self.bucket, ref.key, ref.version_id)
        params = self._params(ref.key, ref.version_id)

        async def attempt() -> tuple[str | None, str | None]:
            self.stats["requests"] += 1
            resp = await self._client.head_object(**params)
            self._verify_version(name, ref.version_id, resp)
            self._verify_etag(name, ref, resp)
            self._check(name, "object size (Content-Length)", ref.size, resp.get("ContentLength"))
            etag = resp.get("ETag")
            return resp.get("VersionId"), None if etag is None else strip_etag(str(etag))

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
        params = self._params(key, version_id)
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
                    while chunk := await body.read(config.DOWNLOAD_CHUNK):
                        watchdog.deadline = trio.current_time() + stall
                        size += len(chunk)
                        self.stats["bytes"] += len(chunk)
                        _check_size(what, size, max_bytes)
                        await put(chunk)
                    self._check(name, "body length", resp.get("ContentLength", size), size)
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

            page = await self._list_page(
                self._client.list_objects_v2, params, what, Priority.DEMAND
            )
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

            page = await self._list_page(
                self._client.list_object_versions, params, what, Priority.DEMAND
            )
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
        self,
        call: Callable[..., Awaitable[dict[str, Any]]],
        params: dict[str, Any],
        what: str,
        priority: Priority,
    ) -> dict[str, Any]:
        """One page of a listing, retried like any request (with the per-request timeout)."""

        async def attempt() -> dict[str, Any]:
            self.stats["requests"] += 1
            return await call(**params)

        return await self._retry(
            attempt, what, None, self.settings.request_timeout, Ticket(priority)
        )

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
            slots=self.slots,
            ticket=ticket,
        )

    async def _verify_md5(self, name: str, expected: str, data: bytes) -> None:
        if len(data) >= config.HASH_IN_THREAD:
            got, spent = await trio.to_thread.run_sync(_md5_hex, data, abandon_on_cancel=True)
        else:
            got, spent = _md5_hex(data)
        self.stats["md5_bytes"] += len(data)
        self.stats["md5_ns"] += spent
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
