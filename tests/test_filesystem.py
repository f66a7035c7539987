"""Tier 2: the domain operations and the pyfuse3 handlers, awaited directly without a mount.

The filesystem is wired exactly as `mount.serve` wires it, against the sample dandiset in a local S3.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pyfuse3
import pytest
import trio

from zarrfs.archive.sources import parse_source
from zarrfs.config import Config, S3Settings, default_manifest_roots
from zarrfs.demo.sample import ARRAY_PATH, OME_PATH, OME_V2_DELETED, V1, V2, SampleDandiset
from zarrfs.errors import DataError, NotFound
from zarrfs.fs.core import open_filesystem
from zarrfs.fs.filesystem import Filesystem
from zarrfs.fs.namespace import ROOT_INO
from zarrfs.fuse_ops import XATTR_URL, ZarrfsOperations

pytestmark = pytest.mark.trio


def make_config(
    sample: SampleDandiset, source: str, cache: Path, api_url: str = "http://127.0.0.1:9/api"
) -> Config:
    return Config(
        source=parse_source(source),
        mountpoint=Path("/nonexistent"),
        s3=S3Settings(endpoint_url=sample.endpoint_url, bucket=sample.bucket),
        manifest_roots=default_manifest_roots(sample.bucket)[:1],
        api_url=api_url,
        cache_dir=cache,
        memory_cache_size=1 << 26,
        block_size=1 << 16,
    )


async def make_fs(sample: SampleDandiset, version: str, cache: Path) -> AsyncIterator[Filesystem]:
    """The filesystem wired exactly as every face wires it (`core.open_filesystem`)."""
    async with open_filesystem(make_config(sample, f"{sample.dandiset_id}@{version}", cache)) as fs:
        yield fs


async def walk(fs: Filesystem, ino: int, prefix: str = "") -> dict[str, int]:
    found = {}
    handle = await fs.opendir(ino)
    for name, entry, _ in await fs.readdir(handle, 0):
        path = prefix + name.decode()
        if entry.is_dir:
            found.update(await walk(fs, entry.ino, path + "/"))
        else:
            found[path] = entry.ino
    return found


async def resolve_path(fs: Filesystem, path: str) -> int:
    return await fs.walk(path)


async def test_every_file_through_the_domain_layer(sample: SampleDandiset, tmp_path: Path) -> None:
    async for fs in make_fs(sample, V1, tmp_path):
        files = await walk(fs, ROOT_INO)
        expected = sample.versions[V1].files
        assert sorted(files) == sorted(expected)
        for path, ino in files.items():
            handle = await fs.open(ino)
            data = b""
            while chunk := await fs.read(handle, len(data), 50_000):
                data += chunk
            assert data == expected[path], path
            assert (await fs.getattr(ino)).size == len(expected[path])


async def test_handlers(sample: SampleDandiset, tmp_path: Path) -> None:
    async for fs in make_fs(sample, V2, tmp_path):
        ops = ZarrfsOperations(fs, xattrs=True)
        ctx = None
        attr = await ops.getattr(ROOT_INO, ctx)  # type: ignore[arg-type]
        assert stat.S_ISDIR(attr.st_mode) and attr.st_mode & 0o777 == 0o555
        chunk_path = f"{OME_PATH}/0/0/0/0/0"
        ino = await resolve_path(fs, chunk_path)
        attr = await ops.lookup(
            await resolve_path(fs, chunk_path.rsplit("/", 1)[0]),
            b"0",
            ctx,  # type: ignore[arg-type]
        )
        assert attr.st_ino == ino and attr.st_mode == stat.S_IFREG | 0o444
        assert attr.st_size == len(sample.versions[V2].files[chunk_path])
        assert attr.entry_timeout >= 3600 and attr.attr_timeout >= 3600
        # negative lookups are answered with st_ino 0 so that the kernel caches them
        deleted_parent, deleted_name = f"{OME_PATH}/{OME_V2_DELETED[0]}".rsplit("/", 1)
        negative = await ops.lookup(
            await resolve_path(fs, deleted_parent),
            deleted_name.encode(),
            ctx,  # type: ignore[arg-type]
        )
        assert negative.st_ino == 0 and negative.entry_timeout >= 3600
        info = await ops.open(ino, os.O_RDONLY, ctx)  # type: ignore[arg-type]
        assert info.keep_cache
        data = await ops.read(info.fh, 0, 1 << 20)
        assert data == sample.versions[V2].files[chunk_path]
        await ops.release(info.fh)
        url = await ops.getxattr(ino, XATTR_URL, ctx)  # type: ignore[arg-type]
        zarr_id = sample.versions[V2].zarr_ids[OME_PATH]
        assert url.decode().startswith(f"s3://{sample.bucket}/zarr/{zarr_id}/0/0/0/0/0?versionId=")
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.open(ino, flags, ctx)  # type: ignore[arg-type]
            assert e.value.errno == errno.EROFS
        for call in (
            ops.unlink(ROOT_INO, b"x", ctx),
            ops.mkdir(ROOT_INO, b"x", 0o755, ctx),
            ops.write(1, 0, b"x"),
            ops.setxattr(ino, b"user.x", b"1", ctx),
            ops.create(ROOT_INO, b"x", 0o644, os.O_WRONLY, ctx),
        ):  # type: ignore[arg-type]
            with pytest.raises(pyfuse3.FUSEError) as e:
                await call
            assert e.value.errno == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getattr(ROOT_INO + 10_000, ctx)  # type: ignore[arg-type]
        assert e.value.errno == errno.ENOENT
        stats = await ops.statfs(ctx)  # type: ignore[arg-type]
        assert stats.f_files == 4 and stats.f_blocks > 0


async def test_tampered_manifest_is_eio_not_data(
    sample: SampleDandiset, local_s3: object, tmp_path: Path
) -> None:
    from zarrfs.demo.locals3 import LocalS3
    from zarrfs.demo.sample import build_sample

    assert isinstance(local_s3, LocalS3)
    other = build_sample(local_s3, "000555")
    key = other.versions[V1].manifest_keys[OME_PATH]
    body = other.versions[V1].manifests[OME_PATH]
    tampered = body.replace(
        b'"0": {',
        b'"0": {\n  "extra": ["v", "2025-01-01T00:00:00+00:00", 1, '
        b'"d41d8cd98f00b204e9800998ecf8427e"],',
        1,
    )
    assert tampered != body
    local_s3.client.put_object(Bucket=other.bucket, Key=key, Body=tampered)
    async for fs in make_fs(other, V1, tmp_path):
        zarr_ino = await resolve_path(fs, OME_PATH)
        with pytest.raises(DataError, match="recompute"):
            await fs.lookup(zarr_ino, b".zattrs")
        with pytest.raises(DataError):  # remembered, not re-fetched
            await fs.opendir(zarr_ino)
        assert fs.manifests.stats["fetches"] == 1
        # the other Zarr and the blobs are unaffected
        files = sample.versions[V1].files
        blob = next(p for p in files if p.endswith(".nwb"))
        handle = await fs.open(await resolve_path(fs, blob))
        assert await fs.read(handle, 0, 100) == other.versions[V1].files[blob][:100]
        with pytest.raises(NotFound):
            await fs.lookup(ROOT_INO, b"nope")


async def test_first_entry_fetches_the_metadata_at_once(
    sample: SampleDandiset, tmp_path: Path
) -> None:
    files = sample.versions[V1].files
    metadata = [
        p
        for p in files
        if p.startswith(OME_PATH + "/")
        and p.rsplit("/", 1)[-1] in (".zgroup", ".zattrs", ".zarray")
    ]
    assert len(metadata) >= 7
    async for fs in make_fs(sample, V1, tmp_path):
        zarr = await resolve_path(fs, OME_PATH)
        before = fs.reader.stats["requests"]
        await fs.lookup(zarr, b".zgroup")  # first entry: the metadata objects come all at once
        for _ in range(200):  # until the manifest and every metadata object have arrived
            if fs.reader.stats["requests"] - before >= 1 + len(metadata):
                break
            await trio.sleep(0.01)
        fetched = fs.reader.stats["requests"]
        for rel in metadata:
            handle = await fs.open(await resolve_path(fs, rel))
            assert await fs.read(handle, 0, 1 << 20) == files[rel]
        assert fs.reader.stats["requests"] == fetched  # every one was already there


async def test_consolidate_shows_a_zmetadata_built_from_the_metadata(
    sample: SampleDandiset, tmp_path: Path
) -> None:
    import dataclasses
    import json

    config = dataclasses.replace(
        make_config(sample, f"{sample.dandiset_id}@{V1}", tmp_path), consolidate=True
    )
    files = sample.versions[V1].files
    assert f"{OME_PATH}/.zmetadata" not in files  # the sample has none of its own
    async with open_filesystem(config) as fs:
        zarr = await resolve_path(fs, OME_PATH)
        entry = await fs.lookup(zarr, b".zmetadata")
        handle = await fs.open(entry.ino)
        doc = json.loads(await fs.read(handle, 0, entry.size + 10))
        assert doc["zarr_consolidated_format"] == 1
        expected = {
            rel[len(OME_PATH) + 1 :]: json.loads(data)
            for rel, data in files.items()
            if rel.startswith(OME_PATH + "/")
            and rel.rsplit("/", 1)[-1] in (".zgroup", ".zattrs", ".zarray")
        }
        assert doc["metadata"] == expected
        names = [n for n, _, _ in await fs.readdir(await fs.opendir(zarr), 0)]
        assert b".zmetadata" in names and names == sorted(names)
        assert (await fs.getattr(entry.ino)).size == entry.size
        # made by zarrfs: it names no object of the bucket (not the version's dandiset.yaml)
        assert set(await fs.provenance(entry.ino)) == {"asset_id"}
        # a Zarr format 3 array has nothing to consolidate in format 2 terms: left as it is
        array = await resolve_path(fs, ARRAY_PATH)
        with pytest.raises(NotFound):
            await fs.lookup(array, b".zmetadata")
    async for plain in make_fs(sample, V1, tmp_path / "plain"):
        with pytest.raises(NotFound):
            await plain.lookup(await resolve_path(plain, OME_PATH), b".zmetadata")


async def test_a_stop_that_cancels_the_core_still_writes_what_it_read_to_disk(
    sample: SampleDandiset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unmount cancels everything the core runs. The disk cache's background writes must not be
    cut short by it: the core's close waits for them (bounded), so a remount reads from disk what
    this mount read, and the close does not wait its whole bound for writes nobody makes any more
    (they were cancelled: a 128 MiB read then left ~95 blocks behind and took 11 s to stop)."""
    import dataclasses
    import time

    from zarrfs.io.disk_store import DiskBlockCache

    put = DiskBlockCache.put

    def slow_put(self: DiskBlockCache, *args: object, **kwargs: object) -> bool:
        time.sleep(0.02)  # a disk slower than the reads: blocks queue up behind the reader
        return put(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(DiskBlockCache, "put", slow_put)
    config = dataclasses.replace(
        make_config(sample, f"{sample.dandiset_id}@{V1}", tmp_path), disk_cache_size=1 << 30
    )
    files = sample.versions[V1].files
    blob = max((p for p in files if p.endswith(".nwb")), key=lambda p: len(files[p]))
    blocks = -(-len(files[blob]) // config.block_size)
    assert blocks >= 8
    with trio.CancelScope() as outer:  # what the mount face cancels when the kernel unmounts
        async with open_filesystem(config) as fs:
            handle = await fs.open(await resolve_path(fs, blob))
            assert await fs.read(handle, 0, len(files[blob])) == files[blob]
            disk = fs.stack.disk
            assert disk is not None and disk.pending > 0  # still being written
            started = time.monotonic()
            outer.cancel()
            await trio.sleep_forever()
    assert time.monotonic() - started < 5
    assert disk.pending == 0
    on_disk = disk.disk.stats()
    assert on_disk["puts"] == blocks, on_disk


async def test_a_zarr_root_is_described_without_its_manifest(
    sample: SampleDandiset, tmp_path: Path
) -> None:
    """Listing the directory that holds a Zarr, looking the Zarr up and its getattr are answered by
    the namespace: only an operation on its children (or inside it) loads its manifest."""
    parent, _, name = OME_PATH.rpartition("/")
    async for fs in make_fs(sample, V1, tmp_path):
        parent_ino = await resolve_path(fs, parent)
        listed = {n: e for n, e, _ in await fs.readdir(await fs.opendir(parent_ino), 0)}
        zarr = await fs.lookup(parent_ino, name.encode())
        assert zarr.is_dir and listed[name.encode()] == zarr
        assert (await fs.getattr(zarr.ino)) == zarr
        assert fs.manifests.stats["fetches"] == 0
        handle = await fs.opendir(zarr.ino)
        assert fs.manifests.stats["fetches"] == 1
        children = [n for n, _, _ in await fs.readdir(handle, 0)]
        assert b".zattrs" in children or b"zarr.json" in children
        assert (await fs.lookup(zarr.ino, children[0])).ino != zarr.ino
        assert fs.manifests.stats["fetches"] == 1
