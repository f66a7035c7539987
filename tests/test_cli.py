"""The command line as a user meets it: `python -m zarrfs ...` in a subprocess.

Every failure must exit with the documented code (2 usage or SOURCE, 3 not found, 4 mountpoint,
5 remote), print exactly one `zarrfs: error: ...` line and no traceback, and leave no mount and no
daemon behind.
None of these tests gets as far as mounting; the successful paths are in `test_mount`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import processes_mentioning
from zarrfs.demo.locals3 import LocalS3
from zarrfs.demo.sample import SampleDandiset

MISSING_VERSION = "0.990101.0000"
EXIT_DEADLINE = 20.0


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    return subprocess.run(
        [sys.executable, "-m", "zarrfs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def assert_nothing_left(mnt: Path) -> None:
    deadline = time.monotonic() + EXIT_DEADLINE
    while pids := processes_mentioning(mnt):
        if time.monotonic() > deadline:
            pytest.fail(f"processes {pids} still run for {mnt}")
        time.sleep(0.05)
    assert not os.path.ismount(mnt)


def assert_user_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Exit `code`; stderr is one `zarrfs: error:` line holding every needle; no traceback."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("zarrfs: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "cli-mountpoint"
    path.mkdir()
    return path


@pytest.fixture
def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("00012", "six digits"),
        ("abc@draft", "abc@draft"),
        ("000123@1.0", "bad version '1.0'"),
        ("12345@draft", "12345"),
        ("000123@", "000123@"),
        ("https://dandiarchive.org/dandiset/000123", "names no version"),
    ],
)
def test_bad_source_exits_2(mnt: Path, tmp_path: Path, source: str, needle: str) -> None:
    for mode in ([], ["-f"]):
        result = run_cli("mount", *mode, source, str(mnt), "--cache-dir", str(tmp_path / "c"))
        assert_user_error(result, 2, needle)
    assert_nothing_left(mnt)


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "background"])
def test_missing_version_exits_3_naming_the_key(
    local_s3: LocalS3, mnt: Path, tmp_path: Path, foreground: bool
) -> None:
    args = ["mount", *(["-f"] if foreground else [])]
    result = run_cli(
        *args,
        f"000123@{MISSING_VERSION}",
        str(mnt),
        "--endpoint-url",
        local_s3.endpoint_url,
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert_user_error(result, 3, f"dandisets/000123/{MISSING_VERSION}/assets.jsonld")
    assert_nothing_left(mnt)


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "background"])
def test_unreachable_s3_exits_5(
    closed_port: int, mnt: Path, tmp_path: Path, foreground: bool
) -> None:
    args = ["mount", *(["-f"] if foreground else [])]
    result = run_cli(
        *args,
        "000123@0.251101.1200",
        str(mnt),
        "--endpoint-url",
        f"http://127.0.0.1:{closed_port}",
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert result.returncode == 5, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("zarrfs: error: ")]
    assert len(errors) == 1, result.stderr
    assert "assets.jsonld" in errors[0]
    assert_nothing_left(mnt)


def test_missing_mountpoint_exits_4(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    result = run_cli("mount", "000123@0.251101.1200", str(missing))
    assert_user_error(result, 4, str(missing), "does not exist")
    assert not missing.exists()


def test_no_background_mount_from_a_process_with_threads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon is a fork: forking a process with other threads could copy a lock one of them
    holds. Called in-process (a notebook, a program) with a thread running: a clear error."""
    from zarrfs.faces import cli

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        code = cli.main(["mount", "000123@0.251101.1200", str(tmp_path),
                         "--endpoint-url", "http://127.0.0.1:9", "--cache-dir", str(tmp_path / "c")])  # fmt: skip
    finally:
        stop.set()
        thread.join()
    assert code == 2
    assert "process that runs threads" in capsys.readouterr().err
    assert not os.path.ismount(tmp_path)


def test_mountpoint_that_is_a_file_exits_4(tmp_path: Path) -> None:
    path = tmp_path / "a-file"
    path.write_bytes(b"not a directory")
    result = run_cli("mount", "-f", "000123@0.251101.1200", str(path))
    assert_user_error(result, 4, str(path), "not a directory")
    assert path.read_bytes() == b"not a directory"


def test_unmount_of_a_non_mount_fails_with_a_message(mnt: Path) -> None:
    result = run_cli("unmount", str(mnt))
    assert result.returncode != 0
    assert_user_error(result, result.returncode, str(mnt), "not mounted")
    missing = mnt / "missing"
    assert_user_error(run_cli("unmount", str(missing)), result.returncode, str(missing))


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["-o", "bogus"], "bogus"),
        (["-o", "ro,allow_other,no_such_thing=1"], "no_such_thing"),
        (["--manifest-root", "ftp://example.org/manifests/"], "ftp://"),
        (["--memory-cache-size", "lots"], "lots"),
    ],
)
def test_bad_options_exit_2(mnt: Path, tmp_path: Path, options: list[str], needle: str) -> None:
    result = run_cli(
        "mount", "000123@0.251101.1200", str(mnt), "--cache-dir", str(tmp_path / "c"), *options
    )
    assert_user_error(result, 2, needle)
    assert_nothing_left(mnt)


def test_usage_errors_and_version() -> None:
    missing = run_cli("mount")
    assert missing.returncode == 2 and "usage:" in missing.stderr
    assert "Traceback" not in missing.stderr
    unknown = run_cli("frobnicate")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("zarrfs ")


#: A FUSE daemon without auto_unmount (as an older zarrfs, or another tool, would leave behind).
DEAD_MOUNT_DAEMON = """
import sys, pyfuse3, trio
pyfuse3.init(pyfuse3.Operations(), sys.argv[1], {"fsname=stale"})
trio.run(pyfuse3.main)
"""


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_kill_9_of_the_daemon_leaves_no_dead_mount(sample: SampleDandiset, tmp_path: Path) -> None:
    """auto_unmount: fusermount3's watchdog unmounts when the daemon dies, even by SIGKILL; the
    mountpoint is then an empty directory again and a new mount works at once."""
    from conftest import require_fuse
    from zarrfs.faces.cli import is_mounted

    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = ["000123@0.251101.1200", str(mnt), "--endpoint-url", sample.endpoint_url,
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    daemon = subprocess.Popen(
        [sys.executable, "-m", "zarrfs", "mount", "-f", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: os.path.ismount(mnt), "the mount")
        assert os.listdir(mnt)  # live
        daemon.kill()
        daemon.wait()
        wait_for(lambda: not is_mounted(mnt), "the watchdog to unmount")
        assert os.listdir(mnt) == []
        result = run_cli("mount", *args)
        assert result.returncode == 0, result.stderr
        assert os.listdir(mnt)
        assert run_cli("unmount", str(mnt)).returncode == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


def test_stale_mountpoint_gets_a_hint(tmp_path: Path) -> None:
    """A dead mount (a daemon killed without auto_unmount) answers ENOTCONN; `zarrfs mount` says how
    to clear it, and `zarrfs unmount -z` does."""
    from conftest import require_fuse
    from zarrfs.faces.cli import is_mounted

    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemon = subprocess.Popen([sys.executable, "-c", DEAD_MOUNT_DAEMON, str(mnt)])
    try:
        wait_for(lambda: is_mounted(mnt), "the stale daemon's mount")
        daemon.kill()
        daemon.wait()
        result = run_cli("mount", "000123@0.251101.1200", str(mnt))
        assert result.returncode == 4
        # the kernel may still answer stat from its attribute cache ("already a mount point") or
        # not ("Transport endpoint is not connected"); either way the way out is named
        assert f"zarrfs unmount -z {mnt}" in result.stderr, result.stderr
        assert run_cli("unmount", "-z", str(mnt)).returncode == 0
        assert not is_mounted(mnt)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


def test_mount_helper_translates_mount8_calls() -> None:
    from zarrfs.faces.cli import mount_helper_args

    assert mount_helper_args(["000123@draft", "/mnt/d", "-o", "allow_other,cache_dir=/c"]) == [
        "mount", "000123@draft", "/mnt/d", "-o", "allow_other,cache_dir=/c"
    ]  # fmt: skip
    assert mount_helper_args(["000123@draft", "/mnt/d", "-n", "-v", "-t", "fuse.zarrfs"]) == [
        "mount", "000123@draft", "/mnt/d"
    ]  # fmt: skip
    assert mount_helper_args(["000123@draft", "/mnt/d", "-f"]) is None  # mount(8) -f: fake
    assert mount_helper_args(["000123@draft", "/mnt/d", "-sv", "-o", "ro"]) == [
        "mount", "000123@draft", "/mnt/d", "-o", "ro"
    ]  # fmt: skip


# --- a symlinked directory on the way (a cluster's $HOME) -----------------------------------------


@pytest.fixture
def linked(tmp_path: Path) -> tuple[Path, Path]:
    """`(link, real)`: `link` is a symbolic link to the directory `real`, as a $HOME often is."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    return link, real


def test_a_mount_made_through_a_symlink_is_found_through_it(
    sample: SampleDandiset, tmp_path: Path, linked: tuple[Path, Path]
) -> None:
    """/proc/self/mounts holds the real path: `stats`, `info`, `verify` and `unmount` find the mount
    by the path it was made with (through the link) and by its real path."""
    from conftest import require_fuse, start_mount, stop_mount
    from zarrfs.demo.sample import OME_PATH, V1

    require_fuse()
    link, real = linked
    mounted = start_mount(
        link, f"{sample.dandiset_id}@{V1}", "--manifest-root", "s3://dandiarchive/zarr-manifest/",
        endpoint=sample.endpoint_url, cache=tmp_path / "cache",
    )  # fmt: skip
    try:
        assert mounted.path == link / "mnt" and os.path.ismount(real / "mnt")
        for mnt in (link / "mnt", real / "mnt"):
            result = run_cli("stats", str(mnt))
            assert result.returncode == 0, result.stderr
            assert "reads.count: " in result.stdout
            info = run_cli("info", str(mnt / OME_PATH / ".zgroup"))
            assert info.returncode == 0, info.stderr
            assert "type: file" in info.stdout
        verify = run_cli("verify", str(link / "mnt" / OME_PATH))
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "verified:" in verify.stdout
        result = run_cli("unmount", str(link / "mnt"))
        assert result.returncode == 0, result.stderr
        assert not os.path.ismount(real / "mnt")
    finally:
        stop_mount(mounted)


def test_a_dead_mount_is_unmounted_through_a_symlink(linked: tuple[Path, Path]) -> None:
    """`zarrfs unmount -z` of a dead mount (no daemon: stat answers ENOTCONN) named through a
    symlinked directory: found in /proc/self/mounts by its real path, and unmounted."""
    from conftest import require_fuse
    from zarrfs.faces.cli import is_mounted

    require_fuse()
    link, real = linked
    (real / "dead").mkdir()
    daemon = subprocess.Popen([sys.executable, "-c", DEAD_MOUNT_DAEMON, str(link / "dead")])
    try:
        wait_for(lambda: is_mounted(real / "dead"), "the stale daemon's mount")
        daemon.kill()
        daemon.wait()
        result = run_cli("unmount", "-z", str(link / "dead"))
        assert result.returncode == 0, result.stderr
        assert not is_mounted(real / "dead")
    finally:
        if daemon.poll() is None:
            daemon.kill()
        subprocess.run(
            ["fusermount3", "-u", "-z", str(real / "dead")], check=False, capture_output=True
        )
