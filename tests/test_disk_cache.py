"""DiskBlockCache: round trips, verification on read, atomic sharing between processes, eviction,
full and broken disks, permissions. No mounts; the full-disk tests mount a tiny tmpfs as root."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require
from zarrfs import config
from zarrfs.base.refs import ObjectRef
from zarrfs.io import disk_store as disk_cache
from zarrfs.io.disk_store import HEADER_SIZE, DiskBlockCache

BUCKET = "dandiarchive"
BS = 64 << 10
#: Objects shared by the multi-process tests: 6 objects x 3 blocks, the last one short.
SHARED_REFS = tuple(
    ObjectRef(f"zarr/0d5b/0/{i}", f"v{i}", 2 * BS + 1000 * (i + 1), f"etag{i}") for i in range(6)
)


def make_ref(key: str = "zarr/abc/0/0", size: int = 3 * BS + 100, **kw: str | None) -> ObjectRef:
    return ObjectRef(key, kw.get("version_id", "v1"), size, kw.get("etag", "e1"))


def n_blocks(ref: ObjectRef) -> int:
    return -(-ref.size // BS)


def block(ref: ObjectRef, index: int) -> bytes:
    """Deterministic bytes of block `index` of `ref`, different for every (key, version, index)."""
    length = min(BS, ref.size - index * BS)
    return random.Random(f"{ref.key}|{ref.version_id}|{index}").randbytes(length)


def make_cache(cache_dir: Path, **kw: object) -> DiskBlockCache:
    options: dict[str, object] = {"max_bytes": 1 << 30, "block_size": BS, "min_free_fraction": 0.0}
    options.update(kw)
    return DiskBlockCache(cache_dir, **options)  # type: ignore[arg-type]


def block_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.glob("blocks/v1/*/*") if not p.name.startswith("."))


def path_of(cache: DiskBlockCache, ref: ObjectRef, index: int, bucket: str = BUCKET) -> Path:
    digest = disk_cache.identity_digest(bucket, ref, cache.block_size).hex()
    return cache.cache_dir / "blocks" / "v1" / digest[:3] / f"{digest}.{index}"


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# --- round trips and misses -----------------------------------------------------------------------


def test_round_trip_of_every_block_including_the_short_last_one(cache_dir: Path) -> None:
    cache = make_cache(cache_dir)
    ref = make_ref()
    for i in range(n_blocks(ref)):
        assert cache.get(BUCKET, ref, i) is None
        assert cache.put(BUCKET, ref, i, block(ref, i))
    for i in range(n_blocks(ref)):
        assert cache.get(BUCKET, ref, i) == block(ref, i)
    assert len(cache.get(BUCKET, ref, 3) or b"") == 100
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["puts"]) == (5, 4, 4)
    assert stats["bad_blocks"] == stats["errors"] == stats["puts_skipped"] == 0
    assert len(block_files(cache_dir)) == 4
    assert cache.usage().blocks == 4


def test_every_part_of_the_identity_matters(cache_dir: Path) -> None:
    cache = make_cache(cache_dir)
    ref = make_ref()
    assert cache.put(BUCKET, ref, 0, block(ref, 0))
    others = [
        make_ref(key="zarr/abc/0/1"),
        make_ref(version_id="v2"),
        make_ref(version_id=None),
        make_ref(etag="e2"),
        make_ref(etag=None),
        make_ref(size=ref.size + 1),
    ]
    for other in others:
        assert cache.get(BUCKET, other, 0) is None, other
    assert cache.get("otherbucket", ref, 0) is None
    assert make_cache(cache_dir, block_size=BS * 2).get(BUCKET, ref, 0) is None
    assert cache.get(BUCKET, ref, 0) == block(ref, 0)
    assert cache.stats()["bad_blocks"] == 0


def test_immutable_blob_keys_without_version_or_etag(cache_dir: Path) -> None:
    cache = make_cache(cache_dir)
    blob = ObjectRef("blobs/abc/def/abcdef", None, BS // 2, None)
    literal = ObjectRef("blobs/abc/def/abcdef", "null", BS // 2, "None")
    assert cache.put(BUCKET, blob, 0, block(blob, 0))
    assert cache.get(BUCKET, blob, 0) == block(blob, 0)
    assert cache.get(BUCKET, literal, 0) is None


def test_caller_bugs_raise_value_error(cache_dir: Path) -> None:
    cache = make_cache(cache_dir)
    ref = make_ref()
    with pytest.raises(ValueError):
        cache.get(BUCKET, ref, 4)
    with pytest.raises(ValueError):
        cache.get(BUCKET, ref, -1)
    with pytest.raises(ValueError):
        cache.put(BUCKET, ref, 0, block(ref, 0)[:-1])
    with pytest.raises(ValueError):
        cache.put(BUCKET, ref, 3, block(ref, 0))
    with pytest.raises(ValueError):
        make_cache(cache_dir, max_bytes=0)
    assert not cache_dir.exists()  # nothing touched the disk


# --- verification on read -------------------------------------------------------------------------


def assert_discarded(cache: DiskBlockCache, ref: ObjectRef, index: int, path: Path) -> None:
    bad_before = cache.stats()["bad_blocks"]
    assert cache.get(BUCKET, ref, index) is None
    assert not path.exists()
    assert cache.stats()["bad_blocks"] == bad_before + 1


def test_a_block_of_another_object_at_this_name_is_discarded(cache_dir: Path) -> None:
    cache = make_cache(cache_dir)
    a, b = make_ref(key="a"), make_ref(key="b")
    assert cache.put(BUCKET, a, 0, block(a, 0))
    forged = path_of(cache, b, 0)
    forged.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path_of(cache, a, 0), forged)
    assert_discarded(cache, b, 0, forged)
    assert cache.get(BUCKET, a, 0) == block(a, 0)


def test_another_block_of_the_same_object_at_this_name_is_discarded(cache_dir: Path) -> None:
    cache = make_cache(cache_dir)
    ref = make_ref()
    assert cache.put(BUCKET, ref, 1, block(ref, 1))
    os.replace(path_of(cache, ref, 1), path_of(cache, ref, 2))
    assert_discarded(cache, ref, 2, path_of(cache, ref, 2))


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize(
    "damage",
    ["truncated by one byte", "one byte longer", "empty", "header only", "flipped data byte"],
)
def test_damaged_files_are_discarded_never_served(cache_dir: Path, damage: str) -> None:
    cache = make_cache(cache_dir)
    ref = make_ref()
    assert cache.put(BUCKET, ref, 1, block(ref, 1))
    path = path_of(cache, ref, 1)
    size = path.stat().st_size
    if damage == "truncated by one byte":
        os.truncate(path, size - 1)
    elif damage == "one byte longer":
        with path.open("ab") as f:
            f.write(b"\0")
    elif damage == "empty":
        os.truncate(path, 0)
    elif damage == "header only":
        os.truncate(path, HEADER_SIZE)
    else:
        flip(path, HEADER_SIZE + BS // 2)
    assert_discarded(cache, ref, 1, path)
    assert cache.put(BUCKET, ref, 1, block(ref, 1))  # refetched and written again
    assert cache.get(BUCKET, ref, 1) == block(ref, 1)


def test_every_flipped_header_byte_is_caught(cache_dir: Path) -> None:
    cache = make_cache(cache_dir)
    ref = make_ref()
    for offset in range(HEADER_SIZE):
        assert cache.put(BUCKET, ref, 0, block(ref, 0))
        flip(path_of(cache, ref, 0), offset)
        assert_discarded(cache, ref, 0, path_of(cache, ref, 0))
    assert cache.stats()["bad_blocks"] == HEADER_SIZE
    assert cache.stats()["hits"] == 0


def test_a_bad_block_warning_is_rate_limited(
    cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_cache(cache_dir)
    ref = make_ref()
    with caplog.at_level(logging.WARNING, logger="zarrfs.io.disk_store"):
        for _ in range(3):
            assert cache.put(BUCKET, ref, 0, block(ref, 0))
            os.truncate(path_of(cache, ref, 0), 10)
            assert cache.get(BUCKET, ref, 0) is None
    assert cache.stats()["bad_blocks"] == 3
    assert len([r for r in caplog.records if "bad block" in r.getMessage()]) == 1


# --- several processes on one directory -----------------------------------------------------------


def hammer(cache_dir: str, seed: int, ops: int, evictor: bool) -> dict[str, int]:
    """Random puts and gets of SHARED_REFS' blocks; an evictor also evicts with a tiny budget and
    sometimes clears everything. Counts results that are neither None nor exactly right."""
    rng = random.Random(seed)
    max_bytes = 4 * (HEADER_SIZE + BS) if evictor else 1 << 30
    cache = make_cache(Path(cache_dir), max_bytes=max_bytes, touch_interval=0.0)
    wrong = 0
    for _ in range(ops):
        ref = SHARED_REFS[rng.randrange(len(SHARED_REFS))]
        index = rng.randrange(n_blocks(ref))
        if evictor and rng.random() < 0.3:
            if rng.random() < 0.1:
                cache.clear()
            else:
                cache.evict()
        elif rng.random() < 0.4:
            cache.put(BUCKET, ref, index, block(ref, index))
        else:
            got = cache.get(BUCKET, ref, index)
            wrong += got is not None and got != block(ref, index)
    return {"wrong": wrong, **cache.stats()}


def write_blocks(cache_dir: str) -> int:
    cache = make_cache(Path(cache_dir))
    return sum(
        cache.put(BUCKET, ref, i, block(ref, i))
        for ref in SHARED_REFS
        for i in range(n_blocks(ref))
    )


def test_concurrent_processes_see_whole_blocks_or_none(cache_dir: Path) -> None:
    jobs = [(str(cache_dir), seed, 400, seed == 0) for seed in range(4)]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        results = pool.starmap(hammer, jobs)
    assert sum(r["wrong"] for r in results) == 0
    # a partial or torn file would have been caught as a bad block; a vanished one is a plain miss
    assert sum(r["bad_blocks"] for r in results) == 0
    assert sum(r["errors"] for r in results) == 0
    assert sum(r["hits"] for r in results) > 0
    assert sum(r["puts"] for r in results) > 0
    assert not [p for p in cache_dir.glob("blocks/v1/*/.*") if p.name.endswith(".tmp")]


def test_a_block_written_by_one_process_is_read_by_another(cache_dir: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        written = pool.apply(write_blocks, (str(cache_dir),))
    assert written == len(SHARED_REFS) * 3
    reader = make_cache(cache_dir)
    for ref in SHARED_REFS:
        for i in range(n_blocks(ref)):
            assert reader.get(BUCKET, ref, i) == block(ref, i)
    assert reader.stats()["hits"] == written


# --- eviction -------------------------------------------------------------------------------------


def fill(cache: DiskBlockCache, count: int) -> tuple[list[ObjectRef], int]:
    """`count` one-block objects, the first oldest (mtime an hour ago + i s); one file's size."""
    refs = [make_ref(key=f"k{i}", size=BS) for i in range(count)]
    old = time.time() - 3600
    for i, ref in enumerate(refs):
        assert cache.put(BUCKET, ref, 0, block(ref, 0))
        os.utime(path_of(cache, ref, 0), (old + i, old + i))
    return refs, cache.usage().bytes // count


def test_evict_trims_to_the_low_water_mark_oldest_first(cache_dir: Path) -> None:
    probe = make_cache(cache_dir)
    refs, file_bytes = fill(probe, 20)
    cache = make_cache(cache_dir, max_bytes=10 * file_bytes, high_water=0.95, low_water=0.85)
    assert cache.needs_eviction  # nothing scanned yet
    report = cache.evict()
    assert report is not None
    assert (report.scanned_blocks, report.removed_blocks) == (20, 12)
    assert report.remaining_bytes == 8 * file_bytes == cache.usage().bytes
    assert [cache.get(BUCKET, ref, 0) is not None for ref in refs] == [False] * 12 + [True] * 8
    assert not cache.needs_eviction
    # under the high-water mark, nothing is removed
    assert cache.put(BUCKET, refs[0], 0, block(refs[0], 0))
    report = cache.evict()
    assert report is not None and report.removed_blocks == 0


def test_a_hit_makes_a_block_recently_used(cache_dir: Path) -> None:
    probe = make_cache(cache_dir)
    refs, file_bytes = fill(probe, 20)
    cache = make_cache(cache_dir, max_bytes=10 * file_bytes, touch_interval=60.0)
    assert cache.get(BUCKET, refs[0], 0) is not None  # an hour old: refreshed
    assert cache.get(BUCKET, refs[0], 0) is not None  # just refreshed: not again
    assert cache.stats()["touches"] == 1
    cache.evict()
    kept = [i for i, ref in enumerate(refs) if cache.get(BUCKET, ref, 0) is not None]
    assert kept == [0, 13, 14, 15, 16, 17, 18, 19]


def test_put_refuses_blocks_over_the_budget_until_evicted(cache_dir: Path) -> None:
    probe = make_cache(cache_dir)
    _, file_bytes = fill(probe, 1)
    probe.clear()
    cache = make_cache(cache_dir, max_bytes=10 * file_bytes)
    cache.evict()
    assert not cache.needs_eviction
    refs = [make_ref(key=f"n{i}", size=BS) for i in range(11)]
    results = [cache.put(BUCKET, ref, 0, block(ref, 0)) for ref in refs]
    assert results == [True] * 10 + [False]
    assert cache.stats()["puts_skipped"] == 1
    assert cache.needs_eviction
    report = cache.evict()
    assert report is not None and report.removed_blocks == 2
    assert cache.put(BUCKET, refs[10], 0, block(refs[10], 0))


def test_evict_tolerates_files_and_directories_vanishing(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = make_cache(cache_dir)
    refs, file_bytes = fill(probe, 40)
    original = DiskBlockCache._scan

    def scan_then_another_node_evicts(
        self: DiskBlockCache, **kw: float | None
    ) -> tuple[list[disk_cache._Entry], int, int]:
        found = original(self, **kw)
        for ref in refs[::2]:
            path_of(self, ref, 0).unlink(missing_ok=True)
        shutil.rmtree(path_of(self, refs[1], 0).parent)
        return found

    monkeypatch.setattr(DiskBlockCache, "_scan", scan_then_another_node_evicts)
    cache = make_cache(cache_dir, max_bytes=10 * file_bytes)
    report = cache.evict()
    assert report is not None and report.scanned_blocks == 40
    assert cache.stats()["errors"] == 0
    monkeypatch.undo()
    assert cache.usage().bytes <= 10 * file_bytes


def test_evict_removes_only_stale_temp_files(cache_dir: Path) -> None:
    cache = make_cache(cache_dir, stale_temp_age=3600.0)
    ref = make_ref()
    assert cache.put(BUCKET, ref, 0, block(ref, 0))
    directory = path_of(cache, ref, 0).parent
    stale, fresh = directory / ".x.host.1.aa.tmp", directory / ".y.host.2.bb.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    report = cache.evict()
    assert report is not None and report.removed_temp_files == 1
    assert not stale.exists() and fresh.exists()
    assert cache.usage().temp_files == 1
    assert cache.get(BUCKET, ref, 0) == block(ref, 0)


def test_clear_removes_everything(cache_dir: Path) -> None:
    cache = make_cache(cache_dir)
    _, file_bytes = fill(cache, 5)
    cleared = cache.clear()
    assert (cleared.blocks, cleared.bytes) == (5, 5 * file_bytes)
    assert cache.usage() == disk_cache.DiskUsage(0, 0, 0)
    assert list((cache_dir / "blocks" / "v1").iterdir()) == []
    ref = make_ref()
    assert cache.put(BUCKET, ref, 0, block(ref, 0))  # the fan-out directory comes back


# --- full, read-only and broken cache dirs --------------------------------------------------------


def require_root_mount() -> None:
    require(
        os.geteuid() == 0 and bool(shutil.which("mount")) and bool(shutil.which("umount")),
        "mounting a tmpfs needs root and mount(8)",
    )


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, always unmounted afterwards."""
    require_root_mount()
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill_filesystem(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: full
    finally:
        os.close(fd)


def test_a_full_disk_skips_writes_keeps_serving_and_evicts(
    tiny_fs: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # a stale free-space estimate, as when another process fills the disk between two statvfs
    monkeypatch.setattr(config, "DISK_CACHE_FREE_SPACE_INTERVAL", float("inf"))
    cache = make_cache(tiny_fs / "cache", touch_interval=7200.0)  # hits keep fill()'s LRU order
    refs, _ = fill(cache, 5)
    assert cache.evict() is not None and not cache.needs_eviction
    fill_filesystem(tiny_fs / "filler")
    more = [make_ref(key=f"more{i}", size=BS) for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="zarrfs.io.disk_store"):
        assert [cache.put(BUCKET, ref, 0, block(ref, 0)) for ref in more] == [False] * 5
    assert cache.stats()["puts_skipped"] == 5
    assert len([r for r in caplog.records if "out of space" in r.getMessage()]) == 1
    assert [cache.get(BUCKET, ref, 0) for ref in refs] == [block(ref, 0) for ref in refs]
    assert cache.usage().temp_files == 0
    # out of space without a floor or a budget to blame (a quota): give up the oldest 15%
    assert cache.needs_eviction
    report = cache.evict()
    assert report is not None and report.removed_blocks == 1
    assert cache.get(BUCKET, refs[0], 0) is None
    assert cache.put(BUCKET, more[0], 0, block(more[0], 0))


def test_the_free_space_floor_stops_writes_before_the_disk_is_full(tiny_fs: Path) -> None:
    cache = make_cache(tiny_fs / "cache", min_free_fraction=0.5)
    refs = [make_ref(key=f"k{i}", size=BS) for i in range(40)]
    results = [cache.put(BUCKET, ref, 0, block(ref, 0)) for ref in refs]
    assert True in results and results[-1] is False
    assert cache.stats()["errors"] == 0  # refused by the floor, never by ENOSPC
    st = os.statvfs(tiny_fs)
    assert st.f_bavail * st.f_frsize >= st.f_blocks * st.f_frsize // 2 - 4 * (HEADER_SIZE + BS)
    assert cache.needs_eviction
    written = sum(results)
    for ref in refs[:written]:
        assert cache.get(BUCKET, ref, 0) == block(ref, 0)


def test_evict_yields_space_when_the_floor_is_breached(tiny_fs: Path) -> None:
    cache = make_cache(tiny_fs / "cache")
    refs = [make_ref(key=f"k{i}", size=BS) for i in range(8)]
    for ref in refs:
        assert cache.put(BUCKET, ref, 0, block(ref, 0))
    fill_filesystem(tiny_fs / "filler")
    floored = make_cache(tiny_fs / "cache", min_free_fraction=0.1)
    report = floored.evict()
    assert report is not None and report.removed_blocks > 0
    st = os.statvfs(tiny_fs)
    assert st.f_bavail * st.f_frsize >= 0.1 * st.f_blocks * st.f_frsize


def test_a_read_only_cache_dir_still_serves_what_it_holds(
    tiny_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_cache(tiny_fs / "cache", touch_interval=0.0)
    ref = make_ref()
    assert cache.put(BUCKET, ref, 0, block(ref, 0))
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    with caplog.at_level(logging.WARNING, logger="zarrfs.io.disk_store"):
        assert not cache.put(BUCKET, ref, 1, block(ref, 1))
        assert cache.get(BUCKET, ref, 0) == block(ref, 0)  # the mtime refresh fails: still a hit
        assert cache.evict() is not None
        assert cache.clear().blocks == 0
    assert cache.stats()["errors"] >= 2
    assert any("Read-only" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("broken", ["blocks", "."])
def test_a_file_where_a_directory_should_be(
    tmp_path: Path, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = tmp_path / "cache"
    if broken == ".":
        cache_dir.write_bytes(b"not a directory")
    else:
        cache_dir.mkdir()
        (cache_dir / broken).write_bytes(b"not a directory")
    cache = make_cache(cache_dir)
    ref = make_ref()
    with caplog.at_level(logging.WARNING, logger="zarrfs.io.disk_store"):
        assert [cache.put(BUCKET, ref, 0, block(ref, 0)) for _ in range(5)] == [False] * 5
        assert cache.get(BUCKET, ref, 0) is None
        assert cache.usage() == disk_cache.DiskUsage(0, 0, 0)
        assert cache.evict() is not None
        assert cache.clear().blocks == 0
    assert cache.stats()["puts_skipped"] == 5
    assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 1


# --- permissions and sizing -----------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o277])
def test_directories_are_0700_and_files_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        cache = make_cache(tmp_path / "a" / "cache")
        ref = make_ref()
        assert cache.put(BUCKET, ref, 0, block(ref, 0))
    finally:
        os.umask(old)
    file = path_of(cache, ref, 0)
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    for directory in (file.parent, file.parent.parent, tmp_path / "a" / "cache", tmp_path / "a"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert cache.get(BUCKET, ref, 0) == block(ref, 0)


def test_default_size_is_a_capped_fraction_of_the_free_space(tmp_path: Path) -> None:
    assert config.default_disk_cache_size(0) == 0
    assert config.default_disk_cache_size(10 << 30) == (1 << 30) - (1 << 30) % (1 << 20)
    assert config.default_disk_cache_size(1 << 50) == config.DISK_CACHE_DEFAULT_MAX
    assert config.default_disk_cache_size(5 << 20) == 0  # under 1 MiB to spare: disabled
    st = os.statvfs(tmp_path)
    expected = config.default_disk_cache_size(st.f_bavail * st.f_frsize)
    assert abs(disk_cache.default_size(tmp_path / "missing" / "cache") - expected) <= 64 << 20
