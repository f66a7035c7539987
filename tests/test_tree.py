"""Tier 1: the namespace and a Zarr's view (inodes, lookup, readdir offsets, attributes) without I/O."""

from __future__ import annotations

import pytest

from zarrfs.archive.assets import AssetRecord
from zarrfs.archive.resolver import ResolvedVersion
from zarrfs.base.refs import ObjectRef
from zarrfs.config import Source
from zarrfs.demo.sample import ManifestLeaf, build_manifest, format_manifest, zarr_checksum_of
from zarrfs.errors import IsADirectory, NotADirectory, NotFound
from zarrfs.fs.namespace import ROOT_INO, ZARR_SHIFT, InlineFile, Namespace
from zarrfs.fs.zarrs import ZarrView
from zarrfs.manifests.index import ManifestIndex
from zarrfs.manifests.parse import parse_manifest

ZID = "9eea4d89-c304-4a94-9117-66334b704cbd"
LEAVES = [
    ManifestLeaf(p, f"ver-{p}", "2025-11-01T12:00:01+00:00", 10 + i, f"{i:032x}")
    for i, p in enumerate([".zgroup", "0/.zarray", "0/0/0", "0/0/1", "0/1/0", "é", "Z"])
]
CHECKSUM = zarr_checksum_of(LEAVES)


def make_namespace(extra: tuple[AssetRecord, ...] = ()) -> tuple[Namespace, ManifestIndex]:
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
    return Namespace(resolved), index


def names(ns: Namespace, ino: int, offset: int = 0) -> list[bytes]:
    return [n for n, _, _ in ns.readdir(ino, offset)]


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
    view = ZarrView(index)
    sub01 = ns.lookup(ROOT_INO, b"sub-01")
    zroot = ns.lookup(sub01.ino, b"img.ome.zarr")
    assert zroot.is_dir and zroot.ino < (1 << ZARR_SHIFT)
    assert ns.zarr_at(sub01.ino) is None
    place = ns.zarr_at(zroot.ino)
    assert place is not None and place.asset.zarr_id == ZID and place.node(zroot.ino) == 0
    assert [n for n, _, _ in view.readdir(place, 0, 0)] == [b".zgroup", b"0", b"Z", "é".encode()]
    zero = view.lookup(place, 0, b"0")
    assert zero.is_dir and zero.ino >> ZARR_SHIFT == 2  # bad.zarr sorts first: slot 1
    assert ns.zarr_at(zero.ino) == place
    chunk = view.lookup(place, place.node(view.lookup(place, place.node(zero.ino), b"0").ino), b"1")
    assert view.getattr(place, place.node(chunk.ino)) == chunk and chunk.size == 13
    ref = view.file_source(place, place.node(chunk.ino))
    assert ref == ObjectRef(f"zarr/{ZID}/0/0/1", "ver-0/0/1", 13, f"{3:032x}")
    assert f"{place.path}/{view.path(place.node(chunk.ino))}" == "sub-01/img.ome.zarr/0/0/1"
    # inode numbers are derived: the same after the namespace and the index are rebuilt
    ns2, index2 = make_namespace()
    view2, place2 = ZarrView(index2), ns2.zarr_at(zroot.ino)
    assert place2 is not None
    again = view2.lookup(place2, place2.node(view2.lookup(place2, 0, b"0").ino), b"0")
    assert view2.lookup(place2, place2.node(again.ino), b"1").ino == chunk.ino
    with pytest.raises(NotFound):
        ns.zarr_at((5 << ZARR_SHIFT) | 1)
    bad = ns.zarr_at(ns.lookup(ROOT_INO, b"bad.zarr").ino)
    assert bad is not None and bad.asset.problem == "no checksum"
    with pytest.raises(NotADirectory):
        view.lookup(place, place.node(chunk.ino), b"x")
    with pytest.raises(IsADirectory):
        view.file_source(place, 0)


def test_a_namespace_placed_elsewhere_numbers_there() -> None:
    ns, index = make_namespace()
    before = ns.lookup(ROOT_INO, b"sub-01")
    ns.place(root_ino=7, plain_base=1000, slot_base=40)
    sub01 = ns.lookup(7, b"sub-01")
    assert sub01.ino == before.ino - 2 + 1000
    place = ns.zarr_at(ns.lookup(sub01.ino, b"img.ome.zarr").ino)
    assert place is not None and place.base == 41 << ZARR_SHIFT
    zero = ZarrView(index).lookup(place, 0, b"0")
    assert zero.ino >> ZARR_SHIFT == 41 and ns.zarr_at(zero.ino) == place
    with pytest.raises(NotFound):
        ns.getattr(ROOT_INO)  # not this namespace's any more


def test_readdir_offsets_resume_exactly() -> None:
    ns, index = make_namespace()
    view = ZarrView(index)
    zroot = ns.lookup(ns.lookup(ROOT_INO, b"sub-01").ino, b"img.ome.zarr")
    place = ns.zarr_at(zroot.ino)
    assert place is not None
    full = list(view.readdir(place, 0, 0))
    for i, (_, _, next_offset) in enumerate(full):
        assert [n for n, _, _ in view.readdir(place, 0, next_offset)] == [
            n for n, _, _ in full[i + 1 :]
        ]
    assert names(ns, ROOT_INO, offset=2) == [b"sub-01", b"sub-02"]


def test_a_consolidated_document_shows_at_the_zarr_root_only() -> None:
    ns, index = make_namespace()
    view = ZarrView(index, b'{"metadata": {}}')
    place = ns.zarr_at(ns.lookup(ns.lookup(ROOT_INO, b"sub-01").ino, b"img.ome.zarr").ino)
    assert place is not None
    listing = [n for n, _, _ in view.readdir(place, 0, 0)]
    assert listing == [b".zgroup", b".zmetadata", b"0", b"Z", "é".encode()]
    document = view.lookup(place, 0, b".zmetadata")
    assert view.file_source(place, place.node(document.ino)) == InlineFile(b'{"metadata": {}}')
    with pytest.raises(NotFound):
        view.lookup(place, place.node(view.lookup(place, 0, b"0").ino), b".zmetadata")


@pytest.mark.parametrize("n", [1, 63, 64, 65, 320, 321, 1400])
def test_a_listing_across_readdir_batches_has_every_child_once(n: int) -> None:
    """ZarrView.readdir converts children in growing batches (64, 256, 1024, ...) and stops after a
    short one: a directory whose size is at, below or above a batch edge lists each child once."""
    leaves = [
        ManifestLeaf(f"0/{i:05d}", f"v{i}", "2025-11-01T12:00:01+00:00", i, f"{i:032x}")
        for i in range(n)
    ]
    checksum = zarr_checksum_of(leaves)
    index = parse_manifest(
        format_manifest(build_manifest(leaves)).encode(), zarr_id=ZID, expected_checksum=checksum
    )
    asset = AssetRecord("a", "x.zarr", 1, 5, zarr_id=ZID, zarr_checksum=checksum)
    ns = Namespace(ResolvedVersion(Source("000123", "0.251101.1200"), (asset,), None, True))
    place = ns.zarr_at(ns.lookup(ROOT_INO, b"x.zarr").ino)
    assert place is not None
    view = ZarrView(index)
    directory = view.lookup(place, 0, b"0")
    rows = list(view.readdir(place, place.node(directory.ino), 0))
    assert [name for name, _, _ in rows] == [f"{i:05d}".encode() for i in range(n)]
    assert [entry.size for _, entry, _ in rows] == list(range(n))
    assert [offset for _, _, offset in rows] == list(range(1, n + 1))
    assert list(view.readdir(place, place.node(directory.ino), n)) == []
