"""Shared fixtures: the sample dandiset in a local S3, a fake DANDI API, and real FUSE mounts.

Mount helpers start `python -m zarrfs mount -f` in a subprocess, poll `os.path.ismount` with a
deadline (failing fast with the daemon's output if it died), and always tear down with
`fusermount3 -u -z`, then terminate, then kill. No FUSE test is skipped silently: in CI (CI=true) a
missing /dev/fuse or fusermount3 is an error, elsewhere a visible skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from zarrfs.locals3 import LocalS3
from zarrfs.sample import SampleDandiset, build_sample

MOUNT_DEADLINE = 60.0


def fuse_problem() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


def require_fuse() -> None:
    problem = fuse_problem()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"FUSE tests cannot run in CI: {problem}")
    pytest.skip(f"FUSE not available: {problem}")


@pytest.fixture(scope="session")
def local_s3() -> Iterator[LocalS3]:
    with LocalS3() as s3:
        yield s3


@pytest.fixture(scope="session")
def sample(local_s3: LocalS3) -> SampleDandiset:
    return build_sample(local_s3)


@pytest.fixture(scope="session")
def fake_api(sample: SampleDandiset) -> Iterator[str]:
    from zarrfs.fake_api import FakeDandiAPI

    with FakeDandiAPI(sample) as api:
        yield api.url


class Mounted:
    """A live mount in a subprocess."""

    def __init__(self, path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
        self.path = path
        self.process = process
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def zarrfs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "zarrfs", *args]


def wait_for_mount(path: Path, process: subprocess.Popen[bytes] | None, log: Path | None) -> None:
    deadline = time.monotonic() + MOUNT_DEADLINE
    while not os.path.ismount(path):
        if process is not None and process.poll() is not None:
            output = log.read_text(errors="replace") if log else ""
            pytest.fail(f"zarrfs exited with {process.returncode} before mounting:\n{output}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} was not mounted within {MOUNT_DEADLINE} s")
        time.sleep(0.05)


def unmount(path: Path, process: subprocess.Popen[bytes] | None = None) -> None:
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, capture_output=True)
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def mount(
    tmp_path_factory: pytest.TempPathFactory, sample: SampleDandiset
) -> Iterator[Callable[..., Mounted]]:
    """Factory: `mount("000123@0.251101.1200", *extra_args)` -> a live `Mounted`."""
    require_fuse()
    live: list[Mounted] = []

    def start(source: str, *extra: str, cache_dir: Path | None = None) -> Mounted:
        base = tmp_path_factory.mktemp("mnt")
        path = base / "mnt"
        path.mkdir()
        log = base / "zarrfs.log"
        cache = cache_dir or base / "cache"
        args = [
            "mount",
            "-f",
            source,
            str(path),
            "--endpoint-url",
            sample.endpoint_url,
            "--cache-dir",
            str(cache),
            *extra,
        ]
        with open(log, "wb") as out:
            process = subprocess.Popen(zarrfs_command(*args), stdout=out, stderr=subprocess.STDOUT)
        mounted = Mounted(path, process, log)
        live.append(mounted)
        wait_for_mount(path, process, log)
        return mounted

    yield start
    for mounted in live:
        unmount(mounted.path, mounted.process)
