"""A mount made by an ordinary user, as on an HPC login node or in the container images:
fusermount3 instead of root.

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

from conftest import require, require_fuse
from zarrfs.demo.sample import EPHYS_PATH, OME_PATH, V1, SampleDandiset
from zarrfs.faces.cli import is_mounted  # also sees mounts that root cannot stat

USER = "zarrfs-test"
pytestmark = pytest.mark.fuse


@pytest.fixture
def user() -> pwd.struct_passwd:
    require(os.getuid() == 0, "needs root to create the unprivileged user and open up /dev/fuse")
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


def user_env(**extra: str) -> dict[str, str]:
    """A login-like environment; PYTHONPATH is kept (the code under test may come from it)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", **extra}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def as_user(
    user: pwd.struct_passwd, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
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
        env=user_env() if env is None else env,
    )


@pytest.fixture
def home(user: pwd.struct_passwd) -> Iterator[Path]:
    """A home of the user's own (pytest's tmp_path lives under a root-only directory), once the
    user is known to be able to run this interpreter."""
    probe = as_user(user, sys.executable, "-c", "import zarrfs")
    # a venv under root's home is not executable by others: scripts/setup.sh builds it on a system
    # interpreter, which CI uses; a developer's own venv may not be
    require(
        probe.returncode == 0,
        f"{user.pw_name} cannot run {sys.executable}: {probe.stderr.strip()[-200:]}",
    )
    path = Path(tempfile.mkdtemp(prefix="zarrfs-user-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_ordinary_user_mounts_reads_and_unmounts(
    sample: SampleDandiset,
    user: pwd.struct_passwd,
    open_dev_fuse: None,
    home: Path,
) -> None:
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
        # only root may raise the kernel's readahead: the user's mount says how, and serves anyway
        log = "".join(p.read_text() for p in (home / "cache" / "logs").glob("*.log"))
        assert "kernel readahead of" in log and "left at its default" in log, log
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


def test_the_container_entrypoint_as_an_ordinary_user(
    sample: SampleDandiset,
    user: pwd.struct_passwd,
    open_dev_fuse: None,
    home: Path,
) -> None:
    """scripts/mount.sh as containers/Dockerfile runs it: as an ordinary user, zarrfs found on PATH
    (the image's `ENV PATH`), the default cache dir under the user's home, the mountpoint created by
    the script; it mounts, runs the command with the data visible, unmounts, and passes on the
    command's exit code."""
    entrypoint = home / "scripts" / "mount.sh"  # the image copies scripts/ as the repository has it
    entrypoint.parent.mkdir()
    shutil.copy2(Path(__file__).resolve().parents[1] / "scripts" / "mount.sh", entrypoint)
    for path in (home, entrypoint.parent, entrypoint):
        os.chown(path, user.pw_uid, user.pw_gid)
    mnt = home / "dandi"
    env = user_env(PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin", HOME=str(home))
    chunk = f"{OME_PATH}/0/0/0/0/0"
    command = (
        f'sha256sum "{mnt}/{EPHYS_PATH}" "{mnt}/{chunk}" && stat -c "%u %a" "{mnt}/{EPHYS_PATH}"'
        " && exit 3"
    )
    try:
        result = as_user(user, str(entrypoint), f"000123@{V1}", str(mnt),
                         "--endpoint-url", sample.endpoint_url, "--", "sh", "-c", command, env=env)  # fmt: skip
        assert result.returncode == 3, result.stderr
        expected = sample.versions[V1].files
        *sums, owner = result.stdout.splitlines()
        assert [line.split()[0] for line in sums] == [
            hashlib.sha256(expected[rel]).hexdigest() for rel in (EPHYS_PATH, chunk)
        ]
        assert owner.split() == [str(user.pw_uid), "444"]
        assert not is_mounted(mnt)
        assert (home / ".cache" / "zarrfs").is_dir()  # the default cache dir, in the user's home
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
