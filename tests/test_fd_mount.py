"""`zarrfs mount SOURCE /dev/fd/N`: serving a /dev/fuse descriptor that the caller has mounted.

Done the way Apptainer's `--fusemount` and Kubernetes FUSE plugins (meta-fuse-csi-plugin's
fuse-starter) do it: the test, as root, opens /dev/fuse, mount(2)s it itself, starts zarrfs with the
descriptor passed and `/dev/fd/N` as MOUNTPOINT, then closes its own copy (so that a daemon that
dies leaves a dead mount answering ENOTCONN rather than one where every access hangs). zarrfs mounts
and unmounts nothing: the test unmounts the target in teardown, always. Without root these tests
are skipped visibly (and fail in CI).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import (
    EXIT_DEADLINE,
    MOUNT_DEADLINE,
    processes_mentioning,
    require,
    require_fuse,
    wait_until_no_process_mentions,
    zarrfs_command,
)
from zarrfs.archive.sources import parse_source
from zarrfs.config import Config
from zarrfs.demo.sample import EPHYS_PATH, OME_PATH, V1, SampleDandiset
from zarrfs.faces.cli import is_mounted
from zarrfs.faces.mount import fuse_fd, fuse_options
from zarrfs.fuse_ops import INTERNAL_ERROR

pytestmark = pytest.mark.fuse

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2
#: Files read through the caller's mount: a blob, Zarr metadata, a chunk, the dandiset's metadata.
READ_PATHS = (EPHYS_PATH, f"{OME_PATH}/.zattrs", f"{OME_PATH}/0/0/0/0/0", "dandiset.yaml")

_libc = ctypes.CDLL(None, use_errno=True)


class CallerMount:
    """A /dev/fuse descriptor mounted at `target` by this process, as a container runtime does."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.fd = os.open("/dev/fuse", os.O_RDWR)
        options = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0"
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV
        if _libc.mount(b"zarrfs", os.fsencode(target), b"fuse.zarrfs", flags, options.encode()):
            code = ctypes.get_errno()
            self.close_fd()
            pytest.fail(f"mount(2) of /dev/fuse at {target}: {os.strerror(code)}")

    @property
    def mountpoint(self) -> str:
        return f"/dev/fd/{self.fd}"

    def close_fd(self) -> None:
        """Give up this process's copy: from now on the daemon alone holds the connection."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def unmount(self, flags: int = 0) -> None:
        if _libc.umount2(os.fsencode(self.target), flags):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(self.target))


@pytest.fixture
def caller_mount(tmp_path: Path) -> Iterator[CallerMount]:
    require_fuse()
    require(
        os.getuid() == 0,
        "mount(2) of /dev/fuse needs root (as Apptainer's starter or a CSI driver has)",
    )
    target = tmp_path / "target"
    target.mkdir()
    mounted = CallerMount(target)
    try:
        yield mounted
    finally:
        mounted.close_fd()
        if is_mounted(target):
            mounted.unmount(MNT_DETACH)


def common_args(sample: SampleDandiset, cache: Path) -> list[str]:
    return ["--endpoint-url", sample.endpoint_url, "--cache-dir", str(cache)]


def assert_reads_exact_bytes(target: Path, sample: SampleDandiset) -> None:
    expected = sample.versions[V1].files
    for rel in READ_PATHS:
        assert (target / rel).read_bytes() == expected[rel], rel
    assert stat.S_IMODE((target / EPHYS_PATH).stat().st_mode) == 0o444


def test_foreground_daemon_serves_the_callers_mount(
    caller_mount: CallerMount, sample: SampleDandiset, tmp_path: Path
) -> None:
    log = tmp_path / "zarrfs.log"
    command = zarrfs_command(
        "mount", "-f", f"{sample.dandiset_id}@{V1}", caller_mount.mountpoint,
        *common_args(sample, tmp_path / "cache"),
    )  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, pass_fds=(caller_mount.fd,)
        )
    caller_mount.close_fd()
    try:
        # no waiting for readiness: the kernel holds requests until the daemon answers them
        assert_reads_exact_bytes(caller_mount.target, sample)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_DEADLINE) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()
    assert "mounted by the caller" in output, output
    assert "while unmounting" not in output and INTERNAL_ERROR not in output, output
    # unmounting is the caller's business: the mount is still there, its connection gone
    assert is_mounted(caller_mount.target)
    with pytest.raises(OSError) as gone:
        os.statvfs(caller_mount.target)
    assert gone.value.errno == errno.ENOTCONN


def test_background_mount_hands_the_descriptor_to_its_daemon(
    caller_mount: CallerMount, sample: SampleDandiset, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    log = tmp_path / "daemon.log"
    result = subprocess.run(
        zarrfs_command(
            "mount", f"{sample.dandiset_id}@{V1}", caller_mount.mountpoint,
            *common_args(sample, cache), "--log-file", str(log),
        ),
        pass_fds=(caller_mount.fd,), capture_output=True, text=True, timeout=MOUNT_DEADLINE,
        check=False,
    )  # fmt: skip
    caller_mount.close_fd()
    try:
        assert result.returncode == 0, result.stderr + log.read_text()
        assert result.stderr == ""
        assert processes_mentioning(cache), "no daemon serves the mount"
        assert_reads_exact_bytes(caller_mount.target, sample)
        # the runtime unmounts (at container exit): the daemon sees it and ends by itself
        caller_mount.unmount()
        wait_until_no_process_mentions(cache)
    finally:
        for pid in processes_mentioning(cache):
            os.kill(pid, signal.SIGKILL)
    output = log.read_text()
    assert "mounted by the caller" in output and "unmounted" in output, output
    assert INTERNAL_ERROR not in output, output


def run_mount(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        zarrfs_command("mount", *args), pass_fds=pass_fds, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def test_a_dev_fd_mountpoint_must_be_an_open_dev_fuse(tmp_path: Path) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")]
    for mode in ([], ["-f"]):
        closed = run_mount(*mode, "000123@0.251101.1200", "/dev/fd/97", *cache)
        assert closed.returncode == 4, closed.stderr
        assert closed.stderr.startswith("zarrfs: error: /dev/fd/97: descriptor 97 is not open")
        read_end, write_end = os.pipe()
        try:
            pipe = run_mount(
                *mode, "000123@0.251101.1200", f"/dev/fd/{read_end}", *cache, pass_fds=(read_end,)
            )
        finally:
            os.close(read_end)
            os.close(write_end)
        assert pipe.returncode == 4, pipe.stderr
        assert pipe.stderr.strip() == (
            f"zarrfs: error: /dev/fd/{read_end}: descriptor {read_end} is not /dev/fuse"
        )
        assert "Traceback" not in closed.stderr + pipe.stderr


def test_no_auto_unmount_for_a_descriptor() -> None:
    """fusermount3's watchdog would have nothing to unmount: the caller mounted."""
    config = Config(source=parse_source("000123@0.251101.1200"), mountpoint=Path("/mnt/d"))
    assert "auto_unmount" in fuse_options(config)
    fd_config = replace(config, mountpoint=Path("/dev/fd/3"))
    assert "auto_unmount" not in fuse_options(fd_config)
    assert {"ro", "subtype=zarrfs"} <= fuse_options(fd_config)


@pytest.mark.parametrize(
    ("path", "fd"),
    [("/dev/fd/3", 3), ("/dev/fd/12", 12), ("/dev/fd/", None), ("/dev/fd/3/x", None),
     ("/dev/fd/x", None), ("/mnt/dev/fd/3", None), ("/dev/fuse", None)],
)  # fmt: skip
def test_which_mountpoints_are_descriptors(path: str, fd: int | None) -> None:
    assert fuse_fd(path) == fd
