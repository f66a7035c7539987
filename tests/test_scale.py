"""Correctness at scale (small sizes): big directories through a real mount, readdir paging across
kernel buffer boundaries, bytewise name order, and manifest eviction + reload giving identical results.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import Mounted
from zarrfs.archive.assets import AssetRecord
from zarrfs.config import S3Settings
from zarrfs.demo.locals3 import LocalS3
from zarrfs.demo.sample import (
    ManifestLeaf,
    build_manifest,
    format_manifest,
    manifest_key,
    zarr_checksum_of,
)
from zarrfs.io.remote import Remote
from zarrfs.manifest_cache import ManifestCache, manifest_url

DANDISET = "000901"
VERSION = "0.251105.0900"
BIG_DIR = "0/0/0"
# names whose bytewise order differs from a locale or numeric order, and long ones that fill the
# kernel's readdir buffer after few entries
SPECIAL = [
    "Z",
    "a",
    "é",
    "É",
    "10",
    "9",
    "_x",
    "~",
    "日本語",
    "😀",
    "a" * 200,
    "ä" * 100,
    ".hidden",
]


def make_leaves(n_big: int, seed: int) -> list[ManifestLeaf]:
    rng = random.Random(seed)
    names = {f"{i}" for i in range(n_big - len(SPECIAL))} | set(SPECIAL)
    leaves = []
    for name in sorted(names):
        leaves.append(leaf(f"{BIG_DIR}/{name}", rng))
    for level in range(1, 5):
        for i in range(20):
            leaves.append(leaf(f"{level}/0/{i // 5}/{i % 5}", rng))
    leaves.append(leaf(".zattrs", rng))
    leaves.append(leaf(".zgroup", rng))
    return leaves


def leaf(path: str, rng: random.Random) -> ManifestLeaf:
    return ManifestLeaf(
        path=path,
        version_id="".join(
            rng.choice("abcdefghijklmnopqrstuvwxyzABCDEF0123456789._") for _ in range(32)
        ),
        last_modified=f"2025-11-05T08:00:{rng.randrange(60):02d}+00:00",
        size=rng.randrange(1, 1 << 20),
        etag=f"{rng.getrandbits(128):032x}",
    )


def zarr_record(path: str, zarr_id: str, leaves: list[ManifestLeaf]) -> dict[str, object]:
    return {
        "identifier": str(uuid.uuid4()),
        "path": path,
        "contentSize": sum(x.size for x in leaves),
        "encodingFormat": "application/x-zarr",
        "contentUrl": [f"https://dandiarchive.s3.amazonaws.com/zarr/{zarr_id}/"],
        "digest": {"dandi:dandi-zarr-checksum": zarr_checksum_of(leaves)},
        "dateModified": "2025-11-05T08:30:00+00:00",
    }


@pytest.fixture(scope="module")
def big_dandiset(local_s3: LocalS3) -> dict[str, list[ManifestLeaf]]:
    """A dandiset of two Zarrs: one with a 6,000-entry directory, one smaller."""
    zarrs = {"big.zarr": make_leaves(6000, 1), "small.zarr": make_leaves(300, 2)}
    records = []
    for path, leaves in zarrs.items():
        zarr_id = str(uuid.uuid4())
        checksum = zarr_checksum_of(leaves)
        body = format_manifest(build_manifest(leaves)).encode()
        local_s3.client.put_object(
            Bucket=local_s3.bucket, Key=manifest_key(zarr_id, checksum), Body=body
        )
        records.append(zarr_record(path, zarr_id, leaves))
    prefix = f"dandisets/{DANDISET}/{VERSION}/"
    local_s3.client.put_object(
        Bucket=local_s3.bucket, Key=prefix + "assets.jsonld", Body=json.dumps(records).encode()
    )
    return zarrs


def expected_tree(leaves: list[ManifestLeaf], directory: str) -> list[bytes]:
    prefix = directory + "/" if directory else ""
    children = {x.path[len(prefix) :].split("/")[0] for x in leaves if x.path.startswith(prefix)}
    return sorted(n.encode() for n in children)


@pytest.mark.fuse
def test_big_directory_listing_through_a_mount(
    mount: Callable[..., Mounted], big_dandiset: dict[str, list[ManifestLeaf]]
) -> None:
    # a 1-byte manifest budget evicts every index as soon as the next one loads
    mounted = mount(f"{DANDISET}@{VERSION}", "--manifest-memory", "1")
    for name, leaves in big_dandiset.items():
        zarr_dir = mounted.path / name
        for directory in (BIG_DIR, "", "1/0/0"):
            listed = os.listdir(zarr_dir / directory)
            assert sorted(n.encode() for n in listed) == expected_tree(leaves, directory)
        with os.scandir(zarr_dir / BIG_DIR) as it:
            sizes = {e.name: e.stat().st_size for e in it}
        by_path = {x.path: x for x in leaves}
        assert sizes == {
            p.rsplit("/", 1)[1]: x.size for p, x in by_path.items() if p.startswith(BIG_DIR + "/")
        }
        for special in SPECIAL:
            st = os.stat(zarr_dir / BIG_DIR / special)
            assert st.st_size == by_path[f"{BIG_DIR}/{special}"].size
        with pytest.raises(FileNotFoundError):
            os.stat(zarr_dir / BIG_DIR / "does-not-exist")
    # everything, via os.walk, after the indexes were evicted and reloaded several times
    for name, leaves in big_dandiset.items():
        found = set()
        for root, _, files in os.walk(mounted.path / name):
            rel = os.path.relpath(root, mounted.path / name)
            found |= {f if rel == "." else f"{rel}/{f}" for f in files}
        assert found == {x.path for x in leaves}
    assert "exceeds the manifest memory budget" in mounted.output()


@pytest.mark.trio
async def test_eviction_and_reload_return_identical_results(tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    assets = []
    for i, n in enumerate((2000, 500)):
        leaves = make_leaves(n, 10 + i)
        zarr_id, checksum = str(uuid.uuid4()), zarr_checksum_of(leaves)
        target = Path(manifest_url(str(roots), zarr_id, checksum))
        target.parent.mkdir(parents=True)
        target.write_text(format_manifest(build_manifest(leaves)))
        assets.append(
            AssetRecord(str(i), f"z{i}.zarr", 0, 0, zarr_id=zarr_id, zarr_checksum=checksum)
        )
    async with Remote.open(S3Settings(endpoint_url="http://127.0.0.1:9")) as remote:
        probe = ManifestCache(
            remote, roots=[f"file://{roots}/"], cache_dir=tmp_path / "cache", memory_budget=1 << 30
        )
        sizes = sorted([(await probe.get(a)).nbytes for a in assets])
        # room for either index, not both: every alternate access evicts the other one (LRU)
        small_budget = ManifestCache(
            remote,
            roots=[f"file://{roots}/"],
            cache_dir=tmp_path / "cache",
            memory_budget=sizes[-1] + sizes[0] // 2,
        )
        first = {a.path: await small_budget.get(a) for a in assets}
        assert small_budget.loaded_bytes == sizes[0]  # the big one was evicted by the small one
        snapshots = {p: list(ix.iter_files()) for p, ix in first.items()}
        for _ in range(3):
            for a in assets:
                index = await small_budget.get(a)
                assert list(index.iter_files()) == snapshots[a.path]
                assert index.recompute_checksum() == a.zarr_checksum
        assert probe.stats["fetches"] == 2 and small_budget.stats["fetches"] == 0
        assert small_budget.stats["disk_loads"] == 8
        # single flight: many concurrent first accesses, one fetch
        fresh = ManifestCache(
            remote, roots=[f"file://{roots}/"], cache_dir=tmp_path / "cache2", memory_budget=1 << 30
        )
        results = []

        async def get() -> None:
            results.append(await fresh.get(assets[0]))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(get)
        assert fresh.stats["fetches"] == 1 and all(r is results[0] for r in results)


def one_manifest_root(tmp_path: Path) -> tuple[Path, AssetRecord]:
    leaves = make_leaves(50, 3)
    zarr_id, checksum = str(uuid.uuid4()), zarr_checksum_of(leaves)
    roots = tmp_path / "roots"
    target = Path(manifest_url(str(roots), zarr_id, checksum))
    target.parent.mkdir(parents=True)
    target.write_text(format_manifest(build_manifest(leaves)))
    return roots, AssetRecord("a", "z.zarr", 0, 0, zarr_id=zarr_id, zarr_checksum=checksum)


@pytest.mark.trio
async def test_an_unusable_cache_dir_means_memory_not_eio(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    roots, asset = one_manifest_root(tmp_path)
    async with Remote.open(S3Settings(endpoint_url="http://127.0.0.1:9")) as remote:
        # the cache dir is a file, or only its index store is in the way: the cache dir is an
        # optimisation, so the verified index is served from memory (and nothing is stored)
        blocked = tmp_path / "not-a-dir"
        blocked.write_text("x")
        partial = tmp_path / "partial"
        partial.mkdir()
        (partial / "manifests").write_text("in the way")
        for cache_dir in (blocked, partial):
            cache = ManifestCache(
                remote, roots=[f"file://{roots}/"], cache_dir=cache_dir, memory_budget=1 << 20
            )
            index = await cache.get(asset)
            assert index.recompute_checksum() == asset.zarr_checksum and index.n_files == 130
            assert cache.stats["not_stored"] == 1 and cache.stats["stored"] == 0
    assert any("cannot keep the manifest" in r.message for r in caplog.records)


def test_stale_temporary_files_are_swept(tmp_path: Path) -> None:
    import time as time_

    cache = ManifestCache(
        None,  # type: ignore[arg-type]  # sweeping needs no remote
        roots=["file:///nowhere/"],
        cache_dir=tmp_path,
        memory_budget=1,
    )
    (tmp_path / "tmp").mkdir()
    old, fresh = tmp_path / "tmp" / "old.json", tmp_path / "tmp" / "fresh.json"
    index_dir = tmp_path / "manifests" / "abc" / "abcdef"
    index_dir.mkdir(parents=True)
    old_index_tmp, kept_index = index_dir / ".x.arrow.1.tmp", index_dir / "x.arrow"
    for path in (old, fresh, old_index_tmp, kept_index):
        path.write_text("x")
    two_days_ago = time_.time() - 2 * 86400
    for path in (old, old_index_tmp, kept_index):
        os.utime(path, (two_days_ago, two_days_ago))
    assert cache.sweep_stale_temp_files() == 2
    assert not old.exists() and not old_index_tmp.exists()
    assert fresh.exists() and kept_index.exists()


@pytest.mark.trio
async def test_a_cancelled_loader_hands_over_to_its_waiters(tmp_path: Path) -> None:
    import trio.testing

    roots, asset = one_manifest_root(tmp_path)
    async with Remote.open(S3Settings(endpoint_url="http://127.0.0.1:9")) as remote:
        cache = ManifestCache(
            remote, roots=[f"file://{roots}/"], cache_dir=tmp_path / "c", memory_budget=1 << 20
        )
        results = []
        first = trio.CancelScope()
        fetch = remote.get_bytes
        fetched: list[str] = []
        reached = trio.Event()
        loader_task: list[trio.lowlevel.Task] = []

        async def loader_fetch_hangs(url: str, **kw: Any) -> bytes:
            fetched.append(url)
            if trio.lowlevel.current_task() in loader_task:
                reached.set()
                await trio.sleep_forever()  # the loader is stuck here when it is cancelled
            return await fetch(url, **kw)

        remote.get_bytes = loader_fetch_hangs  # type: ignore[method-assign]

        async def loader() -> None:
            loader_task.append(trio.lowlevel.current_task())
            with first:
                await cache.get(asset)

        async def waiter() -> None:
            results.append(await cache.get(asset))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(loader)
            await reached.wait()
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()
        assert first.cancelled_caught and len(fetched) == 2  # the waiter took over the load
        assert len(results) == 1 and results[0].recompute_checksum() == asset.zarr_checksum
