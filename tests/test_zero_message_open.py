"""Zero-message open: the kernel opens files without asking the daemon.

Where the kernel supports it and pyfuse3 can report it (`pyfuse3.no_open_support`,
the build `patches/` makes), `open` replies ENOSYS once; the kernel then opens every file without an
OPEN or RELEASE request, keeps each file's page cache across opens, and sends READs that carry the
file's inode, whose read state `Filesystem.read_unopened` keeps (`fs.streams`). `flush` replies
ENOSYS too, so no close waits for a FLUSH. `ZARRFS_ZERO_MESSAGE_OPEN=0` keeps OPEN and RELEASE. Every
kind of mount uses it: a file's bytes never change while it is mounted (a draft stays pinned).

The environment variable's parsing is tested with its sibling's in `test_readdir_cache.py`.
Observers: the handlers awaited directly over a stand-in core, and the daemon's `--debug` log,
where `fuse_ops` writes one line per open and per read request before answering it. The oracle
for bytes is the sample's published files. Tests of a real zero-message mount need the patched
pyfuse3: without it they skip, and fail in CI (CI=true), where `scripts/setup.sh` must build it.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest

from conftest import Mounted, require
from zarrfs.config import ZERO_MESSAGE_OPEN_ENV
from zarrfs.demo.sample import V1, SampleDandiset
from zarrfs.fs.filesystem import OpenFile
from zarrfs.fs.namespace import InlineFile
from zarrfs.fuse_ops import ZarrfsOperations

ZERO_MESSAGE_OPEN = "the kernel opens files without asking"


@pytest.fixture
def patched_pyfuse3() -> None:
    """Skip without a pyfuse3 that reports zero-message open; in CI, fail instead."""
    require(
        hasattr(pyfuse3, "no_open_support"),
        "this pyfuse3 cannot report zero-message open "
        "(scripts/setup.sh builds one with patches/pyfuse3-3.5.0-cache-readdir.patch)",
    )


# --- the handlers, awaited directly -------------------------------------------------------------


class _Files:
    """Stands in for `Filesystem`: every inode is a file holding its own number, as text."""

    def __init__(self) -> None:
        self.opened: list[int] = []
        self.unopened_reads: list[tuple[int, int, int]] = []

    async def open(self, ino: int) -> OpenFile:
        self.opened.append(ino)
        return OpenFile(ino, InlineFile(str(ino).encode()), f"file-{ino}")

    async def read(self, handle: OpenFile, offset: int, size: int) -> bytes:
        assert isinstance(handle.source, InlineFile)
        return handle.source.data[offset : offset + size]

    async def read_unopened(self, ino: int, offset: int, size: int) -> bytes:
        self.unopened_reads.append((ino, offset, size))
        return str(ino).encode()[offset : offset + size]

    async def release(self, handle: OpenFile) -> None:
        return None


def _initialized(
    monkeypatch: pytest.MonkeyPatch, kernel: bool, **kwargs: bool
) -> tuple[ZarrfsOperations, _Files]:
    """Operations after the kernel's INIT, the kernel supporting zero-message open or not."""
    monkeypatch.setattr(pyfuse3, "no_open_support", kernel, raising=False)
    files = _Files()
    ops = ZarrfsOperations(files, **kwargs)  # type: ignore[arg-type]
    ops.init()
    return ops, files


@pytest.mark.trio
@pytest.mark.parametrize("fixed_tree", [True, False])  # a version mount, the archive's levels
async def test_the_kernel_opens_files_without_asking_where_it_can(
    monkeypatch: pytest.MonkeyPatch, fixed_tree: bool
) -> None:
    ops, files = _initialized(monkeypatch, True, fixed_tree=fixed_tree)
    assert ops.no_open
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await ops.open(4242, os.O_RDONLY, None)  # type: ignore[arg-type]
    assert raised.value.errno == errno.ENOSYS and not files.opened and not ops._files
    assert await ops.read(4242, 1, 10) == b"242"  # the inode, in place of a handle
    assert files.unopened_reads == [(4242, 1, 10)]
    with pytest.raises(pyfuse3.FUSEError) as raised:  # a write is still refused as one
        await ops.open(4242, os.O_RDWR, None)  # type: ignore[arg-type]
    assert raised.value.errno == errno.EROFS


@pytest.mark.trio
@pytest.mark.parametrize(
    ("kernel", "kwargs"),
    [
        (False, {"fixed_tree": True}),  # the kernel (or a stock pyfuse3) cannot
        (True, {"fixed_tree": True, "zero_message_open": False}),  # turned off
    ],
)
async def test_files_are_opened_with_a_handle_otherwise(
    monkeypatch: pytest.MonkeyPatch, kernel: bool, kwargs: dict[str, bool]
) -> None:
    ops, files = _initialized(monkeypatch, kernel, **kwargs)
    assert not ops.no_open
    info = await ops.open(4242, os.O_RDONLY, None)  # type: ignore[arg-type]
    assert files.opened == [4242] and info.keep_cache and not info.direct_io
    assert await ops.read(info.fh, 0, 10) == b"4242"
    assert not files.unopened_reads
    await ops.release(info.fh)
    assert not ops._files


@pytest.mark.trio
async def test_flush_tells_the_kernel_to_stop_asking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is ever written: ENOSYS makes the kernel stop sending FLUSH on every close."""
    ops, _ = _initialized(monkeypatch, False)
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await ops.flush(1)
    assert raised.value.errno == errno.ENOSYS


# --- real mounts ------------------------------------------------------------------------------


def requests(mounted: Mounted, op: str) -> int:
    """How many `op` requests (open, read, flush) the daemon has logged."""
    return len(re.findall(rf"zarrfs\.fuse_ops: {op} \d+", mounted.output()))


def read_every_file(root: Path, sample: SampleDandiset) -> None:
    """Open, read whole and close every published file of V1; each must be its bytes."""
    for path, data in sample.versions[V1].files.items():
        with open(root / path, "rb") as f:
            assert f.read() == data, path


@pytest.mark.fuse
@pytest.mark.usefixtures("patched_pyfuse3")
def test_a_version_mount_reads_every_file_without_an_open_request(
    mount: Callable[..., Mounted], sample: SampleDandiset
) -> None:
    """Every kernel this runs on supports zero-message open, and a mount uses it. Every file
    reads as published; the daemon is asked to open one file (the answer that switches the mode)
    and sees reads of every non-empty file; the second pass is served from the kernel's page
    cache."""
    mounted = mount(f"{sample.dandiset_id}@{V1}", "--debug")
    assert ZERO_MESSAGE_OPEN in mounted.output()
    read_every_file(mounted.path, sample)
    assert requests(mounted, "open") == 1, mounted.output()
    files_read = {int(n) for n in re.findall(r"zarrfs\.fuse_ops: read (\d+)", mounted.output())}
    non_empty = sum(1 for data in sample.versions[V1].files.values() if data)
    assert len(files_read) == non_empty
    reads = requests(mounted, "read")
    read_every_file(mounted.path, sample)
    assert requests(mounted, "read") == reads  # the kernel kept every file's pages
    assert requests(mounted, "open") == 1
    assert requests(mounted, "flush") == 1  # answered ENOSYS: no close waits for one again


@pytest.mark.fuse
def test_turned_off_every_open_reaches_the_daemon(
    mount: Callable[..., Mounted], sample: SampleDandiset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path with OPEN and RELEASE, forced on any build by the environment."""
    monkeypatch.setenv(ZERO_MESSAGE_OPEN_ENV, "0")
    mounted = mount(f"{sample.dandiset_id}@{V1}", "--debug")
    assert ZERO_MESSAGE_OPEN not in mounted.output()
    read_every_file(mounted.path, sample)
    opens = requests(mounted, "open")
    assert opens == len(sample.versions[V1].files), mounted.output()
    read_every_file(mounted.path, sample)
    assert requests(mounted, "open") == 2 * opens
    assert requests(mounted, "flush") == 1
