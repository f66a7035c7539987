"""Tier 1: manifest parsing, verification and the columnar index, without I/O beyond tmp files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import REFERENCE_SAMPLES
from zarrfs.demo.sample import ManifestLeaf, build_manifest, format_manifest, zarr_checksum_of
from zarrfs.errors import IntegrityError, ManifestError
from zarrfs.manifests.checksums import EMPTY_CHECKSUM
from zarrfs.manifests.index import ManifestIndex
from zarrfs.manifests.parse import parse_manifest

SAMPLE = REFERENCE_SAMPLES
REAL = SAMPLE / "zarr-manifest-v2-real-509.json"
REAL_CHECKSUM = "6ddc4625befef8d6f9796835648162be-509--710206390"


def leaf(
    path: str, size: int = 10, etag: str | None = None, vid: str | None = None
) -> ManifestLeaf:
    h = f"{abs(hash((path, size))) % (1 << 128):032x}"
    return ManifestLeaf(
        path=path,
        version_id=vid or f"v-{path}",
        last_modified="2025-11-01T12:00:01+00:00",
        size=size,
        etag=etag or h,
    )


def parse_leaves(leaves: list[ManifestLeaf]) -> tuple[ManifestIndex, str]:
    doc = format_manifest(build_manifest(leaves)).encode()
    checksum = zarr_checksum_of(leaves)
    return parse_manifest(doc, zarr_id="zid", expected_checksum=checksum), checksum


def real_manifest() -> bytes:
    return REAL.read_bytes()


def test_real_manifest_recomputes_to_its_name() -> None:
    index = parse_manifest(real_manifest(), zarr_id="zid", expected_checksum=REAL_CHECKSUM)
    doc = json.loads(real_manifest())
    assert index.n_files == doc["statistics"]["entries"] == 509
    assert index.checksum == REAL_CHECKSUM
    assert index.recompute_checksum() == REAL_CHECKSUM
    node = index.resolve("0/0/0/13/8/100")
    assert node is not None
    obj = index.entry_object(node)
    assert [obj.version_id, obj.size, obj.etag] == [
        doc["entries"]["0"]["0"]["0"]["13"]["8"]["100"][i] for i in (0, 2, 3)
    ]
    assert index.stat(node).mtime_ns == 1656371351 * 10**9  # 2022-06-27T23:09:11+00:00
    assert index.path(node) == "0/0/0/13/8/100"


def test_every_real_entry_round_trips() -> None:
    doc = json.loads(real_manifest())
    index = parse_manifest(real_manifest(), zarr_id="zid", expected_checksum=REAL_CHECKSUM)

    def walk(node: dict, prefix: str) -> list[tuple[str, list]]:
        out = []
        for name, value in node.items():
            path = f"{prefix}{name}"
            out += walk(value, path + "/") if isinstance(value, dict) else [(path, value)]
        return out

    expected = sorted(walk(doc["entries"], ""))
    got = sorted((o.path, [o.version_id, o.size, o.etag]) for o in index.iter_files())
    assert got == [(p, [v[0], v[2], v[3]]) for p, v in expected]


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.replace(
            b'"cb32b88f6488d55818aba94746bcc19a"', b'"cb32b88f6488d55818aba94746bcc19b"'
        ),
        lambda d: d.replace(b"8312", b"8313", 1),
        lambda d: d.replace(b'"100": [', b'"100x": [', 1),
    ],
    ids=["etag", "size", "name"],
)
def test_tampered_real_manifest_is_rejected(edit) -> None:  # type: ignore[no-untyped-def]
    tampered = edit(real_manifest())
    assert tampered != real_manifest()
    with pytest.raises(IntegrityError, match="recompute"):
        parse_manifest(tampered, zarr_id="zid", expected_checksum=REAL_CHECKSUM)


def test_wrong_expected_checksum_is_rejected() -> None:
    other = "0" * 32 + "-509--710206390"
    with pytest.raises(IntegrityError, match=other):
        parse_manifest(real_manifest(), zarr_id="zid", expected_checksum=other)


def test_names_are_binary_searchable_whatever_their_order() -> None:
    names = ["Z", "a", "é", "10", "9", "ä", "_", ".zattrs", "zarr.json", "a b", "日本", "😀", "A"]
    leaves = [leaf(f"d/{n}") for n in names] + [leaf(f"{n}/x") for n in names[:5]]
    index, checksum = parse_leaves(leaves)
    assert index.recompute_checksum() == checksum
    d = index.resolve("d")
    assert d is not None and index.is_dir(d)
    listed = [index.name(c) for c in index.child_range(d)]
    assert listed == sorted(n.encode() for n in names)
    for n in names:
        node = index.lookup(d, n.encode())
        assert node is not None and index.entry_object(node).path == f"d/{n}"
    for missing in ["b", "", "zz", "é0", "0"]:
        assert index.lookup(d, missing.encode()) is None
    assert index.resolve("d/é/nope") is None


def test_random_trees_match_zarr_checksum_reference() -> None:
    rng = random.Random(7)
    for _ in range(20):
        paths = set()
        for _ in range(rng.randint(1, 60)):
            depth = rng.randint(1, 5)
            paths.add("/".join(rng.choice(["0", "1", "a", "B", "c.d", "ü"]) for _ in range(depth)))
        # a path cannot be both a file and a directory
        files = sorted(p for p in paths if not any(q.startswith(p + "/") for q in paths))
        leaves = [leaf(p, size=rng.randint(0, 10**6)) for p in files]
        index, checksum = parse_leaves(leaves)
        assert index.checksum == checksum
        assert index.recompute_checksum() == checksum
        assert sorted(o.path for o in index.iter_files()) == files


def test_empty_zarr_and_empty_directories() -> None:
    doc = {
        "schemaVersion": 2,
        "fields": ["versionId", "lastModified", "size", "ETag"],
        "statistics": {
            "entries": 0,
            "depth": 0,
            "totalSize": 0,
            "lastModified": None,
            "zarrChecksum": EMPTY_CHECKSUM,
        },
        "entries": {},
    }
    index = parse_manifest(json.dumps(doc).encode(), zarr_id="z", expected_checksum=EMPTY_CHECKSUM)
    assert index.n_files == 0 and list(index.child_range(0)) == []
    leaves = [leaf("a/b")]
    manifest = build_manifest(leaves)
    manifest["entries"]["empty"] = {"deeper": {}}
    index = parse_manifest(
        json.dumps(manifest).encode(), zarr_id="z", expected_checksum=zarr_checksum_of(leaves)
    )
    assert [index.name(c) for c in index.child_range(0)] == [b"a"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            b'{"schemaVersion": 1, "entries": {"a/b": ["v", "2020-01-01T00:00:00+00:00", 1, "e"]}}',
            "unsupported manifest schemaVersion 1",
        ),
        (
            b'{"schemaVersion": 2, "fields": ["versionId"], "entries": {}}',
            "unsupported manifest fields",
        ),
        (
            b'{"schemaVersion": 2, "entries": {"a": ["v", "2020-01-01T00:00:00+00:00", "1", "e"]}}',
            "malformed",
        ),
        (
            b'{"schemaVersion": 2, "entries": {"a/b": ["v", "2020-01-01T00:00:00+00:00", 1, "e"]}}',
            "invalid entry name",
        ),
        (
            b'{"schemaVersion": 2, "entries": {"..": {"x": ["v", "2020-01-01T00:00:00+00:00", 1, "e"]}}}',
            "invalid entry name",
        ),
        (b'{"schemaVersion": 2, "entries": {"a": ["v", "2020-01-01T00:00:00", 1, "e"]}}', "offset"),
        (
            b'{"schemaVersion": 2, "entries": {"a": ["v", "2020-01-01T00:00:00+00:00", 1, "e"], '
            b'"a": ["v", "2020-01-01T00:00:00+00:00", 1, "e"]}}',
            "duplicate",
        ),
        (b'{"schemaVersion": 2, "entries": {', "not valid JSON"),
        (b"[1, 2]", "not a schema-2 Zarr manifest"),
    ],
)
def test_malformed_manifests_give_clear_errors(doc: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(doc, zarr_id="z", expected_checksum=EMPTY_CHECKSUM)


def test_arrow_round_trip_and_header_checks(tmp_path: Path) -> None:
    leaves = [
        leaf("0/.zarray"),
        leaf("0/0/0", etag="ab" * 16 + "-3"),
        leaf("odd", etag="not-md5"),
        leaf(".zattrs", size=0),
    ]
    index, checksum = parse_leaves(leaves)
    path = tmp_path / "i.arrow"
    index.write(path)
    loaded = ManifestIndex.load(path, zarr_id="zid", checksum=checksum)
    assert loaded.n_nodes == index.n_nodes and loaded.n_files == 4
    assert list(loaded.iter_files()) == list(index.iter_files())
    assert loaded.recompute_checksum() == checksum
    for node in range(index.n_nodes):
        assert loaded.stat(node) == index.stat(node)
        assert loaded.name(node) == index.name(node)
        assert loaded.parent(node) == index.parent(node)
    with pytest.raises(ManifestError, match="checksum"):
        ManifestIndex.load(path, zarr_id="zid", checksum=EMPTY_CHECKSUM)
    with pytest.raises(ManifestError, match="zarr_id"):
        ManifestIndex.load(path, zarr_id="other", checksum=checksum)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ManifestError, match="unreadable"):
        ManifestIndex.load(path, zarr_id="zid", checksum=checksum)


def test_bulk_children_match_per_node_accessors() -> None:
    index = parse_manifest(real_manifest(), zarr_id="zid", expected_checksum=REAL_CHECKSUM)
    for node in range(index.n_nodes):
        if not index.is_dir(node):
            assert index.children(node) == []
            continue
        expected = [
            (c, index.name(c), index.is_dir(c), index.stat(c).size, index.stat(c).mtime_ns)
            for c in index.child_range(node)
        ]
        assert index.children(node, 0, 10**6) == expected
        for start, count in ((0, 1), (1, 3), (len(expected) - 1, 5), (len(expected), 5)):
            assert index.children(node, start, count) == expected[start : start + count]


# --- the direct digest is byte-identical to zarr_checksum's ---------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from zarr_checksum.checksum import ZarrChecksum, ZarrChecksumManifest  # noqa: E402

from zarrfs.manifests.checksums import directory_digest  # noqa: E402

any_name = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=20)
any_etag = st.one_of(
    st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
    st.text(alphabet="0123456789abcdef", min_size=32, max_size=32).map(lambda e: e + "-17"),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40),  # anything S3 says
)
sizes = st.integers(min_value=0, max_value=1 << 62)


@given(
    st.dictionaries(any_name, st.tuples(any_etag, sizes), max_size=12),
    st.dictionaries(
        any_name,
        st.tuples(
            st.text("0123456789abcdef", min_size=32, max_size=32), sizes, st.integers(1, 10**6)
        ),
        max_size=6,
    ),
)
@settings(max_examples=400)
def test_directory_digest_equals_zarr_checksum(
    files: dict[str, tuple[str, int]], dirs: dict[str, tuple[str, int, int]]
) -> None:
    dirs = {name: value for name, value in dirs.items() if name not in files}
    file_rows = sorted((name, etag, size) for name, (etag, size) in files.items())
    dir_rows = sorted(
        (name, f"{md5}-{count}--{size}", size, count) for name, (md5, size, count) in dirs.items()
    )
    reference = ZarrChecksumManifest(
        directories=[ZarrChecksum(digest=d, name=n, size=s) for n, d, s, _ in dir_rows],
        files=[ZarrChecksum(digest=e, name=n, size=s) for n, e, s in file_rows],
    ).generate_digest()
    assert directory_digest(file_rows, dir_rows) == (reference.digest, reference.count)


component = any_name.filter(
    lambda n: "/" not in n and n not in (".", "..") and "\0" not in n and len(n.encode()) <= 255
)
etag_ok = any_etag.filter(lambda e: e != "" and "\0" not in e)  # what parsing accepts


@given(
    st.lists(
        st.tuples(
            st.lists(component, min_size=1, max_size=4),
            etag_ok,
            st.integers(min_value=0, max_value=5 << 40),
        ),
        min_size=1,
        max_size=30,
    )
)
@settings(max_examples=150, deadline=None)
def test_whole_trees_verify_against_zarr_checksum(
    rows: list[tuple[list[str], str, int]],
) -> None:
    leaves: dict[str, ManifestLeaf] = {}
    for parts, etag, size in rows:
        path = "/".join(parts)
        if any(p == path or path.startswith(p + "/") or p.startswith(path + "/") for p in leaves):
            continue
        leaves[path] = ManifestLeaf(path, "v", "2025-11-01T12:00:01+00:00", size, etag)
    checksum = zarr_checksum_of(list(leaves.values()))  # the reference: ZarrChecksumTree
    doc = format_manifest(build_manifest(list(leaves.values()))).encode()
    index = parse_manifest(doc, zarr_id="z", expected_checksum=checksum)  # raises on any difference
    assert index.recompute_checksum() == checksum
