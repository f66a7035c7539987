"""Tier 1: the namespace (inodes, lookup, readdir offsets, attributes) without I/O."""

from __future__ import annotations

import pytest

from zarrfs.archive.assets import AssetRecord
from zarrfs.archive.resolver import ResolvedVersion
from zarrfs.base.refs import ObjectRef
from zarrfs.config import Source
from zarrfs.demo.sample import ManifestLeaf, build_manifest, format_manifest, zarr_checksum_of
from zarrfs.errors import DataError, IsADirectory, NotADirectory, NotFound
from zarrfs.fs.namespace import ROOT_INO, ZARR_SHIFT, InlineFile, Namespace
from zarrfs.manifests.parse import parse_manifest

ZID = "9eea4d89-c304-4a94-9117-66334b704cbd"
LEAVES = [
    ManifestLeaf(p, f"ver-{p}", "2025-11-01T12:00:01+00:00", 10 + i, f"{i:032x}")
    for i, p in enumerate([".zgroup", "0/.zarray", "0/0/0", "0/0/1", "0/1/0", "é", "Z"])
]
CHECKSUM = zarr_checksum_of(LEAVES)


def make_namespace(extra: tuple[AssetRecord, ...] = ()) -> tuple[Namespace, object]:
    assets = (
        AssetRecord("a1", "sub-01/a.nwb", 100, 5, blob_key="blobs/x", blob_etag="e-1"),
        AssetRecord("a2", "sub-01/img.ome.zarr", 70, 6, zarr_id=ZID, zarr_checksum=CHECKSUM),
        AssetRecord("a3", "sub-02/b.nwb", 7, 7, blob_key="blobs/y"),
        AssetRecord("a4", "sub-02/b.nwb/c.nwb", 7, 7, blob_key="blobs/z"),  # conflicts: skipped
        AssetRecord("a5", "sub-01/img.ome.zarr/x.nwb", 7, 7, blob_key="blobs/w"),  # inside a Zarr
        AssetRecord("a6", "bad.zarr", 1, 8, zarr_id=ZID, problem="no checksum"),
        *extra,
    )
    resolved = ResolvedVersion(Source("000123", "0.251101.1200"), assets, b"name: x\n", True)
    index = parse_manifest(
        format_manifest(build_manifest(LEAVES)).encode(), zarr_id=ZID, expected_checksum=CHECKSUM
    )
    return Namespace(resolved, bucket="dandiarchive"), index


def names(ns: Namespace, ino: int, index: object = None, offset: int = 0) -> list[bytes]:
    return [n for n, _, _ in ns.readdir(ino, offset, index)]  # type: ignore[arg-type]


def test_top_level_tree() -> None:
    ns, _ = make_namespace()
    assert names(ns, ROOT_INO) == [b"bad.zarr", b"dandiset.yaml", b"sub-01", b"sub-02"]
    sub01 = ns.lookup(ROOT_INO, b"sub-01")
    assert sub01.is_dir
    assert names(ns, sub01.ino) == [b"a.nwb", b"img.ome.zarr"]
    blob = ns.lookup(sub01.ino, b"a.nwb")
    assert not blob.is_dir and blob.size == 100 and blob.mtime_ns == 5
    assert ns.file_source(blob.ino) == ObjectRef("blobs/x", None, 100, "e-1")
    yaml = ns.lookup(ROOT_INO, b"dandiset.yaml")
    assert ns.file_source(yaml.ino) == InlineFile(b"name: x\n") and yaml.size == 8
    sub02 = ns.lookup(ROOT_INO, b"sub-02")
    assert names(ns, sub02.ino) == [b"b.nwb"]
    with pytest.raises(NotFound):
        ns.lookup(ROOT_INO, b"nope")
    with pytest.raises(NotADirectory):
        ns.lookup(blob.ino, b"x")
    with pytest.raises(IsADirectory):
        ns.file_source(sub01.ino)


def test_zarr_entries_and_inodes() -> None:
    ns, index = make_namespace()
    sub01 = ns.lookup(ROOT_INO, b"sub-01")
    zroot = ns.lookup(sub01.ino, b"img.ome.zarr")
    assert zroot.is_dir and zroot.ino < (1 << ZARR_SHIFT)
    assert ns.zarr_of(zroot.ino, inside_only=True) is None
    assert ns.zarr_of(zroot.ino).zarr_id == ZID  # type: ignore[union-attr]
    assert names(ns, zroot.ino, index) == [b".zgroup", b"0", b"Z", "é".encode()]
    zero = ns.lookup(zroot.ino, b"0", index)
    assert zero.is_dir and zero.ino >> ZARR_SHIFT == 2  # bad.zarr sorts first: slot 1
    chunk = ns.lookup(ns.lookup(zero.ino, b"0", index).ino, b"1", index)
    assert ns.getattr(chunk.ino, index) == chunk and chunk.size == 13
    ref = ns.file_source(chunk.ino, index)
    assert ref == ObjectRef(f"zarr/{ZID}/0/0/1", "ver-0/0/1", 13, f"{3:032x}")
    assert ns.describe(chunk.ino, index) == "sub-01/img.ome.zarr/0/0/1"
    # inode numbers are derived: the same after the index is rebuilt
    ns2, index2 = make_namespace()
    assert ns2.lookup(ns2.lookup(zero.ino, b"0", index2).ino, b"1", index2).ino == chunk.ino
    with pytest.raises(NotFound):
        ns.getattr((5 << ZARR_SHIFT) | 1)
    with pytest.raises(DataError, match="no checksum"):
        ns.zarr_of(ns.lookup(ROOT_INO, b"bad.zarr").ino)


def test_readdir_offsets_resume_exactly() -> None:
    ns, index = make_namespace()
    zroot = ns.lookup(ns.lookup(ROOT_INO, b"sub-01").ino, b"img.ome.zarr")
    full = list(ns.readdir(zroot.ino, 0, index))
    for i, (_, _, next_offset) in enumerate(full):
        assert [n for n, _, _ in ns.readdir(zroot.ino, next_offset, index)] == [
            n for n, _, _ in full[i + 1 :]
        ]
    assert names(ns, ROOT_INO, offset=2) == [b"sub-01", b"sub-02"]
