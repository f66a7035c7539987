"""An embedded local S3 (moto server) shaped like the public DANDI bucket.

Owns: running a moto S3 server on 127.0.0.1 with a free port and creating a versioned bucket that
anonymous clients may read (as the real archive allows), and the WSGI middleware in front of moto.
Used by `zarrfs demo`, the test suite and the benchmarks; never by a real mount.

By default the server runs in its own process (`python -m zarrfs.demo.locals3`): a client in the same
process that holds the GIL while it blocks in a read syscall on the mount (h5py does) would otherwise
stop the server thread and deadlock. `isolated=False` runs it as a thread in this process instead, for
tests that wrap moto's in-process backend.

The middleware (`tc netem` is not available here, so it is all in WSGI):
- `latency` adds a delay to every response, to imitate a remote store;
- `stream_bandwidth` (off by default) paces every response body to that many bytes per second, as
  one connection to S3 is limited (some 100 MB/s), so that one stream and several parallel ones
  differ as they do there;
- it counts requests (by kind: GET, HEAD, LIST, PUT, POST, DELETE, OTHER) and the body bytes sent,
  and serves those counters as JSON at `STATS_PATH` (`LocalS3.stats()`), which moto never sees and
  which is neither delayed nor counted;
- `fast_range_min_size` (off by default) turns on the large-object fast path. moto copies a whole
  object for every GET, ranged or not (a 256 KiB range of a 512 MiB object costs half a second),
  so big-file reads through stock moto measure moto. With the fast path, a plain GET of an object
  at least that big (learned from earlier responses) is answered from an in-memory copy, sliced:
  moto answers a HEAD for the same request (so its checks, errors and headers apply), then
  Content-Length and Content-Range are set exactly as moto's own ranged GET sets them. Anything
  unusual (conditional or CORS headers, query parameters other than versionId, a checksum-mode
  request whose answer would carry checksums, a range moto would reject or ignore, the
  `DIRECT_HEADER`) goes to moto unchanged.

Concurrency: the werkzeug server is threaded (delays overlap); counters and the copies are guarded by
locks. A copy is keyed by host, path, VersionId, ETag and Last-Modified, so an overwritten key is
never served stale.

One fix to moto itself (`_list_versions_without_copies`, applied in every server): its
ListObjectVersions deep-copies every version of every key in the bucket for each page it answers,
only to mark the copies `IsLatest`, and moto's instance tracker keeps every copy for the life of the
process. A listing of N keys thus costs O(N^2) and holds about 3 KB per key per page: a 100,000-key
Zarr would take an hour to list and some 30 GB. The fixed listing marks the stored versions
themselves (`is_latest` is read by nothing but this listing, and always recomputed first), which gives
the same answers.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

#: Actions anonymous readers need. moto derives the checked action from the HTTP method, so HEAD
#: requests need `s3:HeadObject` as well.
PUBLIC_READ_ACTIONS = [
    "s3:GetObject",
    "s3:GetObjectVersion",
    "s3:HeadObject",
    "s3:ListBucket",
    "s3:ListBucketVersions",
]

#: Credentials used by the writer client; moto accepts any.
WRITER_KEY = "zarrfs-local"
#: Seconds to wait for a server process to report its port.
START_TIMEOUT = 60.0
#: Path of the statistics document (no bucket can be named `__zarrfs_stats`).
STATS_PATH = "/__zarrfs_stats"
#: A request carrying this header is passed to moto unchanged by the fast path (for comparisons).
DIRECT_HEADER = "x-locals3-direct"
#: Byte budget of the fast path's in-memory object copies (least recently used go first).
FAST_PATH_MEMORY = 2 << 30
#: Bytes per piece of a body served by the fast path (a client that hangs up stops the rest).
FAST_PATH_PIECE = 1 << 20
#: Request kinds counted.
KINDS = ("GET", "HEAD", "LIST", "PUT", "POST", "DELETE", "OTHER")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def _list_versions_without_copies() -> None:
    """Make moto's ListObjectVersions mark the stored versions instead of deep copies of them (see
    the module docstring). Only the deep copies made inside that call are skipped; idempotent."""
    from moto.s3 import models

    backend = models.S3Backend
    if getattr(backend.list_object_versions, "_without_copies", False):
        return
    listing = threading.local()

    class _CopyModule:
        """Stands in for `copy` inside moto's S3 models: `deepcopy` is the identity only while the
        current thread is in `list_object_versions`."""

        def __getattr__(self, name: str) -> Any:
            return getattr(copy, name)

        @staticmethod
        def deepcopy(value: Any, memo: Any = None) -> Any:
            return value if getattr(listing, "active", False) else copy.deepcopy(value, memo)

    original = backend.list_object_versions

    @functools.wraps(original)
    def list_object_versions(self: Any, *args: Any, **kwargs: Any) -> Any:
        listing.active = True
        try:
            return original(self, *args, **kwargs)
        finally:
            listing.active = False

    list_object_versions._without_copies = True  # type: ignore[attr-defined]
    models.copy = _CopyModule()  # type: ignore[attr-defined,assignment]
    backend.list_object_versions = list_object_versions  # type: ignore[method-assign]


@dataclass(frozen=True, slots=True)
class RequestStats:
    """What the server has answered so far; subtract two snapshots for the requests in between."""

    requests: int = 0
    bytes_sent: int = 0
    by_kind: Mapping[str, int] = field(default_factory=dict)
    #: GETs answered from an in-memory copy by the fast path.
    fast_path: int = 0

    def __sub__(self, other: RequestStats) -> RequestStats:
        kinds = {k: self.by_kind.get(k, 0) - other.by_kind.get(k, 0) for k in self.by_kind}
        return RequestStats(
            requests=self.requests - other.requests,
            bytes_sent=self.bytes_sent - other.bytes_sent,
            by_kind={k: v for k, v in kinds.items() if v},
            fast_path=self.fast_path - other.fast_path,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "bytes_sent": self.bytes_sent,
            "by_kind": dict(self.by_kind),
            "fast_path": self.fast_path,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RequestStats:
        return cls(
            requests=int(data["requests"]),
            bytes_sent=int(data["bytes_sent"]),
            by_kind={str(k): int(v) for k, v in data["by_kind"].items()},
            fast_path=int(data["fast_path"]),
        )


def _kind(environ: Mapping[str, Any]) -> str:
    method = str(environ.get("REQUEST_METHOD", ""))
    if method == "GET":
        # path style: /bucket or /bucket/ is a bucket request (a listing), /bucket/key an object
        _, _, key = str(environ.get("PATH_INFO", "")).lstrip("/").partition("/")
        return "GET" if key else "LIST"
    return method if method in KINDS else "OTHER"


def _header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    return next((v for k, v in headers if k.lower() == name), None)


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests = 0
        self._bytes = 0
        self._kinds = dict.fromkeys(KINDS, 0)
        self._fast = 0

    def request(self, kind: str) -> None:
        with self._lock:
            self._requests += 1
            self._kinds[kind] += 1

    def sent(self, n: int) -> None:
        with self._lock:
            self._bytes += n

    def fast(self) -> None:
        with self._lock:
            self._fast += 1

    def snapshot(self) -> RequestStats:
        with self._lock:
            return RequestStats(self._requests, self._bytes, dict(self._kinds), self._fast)


#: Bytes yielded at a time by a paced body.
PACED_PIECE = 64 << 10


class _Counted:
    """A response body that adds the bytes it yields to the counters (WSGI `close` passed on), paced
    to `bandwidth` bytes per second when that is positive."""

    def __init__(self, body: Iterable[bytes], counters: _Counters, bandwidth: float = 0.0) -> None:
        self._body = body
        self._counters = counters
        self._bandwidth = bandwidth

    def __iter__(self) -> Iterator[bytes]:
        if self._bandwidth <= 0:
            for piece in self._body:
                self._counters.sent(len(piece))
                yield piece
            return
        start, sent = time.monotonic(), 0
        for piece in self._body:
            for at in range(0, len(piece), PACED_PIECE):
                part = piece[at : at + PACED_PIECE]
                self._counters.sent(len(part))
                yield part
                sent += len(part)
                ahead = start + sent / self._bandwidth - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()


def _call(app: WSGIApp, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    """Run `app` on `environ` to completion: status line, headers, body."""
    captured: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured[:] = [status, list(headers)]
        return lambda data: None

    body = app(environ, start_response)
    try:
        data = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return captured[0], captured[1], data


def _status_line(code: int) -> str:
    from werkzeug.http import HTTP_STATUS_CODES

    return f"{code} {HTTP_STATUS_CODES[code].upper()}"  # as werkzeug formats moto's responses


def _moto_range(header: str, length: int) -> tuple[int, int] | None:
    """The (first, last) byte moto's own range handling serves with a 206, else None.

    None covers everything moto answers otherwise (a 200 with the whole object, an InvalidRange
    error, a server error on a malformed header): those requests go to moto itself.
    """
    parts = header.split("=")
    if len(parts) != 2:
        return None
    spec = parts[1]
    if "," in spec:
        return None
    try:
        begin, end = (int(i) if i else None for i in spec.split("-"))
    except ValueError:
        return None
    last = length - 1
    if (begin is None and end == 0) or (begin is not None and begin > last):
        return None
    if begin is not None:
        end = last if end is None else min(end, last)
    elif end is not None:
        begin = length - min(end, length)
        end = last
    else:
        return None
    if begin > min(end, last):
        return None
    return begin, end


class _LargeObjects:
    """The fast path: GETs of large objects served from in-memory copies (see the module doc)."""

    def __init__(self, min_size: int, budget: int = FAST_PATH_MEMORY) -> None:
        self.min_size = min_size
        self.budget = budget
        self._lock = threading.Lock()
        self._fill_lock = threading.Lock()
        self._large: set[tuple[str, str]] = set()
        self._copies: OrderedDict[tuple[str, ...], bytes] = OrderedDict()
        self._held = 0

    @staticmethod
    def _where(environ: Mapping[str, Any]) -> tuple[str, str]:
        return str(environ.get("HTTP_HOST", "")), str(environ.get("PATH_INFO", ""))

    def learn(
        self, environ: Mapping[str, Any], status: str, headers: list[tuple[str, str]]
    ) -> None:
        """Remember paths whose responses show an object of at least `min_size` bytes."""
        size: int | None = None
        if status.startswith("206"):
            total = (_header(headers, "content-range") or "").rpartition("/")[2]
            size = int(total) if total.isdigit() else None
        elif status.startswith("200"):
            length = _header(headers, "content-length") or ""
            size = int(length) if length.isdigit() else None
        if size is not None and size >= self.min_size:
            with self._lock:
                self._large.add(self._where(environ))

    def serve(
        self, app: WSGIApp, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes] | None:
        """The response body if this GET can be served from a copy, else None (moto answers)."""
        with self._lock:
            if self._where(environ) not in self._large:
                return None
        if f"HTTP_{DIRECT_HEADER.upper().replace('-', '_')}" in environ or "HTTP_ORIGIN" in environ:
            return None
        if any(k.startswith("HTTP_IF_") for k in environ):
            return None
        query = parse_qs(str(environ.get("QUERY_STRING", "")), keep_blank_values=True)
        if not set(query) <= {"versionId"}:
            return None
        checksum_mode = "HTTP_X_AMZ_CHECKSUM_MODE" in environ
        head = {
            k: v
            for k, v in environ.items()
            if k not in ("HTTP_RANGE", "HTTP_X_AMZ_CHECKSUM_MODE", "CONTENT_LENGTH")
        }
        head["REQUEST_METHOD"] = "HEAD"
        status, headers, _ = _call(app, head)
        length = _header(headers, "content-length")
        if not status.startswith("200") or length is None or not length.isdigit():
            return None
        size = int(length)
        rng = str(environ.get("HTTP_RANGE", ""))
        if rng:
            span = _moto_range(rng, size)
            if span is None:
                return None
            first, last = span
            if checksum_mode and first == 0 and last == size - 1:
                return None  # moto keeps the checksum headers of a range covering everything
        elif checksum_mode:
            return None
        else:
            first, last = 0, size - 1
        identity = (
            *self._where(environ),
            _header(headers, "x-amz-version-id") or "",
            _header(headers, "etag") or "",
            _header(headers, "last-modified") or "",
        )
        data = self._copy(app, environ, identity, size)
        if data is None:
            return None
        out = [(k, v) for k, v in headers if k.lower() != "content-length"]
        if rng:
            out.append(("content-range", f"bytes {first}-{last}/{size}"))
        out.append(("content-length", str(last - first + 1)))
        start_response(_status_line(206 if rng else 200), out)
        return self._pieces(data, first, last + 1)

    @staticmethod
    def _pieces(data: bytes, start: int, end: int) -> Iterator[bytes]:
        view = memoryview(data)
        for offset in range(start, end, FAST_PATH_PIECE):
            yield bytes(view[offset : min(end, offset + FAST_PATH_PIECE)])

    def _copy(
        self, app: WSGIApp, environ: dict[str, Any], identity: tuple[str, ...], size: int
    ) -> bytes | None:
        if size > self.budget:
            return None
        with self._lock:
            data = self._copies.get(identity)
            if data is not None:
                self._copies.move_to_end(identity)
                return data
        with self._fill_lock:  # one whole-object GET from moto per copy
            with self._lock:
                data = self._copies.get(identity)
            if data is not None:
                return data
            get = {
                k: v
                for k, v in environ.items()
                if k not in ("HTTP_RANGE", "HTTP_X_AMZ_CHECKSUM_MODE", "CONTENT_LENGTH")
            }
            status, headers, body = _call(app, get)
            got = (_header(headers, "x-amz-version-id") or "", _header(headers, "etag") or "")
            if not status.startswith("200") or len(body) != size or got != identity[2:4]:
                return None  # changed between the HEAD and this GET: let moto answer
            with self._lock:
                self._copies[identity] = body
                self._held += size
                while self._held > self.budget:
                    _, dropped = self._copies.popitem(last=False)
                    self._held -= len(dropped)
            return body


class _Middleware:
    """Latency, request counting, the statistics document and the optional fast path."""

    def __init__(
        self, app: WSGIApp, latency: float, fast_range_min_size: int, stream_bandwidth: float = 0.0
    ) -> None:
        self.app = app
        self.latency = latency
        self.stream_bandwidth = stream_bandwidth
        self.counters = _Counters()
        self.large = _LargeObjects(fast_range_min_size) if fast_range_min_size > 0 else None

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == STATS_PATH:
            document = json.dumps(self.counters.snapshot().to_json()).encode()
            start_response(
                "200 OK",
                [("Content-Type", "application/json"), ("Content-Length", str(len(document)))],
            )
            return [document]
        if self.latency > 0:
            time.sleep(self.latency)
        kind = _kind(environ)
        self.counters.request(kind)
        large = self.large
        body: Iterable[bytes] | None = None
        if large is not None and kind == "GET":
            body = large.serve(self.app, environ, start_response)
            if body is not None:
                self.counters.fast()
        if body is None:
            if large is not None and kind in ("GET", "HEAD"):

                def learning(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
                    large.learn(environ, status, headers)
                    return start_response(status, headers, *exc)

                body = self.app(environ, learning)
            else:
                body = self.app(environ, start_response)
        return _Counted(body, self.counters, self.stream_bandwidth)


def _make_server(
    latency: float, fast_range_min_size: int = 0, stream_bandwidth: float = 0.0
) -> Any:
    """A threaded werkzeug server around moto's WSGI app, on a free loopback port."""
    _list_versions_without_copies()
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        create_backend_app,
    )
    from moto.server import MotoRequestHandler  # type: ignore[attr-defined]
    from werkzeug.serving import make_server

    moto: WSGIApp = DomainDispatcherApplication(create_backend_app)
    app = _Middleware(moto, latency, fast_range_min_size, stream_bandwidth)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    return make_server("127.0.0.1", 0, app, True, request_handler=MotoRequestHandler)


class LocalS3:
    """A running moto server holding one public-read, versioned bucket.

    Use as a context manager: `with LocalS3() as s3: s3.client.put_object(...)`. `endpoint_url` is what
    zarrfs gets as `--endpoint-url`; `client` is a signed boto3 client for writing; `stats()` counts
    what the server has answered.
    """

    def __init__(
        self,
        bucket: str = "dandiarchive",
        *,
        isolated: bool = True,
        latency: float = 0.0,
        fast_range_min_size: int = 0,
        stream_bandwidth: float = 0.0,
    ) -> None:
        self.bucket = bucket
        self.isolated = isolated
        self.latency = latency
        self.fast_range_min_size = fast_range_min_size
        self.stream_bandwidth = stream_bandwidth
        self.endpoint_url = ""
        self.client: Any = None
        self.pid: int | None = None
        self._process: subprocess.Popen[str] | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> LocalS3:
        import boto3

        if self.isolated:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "zarrfs.demo.locals3",
                    "--latency",
                    str(self.latency),
                    "--fast-range-min-size",
                    str(self.fast_range_min_size),
                    "--stream-bandwidth",
                    str(self.stream_bandwidth),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            )
            self.pid = self._process.pid
            assert self._process.stdout is not None
            ready, _, _ = select.select([self._process.stdout], [], [], START_TIMEOUT)
            line = self._process.stdout.readline().strip() if ready else "nothing in time"
            if not line.startswith("PORT "):
                self.stop()
                raise RuntimeError(f"local S3 server did not start (said {line!r})")
            port = int(line.split()[1])
        else:
            self._server = _make_server(
                self.latency, self.fast_range_min_size, self.stream_bandwidth
            )
            self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
            self._thread.start()
            port = self._server.server_address[1]
        self.endpoint_url = f"http://127.0.0.1:{port}"
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=WRITER_KEY,
            aws_secret_access_key=WRITER_KEY,
            region_name="us-east-1",
        )
        self.client.create_bucket(Bucket=self.bucket)
        self.client.put_bucket_versioning(
            Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"}
        )
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": PUBLIC_READ_ACTIONS,
                    "Resource": [f"arn:aws:s3:::{self.bucket}", f"arn:aws:s3:::{self.bucket}/*"],
                }
            ],
        }
        self.client.put_bucket_policy(Bucket=self.bucket, Policy=json.dumps(policy))
        return self

    def stats(self) -> RequestStats:
        """Requests and body bytes the server has answered since it started (a snapshot)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.endpoint_url + STATS_PATH, timeout=30) as response:
            return RequestStats.from_json(json.loads(response.read()))

    def stop(self) -> None:
        if self._process is not None:
            process, self._process = self._process, None
            if process.stdin is not None:
                process.stdin.close()  # the server exits when its stdin closes
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.terminate()
                process.wait(timeout=10)
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            if self._thread is not None:
                self._thread.join()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _serve_until_stdin_closes(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="moto S3 server for zarrfs tests and demo")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per response")
    parser.add_argument(
        "--fast-range-min-size",
        type=int,
        default=0,
        help="serve GETs of objects of at least this many bytes from memory (0: off)",
    )
    parser.add_argument(
        "--stream-bandwidth",
        type=float,
        default=0.0,
        help="bytes per second each response body is paced to (0: unpaced)",
    )
    args = parser.parse_args(argv)
    server = _make_server(args.latency, args.fast_range_min_size, args.stream_bandwidth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(f"PORT {server.server_address[1]}", flush=True)
    sys.stdin.read()  # returns when the parent closes our stdin or dies
    server.shutdown()


if __name__ == "__main__":
    _serve_until_stdin_closes()
