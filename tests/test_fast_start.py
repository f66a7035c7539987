"""Fast start: the mount is made before the core starts (the S3 client's imports and the version's
resolution take most of the start-up), so the mountpoint is live at once; requests made meanwhile
wait for the core, and a core that cannot start still ends in a clear error exit with nothing left
mounted.

The core is slowed (or made to fail) in a controlled way by `conftest.inject`:
`archive.resolver.resolve` sleeps first, so the order of events does not depend on the machine's speed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import (
    EXIT_DEADLINE,
    MOUNT_DEADLINE,
    Mounted,
    inject,
    require_fuse,
    stop_mount,
    wait_until_no_process_mentions,
    zarrfs_command,
)
from zarrfs.demo.locals3 import LocalS3
from zarrfs.demo.sample import ARRAY_PATH, EPHYS_PATH, V1, SampleDandiset

pytestmark = pytest.mark.fuse

TOP_LEVEL = ["dandiset.yaml", "sub-01", "sub-02"]
#: A dandiset this module publishes: the sample's NWB files alone.
BLOBS_ONLY = "000444"
#: Seconds the injected code holds the core back.
SLOW_START = 3.0
#: The line the core logs once it is ready, before it answers the requests that waited for it. (The
#: mount's own "mounted ... at" line comes later, after the mount's state file is written, so a
#: request may be answered before it.)
CORE_READY = re.compile(r"^.* zarrfs\.fs\.core: serving ", re.MULTILINE)

SLOW_RESOLVE = f"""
import trio, zarrfs.archive.resolver as d
_resolve = d.resolve
async def resolve(*args, **kwargs):
    await trio.sleep({SLOW_START})
    return await _resolve(*args, **kwargs)
d.resolve = resolve
"""


def spawn(source: str, tmp_path: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = (tmp_path / "zarrfs.log").open("wb")
    return subprocess.Popen(
        zarrfs_command("mount", source, str(mnt), "--cache-dir", str(tmp_path / "cache"), *extra),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def wait_live(mnt: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + MOUNT_DEADLINE
    while not os.path.ismount(mnt):
        assert process.poll() is None, f"exited {process.returncode} before mounting"
        assert time.monotonic() < deadline, "not mounted in time"
        time.sleep(0.01)


def cleanup(mnt: Path, process: subprocess.Popen[bytes]) -> None:
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
    try:
        process.wait(timeout=EXIT_DEADLINE)  # an unmounted daemon ends by itself
    except subprocess.TimeoutExpired:
        process.terminate()
        process.wait(timeout=EXIT_DEADLINE)


def test_the_mountpoint_is_live_before_the_core_and_requests_wait_for_it(
    sample: SampleDandiset, tmp_path: Path
) -> None:
    require_fuse()
    env = inject(tmp_path / "inject", SLOW_RESOLVE)
    mnt, log = tmp_path / "mnt", tmp_path / "zarrfs.log"
    process = spawn(f"{sample.dandiset_id}@{V1}", tmp_path, env, "-f",
                    "--endpoint-url", sample.endpoint_url)  # fmt: skip
    try:
        wait_live(mnt, process)
        # live, and the core is still being held back: the root is a directory already
        assert not CORE_READY.search(log.read_text())
        assert stat.S_ISDIR(os.stat(mnt).st_mode)
        # requests made now wait for the core, then get the real answers
        found: dict[str, object] = {}

        def read() -> None:
            found["listing"] = sorted(os.listdir(mnt))
            found["bytes"] = (mnt / EPHYS_PATH).read_bytes()

        reader = threading.Thread(target=read)
        reader.start()
        reader.join(timeout=MOUNT_DEADLINE)
        assert not reader.is_alive()
        assert CORE_READY.search(log.read_text())  # they were answered after the core was ready
        assert found["listing"] == TOP_LEVEL
        assert found["bytes"] == sample.versions[V1].files[EPHYS_PATH]
        # the root's attributes are now the version's own (the placeholder was not kept)
        assert os.stat(mnt).st_mtime_ns != 0
    finally:
        cleanup(mnt, process)
    assert process.wait(timeout=EXIT_DEADLINE) == 0
    assert "INTERNAL_ERROR" not in log.read_text()


def test_a_core_that_cannot_start_fails_the_waiting_requests_and_unmounts(
    sample: SampleDandiset, tmp_path: Path
) -> None:
    """The version does not exist (found out after the slowed start): the request that waited fails,
    the daemon exits 3 with one error line, and nothing stays mounted."""
    require_fuse()
    env = inject(tmp_path / "inject", SLOW_RESOLVE)
    mnt = tmp_path / "mnt"
    process = spawn(f"{sample.dandiset_id}@0.990101.0000", tmp_path, env, "-f",
                    "--endpoint-url", sample.endpoint_url)  # fmt: skip
    try:
        wait_live(mnt, process)
        with pytest.raises(OSError) as info:
            os.listdir(mnt)
        assert info.value.errno in (errno.EIO, errno.ENOTCONN)  # EIO, or the mount already gone
        assert process.wait(timeout=EXIT_DEADLINE) == 3
    finally:
        cleanup(mnt, process)
    output = (tmp_path / "zarrfs.log").read_text()
    assert "zarrfs: error:" in output and "0.990101.0000" in output
    assert "Traceback" not in output
    assert not os.path.ismount(mnt)
    wait_until_no_process_mentions(mnt)


def test_a_background_mount_returns_only_once_it_serves_and_reports_a_failed_start(
    sample: SampleDandiset, tmp_path: Path
) -> None:
    """The launcher's exit status stays the truth: 0 when the mount serves, 3 (with the message)
    when the core could not start, though the mountpoint was live meanwhile."""
    require_fuse()
    env = inject(tmp_path / "inject", SLOW_RESOLVE)
    for version, code in ((V1, 0), ("0.990101.0000", 3)):
        mnt = tmp_path / f"mnt-{version}"
        mnt.mkdir()
        command = zarrfs_command(
            "mount", f"{sample.dandiset_id}@{version}", str(mnt), "--endpoint-url",
            sample.endpoint_url, "--cache-dir", str(tmp_path / "cache"),
        )  # fmt: skip
        try:
            result = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=MOUNT_DEADLINE
            )
            assert result.returncode == code, result.stderr
            if code == 0:
                # it returned once serving: the listing is answered without waiting for anything
                assert sorted(os.listdir(mnt)) == TOP_LEVEL
            else:
                assert result.stderr.startswith("zarrfs: error:") and version in result.stderr
                assert not os.path.ismount(mnt)
        finally:
            if os.path.ismount(mnt):
                subprocess.run(
                    [sys.executable, "-m", "zarrfs", "unmount", str(mnt)],
                    check=False,
                    capture_output=True,
                )
        wait_until_no_process_mentions(mnt)


def loaded_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def wait_for_library(pid: int, library: str, what: str) -> None:
    """Until the process has mapped `library` (fails after MOUNT_DEADLINE: not imported ahead)."""
    wait = time.monotonic() + MOUNT_DEADLINE
    while library not in loaded_libraries(pid):
        assert time.monotonic() < wait, f"{what} was not imported ahead"
        time.sleep(0.05)


def test_the_manifest_machinery_is_imported_ahead_only_for_versions_with_zarrs(
    mount: Callable[..., Mounted], sample: SampleDandiset, local_s3: LocalS3, tmp_path: Path
) -> None:
    """numpy (what serving a Zarr's index needs), ~0.1 s to import, is imported in the background
    once a mount of a version with Zarrs serves, so that entering a Zarr does not wait for it. A
    small manifest is kept in the cache dir as its document, so pyarrow (the format of big ones'
    indexes, an import that holds the GIL for 20-100 ms) is loaded neither to store it nor to read
    it back on the next mount. A mount of NWB files alone loads neither."""
    cache = tmp_path / "cache"
    for run in ("fresh", "again"):
        mounted = mount(f"{sample.dandiset_id}@{V1}", cache_dir=cache)
        wait_for_library(mounted.process.pid, "_multiarray_umath", "numpy")
        assert sorted(os.listdir(mounted.path / ARRAY_PATH))
        deadline = time.monotonic() + MOUNT_DEADLINE  # stored in the background
        while not list((cache / "manifests").rglob("*.json")):
            assert time.monotonic() < deadline, "the manifest was not stored"
            time.sleep(0.05)
        time.sleep(1.0)  # what importing pyarrow would have needed, and more
        assert "pyarrow" not in loaded_libraries(mounted.process.pid), run
        stop_mount(mounted)
    assert not list(cache.rglob("*.arrow"))
    blobs_only = [r for r in sample.versions[V1].assets if "zarr" not in r["encodingFormat"]]
    key = f"dandisets/{BLOBS_ONLY}/{V1}/assets.jsonld"
    local_s3.client.put_object(Bucket=sample.bucket, Key=key, Body=json.dumps(blobs_only).encode())
    without = mount(f"{BLOBS_ONLY}@{V1}")
    assert (without.path / EPHYS_PATH).read_bytes() == sample.versions[V1].files[EPHYS_PATH]
    time.sleep(1.0)  # what the other mount needed, and more
    maps = loaded_libraries(without.process.pid)
    assert "pyarrow" not in maps and "numpy" not in maps


def test_pyarrow_is_imported_ahead_when_the_cache_dir_holds_indexes(
    mount: Callable[..., Mounted], sample: SampleDandiset, tmp_path: Path
) -> None:
    """Manifests stored as Arrow indexes (every manifest here, with the document form turned off):
    the first mount imports pyarrow only when it writes one, after the lookup has its answer; a
    mount over a cache dir holding indexes imports it ahead, in the background, so that entering a
    Zarr does not wait for it."""
    env = inject(
        tmp_path / "inject", "import zarrfs.config as c\nc.MANIFEST_DOCUMENT_MAX_FILES = 0\n"
    )
    cache = tmp_path / "cache"
    fresh = mount(f"{sample.dandiset_id}@{V1}", cache_dir=cache, env=env)
    wait_for_library(fresh.process.pid, "_multiarray_umath", "numpy")
    time.sleep(1.0)  # what importing pyarrow ahead would have needed, and more
    assert "pyarrow" not in loaded_libraries(fresh.process.pid)
    assert sorted(os.listdir(fresh.path / ARRAY_PATH))
    wait_for_library(fresh.process.pid, "pyarrow", "pyarrow (to write the index)")
    stop_mount(fresh)
    assert list((cache / "manifests").rglob("*.arrow"))
    again = mount(f"{sample.dandiset_id}@{V1}", cache_dir=cache, env=env)
    for library, what in (("_multiarray_umath", "numpy"), ("pyarrow", "pyarrow")):
        wait_for_library(again.process.pid, library, what)
