"""Shared fixtures: the sample dandiset in a local S3, a fake DANDI API, and real FUSE mounts.

Mount helpers start `python -m zarrfs mount -f` in a subprocess, poll `os.path.ismount` with a
deadline (failing fast with the daemon's output if it died), and always tear down with
`fusermount3 -u -z`, then terminate, then kill. No FUSE test is skipped silently: in CI (CI=true) a
missing /dev/fuse or fusermount3 is an error, elsewhere a visible skip.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from zarrfs import fuse_ops
from zarrfs.demo.locals3 import LocalS3
from zarrfs.demo.sample import SampleDandiset, build_sample
from zarrfs.fuse_ops import INTERNAL_ERROR

#: Real DANDI files (a manifest, an asset record), copied into the repository (see its README).
REFERENCE_SAMPLES = Path(__file__).resolve().parent / "fixtures" / "dandi"
MOUNT_DEADLINE = 60.0
EXIT_DEADLINE = 20.0


def fuse_problem() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


def require(ok: bool, problem: str) -> None:
    """Skip a test whose precondition does not hold here (a developer's machine without root or a
    tool), saying why; in CI (CI=true), where `.ci/run` provides all of them, fail instead: no
    test is skipped silently there."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"cannot run in CI: {problem}")
    pytest.skip(problem)


def require_fuse() -> None:
    problem = fuse_problem()
    require(problem is None, f"FUSE not available: {problem}")


@pytest.fixture(scope="session")
def local_s3() -> Iterator[LocalS3]:
    with LocalS3() as s3:
        yield s3


@pytest.fixture(scope="session")
def sample(local_s3: LocalS3) -> SampleDandiset:
    return build_sample(local_s3)


@pytest.fixture(scope="session")
def fake_api(sample: SampleDandiset) -> Iterator[str]:
    from zarrfs.demo.fake_api import FakeDandiAPI

    with FakeDandiAPI(sample) as api:
        yield api.url


#: The line a mount logs once it serves (its core ready, its state file written).
SERVING = re.compile(r"^.*\b(mounted \S+ at|serving \S+ on) ", re.MULTILINE)


class Mounted:
    """A live mount in a subprocess."""

    def __init__(self, path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
        self.path = path
        self.process = process
        self.log = log
        #: Tests that inject a bug on purpose set this; otherwise a bug answered with EIO by the
        #: handlers' last resort fails the test at teardown.
        self.expect_internal_errors = False

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def inject(tmp: Path, code: str) -> dict[str, str]:
    """An environment whose Python processes run `code` at start-up (a `sitecustomize` module on
    PYTHONPATH), for tests that make the daemon misbehave in a controlled way."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "sitecustomize.py").write_text(code)
    path = os.pathsep.join(p for p in (str(tmp), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def zarrfs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "zarrfs", *args]


def start_mount(
    base: Path,
    source: str,
    *extra: str,
    endpoint: str,
    cache: Path,
    env: dict[str, str] | None = None,
) -> Mounted:
    """`zarrfs mount -f` in a subprocess; returns once the mount serves (fails fast). The mountpoint
    is live before the core is ready (fast start): a mount serves once it logs so."""
    path = base / "mnt"
    path.mkdir(parents=True)
    log = base / "zarrfs.log"
    args = ["mount", "-f", source, str(path), "--endpoint-url", endpoint, "--cache-dir", str(cache)]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            zarrfs_command(*args, *extra), stdout=out, stderr=subprocess.STDOUT, env=env
        )
    mounted = Mounted(path, process, log)
    deadline = time.monotonic() + MOUNT_DEADLINE
    while not (os.path.ismount(path) and SERVING.search(mounted.output())):
        if process.poll() is not None:
            pytest.fail(
                f"zarrfs exited with {process.returncode} before mounting:\n{mounted.output()}"
            )
        if time.monotonic() > deadline:
            stop_mount(mounted)
            pytest.fail(f"{path} was not mounted within {MOUNT_DEADLINE} s:\n{mounted.output()}")
        time.sleep(0.05)
    return mounted


def stop_mount(mounted: Mounted) -> None:
    """Unmount (lazily), let the daemon exit by itself, else terminate, then kill. Fails the test
    if the daemon answered an unexpected exception (a bug) with EIO."""
    if os.path.ismount(mounted.path):
        subprocess.run(
            ["fusermount3", "-u", "-z", str(mounted.path)], check=False, capture_output=True
        )
    for stop in (None, mounted.process.terminate, mounted.process.kill):
        if mounted.process.poll() is not None:
            break
        if stop is not None:
            stop()
        try:
            mounted.process.wait(timeout=EXIT_DEADLINE)
        except subprocess.TimeoutExpired:
            continue
    if not mounted.expect_internal_errors and INTERNAL_ERROR in mounted.output():
        pytest.fail(f"the daemon hit a bug (answered EIO):\n{mounted.output()}")


@pytest.fixture(autouse=True)
def no_internal_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Handler tests awaited in this process: a bug caught by the last resort still fails the test
    (unless the test expects it: `@pytest.mark.internal_errors`)."""
    fuse_ops.internal_errors.clear()
    yield
    found = dict(fuse_ops.internal_errors)
    fuse_ops.internal_errors.clear()
    if found and request.node.get_closest_marker("internal_errors") is None:
        pytest.fail(f"unexpected exceptions answered with EIO: {found}")


def processes_mentioning(path: Path) -> list[int]:
    """Pids of live processes with `path` as one of their arguments."""
    needle = os.fsencode(path)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in argv:
            pids.append(int(entry))
    return pids


def wait_until_no_process_mentions(path: Path) -> None:
    deadline = time.monotonic() + EXIT_DEADLINE
    while pids := processes_mentioning(path):
        if time.monotonic() > deadline:
            pytest.fail(f"processes {pids} still run for {path}")
        time.sleep(0.05)


@pytest.fixture
def mount(
    tmp_path_factory: pytest.TempPathFactory, sample: SampleDandiset
) -> Iterator[Callable[..., Mounted]]:
    """Factory: `mount("000123@0.251101.1200", *extra_args)` -> a live `Mounted`."""
    require_fuse()
    live: list[Mounted] = []

    def start(
        source: str,
        *extra: str,
        cache_dir: Path | None = None,
        env: dict[str, str] | None = None,
        endpoint: str | None = None,
    ) -> Mounted:
        base = tmp_path_factory.mktemp("mnt")
        mounted = start_mount(
            base,
            source,
            *extra,
            endpoint=endpoint or sample.endpoint_url,
            cache=cache_dir or base / "cache",
            env=env,
        )
        live.append(mounted)
        return mounted

    yield start
    for mounted in live:
        stop_mount(mounted)


class ForwardingProxy:
    """An HTTP proxy in front of the local S3: forwards every GET and HEAD, counts them by (method,
    path), and passes each GET body through `alter` (a subclass damages some). With
    `drop_checksums`, `x-amz-checksum-*` headers are not passed on, as for most objects in the
    archive (uploaded without a checksum), so that botocore cannot catch damage itself."""

    def __init__(self, upstream: str, *, drop_checksums: bool = False) -> None:
        self.upstream = urlsplit(upstream)
        self.drop_checksums = drop_checksums
        self.counts: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.forward("GET")

            def do_HEAD(self) -> None:
                self.forward("HEAD")

            def forward(self, method: str) -> None:
                path = urlsplit(self.path).path
                with proxy.lock:
                    proxy.counts[(method, path)] += 1
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(method, self.path, headers=headers)
                response = conn.getresponse()
                body = response.read()
                if method == "GET":
                    body = proxy.alter(path, body)
                self.send_response(response.status)
                for key, value in response.getheaders():
                    low = key.lower()
                    if low in ("content-length", "transfer-encoding", "connection") or (
                        proxy.drop_checksums and low.startswith("x-amz-checksum")
                    ):
                        continue
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(body)
                conn.close()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alter(self, path: str, body: bytes) -> bytes:
        """The body of a GET of `path` as the client gets it (unchanged here)."""
        return body

    def gets(self, key: str) -> int:
        """GETs so far of paths ending with `key`."""
        with self.lock:
            return sum(n for (m, p), n in self.counts.items() if m == "GET" and p.endswith(key))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
