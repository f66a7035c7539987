"""A mount made by an ordinary user, as on an HPC login node: fusermount3 instead of root.

Runs as root only to set the stage: it creates a system user if needed, makes /dev/fuse 0666 for the
duration (real systems ship it so; this machine has 0600) and restores the mode afterwards. The user
must be able to execute this test's Python (a venv on a system interpreter, as `scripts/setup.sh`
builds); otherwise the test is skipped with that reason, visibly.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_fuse
from zarrfs.cli import is_mounted  # also sees mounts that root cannot stat
from zarrfs.demo.sample import EPHYS_PATH, OME_PATH, V1, SampleDandiset

USER = "zarrfs-test"
pytestmark = pytest.mark.fuse


@pytest.fixture
def user() -> pwd.struct_passwd:
    if os.getuid() != 0:
        pytest.skip("needs root to create the unprivileged user and open up /dev/fuse")
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", USER], check=True
        )
        return pwd.getpwnam(USER)


@pytest.fixture
def open_dev_fuse() -> Iterator[None]:
    require_fuse()
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


def as_user(user: pwd.struct_passwd, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    return subprocess.run(
        argv,
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def test_ordinary_user_mounts_reads_and_unmounts(
    sample: SampleDandiset,
    user: pwd.struct_passwd,
    open_dev_fuse: None,
    request: pytest.FixtureRequest,
) -> None:
    probe = as_user(user, sys.executable, "-c", "import zarrfs")
    if probe.returncode != 0:
        pytest.skip(f"{user.pw_name} cannot run {sys.executable}: {probe.stderr.strip()[-200:]}")
    # pytest's tmp_path lives under a root-only directory: give the user a home of its own
    home = Path(tempfile.mkdtemp(prefix="zarrfs-user-"))
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    mnt = home / "mnt"
    mnt.mkdir()
    for path in (home, mnt):
        os.chown(path, user.pw_uid, user.pw_gid)
    python = sys.executable
    mounted = as_user(user, python, "-m", "zarrfs", "mount", f"000123@{V1}", str(mnt),
                      "--endpoint-url", sample.endpoint_url, "--cache-dir", str(home / "cache"))  # fmt: skip
    try:
        assert mounted.returncode == 0, mounted.stderr
        assert is_mounted(mnt)
        expected = sample.versions[V1].files
        for rel in (EPHYS_PATH, f"{OME_PATH}/.zattrs", f"{OME_PATH}/0/0/0/0/0"):
            read = as_user(user, python, "-c",
                           f"import sys,hashlib; print(hashlib.sha256(open({str(mnt / rel)!r},'rb').read()).hexdigest())")  # fmt: skip
            assert read.returncode == 0, read.stderr
            assert read.stdout.strip() == hashlib.sha256(expected[rel]).hexdigest()
        owner = as_user(user, "stat", "-c", "%u %a", str(mnt / EPHYS_PATH))
        assert owner.stdout.split() == [str(user.pw_uid), "444"]
        # without allow_other, nobody else (not even root) sees inside a user's FUSE mount
        with pytest.raises(PermissionError):
            os.listdir(mnt)
        unmounted = as_user(user, python, "-m", "zarrfs", "unmount", str(mnt))
        assert unmounted.returncode == 0, unmounted.stderr
        assert not is_mounted(mnt)
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
