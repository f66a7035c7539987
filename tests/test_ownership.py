"""`--uid/--gid/--umask` (`-o uid=,gid=,umask=`, as sshfs and rclone take them): the owner and modes
every entry shows, so that a mount made by root for a job shows the job user's ownership.

Modes are derived as rclone does (the umask applied to 0777 for directories and 0666 for files),
and a write bit is never shown (the mount is read-only). The default is today's: the mounting user,
0555 and 0444. Tested on the handler (`ZarrfsOperations.attributes`/`getattr`), through argument
parsing, and on a real mount read by processes of other users.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require, require_fuse, start_mount, stop_mount
from zarrfs import config as cfg
from zarrfs.demo.sample import EPHYS_PATH, OME_PATH, V1, SampleDandiset
from zarrfs.errors import UserError
from zarrfs.faces.cli import build_parser, config_from_args
from zarrfs.fs.namespace import Entry
from zarrfs.fuse_ops import ZarrfsOperations

DIR = Entry(ino=1, is_dir=True, size=0, mtime_ns=0)
FILE = Entry(ino=2, is_dir=False, size=10, mtime_ns=0)
LINK = Entry(ino=3, is_dir=False, size=4, mtime_ns=0, link=b"v1.0")
JOB_UID = 1234
OTHER_UID = 1235


class _OneEntry:
    """Stands in for `Filesystem` in `getattr`: every inode is `FILE`."""

    async def getattr(self, ino: int) -> Entry:
        return FILE


def operations(**kwargs: int) -> ZarrfsOperations:
    return ZarrfsOperations(_OneEntry(), **kwargs)  # type: ignore[arg-type]


def modes(ops: ZarrfsOperations) -> tuple[int, int, int]:
    return tuple(ops.attributes(e).st_mode for e in (DIR, FILE, LINK))  # type: ignore[return-value]


def test_default_is_the_mounting_user_with_0555_and_0444() -> None:
    ops = operations()
    attr = ops.attributes(FILE)
    assert (attr.st_uid, attr.st_gid) == (os.getuid(), os.getgid())
    assert modes(ops) == (stat.S_IFDIR | 0o555, stat.S_IFREG | 0o444, stat.S_IFLNK | 0o777)


@pytest.mark.parametrize(
    ("umask", "dir_mode", "file_mode"),
    [(0o022, 0o555, 0o444), (0o000, 0o555, 0o444), (0o027, 0o550, 0o440), (0o077, 0o500, 0o400),
     (0o277, 0o500, 0o400), (0o777, 0o000, 0o000), (0o111, 0o444, 0o444)],
)  # fmt: skip
def test_umask_applies_to_0777_and_0666_and_never_shows_write_bits(
    umask: int, dir_mode: int, file_mode: int
) -> None:
    ops = operations(uid=JOB_UID, gid=JOB_UID + 1, umask=umask)
    assert modes(ops) == (stat.S_IFDIR | dir_mode, stat.S_IFREG | file_mode, stat.S_IFLNK | 0o777)
    for entry in (DIR, FILE, LINK):
        attr = ops.attributes(entry)
        assert (attr.st_uid, attr.st_gid) == (JOB_UID, JOB_UID + 1)


@pytest.mark.trio
async def test_getattr_reports_them() -> None:
    attr = await operations(uid=0, gid=JOB_UID, umask=0o027).getattr(2, None)  # type: ignore[arg-type]
    assert (attr.st_uid, attr.st_gid, attr.st_mode) == (0, JOB_UID, stat.S_IFREG | 0o440)


def parse(*options: str) -> cfg.Config:
    args: argparse.Namespace = build_parser().parse_args(
        ["mount", "000123@0.251101.1200", "/mnt/dandi", *options]
    )
    return config_from_args(args)


def test_options_and_o_options() -> None:
    config = parse()
    assert (config.uid, config.gid, config.umask) == (None, None, 0o022)
    config = parse("--uid", "1000", "--gid", "100", "--umask", "027")
    assert (config.uid, config.gid, config.umask) == (1000, 100, 0o027)
    config = parse("-o", "ro,uid=1234,gid=0,umask=0077,allow_other")
    assert (config.uid, config.gid, config.umask, config.allow_other) == (1234, 0, 0o077, True)


@pytest.mark.parametrize(
    ("options", "needle"),
    [(["--uid", "alice"], "bad uid 'alice'"), (["-o", "gid=-1"], "bad gid '-1'"),
     (["--uid", "4294967295"], "bad uid"), (["-o", "umask=8"], "bad umask '8'"),
     (["--umask", "1000"], "bad umask '1000'"), (["--umask", "rw"], "bad umask 'rw'")],
)  # fmt: skip
def test_bad_values_are_user_errors(options: list[str], needle: str) -> None:
    with pytest.raises(UserError, match=needle) as raised:
        parse(*options)
    assert raised.value.exit_code == 2


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="zarrfs-owner-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def read_as(uid: int, path: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["cat", str(path)], user=uid, group=uid, extra_groups=[], capture_output=True,
        timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.fuse
def test_a_root_mount_shows_the_job_users_ownership(
    sample: SampleDandiset, shared_base: Path
) -> None:
    """Root mounts for a job with allow_other: the job's user reads, another user is refused (the
    kernel checks the modes zarrfs reports: `default_permissions`)."""
    require_fuse()
    require(os.getuid() == 0, "needs root: mounts for another user and runs readers as other users")
    mounted = start_mount(
        shared_base, f"{sample.dandiset_id}@{V1}", "--allow-other", "-o", f"uid={JOB_UID},gid={JOB_UID}",
        "--umask", "077", endpoint=sample.endpoint_url, cache=shared_base / "cache",
    )  # fmt: skip
    try:
        for rel in ("", OME_PATH, EPHYS_PATH, f"{OME_PATH}/.zattrs"):
            st = os.stat(mounted.path / rel)
            assert (st.st_uid, st.st_gid) == (JOB_UID, JOB_UID), rel
            assert stat.S_IMODE(st.st_mode) == (0o500 if stat.S_ISDIR(st.st_mode) else 0o400), rel
        path = mounted.path / OME_PATH / ".zattrs"
        job = read_as(JOB_UID, path)
        assert job.returncode == 0, job.stderr
        assert job.stdout == sample.versions[V1].files[f"{OME_PATH}/.zattrs"]
        other = read_as(OTHER_UID, path)
        assert other.returncode != 0 and b"Permission denied" in other.stderr
    finally:
        stop_mount(mounted)
