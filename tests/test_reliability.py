"""A mount that never dies and never serves a wrong byte: real mounts under bugs, hostile input,
damaged bytes in transit and stop signals.

Misbehaviour is injected in a controlled way: a `sitecustomize` module on the daemon's PYTHONPATH
(`conftest.inject`) patches one function (a bug in one request, a conversion that never ends, an S3
read that hangs), and a byte-flipping proxy sits between the daemon and the local S3.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import EXIT_DEADLINE, ForwardingProxy, Mounted, inject, zarrfs_command
from zarrfs.demo.sample import (
    ARRAY_PATH,
    EPHYS_PATH,
    OME_PATH,
    V1,
    ManifestLeaf,
    SampleDandiset,
    build_manifest,
    format_manifest,
    manifest_key,
    zarr_checksum_of,
)
from zarrfs.fuse_ops import INTERNAL_ERROR

pytestmark = pytest.mark.fuse

#: A stop must be over within `docker stop`'s default grace.
STOP_DEADLINE = 10.0


def assert_errno(code: int, action: Callable[..., object], *args: object) -> None:
    with pytest.raises(OSError) as info:
        action(*args)
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"


def in_thread(action: Callable[[], object]) -> threading.Thread:
    """Run a syscall that will block (on a hung daemon) in a daemon thread."""

    def run() -> None:
        with contextlib.suppress(OSError):  # the mount went away under it: expected
            action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- 1. a bug in one request ------------------------------------------------------------------------

BUG = """
import zarrfs.fs.filesystem as f
_lookup = f.Filesystem.lookup
async def lookup(self, parent, name):
    if name == b"boom":
        raise RuntimeError("injected bug")
    return await _lookup(self, parent, name)
f.Filesystem.lookup = lookup
"""


def test_a_bug_in_one_request_is_eio_and_the_mount_keeps_serving(
    mount: Callable[..., Mounted], sample: SampleDandiset, tmp_path: Path
) -> None:
    mounted = mount(f"{sample.dandiset_id}@{V1}", env=inject(tmp_path / "inject", BUG))
    mounted.expect_internal_errors = True
    for _ in range(3):
        assert_errno(errno.EIO, os.stat, mounted.path / "boom")
        assert_errno(errno.EIO, os.stat, mounted.path / OME_PATH / "boom")
    files = sample.versions[V1].files
    for rel in (EPHYS_PATH, f"{OME_PATH}/.zattrs", f"{ARRAY_PATH}/zarr.json"):
        assert (mounted.path / rel).read_bytes() == files[rel]
    assert mounted.process.poll() is None
    log = mounted.output()
    assert log.count(f"{INTERNAL_ERROR} in lookup (answered EIO") == 1  # one traceback ...
    assert log.count("Traceback") == 1 and "RuntimeError: injected bug" in log
    assert f"{INTERNAL_ERROR} in lookup again (6 times so far" in log  # ... then one line each


# --- 2. stopping, whatever is in flight ---------------------------------------------------------------

HANG = """
import time, trio
import zarrfs.manifests.parse as mc, zarrfs.s3_reader as s3
_parse = mc.parse_manifest  # looked up there when a conversion starts
def parse(*args, **kwargs):
    time.sleep(600)  # a conversion that outlives any grace period (an uncancellable thread)
    return _parse(*args, **kwargs)
mc.parse_manifest = parse
_read = s3.S3Reader.read_range
async def read_range(self, ref, start, end, ticket=None):
    if ref.key.startswith("blobs/"):
        await trio.sleep_forever()  # S3 never answers
    return await _read(self, ref, start, end, ticket)
s3.S3Reader.read_range = read_range
"""


def hang_everything(mounted: Mounted) -> list[threading.Thread]:
    """A read blocked on S3 and a lookup blocked on a manifest conversion, both in flight."""
    threads = [
        in_thread(lambda: (mounted.path / EPHYS_PATH).read_bytes()),
        in_thread(lambda: os.listdir(mounted.path / OME_PATH)),
    ]
    wait_for(lambda: "fetched manifest of" in mounted.output(), "the conversion to start")
    time.sleep(0.5)
    return threads


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_the_daemon_within_10s_whatever_is_in_flight(
    mount: Callable[..., Mounted], sample: SampleDandiset, tmp_path: Path, signum: int
) -> None:
    mounted = mount(f"{sample.dandiset_id}@{V1}", env=inject(tmp_path / "inject", HANG))
    threads = hang_everything(mounted)
    started = time.monotonic()
    mounted.process.send_signal(signum)
    assert mounted.process.wait(timeout=STOP_DEADLINE) == 0
    assert time.monotonic() - started < STOP_DEADLINE
    assert not os.path.ismount(mounted.path)
    log = mounted.output()
    assert "Traceback" not in log and "cancelling them" in log
    for thread in threads:
        thread.join(timeout=EXIT_DEADLINE)
        assert not thread.is_alive()


def test_a_second_stop_signal_cancels_at_once(
    mount: Callable[..., Mounted], sample: SampleDandiset, tmp_path: Path
) -> None:
    mounted = mount(f"{sample.dandiset_id}@{V1}", env=inject(tmp_path / "inject", HANG))
    hang_everything(mounted)
    mounted.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "received SIGTERM, unmounting" in mounted.output(), "the first signal")
    started = time.monotonic()
    mounted.process.send_signal(signal.SIGTERM)
    assert mounted.process.wait(timeout=STOP_DEADLINE) == 0
    assert time.monotonic() - started < 3.0  # not the 5 s grace period
    assert not os.path.ismount(mounted.path)
    log = mounted.output()
    assert "received SIGTERM again" in log and "Traceback" not in log


# --- 3. signals for operators ----------------------------------------------------------------------


def test_background_daemon_leaves_the_callers_directory_and_reopens_its_log_on_sighup(
    sample: SampleDandiset, tmp_path: Path
) -> None:
    from conftest import require_fuse

    require_fuse()
    mnt, log = tmp_path / "mnt", tmp_path / "logs" / "zarrfs.log"
    mnt.mkdir()
    workdir = tmp_path / "caller"
    workdir.mkdir()
    command = zarrfs_command(
        "mount", f"{sample.dandiset_id}@{V1}", str(mnt), "--endpoint-url", sample.endpoint_url,
        "--cache-dir", str(tmp_path / "cache"), "--log-file", str(log),
    )  # fmt: skip
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    pids = [p for p in _pids_with_arg(str(mnt))]
    try:
        assert len(pids) == 1
        pid = pids[0]
        assert os.readlink(f"/proc/{pid}/cwd") == "/"  # the caller's directory is not kept busy
        assert log.stat().st_mode & 0o777 == 0o600
        assert log.parent.stat().st_mode & 0o777 == 0o700
        # logrotate: move the file away, SIGHUP, and new lines go to a new file
        rotated = log.with_name("zarrfs.log.1")
        log.rename(rotated)
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: log.exists() and "log file reopened" in log.read_text(), "the new log")
        assert os.path.ismount(mnt)  # SIGHUP does not stop a mount that logs to a file
        # SIGUSR2: trio tasks; SIGUSR1: every thread's stack (faulthandler), into the log
        os.kill(pid, signal.SIGUSR2)
        wait_for(lambda: "trio tasks:" in log.read_text(), "the task dump")
        assert "_handle_signals" in log.read_text()
        os.kill(pid, signal.SIGUSR1)
        wait_for(lambda: "most recent call first" in _all_text(log, rotated), "the stack dump")
    finally:
        subprocess.run(zarrfs_command("unmount", str(mnt)), check=False)
        for pid in _pids_with_arg(str(mnt)):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                wait_for(lambda p=pid: not Path(f"/proc/{p}").exists(), "the daemon to exit")


def _all_text(*paths: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in paths if p.exists())


def _pids_with_arg(arg: str) -> list[int]:
    from conftest import processes_mentioning

    return [
        pid
        for pid in processes_mentioning(Path(arg))
        if b"fusermount3" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


# --- 4. damaged bytes in transit ----------------------------------------------------------------------


class FlippingProxy(ForwardingProxy):
    """Flips one byte in the body of the next `flips` GETs whose path ends with `target`, and drops
    the checksum headers (see `ForwardingProxy`)."""

    def __init__(self, upstream: str, target: str) -> None:
        super().__init__(upstream, drop_checksums=True)
        self.target = target
        self.flips = 0
        self.flipped = 0

    def alter(self, path: str, body: bytes) -> bytes:
        with self.lock:
            if not (path.endswith(self.target) and self.flips > 0 and body):
                return body
            self.flips -= 1
            self.flipped += 1
        return body[:100] + bytes([body[100] ^ 0x01]) + body[101:]


@pytest.fixture
def proxy(sample: SampleDandiset) -> Iterator[FlippingProxy]:
    zarr_id = sample.versions[V1].zarr_ids[OME_PATH]
    p = FlippingProxy(sample.endpoint_url, f"zarr/{zarr_id}/0/0/0/0/0")
    yield p
    p.close()


def test_a_byte_flipped_in_transit_is_never_served(
    mount: Callable[..., Mounted], sample: SampleDandiset, proxy: FlippingProxy
) -> None:
    rel = f"{OME_PATH}/0/0/0/0/0"
    expected = sample.versions[V1].files[rel]
    assert len(expected) > 101
    mounted = mount(f"{sample.dandiset_id}@{V1}", endpoint=proxy.url)
    proxy.flips = 1  # damaged once: the retry gets the real bytes
    assert (mounted.path / rel).read_bytes() == expected
    assert proxy.flipped == 1 and "damaged in transit" in mounted.output()
    proxy.flips = 100  # damaged every time: EIO, and the log names the object version
    other = f"{sample.dandiset_id}@{V1}"
    second = mount(other, endpoint=proxy.url)
    assert_errno(errno.EIO, (second.path / rel).read_bytes)
    log = second.output()
    version_id = json.loads(sample.versions[V1].manifests[OME_PATH])["entries"]["0"]["0"]["0"]["0"][
        "0"
    ][0]
    assert f"zarr/{sample.versions[V1].zarr_ids[OME_PATH]}/0/0/0/0/0?versionId={version_id}" in log
    assert "does not match the ETag" in log
    assert second.process.poll() is None


# --- 5. hostile input in the bucket ----------------------------------------------------------------

HOSTILE_ID = "000666"


def hostile_zarr(
    sample: SampleDandiset, client: Any, zarr_id: str, leaves: list[ManifestLeaf]
) -> dict[str, Any]:
    """A Zarr whose manifest is named by the checksum its (hostile) entries really compute to."""
    checksum = zarr_checksum_of(leaves)
    manifest = build_manifest(leaves)
    client.put_object(
        Bucket=sample.bucket,
        Key=manifest_key(zarr_id, checksum),
        Body=format_manifest(manifest).encode(),
    )
    return {
        "identifier": zarr_id,
        "path": f"hostile/{zarr_id[:4]}.zarr",
        "contentSize": 1,
        "contentUrl": [f"https://dandiarchive.s3.amazonaws.com/zarr/{zarr_id}/"],
        "digest": {"dandi:dandi-zarr-checksum": checksum},
        "encodingFormat": "application/x-zarr",
    }


def test_hostile_asset_records_and_manifests_are_refused_and_the_rest_served(
    mount: Callable[..., Mounted], sample: SampleDandiset, local_s3: Any
) -> None:
    client = local_s3.client
    v1 = sample.versions[V1]
    good = copy.deepcopy(v1.assets)
    blob = next(r for r in good if r["path"] == EPHYS_PATH)
    when = "2025-11-01T12:00:00+00:00"
    huge = [ManifestLeaf("0/0", "v", when, 1 << 63, "a" * 32)]
    far_future = [ManifestLeaf("0/0", "v", "9999-01-01T00:00:00+00:00", 1, "b" * 32)]
    long_name = [ManifestLeaf("n" * 256, "v", when, 1, "c" * 32)]
    records: list[Any] = [
        *good,
        hostile_zarr(sample, client, "11111111-1111-4111-8111-111111111111", huge),
        hostile_zarr(sample, client, "22222222-2222-4222-8222-222222222222", far_future),
        hostile_zarr(sample, client, "33333333-3333-4333-8333-333333333333", long_name),
        {**blob, "path": "bad/\udc80.nwb"},  # lone surrogate
        {**blob, "path": "../escape.nwb"},
        {**blob, "path": "a/./b.nwb"},
        {**blob, "path": "x" * 300 + ".nwb"},
        {**blob, "path": "big.nwb", "contentSize": 1 << 64},
        {**blob, "path": "float.nwb", "contentSize": 1.5},
        {**blob, "path": "digest.nwb", "digest": ["not", "a", "dict"]},
        {**blob, "path": "urls.nwb", "contentUrl": 42},
        {**blob, "path": "ipv6.nwb", "contentUrl": ["http://[::1/blobs/x"]},
        "not an object",
        [1, 2],
    ]
    prefix = f"dandisets/{HOSTILE_ID}/{V1}/"
    body = json.dumps(records, ensure_ascii=True).encode()
    client.put_object(Bucket=sample.bucket, Key=prefix + "assets.jsonld", Body=body)
    mounted = mount(f"{HOSTILE_ID}@{V1}")
    mnt = mounted.path
    # the good assets are all there, byte for byte
    for rel, data in v1.files.items():
        if rel != "dandiset.yaml":
            assert (mnt / rel).read_bytes() == data, rel
    # refused records are not shown; records without a usable S3 URL are shown but EIO (logged);
    # a record whose digest is unusable is served unchecked by ETag (it has no ETag to check);
    # Zarrs with hostile manifests are EIO, each on its own
    assert sorted(os.listdir(mnt)) == [
        "digest.nwb", "hostile", "ipv6.nwb", "sub-01", "sub-02", "urls.nwb"
    ]  # fmt: skip
    assert (mnt / "digest.nwb").read_bytes() == v1.files[EPHYS_PATH]
    assert_errno(errno.EIO, (mnt / "ipv6.nwb").read_bytes)
    assert_errno(errno.EIO, (mnt / "urls.nwb").read_bytes)
    assert sorted(os.listdir(mnt / "hostile")) == ["1111.zarr", "2222.zarr", "3333.zarr"]
    for zarr in sorted(os.listdir(mnt / "hostile")):
        assert_errno(errno.EIO, os.listdir, mnt / "hostile" / zarr)
    assert mounted.process.poll() is None
    log = mounted.output()
    assert "Traceback" not in log
    for expected in (
        "is out of range",  # size 2**63
        "past year 2262",
        "bytes long (at most 255)",
        "not valid Unicode",
        "reserved name '..'",
        "reserved name '.'",
        "has no valid contentSize (18446744073709551616)",
        "has no valid contentSize (1.5)",
        "not an object",
    ):
        assert expected in log, expected
    # nothing refused was persisted as an index
    assert not list((mounted.path.parent / "cache" / "manifests").rglob("1111*/*.*"))


# --- 6. what the cache dir looks like -------------------------------------------------------------


def test_cache_dir_is_private(
    mount: Callable[..., Mounted], sample: SampleDandiset, tmp_path: Path
) -> None:
    cache = tmp_path / "deep" / "cache"
    old = os.umask(0o022)
    try:
        mounted = mount(f"{sample.dandiset_id}@{V1}", cache_dir=cache)
    finally:
        os.umask(old)
    assert (mounted.path / f"{OME_PATH}/.zattrs").read_bytes()
    deadline = time.monotonic() + 10  # the index is written in the background
    while not list((cache / "manifests").rglob("*.json")):
        assert time.monotonic() < deadline, "the Zarr's manifest was not stored"
        time.sleep(0.05)
    made = [cache, *cache.rglob("*")]
    dirs = [p for p in made if p.is_dir()]
    files = [p for p in made if p.is_file()]
    assert any(p.suffix == ".json" and "manifests" in p.parts for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in dirs} == {"0o700"}, dirs
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o600"}, files
    assert (tmp_path / "deep").stat().st_mode & 0o777 == 0o700  # parents zarrfs made, too


def test_zarrfs_help_runs_without_the_demo_extra() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "zarrfs", "mount", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--manifest-cache-size" in result.stdout


def test_md5_of_the_sample_chunk_is_its_etag(sample: SampleDandiset) -> None:
    """The control for the proxy test: the chunk it damages is a single-part upload."""
    entry = json.loads(sample.versions[V1].manifests[OME_PATH])["entries"]["0"]["0"]["0"]["0"]["0"]
    data = sample.versions[V1].files[f"{OME_PATH}/0/0/0/0/0"]
    assert entry[3] == hashlib.md5(data).hexdigest()
