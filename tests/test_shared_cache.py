"""The disk block cache between real mounts: two daemons filling one cache dir at once, a third
serving everything from it with S3 unreachable, and a damaged block refetched, never served."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import Mounted, stop_mount
from zarrfs import config
from zarrfs.demo.sample import BLOB_PATHS, V1, SampleDandiset

pytestmark = pytest.mark.fuse
ROOT = "s3://dandiarchive/zarr-manifest/"
UNREACHABLE = "http://127.0.0.1:9"


def block_files(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "blocks").rglob("*") if p.is_file())


def wait_for_writes(cache: Path, settle: float = 1.0, deadline: float = 20.0) -> list[Path]:
    """The block files once their number has not changed for `settle` seconds (blocks are written
    in the background after they are served)."""
    start = time.monotonic()
    files = block_files(cache)
    still_since = time.monotonic()
    while time.monotonic() - still_since < settle:
        assert time.monotonic() - start < deadline, "block writes never settled"
        time.sleep(0.1)
        now = block_files(cache)
        if now != files:
            files, still_since = now, time.monotonic()
    assert not any(p.name.startswith(".") for p in files), "a temp file was left behind"
    return files


def read_all(mounts: list[Mounted], files: dict[str, bytes]) -> None:
    jobs = [(m, rel) for m in mounts for rel in files]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: (job[0].path / job[1]).read_bytes(), jobs))
    for (m, rel), data in zip(jobs, got, strict=True):
        assert data == files[rel], f"{m.path}/{rel}"


def test_two_mounts_fill_one_cache_dir_that_then_serves_without_s3(
    mount: Callable[..., Mounted], sample: SampleDandiset, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    source = f"{sample.dandiset_id}@{V1}"
    files = sample.versions[V1].files
    assert max(len(files[p]) for p in BLOB_PATHS) > config.BLOCK_SIZE  # blobs of several blocks
    first = mount(source, "--manifest-root", ROOT, cache_dir=cache)
    second = mount(source, "--manifest-root", ROOT, cache_dir=cache)
    read_all([first, second], files)  # both daemons read every file at once
    assert wait_for_writes(cache)
    stop_mount(first)
    stop_mount(second)
    third = mount(source, "--manifest-root", ROOT, cache_dir=cache, endpoint=UNREACHABLE)
    read_all([third], files)  # every byte from the cache dir both wrote


def test_a_damaged_block_is_refetched_never_served(
    mount: Callable[..., Mounted], sample: SampleDandiset, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    source = f"{sample.dandiset_id}@{V1}"
    files = {p: sample.versions[V1].files[p] for p in BLOB_PATHS}
    first = mount(source, "--manifest-root", ROOT, cache_dir=cache)
    read_all([first], files)
    blocks = wait_for_writes(cache)
    stop_mount(first)
    damaged = blocks[len(blocks) // 2]
    data = bytearray(damaged.read_bytes())
    data[-100] ^= 0x01  # one bit of the data, the header intact
    damaged.write_bytes(bytes(data))
    second = mount(source, "--manifest-root", ROOT, cache_dir=cache)
    read_all([second], files)
    assert f"discarding bad block {damaged}" in second.output()
    assert wait_for_writes(cache)  # written again, whole
    assert damaged.read_bytes() != bytes(data)
