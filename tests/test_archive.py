"""The whole archive as one mount (and the other sources on the same machinery), against the local S3
and the fake API: the WebDAV layout, lazily listed and resolved; every Zarr at every checksum; draft
Zarrs without a manifest, built from the bucket's listing and verified; the bytes are always the
pinned bytes.

Two dandisets: the session sample (`000123`) and `000778`, whose draft OME-Zarr has no manifest
anywhere (its manifest object is deleted), so the draft can only be served from a listing.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import Mounted
from zarrfs import config
from zarrfs.archive.sources import parse_source
from zarrfs.config import Config, S3Settings
from zarrfs.demo.fake_api import FakeDandiAPI
from zarrfs.demo.locals3 import LocalS3
from zarrfs.demo.sample import (
    ARRAY_PATH,
    DRAFT,
    OME_PATH,
    V1,
    V2,
    ManifestLeaf,
    SampleDandiset,
    build_sample,
    zarr_checksum_of,
)
from zarrfs.errors import DataError, NotFound
from zarrfs.fs.core import open_filesystem

OTHER = "000778"
EXTRA = b"a chunk written while the draft was being listed\n"


@dataclass
class World:
    s3: LocalS3
    sample: SampleDandiset
    other: SampleDandiset
    api: FakeDandiAPI
    #: the checksum the API reports for the other dandiset's draft OME-Zarr once `extra` is written
    changed_checksum: str


def leaves_of(manifest: bytes) -> list[ManifestLeaf]:
    out: list[ManifestLeaf] = []

    def visit(node: dict[str, Any], prefix: str) -> None:
        for name, value in node.items():
            if isinstance(value, dict):
                visit(value, f"{prefix}{name}/")
            else:
                out.append(ManifestLeaf(prefix + name, value[0], value[1], value[2], value[3]))

    visit(json.loads(manifest)["entries"], "")
    return out


@pytest.fixture(scope="module")
def world(local_s3: LocalS3, sample: SampleDandiset) -> Iterator[World]:
    other = build_sample(local_s3, OTHER)
    draft = other.versions[DRAFT]
    local_s3.client.delete_object(Bucket=other.bucket, Key=draft.manifest_keys[OME_PATH])
    import hashlib

    extra = ManifestLeaf(
        "extra", "?", "2025-11-03T09:30:00+00:00", len(EXTRA), hashlib.md5(EXTRA).hexdigest()
    )
    changed = zarr_checksum_of([*leaves_of(draft.manifests[OME_PATH]), extra])
    with FakeDandiAPI(sample, more=other, max_page_size=1) as api:
        yield World(local_s3, sample, other, api, changed)


def archive_args(world: World) -> tuple[str, ...]:
    return ("--api-url", world.api.url, "--manifest-root", "s3://dandiarchive/zarr-manifest/")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Mounted]:
    from conftest import require_fuse, start_mount, stop_mount

    require_fuse()
    base = tmp_path_factory.mktemp("archive")
    mounted = start_mount(
        base,
        "dandi",
        *archive_args(world),
        endpoint=world.sample.endpoint_url,
        cache=base / "cache",
    )
    yield mounted
    stop_mount(mounted)


def files_under(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


def assert_errno(code: int, action: Callable[..., object], *args: object) -> None:
    with pytest.raises(OSError) as info:
        action(*args)
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"


# --- the archive mount ------------------------------------------------------------------------------


@pytest.mark.fuse
def test_the_webdav_layout_with_every_version_byte_for_byte(archive: Mounted, world: World) -> None:
    mnt, sample = archive.path, world.sample
    assert sorted(os.listdir(mnt)) == ["dandisets", "zarrs"]
    before = len(world.api.requests)
    assert sorted(os.listdir(mnt / "dandisets")) == ["000123", OTHER]
    pages = [r for r in world.api.requests[before:] if r.startswith("/api/dandisets/?")]
    assert len(pages) == 2  # one dandiset a page: paginated through `next`
    dandiset = mnt / "dandisets" / "000123"
    assert sorted(os.listdir(dandiset)) == ["draft", "latest", "releases"]
    assert sorted(os.listdir(dandiset / "releases")) == [V1, V2]
    assert os.readlink(dandiset / "latest") == f"releases/{V2}"
    for version in (V1, V2):
        assert files_under(dandiset / "releases" / version) == sample.versions[version].files
    assert files_under(dandiset / "latest") == sample.versions[V2].files
    assert files_under(dandiset / "draft") == sample.versions[DRAFT].files
    assert (dandiset / "releases" / V1 / "dandiset.yaml").read_bytes() == sample.versions[
        V1
    ].metadata_files["dandiset.yaml"]
    assert "Traceback" not in archive.output()


@pytest.mark.fuse
def test_the_archive_mount_opens_files_without_asking(archive: Mounted, world: World) -> None:
    """Zero-message open on the archive too (a file's bytes never change while mounted: a draft
    stays pinned); its files read as published (the test above), now without an OPEN each."""
    import pyfuse3

    from conftest import require

    require(hasattr(pyfuse3, "no_open_support"), "this pyfuse3 cannot report zero-message open")
    assert "the kernel opens files without asking" in archive.output()


def test_names_that_do_not_exist(archive: Mounted) -> None:
    dandisets = archive.path / "dandisets"
    for missing in ("999999", "abc", "000123/nope", f"000123/releases/{V1[:-1]}9", "000123/0.1"):
        assert_errno(errno.ENOENT, os.stat, dandisets / missing)
    assert_errno(errno.ENOENT, os.stat, archive.path / "zarrs" / "xyz")
    assert_errno(
        errno.ENOTDIR, os.listdir, dandisets / "000123" / "releases" / V1 / "dandiset.yaml"
    )


@pytest.mark.fuse
def test_any_zarr_at_any_checksum_including_an_old_one(archive: Mounted, world: World) -> None:
    sample = world.sample
    zarr_id = sample.versions[V1].zarr_ids[OME_PATH]
    level = archive.path / "zarrs" / zarr_id[:3] / zarr_id[3:6] / zarr_id
    for version in (V1, V2):
        checksum = sample.versions[version].zarr_checksums[OME_PATH]
        expected = {
            rel[len(OME_PATH) + 1 :]: data
            for rel, data in sample.versions[version].files.items()
            if rel.startswith(OME_PATH + "/")
        }
        assert files_under(level / f"{checksum}.zarr") == expected  # V1: after the Zarr changed
    listed = os.listdir(level)  # best effort, from the manifest root's listing
    assert f"{sample.versions[V1].zarr_checksums[OME_PATH]}.zarr" in listed
    assert zarr_id[:3] in os.listdir(archive.path / "zarrs")
    unknown = "0" * 32 + "-1--1.zarr"
    assert_errno(errno.ENOENT, os.stat, level / unknown)


@pytest.mark.fuse
def test_a_draft_zarr_without_a_manifest_is_built_from_the_listing(
    archive: Mounted, world: World
) -> None:
    draft = world.other.versions[DRAFT]
    root = archive.path / "dandisets" / OTHER / "draft"
    assert files_under(root) == draft.files
    log = archive.output()
    assert "building it from s3://dandiarchive/zarr/" in log and "listed asset" in log
    cache = archive.path.parent / "cache"
    zarr_id, checksum = draft.zarr_ids[OME_PATH], draft.zarr_checksums[OME_PATH]
    built = cache / "manifests-built" / zarr_id[:3] / zarr_id[3:6] / zarr_id / f"{checksum}.json"
    assert built.exists()  # kept, laid out like a manifest root
    assert json.loads(built.read_bytes())["schemaVersion"] == 2
    assert list((cache / "manifests").rglob(f"{zarr_id}/{checksum}.json"))  # and in the store


@pytest.mark.fuse
def test_a_zarr_changed_while_listed_is_listed_again(
    mount: Callable[..., Mounted], world: World
) -> None:
    """The API already reports the checksum of a state the bucket reaches only after the first
    listing: the first listing does not add up, the second one (after the write) does."""
    draft = world.other.versions[DRAFT]
    zarr_id = draft.zarr_ids[OME_PATH]
    world.api.zarrs[zarr_id]["checksum"] = world.changed_checksum
    try:
        mounted = mount(f"{OTHER}@draft", *archive_args(world))
        zarr = mounted.path / OME_PATH
        results: list[object] = []
        reader = threading.Thread(target=lambda: results.append(sorted(os.listdir(zarr))))
        reader.start()
        deadline = time.monotonic() + 60
        while "does not add up" not in mounted.output():
            assert time.monotonic() < deadline and reader.is_alive(), mounted.output()
            time.sleep(0.05)
        world.s3.client.put_object(Bucket=world.s3.bucket, Key=f"zarr/{zarr_id}/extra", Body=EXTRA)
        reader.join(timeout=60)
        assert "extra" in results[0]  # type: ignore[operator]
        assert (zarr / "extra").read_bytes() == EXTRA
        assert (zarr / ".zattrs").read_bytes() == draft.files[f"{OME_PATH}/.zattrs"]
    finally:
        world.s3.client.delete_object(Bucket=world.s3.bucket, Key=f"zarr/{zarr_id}/extra")
        world.api.zarrs[zarr_id]["checksum"] = draft.zarr_checksums[OME_PATH]


@pytest.mark.fuse
def test_a_listing_that_never_adds_up_is_eio(mount: Callable[..., Mounted], world: World) -> None:
    draft = world.other.versions[DRAFT]
    zarr_id = draft.zarr_ids[OME_PATH]
    world.api.zarrs[zarr_id]["checksum"] = "f" * 32 + "-61--1"
    try:
        mounted = mount(f"{OTHER}@draft", *archive_args(world))
        assert_errno(errno.EIO, os.listdir, mounted.path / OME_PATH)
        assert f"{config.LISTING_ATTEMPTS} listings of s3://dandiarchive/zarr/{zarr_id}/" in (
            mounted.output()
        )
        # everything else of the draft is served
        assert (mounted.path / ARRAY_PATH / "zarr.json").read_bytes() == draft.files[
            f"{ARRAY_PATH}/zarr.json"
        ]
    finally:
        world.api.zarrs[zarr_id]["checksum"] = draft.zarr_checksums[OME_PATH]


@pytest.mark.fuse
def test_an_unreachable_api_breaks_draft_and_nothing_else(
    mount: Callable[..., Mounted], world: World
) -> None:
    mounted = mount(
        "dandi", "--api-url", "http://127.0.0.1:9/api", "--manifest-root",
        "s3://dandiarchive/zarr-manifest/",
    )  # fmt: skip
    dandisets = mounted.path / "dandisets"
    # from the bucket instead (other tests of the session may have added dandisets to it)
    listed = world.s3.client.list_objects_v2(
        Bucket=world.s3.bucket, Prefix="dandisets/", Delimiter="/"
    )
    in_bucket = sorted(p["Prefix"].split("/")[1] for p in listed["CommonPrefixes"])
    assert {"000123", OTHER} <= set(in_bucket)
    assert sorted(os.listdir(dandisets)) == in_bucket
    assert os.readlink(dandisets / "000123" / "latest") == f"releases/{V2}"
    assert files_under(dandisets / "000123" / "latest") == world.sample.versions[V2].files
    assert_errno(errno.EIO, os.listdir, dandisets / "000123" / "draft")
    assert "cannot list dandisets through the API" in mounted.output()


# --- other sources on the same machinery ---------------------------------------------------------


@pytest.mark.fuse
def test_a_dandiset_mount_shows_every_version_and_the_draft(
    mount: Callable[..., Mounted], world: World
) -> None:
    mounted = mount("000123", *archive_args(world))
    assert sorted(os.listdir(mounted.path)) == [V1, V2, "draft"]
    assert files_under(mounted.path / V1) == world.sample.versions[V1].files


@pytest.mark.fuse
def test_a_path_mount_shows_that_directory_only(
    mount: Callable[..., Mounted], world: World
) -> None:
    files = world.sample.versions[V1].files
    mounted = mount(f"dandi://dandi/000123@{V1}/{OME_PATH}", *archive_args(world))
    assert files_under(mounted.path) == {
        rel[len(OME_PATH) + 1 :]: data
        for rel, data in files.items()
        if rel.startswith(OME_PATH + "/")
    }
    inside = mount(f"dandi://dandi/000123@{V1}/{OME_PATH}/0/0", *archive_args(world))
    assert sorted(os.listdir(inside.path)) == sorted(
        {r.split("/")[4] for r in files if r.startswith(f"{OME_PATH}/0/0/")}
    )


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zarrfs", *args], capture_output=True, text=True, check=False
    )


@pytest.mark.fuse
def test_a_path_mount_of_a_file_or_a_missing_path_fails_clearly(
    world: World, tmp_path: Path
) -> None:
    (tmp_path / "m").mkdir()
    common = ["--endpoint-url", world.sample.endpoint_url, "--cache-dir", str(tmp_path / "c")]
    file = run_cli(
        "mount", f"dandi://dandi/000123@{V1}/{OME_PATH}/.zattrs", str(tmp_path / "m"), *common
    )
    assert file.returncode == 2 and "is a file" in file.stderr and "Traceback" not in file.stderr
    missing = run_cli("mount", f"dandi://dandi/000123@{V1}/sub-09", str(tmp_path / "m"), *common)
    assert missing.returncode == 3 and "no directory sub-09" in missing.stderr


def test_zarrfs_ls_lists_without_mounting(world: World, tmp_path: Path) -> None:
    sample = world.sample
    common = [
        *archive_args(world),
        "--endpoint-url",
        sample.endpoint_url,
        "--cache-dir",
        str(tmp_path),
    ]
    result = run_cli("ls", f"dandi://dandi/000123@{V1}/{OME_PATH}/0", *common)
    assert result.returncode == 0, result.stderr
    manifest = json.loads(sample.versions[V1].manifests[OME_PATH])["entries"]["0"]
    assert result.stdout.splitlines() == [
        f"{name}\t{manifest[name][2]}"
        if isinstance(manifest[name], list)
        else f"{name}/\t{_total(manifest[name])}"
        for name in sorted(manifest)
    ]
    long = run_cli("ls", "-l", f"000123@{V1}/{OME_PATH}/0/.zarray", *common)
    assert long.returncode == 0, long.stderr
    vid, _, size, etag = manifest[".zarray"]
    assert long.stdout == f".zarray\t{size}\t{vid}\t{etag}\n"
    top = run_cli("ls", "000123", *common)
    assert top.stdout.splitlines() == [f"{V1}/\t-", f"{V2}/\t-", "draft/\t-"]
    missing = run_cli("ls", f"000123@{V1}/nope", *common)
    assert missing.returncode == 3 and "Traceback" not in missing.stderr


def _total(node: dict[str, Any]) -> int:
    return sum(_total(v) if isinstance(v, dict) else v[2] for v in node.values())


# --- without a mount: the LRU of resolved versions, pins, negative lifetimes ----------------------


def core_config(world: World, source: str, cache: Path, **kw: Any) -> Config:
    return Config(
        source=parse_source(source),
        mountpoint=Path("/"),
        s3=S3Settings(endpoint_url=world.sample.endpoint_url, bucket=world.sample.bucket),
        manifest_roots=("s3://dandiarchive/zarr-manifest/",),
        api_url=world.api.url,
        cache_dir=cache,
        **kw,
    )


@pytest.mark.trio
async def test_evicted_versions_come_back_with_the_same_inodes(
    world: World, tmp_path: Path
) -> None:
    config_ = core_config(world, "dandi", tmp_path, version_memory=1)  # room for none: always evict
    async with open_filesystem(config_) as fs:
        first = {
            v: await fs.walk(f"dandisets/000123/releases/{v}/{OME_PATH}/0/0") for v in (V1, V2)
        }
        again = {
            v: await fs.walk(f"dandisets/000123/releases/{v}/{OME_PATH}/0/0") for v in (V1, V2)
        }
        assert first == again and first[V1] != first[V2]
        before = len(world.api.requests)
        draft = await fs.walk(f"dandisets/{OTHER}/draft/{ARRAY_PATH}")
        await fs.walk("dandisets/000123/releases/" + V1)  # evicts the draft
        assert await fs.walk(f"dandisets/{OTHER}/draft/{ARRAY_PATH}") == draft
        firsts = [
            r
            for r in world.api.requests[before:]
            if "/versions/draft/assets/" in r and "page=" not in r
        ]
        assert len(firsts) == 1  # resolved once: the pinned draft came back from its pin file


@pytest.mark.trio
async def test_names_that_can_never_exist_are_remembered_longer(
    world: World, tmp_path: Path
) -> None:
    async with open_filesystem(core_config(world, "dandi", tmp_path)) as fs:
        dandisets = await fs.walk("dandisets")
        with pytest.raises(NotFound) as never:
            await fs.lookup(dandisets, b"abc")
        assert never.value.ttl is None
        with pytest.raises(NotFound) as not_yet:
            await fs.lookup(dandisets, b"999999")
        assert not_yet.value.ttl == config.NEGATIVE_MUTABLE_TTL
        entry = await fs.lookup(dandisets, b"000123")
        assert entry.is_dir and entry.ttl == config.VERSION_LIST_TTL
        release = await fs.walk(f"dandisets/000123/releases/{V1}")
        assert (await fs.getattr(release)).ttl is None  # a published version never changes


@pytest.mark.trio
async def test_draft_needs_the_api_and_says_why(world: World, tmp_path: Path) -> None:
    config_ = core_config(world, "dandi", tmp_path)
    from dataclasses import replace

    async with open_filesystem(replace(config_, api_url="http://127.0.0.1:9/api")) as fs:
        draft = await fs.walk("dandisets/000123/draft")
        with pytest.raises(DataError):
            await fs.opendir(draft)
    assert trio  # the module's async tests run on trio
