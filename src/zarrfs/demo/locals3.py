"""An embedded local S3 (moto server) shaped like the public DANDI bucket.

Owns: running a moto S3 server on 127.0.0.1 with a free port and creating a versioned bucket that
anonymous clients may read (as the real archive allows). Used by `zarrfs demo`, the test suite and the
benchmarks; never by a real mount.

By default the server runs in its own process (`python -m zarrfs.demo.locals3`): a client in the same
process that holds the GIL while it blocks in a read syscall on the mount (h5py does) would otherwise
stop the server thread and deadlock. `isolated=False` runs it as a thread in this process instead, for
tests that wrap moto's in-process backend. `latency` adds a delay to every response (a WSGI middleware;
`tc netem` is not available here) to imitate a remote store.

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
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

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


def _make_server(latency: float) -> Any:
    """A threaded werkzeug server around moto's WSGI app, on a free loopback port."""
    _list_versions_without_copies()
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        create_backend_app,
    )
    from moto.server import MotoRequestHandler  # type: ignore[attr-defined]
    from werkzeug.serving import make_server

    app: Callable[..., Iterable[bytes]] = DomainDispatcherApplication(create_backend_app)
    if latency > 0:
        inner = app

        def delayed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            time.sleep(latency)
            return inner(environ, start_response)

        app = delayed
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    return make_server("127.0.0.1", 0, app, True, request_handler=MotoRequestHandler)


class LocalS3:
    """A running moto server holding one public-read, versioned bucket.

    Use as a context manager: `with LocalS3() as s3: s3.client.put_object(...)`. `endpoint_url` is what
    zarrfs gets as `--endpoint-url`; `client` is a signed boto3 client for writing.
    """

    def __init__(
        self, bucket: str = "dandiarchive", *, isolated: bool = True, latency: float = 0.0
    ) -> None:
        self.bucket = bucket
        self.isolated = isolated
        self.latency = latency
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
                [sys.executable, "-m", "zarrfs.demo.locals3", "--latency", str(self.latency)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            )
            self.pid = self._process.pid
            assert self._process.stdout is not None
            line = self._process.stdout.readline().strip()
            if not line.startswith("PORT "):
                self.stop()
                raise RuntimeError(f"local S3 server did not start (said {line!r})")
            port = int(line.split()[1])
        else:
            self._server = _make_server(self.latency)
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
    args = parser.parse_args(argv)
    server = _make_server(args.latency)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(f"PORT {server.server_address[1]}", flush=True)
    sys.stdin.read()  # returns when the parent closes our stdin or dies
    server.shutdown()


if __name__ == "__main__":
    _serve_until_stdin_closes()
