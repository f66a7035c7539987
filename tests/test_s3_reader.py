"""S3Reader against a local moto S3 (plus a fault-injecting front end), HttpClient against a tiny
local HTTP server, and the Remote URL facade over both.

The fault-injecting server is a second werkzeug server in this process around moto's WSGI app; moto
keeps its state per process, so both endpoints see the same bucket.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

from zarrfs import config, s3_reader
from zarrfs.config import S3Settings
from zarrfs.demo.locals3 import LocalS3
from zarrfs.errors import DocumentTooLarge, IntegrityError, ObjectMissing, RemoteError
from zarrfs.io.http import HttpClient
from zarrfs.io.remote import Remote
from zarrfs.io.scheduler import Priority, Ticket
from zarrfs.s3_reader import ObjectRef, S3Reader

pytestmark = [pytest.mark.trio, pytest.mark.s3]

BUCKET = "dandiarchive"
OLD = bytes(range(256)) * 40  # 10240 bytes
NEW = b"the key was overwritten with these bytes"
BIG = hashlib.sha256(b"seed").digest() * (3 * (1 << 20) // 32 + 5)  # a little over 3 MiB


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --- servers ----------------------------------------------------------------------------------


_S3_ERRORS = {
    "500": ("500 Internal Server Error", "InternalError"),
    "503": ("503 Service Unavailable", "SlowDown"),
}


class Faults:
    """WSGI middleware around moto: per-request actions from `plan`, request counting, delays."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.plan: list[str] = []
        self.requests = 0
        self.delay = 0.0
        self.inflight = 0
        self.max_inflight = 0
        self.generation = 0  # requests of an earlier test (a hang still sleeping) are not counted

    def reset(self) -> None:
        with self.lock:
            self.plan, self.requests, self.delay, self.max_inflight = [], 0, 0.0, 0
            self.inflight = 0
            self.generation += 1

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with self.lock:
            self.requests += 1
            action = self.plan.pop(0) if self.plan else "pass"
            generation = self.generation
        if action == "hang":  # outlives the client's deadline; not counted as in flight
            time.sleep(1.5)
        with self.lock:
            counted = generation == self.generation
            if counted:
                self.inflight += 1
                self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if self.delay:
                time.sleep(self.delay)
            if action in _S3_ERRORS:
                status, code = _S3_ERRORS[action]
                body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                start_response(
                    status,
                    [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
                )
                return [body]
            captured: dict[str, Any] = {}

            def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
                captured["status"], captured["headers"] = status, headers

            body = b"".join(self.app(environ, capture))
            headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
            if action == "truncate":
                headers.append(("Connection", "close"))
                body = body[: len(body) // 2]
            elif action == "badversion":
                headers = [
                    (k, "not-the-version" if k.lower() == "x-amz-version-id" else v)
                    for k, v in headers
                ]
            elif action == "flip" and body:  # one bit damaged in transit, the length intact
                middle = len(body) // 2
                body = body[:middle] + bytes([body[middle] ^ 0x01]) + body[middle + 1 :]
            elif action == "noversion":  # an endpoint that ignores ?versionId= says nothing of it
                headers = [(k, v) for k, v in headers if k.lower() != "x-amz-version-id"]
            start_response(captured["status"], headers)
            return [body]
        finally:
            with self.lock:
                if counted and generation == self.generation:
                    self.inflight -= 1


@dataclass
class World:
    s3: LocalS3
    faults: Faults
    faulty_url: str
    v_old: str
    v_new: str
    v_delete: str
    empty: ObjectRef
    multipart: ObjectRef
    blob: ObjectRef
    big: ObjectRef

    def settings(self, faulty: bool = False, **kw: Any) -> S3Settings:
        kw.setdefault("max_attempts", 3)
        kw.setdefault("request_timeout", 5.0)
        url = self.faulty_url if faulty else self.s3.endpoint_url
        return S3Settings(endpoint_url=url, bucket=BUCKET, **kw)

    def old(self, **changes: Any) -> ObjectRef:
        fields = {
            "key": "zarr/z1/0/0",
            "version_id": self.v_old,
            "size": len(OLD),
            "etag": md5(OLD),
        }
        fields.update(changes)
        return ObjectRef(**fields)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with LocalS3(BUCKET, isolated=False) as s3:
        c = s3.client
        v_old = c.put_object(Bucket=BUCKET, Key="zarr/z1/0/0", Body=OLD)["VersionId"]
        v_new = c.put_object(Bucket=BUCKET, Key="zarr/z1/0/0", Body=NEW)["VersionId"]
        v_delete = c.delete_object(Bucket=BUCKET, Key="zarr/z1/0/0")["VersionId"]
        v_empty = c.put_object(Bucket=BUCKET, Key="zarr/z1/empty", Body=b"")["VersionId"]
        c.put_object(Bucket=BUCKET, Key="blobs/abc/def/abcdef", Body=OLD)
        c.put_object(Bucket=BUCKET, Key="blobs/big", Body=BIG)
        mp = c.create_multipart_upload(Bucket=BUCKET, Key="zarr/z1/mp")
        part = c.upload_part(
            Bucket=BUCKET, Key="zarr/z1/mp", UploadId=mp["UploadId"], PartNumber=1, Body=OLD
        )
        done = c.complete_multipart_upload(
            Bucket=BUCKET,
            Key="zarr/z1/mp",
            UploadId=mp["UploadId"],
            MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
        )
        c.create_bucket(Bucket="private-bucket")
        c.put_object(Bucket="private-bucket", Key="secret", Body=b"x")

        faults = Faults(DomainDispatcherApplication(create_backend_app))
        server = make_server("127.0.0.1", 0, faults, True, request_handler=MotoRequestHandler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        host, port = server.server_address[:2]
        try:
            yield World(
                s3=s3,
                faults=faults,
                faulty_url=f"http://{host!s}:{port}",
                v_old=v_old,
                v_new=v_new,
                v_delete=v_delete,
                empty=ObjectRef("zarr/z1/empty", v_empty, 0, md5(b"")),
                multipart=ObjectRef(
                    "zarr/z1/mp", done["VersionId"], len(OLD), done["ETag"].strip('"')
                ),
                blob=ObjectRef("blobs/abc/def/abcdef", None, len(OLD), md5(OLD) + "-1"),
                big=ObjectRef("blobs/big", None, len(BIG), md5(BIG)),
            )
        finally:
            server.shutdown()
            thread.join()


@pytest.fixture
def faults(world: World) -> Iterator[Faults]:
    world.faults.reset()
    yield world.faults
    world.faults.reset()


# --- exact versions ---------------------------------------------------------------------------


async def test_old_version_after_overwrite_and_delete(world: World) -> None:
    async with S3Reader.open(world.settings()) as reader:
        ref = world.old()
        assert await reader.read_range(ref, 0, len(OLD)) == OLD
        assert await reader.read_range(ref, 1000, 3000) == OLD[1000:3000]
        assert await reader.read_range(ref, len(OLD) - 1, len(OLD)) == OLD[-1:]
        new = ObjectRef("zarr/z1/0/0", world.v_new, len(NEW), md5(NEW))
        assert await reader.read_range(new, 4, 7) == NEW[4:7]
        assert await reader.get_bytes("zarr/z1/0/0", world.v_old) == OLD
        assert await reader.get_bytes("zarr/z1/0/0", world.v_new) == NEW


async def test_whole_object_reads_are_md5_checked_and_counted(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GET of a whole object with a plain-MD5 ETag is hashed (counted, with the time it took, for
    `zarrfs stats` and the benchmarks): a small one piece by piece as the body arrives, a big one
    after the fact (`_md5_hex`, in a worker thread); a partial range is not hashed."""
    after_the_fact: list[int] = []
    md5_hex = s3_reader._md5_hex

    def counted(data: bytes) -> tuple[str, int]:
        after_the_fact.append(len(data))
        return md5_hex(data)

    monkeypatch.setattr(s3_reader, "_md5_hex", counted)
    assert len(OLD) <= config.HASH_AS_IT_ARRIVES_MAX < len(BIG)
    async with S3Reader.open(world.settings()) as reader:
        assert await reader.read_range(world.old(), 0, len(OLD)) == OLD
        assert after_the_fact == []  # hashed as it arrived
        assert await reader.read_range(world.big, 0, len(BIG)) == BIG
        assert after_the_fact == [len(BIG)]
        assert reader.stats["md5_verified"] == 2
        assert reader.stats["md5_bytes"] == len(OLD) + len(BIG)
        assert reader.stats["md5_ns"] > 0
        assert await reader.read_range(world.old(), 10, 20) == OLD[10:20]
        assert reader.stats["md5_verified"] == 2
        assert reader.stats["md5_mismatches"] == 0


@pytest.mark.parametrize("size", ["small", "big"])
async def test_a_body_damaged_in_transit_is_retried_then_refused(
    world: World, faults: Faults, size: str
) -> None:
    """A whole object whose body does not hash to its ETag (a bit flipped, its length intact) is
    never returned, whether hashed as it arrived (small) or after (big): the attempt is retried, and
    after the last one the read fails (EIO)."""
    ref, data = (world.old(), OLD) if size == "small" else (world.big, BIG)
    async with S3Reader.open(world.settings(faulty=True)) as reader:
        faults.plan = ["flip"]
        assert await reader.read_range(ref, 0, len(data)) == data
        assert (reader.stats["md5_mismatches"], reader.stats["md5_verified"]) == (1, 1)
        faults.plan = ["flip"] * 3
        with pytest.raises(RemoteError, match=r"3 attempt.*CorruptBody.*does not match the ETag"):
            await reader.read_range(ref, 0, len(data))
        assert reader.stats["md5_mismatches"] == 4 and reader.stats["md5_verified"] == 1


async def test_unversioned_blob_and_multipart_etag(world: World) -> None:
    async with S3Reader.open(world.settings()) as reader:
        # single-PUT blob, record carries a multipart-form etag: forms differ, size still checked
        assert await reader.read_range(world.blob, 17, 4000) == OLD[17:4000]
        # multipart object, expected etag of the same (multipart) form and equal
        assert await reader.read_range(world.multipart, 0, 100) == OLD[:100]
        # a pinned version whose recorded ETag differs in form: refused (it is not that object)
        plain = ObjectRef(world.multipart.key, world.multipart.version_id, len(OLD), md5(OLD))
        with pytest.raises(IntegrityError, match="ETag"):
            await reader.read_range(plain, 0, 100)
        # no expected etag at all
        assert await reader.read_range(world.old(etag=None), 5, 6) == OLD[5:6]


async def test_zero_length_reads_send_no_request(world: World, faults: Faults) -> None:
    async with S3Reader.open(world.settings(faulty=True)) as reader:
        nowhere = ObjectRef("no/such/key", "no-such-version", 100, None)
        assert await reader.read_range(nowhere, 7, 7) == b""
        assert await reader.read_range(world.empty, 0, 0) == b""
        assert faults.requests == 0
        assert await reader.get_bytes(world.empty.key, world.empty.version_id) == b""
        with pytest.raises(ValueError):
            await reader.read_range(nowhere, 50, 101)


# --- integrity --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [len(OLD) + 1, len(OLD) - 1, len(OLD) + 5000])
async def test_wrong_size_is_an_integrity_error(world: World, size: int) -> None:
    async with S3Reader.open(world.settings()) as reader:
        ref = world.old(size=size)
        with pytest.raises(IntegrityError, match="zarr/z1/0/0"):
            await reader.read_range(ref, 0, 100)
        with pytest.raises(IntegrityError):
            await reader.read_range(ref, size - 100, size)


async def test_etag_mismatch_is_an_integrity_error(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "0" * 32
    async with S3Reader.open(world.settings()) as reader:
        with (
            caplog.at_level(logging.ERROR, logger="zarrfs.s3_reader"),
            pytest.raises(IntegrityError) as info,
        ):
            await reader.read_range(world.old(etag=wrong), 0, 10)
        message = str(info.value)
        for part in (BUCKET, "zarr/z1/0/0", world.v_old, wrong, md5(OLD)):
            assert part in message
        assert any("zarr/z1/0/0" in r.getMessage() for r in caplog.records)
        # both multipart-form but different
        mp = world.multipart
        bad = ObjectRef(mp.key, mp.version_id, mp.size, "f" * 32 + "-1")
        with pytest.raises(IntegrityError, match="ETag"):
            await reader.read_range(bad, 0, 10)
        # quotes and case do not matter
        ok = world.old(etag=f'"{md5(OLD).upper()}"')
        assert await reader.read_range(ok, 0, 10) == OLD[:10]


async def test_version_mismatch_in_response_is_an_integrity_error(
    world: World, faults: Faults
) -> None:
    async with S3Reader.open(world.settings(faulty=True)) as reader:
        faults.plan = ["badversion"]
        with pytest.raises(IntegrityError, match="not-the-version"):
            await reader.read_range(world.old(), 0, 10)
        assert faults.requests == 1  # not retried


# --- missing objects and access ---------------------------------------------------------------


async def test_missing_key_or_version(world: World, faults: Faults) -> None:
    async with S3Reader.open(world.settings(faulty=True)) as reader:
        cases = [
            world.old(version_id="no-such-version"),
            world.old(version_id=world.v_delete),  # the delete marker
            ObjectRef("zarr/z1/nothing", "v", 10, None),
            ObjectRef("zarr/z1/0/0", None, len(NEW), None),  # current version is deleted
        ]
        for ref in cases:
            with pytest.raises(ObjectMissing):
                await reader.read_range(ref, 0, 10)
        assert faults.requests == len(cases)  # never retried
        with pytest.raises(ObjectMissing):
            await reader.get_bytes("zarr/z1/0/0")


async def test_access_denied_is_remote_error_not_retried(world: World, faults: Faults) -> None:
    settings = S3Settings(endpoint_url=world.faulty_url, bucket="private-bucket", max_attempts=3)
    async with S3Reader.open(settings) as reader:
        with pytest.raises(RemoteError, match="access denied") as info:
            await reader.read_range(ObjectRef("secret", None, 1, None), 0, 1)
        assert not isinstance(info.value, ObjectMissing)
        assert faults.requests == 1


# --- retries ----------------------------------------------------------------------------------


async def test_5xx_is_retried(world: World, faults: Faults) -> None:
    async with S3Reader.open(world.settings(faulty=True)) as reader:
        faults.plan = ["500", "503"]
        assert await reader.read_range(world.old(), 100, 200) == OLD[100:200]
        assert faults.requests == 3


async def test_5xx_exhausts_into_remote_error(world: World, faults: Faults) -> None:
    async with S3Reader.open(world.settings(faulty=True, max_attempts=3)) as reader:
        faults.plan = ["500", "503", "500", "500"]
        with pytest.raises(RemoteError, match=r"zarr/z1/0/0.*3 attempt") as info:
            await reader.read_range(world.old(), 0, 10)
        assert not isinstance(info.value, ObjectMissing | IntegrityError)
        assert info.value.__cause__ is not None
        assert faults.requests == 3


async def test_truncated_body_is_retried(world: World, faults: Faults) -> None:
    async with S3Reader.open(world.settings(faulty=True)) as reader:
        faults.plan = ["truncate"]
        assert await reader.read_range(world.old(), 0, len(OLD)) == OLD
        assert faults.requests == 2


async def test_timeout_is_retried(world: World, faults: Faults) -> None:
    async with S3Reader.open(world.settings(faulty=True, request_timeout=0.5)) as reader:
        faults.plan = ["hang"]
        assert await reader.read_range(world.old(), 0, 10) == OLD[:10]
        assert faults.requests == 2


async def test_concurrency_is_bounded(world: World, faults: Faults) -> None:
    async with S3Reader.open(world.settings(faulty=True, max_concurrency=2)) as reader:
        faults.delay = 0.1
        results: dict[int, bytes] = {}

        async def read(i: int) -> None:
            results[i] = await reader.read_range(world.old(), i * 100, i * 100 + 100)

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(read, i)
        assert results == {i: OLD[i * 100 : i * 100 + 100] for i in range(6)}
        assert faults.max_inflight == 2


# --- whole objects ----------------------------------------------------------------------------


async def test_download_streams_to_file(world: World, faults: Faults, tmp_path: Path) -> None:
    async with S3Reader.open(world.settings(faulty=True)) as reader:
        dest = tmp_path / "big.bin"
        assert await reader.download(world.big.key, dest) == len(BIG)
        assert dest.read_bytes() == BIG
        old = tmp_path / "old.bin"
        faults.plan = ["truncate"]
        assert await reader.download("zarr/z1/0/0", old, world.v_old) == len(OLD)
        assert old.read_bytes() == OLD
        with pytest.raises(ObjectMissing):
            await reader.download("zarr/z1/missing", tmp_path / "missing")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "old.bin"]


# --- HttpClient -------------------------------------------------------------------------------


@dataclass
class HttpWorld:
    base: str
    responses: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)


@pytest.fixture
def http() -> Iterator[HttpWorld]:
    world = HttpWorld(base="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            world.hits[self.path] = world.hits.get(self.path, 0) + 1
            queue = world.responses.get(self.path, [(404, b"not found")])
            status, body = queue.pop(0) if len(queue) > 1 else queue[0]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    world.base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield world
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_http_get_bytes_json_and_errors(http: HttpWorld) -> None:
    doc = {"assets": [1, 2, 3]}
    http.responses = {
        "/ok.json": [(200, json.dumps(doc).encode())],
        "/flaky": [(500, b"oops"), (503, b"busy"), (200, b"finally")],
        "/down": [(500, b"down")],
        "/forbidden": [(403, b"no")],
        "/gone": [(410, b"gone")],
        "/notjson": [(200, b"<html>")],
    }
    async with HttpClient.open(max_attempts=3, timeout=5) as client:
        assert await client.get_json(http.base + "/ok.json") == doc
        assert await client.get_bytes(http.base + "/flaky") == b"finally"
        assert http.hits["/flaky"] == 3
        with pytest.raises(ObjectMissing):
            await client.get_bytes(http.base + "/missing")
        with pytest.raises(ObjectMissing):
            await client.get_bytes(http.base + "/gone")
        assert http.hits["/missing"] == 1
        with pytest.raises(RemoteError, match=r"/down.*3 attempt"):
            await client.get_bytes(http.base + "/down")
        assert http.hits["/down"] == 3
        with pytest.raises(RemoteError, match="403") as info:
            await client.get_bytes(http.base + "/forbidden")
        assert not isinstance(info.value, ObjectMissing)
        assert http.hits["/forbidden"] == 1
        with pytest.raises(RemoteError, match="not JSON"):
            await client.get_json(http.base + "/notjson")


async def test_http_connection_refused_is_retried_then_remote_error() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        async with HttpClient.open(max_attempts=2, timeout=5) as client:
            with pytest.raises(RemoteError, match="2 attempt"):
                await client.get_bytes(f"http://127.0.0.1:{port}/x")


async def test_http_documents_are_bounded_and_retried(http: HttpWorld) -> None:
    http.responses = {"/big": [(500, b""), (200, BIG)]}
    async with HttpClient.open(max_attempts=3, timeout=5) as client:
        assert await client.get_bytes(http.base + "/big", max_bytes=len(BIG), document=True) == BIG
        assert http.hits["/big"] == 2
        with pytest.raises(DocumentTooLarge):
            await client.get_bytes(http.base + "/big", max_bytes=len(BIG) - 1, document=True)
        assert http.hits["/big"] == 3  # refused at once, not retried
        with pytest.raises(ObjectMissing):
            await client.get_bytes(http.base + "/nothing", document=True)


# --- Remote -----------------------------------------------------------------------------------


async def test_remote_dispatches_on_scheme(world: World, http: HttpWorld, tmp_path: Path) -> None:
    http.responses = {"/doc": [(200, b"from http")]}
    local = tmp_path / "local file.json"
    local.write_bytes(b"from disk")
    big = 1 << 30
    async with Remote.open(world.settings()) as remote:
        assert await remote.get_bytes(f"s3://{BUCKET}/{world.blob.key}", max_bytes=big) == OLD
        assert await remote.get_bytes(f"s3://{BUCKET}/{world.big.key}", max_bytes=big) == BIG
        assert await remote.get_bytes(http.base + "/doc", max_bytes=big) == b"from http"
        file_url = "file://" + str(local).replace(" ", "%20")
        assert await remote.get_bytes(file_url, max_bytes=big) == b"from disk"
        for url in (f"s3://{BUCKET}/{world.big.key}", http.base + "/doc", file_url):
            with pytest.raises(DocumentTooLarge):
                await remote.get_bytes(url, max_bytes=5)

        with pytest.raises(RemoteError, match="other-bucket"):
            await remote.get_bytes("s3://other-bucket/key", max_bytes=big)
        with pytest.raises(ObjectMissing):
            await remote.get_bytes(f"s3://{BUCKET}/zarr-manifest/none.json", max_bytes=big)
        with pytest.raises(ObjectMissing):
            await remote.get_bytes(f"file://{tmp_path}/absent", max_bytes=big)
        with pytest.raises(RemoteError, match="scheme"):
            await remote.get_bytes("ftp://example.org/x", max_bytes=big)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local file.json"]  # nothing written


async def test_pinned_read_without_version_header_is_refused(world: World, faults: Faults) -> None:
    async with S3Reader.open(world.settings(faulty=True)) as reader:
        faults.plan = ["noversion"]
        with pytest.raises(IntegrityError, match="VersionId"):
            await reader.read_range(world.old(), 0, 10)
        # blobs are not pinned by version: no header is needed
        faults.plan = ["noversion"]
        assert await reader.read_range(world.blob, 0, 10) == OLD[:10]


@pytest.mark.parametrize(
    "value",
    [
        "2023-06-23T17:35:12.000Z",
        "2023-06-23T17:35:12.123456Z",
        "2023-06-23T17:35:12Z",
        "2023-06-23T19:35:12.5+02:00",
        "Fri, 23 Jun 2023 17:35:12 GMT",  # an HTTP date: botocore's parser keeps these
        "2023-06-23T17:35:12",  # no zone: left to botocore
        "1687541712",
    ],
)
async def test_fast_timestamp_parser_agrees_with_botocore(value: str) -> None:
    import botocore.utils

    from zarrfs.s3_reader import parse_s3_timestamp

    ours = parse_s3_timestamp(value)
    theirs = botocore.utils.parse_timestamp(value)
    assert (ours.tzinfo is None) == (theirs.tzinfo is None)
    assert ours.timestamp() == theirs.timestamp()


# --- the anonymous path's URLs, and a listing client that cannot be made ----------------------------


async def test_object_urls_name_exactly_the_key() -> None:
    """Every key names itself: `.` and `..` segments are not resolved away, reserved characters
    are escaped, the VersionId pins; a bucket with dots goes path-style (no certificate covers it)."""
    from zarrfs.s3_reader import object_url

    local = S3Settings(endpoint_url="http://127.0.0.1:9/", bucket="b")
    assert object_url(local, "a/../b/./c d+?#%", "v 1") == (
        "http://127.0.0.1:9/b/a/%2E%2E/b/%2E/c%20d%2B%3F%23%25?versionId=v%201"
    )
    aws = S3Settings(bucket="dandiarchive", region="us-east-2")
    assert object_url(aws, "blobs/x") == "https://dandiarchive.s3.us-east-2.amazonaws.com/blobs/x"
    assert object_url(aws, "blobs/x", regional=False) == (
        "https://dandiarchive.s3.amazonaws.com/blobs/x"
    )
    dotted = S3Settings(bucket="my.bucket", region="eu-west-1")
    assert object_url(dotted, "k") == "https://s3.eu-west-1.amazonaws.com/my.bucket/k"


async def test_a_listing_client_that_cannot_be_made_is_a_remote_error(world: World) -> None:
    """aiobotocore's client is made when a listing first needs it: a failure then (no such AWS
    profile, a broken install) is a RemoteError naming it, never a botocore exception, and the next
    listing tries again."""
    attempts = []

    async def broken() -> Any:
        attempts.append(1)
        raise RuntimeError("The config profile (nope) could not be found")

    async with S3Reader.open(world.settings()) as anonymous:
        reader = S3Reader(anonymous._client, world.settings(), listing=broken)
        for _ in range(2):
            with pytest.raises(RemoteError, match="could not be found"):
                await reader.list_prefixes("zarr/")
        assert len(attempts) == 2
        assert await reader.read_range(world.old(), 0, 10) == OLD[:10]  # reads need no listing


# --- socket reads ------------------------------------------------------------------------------


async def test_bodies_are_read_from_the_socket_in_wide_reads(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a reader raises httpcore's per-read ceiling to `config.HTTP_READ_SIZE` (from its
    64 KiB), never lowers a higher one, and a streamed body still arrives exact. A 3 MiB body sent
    at once fills the socket faster than it is read, so reads wider than 64 KiB happen."""
    from httpcore._async.http11 import AsyncHTTP11Connection

    monkeypatch.setattr(AsyncHTTP11Connection, "READ_NUM_BYTES", 64 << 10)
    chunks: list[bytes] = []
    async with S3Reader.open(world.settings()) as reader:
        assert AsyncHTTP11Connection.READ_NUM_BYTES == config.HTTP_READ_SIZE
        ticket = Ticket(Priority.PREFETCH)
        await reader.stream_range(world.big, 0, len(BIG), ticket, chunks.append)
    assert b"".join(chunks) == BIG
    assert max(map(len, chunks)) > 64 << 10
    monkeypatch.setattr(AsyncHTTP11Connection, "READ_NUM_BYTES", 4 << 20)
    async with HttpClient.open():
        assert AsyncHTTP11Connection.READ_NUM_BYTES == 4 << 20
