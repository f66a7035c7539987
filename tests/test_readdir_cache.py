"""Kernel caching of directory listings: `opendir` asks for it where pyfuse3 can, and it holds.

A pyfuse3 built with `patches/pyfuse3-3.5.0-cache-readdir.patch` (what `scripts/setup.sh` installs)
lets `opendir` return a `FileInfo` with `cache_readdir` and `keep_cache`; the kernel then answers a
repeated listing of a directory from its cache, without a READDIR request. Stock pyfuse3 cannot ask,
and `ZARRFS_KERNEL_READDIR_CACHE=0` turns the request off on a patched build, so both paths run here.

The observer is the daemon's `--debug` log, where `fuse_ops` writes one line per opendir and per
readdir request before answering it. The oracle for names and sizes is the sample's published files.
Tests of the cached path need the patched pyfuse3: without it they skip, and fail in CI (CI=true),
where `scripts/setup.sh` must have built it.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest

from conftest import Mounted, require
from zarrfs import fuse_ops
from zarrfs.config import KERNEL_READDIR_CACHE_ENV, ZERO_MESSAGE_OPEN_ENV
from zarrfs.demo.sample import OME_PATH, V1, SampleDandiset
from zarrfs.errors import DataError
from zarrfs.faces.cli import build_parser, config_from_args
from zarrfs.fs.filesystem import OpenDir
from zarrfs.fs.namespace import Entry
from zarrfs.fuse_ops import ZarrfsOperations, kernel_readdir_cache_supported

CACHING = "the kernel caches directory listings"
ZERO_MESSAGE = "opens directories without asking"
NOT_ASKED = "kernel caching of directory listings is off"


@pytest.fixture
def patched_pyfuse3() -> None:
    """Skip without the patched pyfuse3; in CI, fail instead (setup.sh must have built it)."""
    require(
        kernel_readdir_cache_supported(),
        "this pyfuse3 cannot ask the kernel to cache directory listings "
        "(scripts/setup.sh builds one with patches/pyfuse3-3.5.0-cache-readdir.patch)",
    )


# --- the handler, awaited directly ------------------------------------------------------------


class _Directories:
    """Stands in for `Filesystem` in `opendir` and `readdir`: every inode is a directory holding
    one file named after it; inode 7 is a level of the archive that can change (never cached by
    the kernel)."""

    async def opendir(self, ino: int) -> OpenDir:
        return OpenDir(ino, cacheable=ino != 7)

    async def readdir(self, handle: OpenDir, offset: int) -> list[tuple[bytes, Entry, int]]:
        row = (f"file-of-{handle.ino}".encode(), Entry(1000 + handle.ino, False, 3, 0), 1)
        return [row][offset:]


def _operations(**kwargs: bool) -> ZarrfsOperations:
    return ZarrfsOperations(_Directories(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.trio
@pytest.mark.usefixtures("patched_pyfuse3")
async def test_opendir_asks_for_the_cache_where_pyfuse3_can() -> None:
    ops = _operations()
    assert ops.kernel_readdir_cache
    reply = await ops.opendir(42, None)  # type: ignore[arg-type]
    assert isinstance(reply, pyfuse3.FileInfo)
    assert ops._dirs[reply.fh].ino == 42
    assert reply.cache_readdir and reply.keep_cache
    assert not reply.direct_io and not reply.nonseekable
    mutable = await ops.opendir(7, None)  # type: ignore[arg-type]
    assert isinstance(mutable, int) and ops._dirs[mutable].ino == 7


def _initialized(monkeypatch: pytest.MonkeyPatch, kernel: bool, **kwargs: bool) -> ZarrfsOperations:
    """Operations after the kernel's INIT, the kernel supporting zero-message opendir or not."""
    monkeypatch.setattr(pyfuse3, "no_opendir_support", kernel, raising=False)
    ops = _operations(**kwargs)
    ops.init()
    return ops


async def _listed(ops: ZarrfsOperations, fh: int) -> list[tuple[bytes, int]]:
    replies: list[tuple[bytes, int]] = []

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        replies.append((name, attr.st_ino))
        return True

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pyfuse3, "readdir_reply", reply)
        await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
    return replies


@pytest.mark.trio
@pytest.mark.usefixtures("patched_pyfuse3")
async def test_a_fixed_tree_has_the_kernel_open_directories_without_asking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A version mount replies ENOSYS to opendir where the kernel supports zero-message opendir;
    readdir then receives the directory's inode, and makes opendir's checks itself."""
    ops = _initialized(monkeypatch, True, fixed_tree=True)
    assert ops.no_opendir
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await ops.opendir(42, None)  # type: ignore[arg-type]
    assert raised.value.errno == errno.ENOSYS and not ops._dirs
    assert await _listed(ops, 42) == [(b"file-of-42", 1042)]

    class Broken(_Directories):
        async def opendir(self, ino: int) -> OpenDir:
            raise DataError("Zarr asset x cannot be served: no checksum")

    ops._fs = Broken()  # type: ignore[assignment]
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await _listed(ops, 42)
    assert raised.value.errno == errno.EIO


@pytest.mark.trio
@pytest.mark.parametrize(("kernel", "fixed_tree"), [(False, True), (True, False)])
@pytest.mark.usefixtures("patched_pyfuse3")
async def test_opendir_is_asked_where_the_kernel_or_the_tree_does_not_allow_otherwise(
    monkeypatch: pytest.MonkeyPatch, kernel: bool, fixed_tree: bool
) -> None:
    """An older kernel would fail the open with ENOSYS; an archive mount has levels that change."""
    ops = _initialized(monkeypatch, kernel, fixed_tree=fixed_tree)
    assert not ops.no_opendir
    reply = await ops.opendir(42, None)  # type: ignore[arg-type]
    assert isinstance(reply, pyfuse3.FileInfo) and reply.cache_readdir
    assert await _listed(ops, reply.fh) == [(b"file-of-42", 1042)]


@pytest.mark.trio
async def test_a_fixed_tree_keeps_opendir_when_the_cache_is_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ops = _initialized(monkeypatch, True, fixed_tree=True, kernel_readdir_cache=False)
    assert not ops.no_opendir
    fh = await ops.opendir(42, None)  # type: ignore[arg-type]
    assert isinstance(fh, int) and ops._dirs[fh].ino == 42


@pytest.mark.trio
async def test_opendir_answers_a_plain_handle_when_turned_off() -> None:
    ops = _operations(kernel_readdir_cache=False)
    assert not ops.kernel_readdir_cache
    fh = await ops.opendir(42, None)  # type: ignore[arg-type]
    assert isinstance(fh, int) and ops._dirs[fh].ino == 42


@pytest.mark.trio
async def test_opendir_answers_a_plain_handle_on_stock_pyfuse3(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fuse_ops, "kernel_readdir_cache_supported", lambda: False)
    ops = _operations()
    assert not ops.kernel_readdir_cache
    fh = await ops.opendir(42, None)  # type: ignore[arg-type]
    assert isinstance(fh, int) and ops._dirs[fh].ino == 42


@pytest.mark.parametrize(
    ("variable", "setting"),
    [
        (KERNEL_READDIR_CACHE_ENV, "kernel_readdir_cache"),
        (ZERO_MESSAGE_OPEN_ENV, "zero_message_open"),  # tests/test_zero_message_open.py
    ],
)
@pytest.mark.parametrize(
    ("value", "on"), [(None, True), ("0", False), (" 0 ", False), ("1", True), ("", True)]
)
def test_the_environment_turns_the_request_off(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    variable: str,
    setting: str,
    value: str | None,
    on: bool,
) -> None:
    """Each kernel feature's escape hatch: `0` turns it off, anything else leaves it on."""
    if value is None:
        monkeypatch.delenv(variable, raising=False)
    else:
        monkeypatch.setenv(variable, value)
    args = build_parser().parse_args(["mount", "000123@0.251101.1200", str(tmp_path)])
    assert getattr(config_from_args(args), setting) is on


# --- real mounts ------------------------------------------------------------------------------


def requests(mounted: Mounted, op: str, ino: int) -> int:
    """How many `op` requests (opendir or readdir) for inode `ino` the daemon has logged."""
    return len(re.findall(rf"zarrfs\.fuse_ops: {op} {ino}\b", mounted.output()))


def all_requests(mounted: Mounted, op: str) -> int:
    return len(re.findall(rf"zarrfs\.fuse_ops: {op} \d+", mounted.output()))


def listing(path: Path) -> dict[str, int | None]:
    """Name -> size (None for a directory) of every entry of one directory."""
    found: dict[str, int | None] = {}
    with os.scandir(path) as entries:
        for entry in entries:
            found[entry.name] = None if entry.is_dir() else entry.stat().st_size
    return found


def expected_listing(sample: SampleDandiset, relative: str) -> dict[str, int | None]:
    """What `listing` must return for a directory of V1, from the published files."""
    prefix = f"{relative}/" if relative else ""
    expected: dict[str, int | None] = {}
    for path, data in sample.versions[V1].files.items():
        if not path.startswith(prefix):
            continue
        head, sep, _ = path[len(prefix) :].partition("/")
        expected[head] = None if sep else len(data)
    return expected


def walk(root: Path) -> dict[str, int]:
    """Relative path -> size of every file under `root`, listing every directory once."""
    files: dict[str, int] = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            files[path.relative_to(root).as_posix()] = path.stat().st_size
    return files


def published_sizes(sample: SampleDandiset) -> dict[str, int]:
    return {path: len(data) for path, data in sample.versions[V1].files.items()}


def mount_v1(mount: Callable[..., Mounted], sample: SampleDandiset) -> Mounted:
    return mount(f"{sample.dandiset_id}@{V1}", "--debug")


@pytest.mark.fuse
@pytest.mark.usefixtures("patched_pyfuse3")
def test_second_listing_is_served_by_the_kernel(
    mount: Callable[..., Mounted], sample: SampleDandiset
) -> None:
    mounted = mount_v1(mount, sample)
    assert CACHING in mounted.output()
    zero_message = ZERO_MESSAGE in mounted.output()
    for relative in ("", OME_PATH, f"{OME_PATH}/0/0"):
        path = mounted.path / relative
        ino = path.stat().st_ino
        expected = expected_listing(sample, relative)
        assert listing(path) == expected
        opened, read = requests(mounted, "opendir", ino), requests(mounted, "readdir", ino)
        assert read >= 1, mounted.output()
        assert listing(path) == expected
        assert requests(mounted, "readdir", ino) == read, relative  # read from the kernel's cache
        if not zero_message:  # the kernel asked the daemon to open the directory again
            assert requests(mounted, "opendir", ino) == opened + 1
    if zero_message:  # the first opendir was answered ENOSYS, and the kernel asked no more
        assert all_requests(mounted, "opendir") == 1, mounted.output()


@pytest.mark.fuse
@pytest.mark.usefixtures("patched_pyfuse3")
def test_a_second_walk_of_the_whole_tree_makes_no_readdir_request(
    mount: Callable[..., Mounted], sample: SampleDandiset
) -> None:
    mounted = mount_v1(mount, sample)
    assert walk(mounted.path) == published_sizes(sample)
    read = all_requests(mounted, "readdir")
    opened = all_requests(mounted, "opendir")
    assert walk(mounted.path) == published_sizes(sample)
    assert all_requests(mounted, "readdir") == read
    if ZERO_MESSAGE in mounted.output():  # nothing of the second walk reached the daemon
        assert all_requests(mounted, "opendir") == opened == 1
    else:
        assert all_requests(mounted, "opendir") > opened  # the walk did reach the daemon


@pytest.mark.fuse
@pytest.mark.usefixtures("patched_pyfuse3")
def test_a_version_mount_has_the_kernel_open_directories_without_asking(
    mount: Callable[..., Mounted], sample: SampleDandiset
) -> None:
    """Linux 5.1 or newer (every machine this runs on) supports zero-message opendir: a version
    mount uses it, and a whole walk then costs the daemon one readdir per directory and no more."""
    mounted = mount_v1(mount, sample)
    assert ZERO_MESSAGE in mounted.output()
    assert walk(mounted.path) == published_sizes(sample)
    directories = sum(1 for _ in os.walk(mounted.path))
    assert all_requests(mounted, "opendir") == 1
    # one request per directory, and one more at the end of each listing
    assert all_requests(mounted, "readdir") <= 2 * directories


@pytest.mark.fuse
def test_without_the_cache_every_listing_reaches_the_daemon(
    mount: Callable[..., Mounted], sample: SampleDandiset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stock-pyfuse3 path, forced on any build by the environment (the daemon inherits it)."""
    monkeypatch.setenv(KERNEL_READDIR_CACHE_ENV, "0")
    mounted = mount_v1(mount, sample)
    assert CACHING not in mounted.output()
    if kernel_readdir_cache_supported():
        assert NOT_ASKED in mounted.output()
    for relative in ("", OME_PATH, f"{OME_PATH}/0/0"):
        path = mounted.path / relative
        ino = path.stat().st_ino
        expected = expected_listing(sample, relative)
        assert listing(path) == expected
        read = requests(mounted, "readdir", ino)
        assert read >= 1, mounted.output()
        assert listing(path) == expected
        assert requests(mounted, "readdir", ino) > read, relative
    directories = sum(1 for _ in os.walk(mounted.path))
    before = all_requests(mounted, "readdir")
    assert walk(mounted.path) == published_sizes(sample)
    assert all_requests(mounted, "readdir") - before >= directories


@pytest.mark.fuse
@pytest.mark.usefixtures("patched_pyfuse3")
def test_cached_entries_keep_their_types_and_inodes(
    mount: Callable[..., Mounted], sample: SampleDandiset
) -> None:
    """d_type and d_ino come from the kernel cache on a second listing, and must not change."""
    mounted = mount_v1(mount, sample)
    zarr = mounted.path / OME_PATH
    first = {e.name: (e.is_dir(), e.inode()) for e in os.scandir(zarr)}
    second = {e.name: (e.is_dir(), e.inode()) for e in os.scandir(zarr)}
    assert first == second
    for name, (is_dir, _) in second.items():
        assert stat.S_ISDIR((zarr / name).stat().st_mode) == is_dir
