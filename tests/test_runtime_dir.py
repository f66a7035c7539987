"""The runtime directory (`runtime`), where a mount publishes its state and statistics for `zarrfs
info`, `verify` and `stats`: trusted only when it is a real directory (not a symbolic link) of the
user's own with no access for anyone else; a file in it only when it is a regular file of the user's
own. Another local user who pre-creates `/tmp/zarrfs-<uid>` (or plants files in it) can neither make
a mount fail nor feed the verbs a state; the verbs then say that the state is unavailable, and why.
Also: mounts are keyed by their real path (`runtime.real_path`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require, require_fuse, start_mount, stop_mount
from zarrfs.config import Config
from zarrfs.demo.sample import OME_PATH, V1, SampleDandiset
from zarrfs.faces import runtime
from zarrfs.faces.cli import build_parser, config_from_args

#: A uid that is not the test's.
OTHER_UID = 12345
ROOT = "s3://dandiarchive/zarr-manifest/"


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (to create files owned by another uid)")


@pytest.fixture
def run_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $XDG_RUNTIME_DIR, `/tmp` replaced by a directory of the test's: the runtime dir is then
    `<base>/zarrfs-<uid>` (returned, not created)."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    base = tmp_path / "tmp"
    base.mkdir()
    base.chmod(0o1777)  # as /tmp: sticky, writable by all
    monkeypatch.setattr(runtime, "TMP_BASE", base)
    path = base / f"zarrfs-{os.getuid()}"
    assert runtime.runtime_dir() == path
    return path


@pytest.fixture
def config(tmp_path: Path) -> Config:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = build_parser().parse_args(
        [
            "mount",
            "000123@0.251101.1200",
            str(mnt),
            "--endpoint-url",
            "http://127.0.0.1:9",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    return config_from_args(args)


def test_a_runtime_dir_of_another_user_is_refused(
    run_dir: Path, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    require_root()
    for mode in (0o700, 0o777):
        run_dir.mkdir(mode)
        run_dir.chmod(mode)
        os.chown(run_dir, OTHER_UID, OTHER_UID)
        caplog.clear()
        runtime._warned.clear()  # a mount warns once per reason
        with caplog.at_level(logging.WARNING):
            published = runtime.write_state(config)  # never raises: the mount goes on
        assert os.listdir(run_dir) == [], "wrote into another user's directory"
        assert published is False
        assert str(run_dir) in caplog.text and f"owned by uid {OTHER_UID}" in caplog.text
        with pytest.raises(runtime.UnsafeRuntimeDir, match=f"owned by uid {OTHER_UID}") as info:
            runtime.read_state(config.mountpoint)
        assert str(run_dir) in str(info.value) and "\n" not in str(info.value)
        assert runtime.write_stats(config.mountpoint, {"reads": 1}) is False
        runtime.remove(config.mountpoint)  # never raises either
        run_dir.rmdir()


def test_a_symlink_at_the_runtime_dir_is_not_followed(
    run_dir: Path, config: Config, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(0o700)
    run_dir.symlink_to(elsewhere)
    published = runtime.write_state(config)
    assert os.listdir(elsewhere) == [], "followed a symlink planted at the runtime dir"
    assert published is False
    with pytest.raises(runtime.UnsafeRuntimeDir, match="symbolic link"):
        runtime.read_state(config.mountpoint)


def test_a_file_at_the_runtime_dir_path_does_not_fail_the_mount(
    run_dir: Path, config: Config
) -> None:
    run_dir.write_text("planted")
    assert runtime.write_state(config) is False  # HEAD raised here: the mount failed
    assert run_dir.read_text() == "planted"
    with pytest.raises(runtime.UnsafeRuntimeDir, match="not a directory"):
        runtime.read_state(config.mountpoint)


def test_the_runtime_dir_is_created_private_and_an_own_loose_one_tightened(
    run_dir: Path, config: Config
) -> None:
    assert runtime.write_state(config) is True
    assert stat.S_IMODE(run_dir.lstat().st_mode) == 0o700
    state = runtime.read_state(config.mountpoint)
    assert state is not None and state["pid"] == os.getpid()
    assert stat.S_IMODE(runtime.state_path(config.mountpoint).stat().st_mode) == 0o600
    run_dir.chmod(0o757)  # e.g. made by hand: a reader does not trust it, a mount narrows it
    with pytest.raises(runtime.UnsafeRuntimeDir, match="mode 0757"):
        runtime.read_stats(config.mountpoint)
    assert runtime.write_stats(config.mountpoint, {"reads": 1}) is True
    assert stat.S_IMODE(run_dir.lstat().st_mode) == 0o700
    assert runtime.read_stats(config.mountpoint) == {"pid": os.getpid(), "reads": 1}
    runtime.remove(config.mountpoint)
    assert os.listdir(run_dir) == []


def _read_in_thread(mountpoint: Path, timeout: float = 10.0) -> object:
    """`read_state` in a thread: a planted FIFO must not block it."""
    result: list[object] = []
    thread = threading.Thread(
        target=lambda: result.append(runtime.read_state(mountpoint)), daemon=True
    )
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "reading the state blocked (a planted FIFO)"
    return result[0]


@pytest.fixture
def planted(run_dir: Path, config: Config, tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    """A private runtime dir (as a mount makes it) and a state document a planted file would hold
    (its pid is alive: this process)."""
    run_dir.mkdir(0o700)
    doc = json.dumps({"pid": os.getpid(), "api_url": "https://attacker.example/api"}).encode()
    yield runtime.state_path(config.mountpoint), doc
    with contextlib.suppress(OSError):  # a reader still blocked on a FIFO (before the fix)
        fd = os.open(runtime.state_path(config.mountpoint), os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)


def test_a_planted_state_file_that_is_a_symlink_is_ignored(
    planted: tuple[Path, bytes], config: Config, tmp_path: Path
) -> None:
    path, doc = planted
    decoy = tmp_path / "decoy.json"
    decoy.write_bytes(doc)
    path.symlink_to(decoy)
    assert _read_in_thread(config.mountpoint) is None


def test_a_planted_state_file_of_another_user_is_ignored(
    planted: tuple[Path, bytes], config: Config
) -> None:
    require_root()
    path, doc = planted
    path.write_bytes(doc)
    assert _read_in_thread(config.mountpoint) is not None  # the control: one's own file is read
    os.chown(path, OTHER_UID, OTHER_UID)
    assert _read_in_thread(config.mountpoint) is None


def test_a_planted_fifo_does_not_block_a_reader(
    planted: tuple[Path, bytes], config: Config
) -> None:
    path, _ = planted
    os.mkfifo(path, 0o600)
    assert _read_in_thread(config.mountpoint) is None


# --- a real mount -----------------------------------------------------------------------------


def zarrfs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zarrfs", *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.fuse
@pytest.mark.parametrize("plant", ["directory of another user", "file"])
def test_a_mount_serves_when_its_state_cannot_be_published(
    sample: SampleDandiset, tmp_path: Path, plant: str
) -> None:
    """Another user's directory (or a file) where the runtime dir goes: the mount logs a warning
    and serves; `stats`, `info` and `verify` on it say in one line that its state is unavailable,
    naming the directory and why, and trust nothing found there."""
    require_fuse()
    if plant.startswith("directory"):
        require_root()
    xdg = tmp_path / "xdg"
    xdg.mkdir(0o700)
    run_dir = xdg / "zarrfs"
    if plant == "file":
        run_dir.write_text("planted")
    else:
        run_dir.mkdir(0o700)
        os.chown(run_dir, OTHER_UID, OTHER_UID)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(xdg)}
    mounted = start_mount(
        tmp_path / "m", f"{sample.dandiset_id}@{V1}", "--manifest-root", ROOT,
        endpoint=sample.endpoint_url, cache=tmp_path / "cache", env=env,
    )  # fmt: skip
    try:
        rel = f"{OME_PATH}/.zgroup"
        assert (mounted.path / rel).read_bytes() == sample.versions[V1].files[rel]
        assert "WARNING" in mounted.output() and str(run_dir) in mounted.output()
        if plant != "file":
            assert os.listdir(run_dir) == []
        for args in (
            ["stats", str(mounted.path)],
            ["info", str(mounted.path / rel)],
            ["verify", str(mounted.path / OME_PATH)],
        ):
            result = zarrfs(env, *args)
            assert result.returncode == 2, f"{args}: {result.stdout}{result.stderr}"
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
            assert lines[0].startswith("zarrfs: error: "), lines[0]
            assert "unavailable" in lines[0] and str(run_dir) in lines[0], lines[0]
        assert mounted.process.poll() is None
    finally:
        stop_mount(mounted)


# --- keys: the real path of a mountpoint ----------------------------------------------------------


def test_real_path_resolves_links_but_never_touches_the_last_component_when_mounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "real"
    (real / "mnt").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert runtime.real_path(link / "mnt") == real / "mnt"
    assert runtime.real_path(link / "missing") == real / "missing"
    (tmp_path / "to-mnt").symlink_to(link / "mnt")  # the last component a link itself
    assert runtime.real_path(tmp_path / "to-mnt") == real / "mnt"
    monkeypatch.chdir(link)
    assert runtime.real_path(Path("mnt")) == real / "mnt"
    assert runtime.real_path("/dev/fd/3") == Path("/dev/fd/3")  # a descriptor, not a path
    assert runtime.state_path(link / "mnt") == runtime.state_path(real / "mnt")
    # a mountpoint (here: as /proc/self/mounts would list it) is joined, not looked at: a dead
    # FUSE mount answers ENOTCONN, a hung one never answers
    touched: list[str] = []
    readlink = os.readlink

    def spy(path: str | os.PathLike[str], *args: object, **kwargs: object) -> str:
        touched.append(os.fspath(path))
        return readlink(path)

    monkeypatch.setattr(runtime, "mounted_paths", lambda: {str(real / "mnt")})
    monkeypatch.setattr(os, "readlink", spy)
    assert runtime.real_path(link / "mnt") == real / "mnt"
    assert str(real / "mnt") not in touched
