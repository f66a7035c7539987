"""Every parser against hostile input: the committed corpus (tests/corpus/, see its generate.py) and
property-based tests (hypothesis). Each bad input gives one clear, typed error, never another exception;
nothing resolves outside its directory; one manifest gives the same node ids however its JSON is ordered;
a damaged on-disk index is refused, never served.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from zarrfs.archive.assets import parse_asset_record, parse_asset_records
from zarrfs.archive.sources import parse_source
from zarrfs.base.names import NAME_MAX, name_problem, path_problem
from zarrfs.demo.sample import ManifestLeaf, build_manifest, format_manifest, zarr_checksum_of
from zarrfs.errors import IntegrityError, ManifestError, SourceError
from zarrfs.manifests.checksums import EMPTY_CHECKSUM
from zarrfs.manifests.index import ManifestIndex
from zarrfs.manifests.parse import parse_manifest

CORPUS = Path(__file__).resolve().parent / "corpus"
ERRORS = {"ManifestError": ManifestError, "IntegrityError": IntegrityError}
WHEN = "2025-11-01T12:00:00+00:00"


# --- the corpus ---------------------------------------------------------------------------------


def corpus(folder: str) -> list[tuple[str, dict[str, str]]]:
    expected = json.loads((CORPUS / folder / "EXPECTED.json").read_text())
    files = sorted(p.name for p in (CORPUS / folder).glob("*.json") if p.name != "EXPECTED.json")
    assert files == sorted(expected), "corpus and EXPECTED.json disagree"
    return sorted(expected.items())


@pytest.mark.parametrize(("name", "expected"), corpus("manifests"))
def test_manifest_corpus(name: str, expected: dict[str, str]) -> None:
    data = (CORPUS / "manifests" / name).read_bytes()
    with pytest.raises(ERRORS[expected["error"]]) as info:
        parse_manifest(data, zarr_id="z", expected_checksum=EMPTY_CHECKSUM)
    assert type(info.value) is ERRORS[expected["error"]]
    message = str(info.value)
    assert re.search(expected["match"], message), message
    assert "\n" not in message and len(message) < 1000  # one clear line


@pytest.mark.parametrize(("name", "expected"), corpus("assets"))
def test_asset_record_corpus(
    name: str, expected: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    record = json.loads((CORPUS / "assets" / name).read_text())
    with caplog.at_level(logging.WARNING):
        assets = parse_asset_records([record])
    if expected["outcome"] == "refused":
        assert assets == []
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and re.search(expected["match"], lines[0]), lines
        assert "\n" not in lines[0]
    elif expected["outcome"] == "problem":
        assert len(assets) == 1 and assets[0].problem is not None
        assert re.search(expected["match"], assets[0].problem), assets[0].problem
    else:
        assert len(assets) == 1 and assets[0].problem is None
        assert assets[0].mtime_ns == 0  # out of the range a file time can have: not shown


def test_source_corpus() -> None:
    for text, expected in json.loads((CORPUS / "sources.json").read_text()):
        if expected == "error":
            with pytest.raises(SourceError):
                parse_source(text)
        else:
            assert str(parse_source(text)) == expected, text


# --- property-based: nothing but the typed errors ------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.text(max_size=200))
def test_any_source_string_parses_or_is_a_source_error(text: str) -> None:
    try:
        source = parse_source(text)
    except SourceError as e:
        assert "\n" not in str(e).replace(repr(text), "")
        return
    assert source.dandiset_id is None or re.fullmatch(r"[0-9]{6}", source.dandiset_id)
    assert source.version in (None, "draft", "latest") or re.fullmatch(
        r"0\.[0-9]{6}\.[0-9]{4}", source.version
    )
    assert not source.path or path_problem(source.path) is None


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "path",
                "contentSize",
                "contentUrl",
                "digest",
                "encodingFormat",
                "identifier",
                "id",
                "dateModified",
                "blobDateModified",
            ]
        ),
        json_values | st.text(),
    )
)
def test_any_asset_record_parses_or_is_refused_with_a_value_error(record: dict[str, Any]) -> None:
    try:
        asset = parse_asset_record(record)
    except ValueError:
        return
    assert path_problem(asset.path) is None  # nothing shown can escape its directory
    assert 0 <= asset.size < 1 << 63


@given(st.lists(json_values, max_size=5))
def test_any_asset_list_is_parsed_without_exceptions(records: list[Any]) -> None:
    for asset in parse_asset_records(records):
        assert path_problem(asset.path) is None


@given(json_values)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_any_json_manifest_is_refused_with_a_typed_error(entries: Any) -> None:
    doc = json.dumps({"schemaVersion": 2, "entries": entries}).encode()
    try:
        index = parse_manifest(doc, zarr_id="z", expected_checksum=EMPTY_CHECKSUM)
    except (ManifestError, IntegrityError):
        return
    assert index.n_files == 0  # only an empty tree adds up to the empty checksum


@given(st.text(max_size=300))
def test_name_rule(name: str) -> None:
    problem = name_problem(name)
    encodable = True
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        encodable = False
    ok = (
        encodable
        and 0 < size <= NAME_MAX
        and name not in (".", "..")
        and "/" not in name
        and "\0" not in name
    )
    assert (problem is None) == ok


# --- one manifest, one numbering ------------------------------------------------------------------

names = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="/\0"),
    min_size=1,
    max_size=12,
).filter(lambda n: n not in (".", "..") and len(n.encode()) <= NAME_MAX)


@st.composite
def trees(draw: st.DrawFn) -> list[ManifestLeaf]:
    paths: set[str] = set()
    dirs: set[str] = set()
    for _ in range(draw(st.integers(1, 40))):
        depth = draw(st.integers(1, 4))
        parts = [draw(names) for _ in range(depth)]
        path = "/".join(parts)
        prefixes = {"/".join(parts[:i]) for i in range(1, depth)}
        if path in paths or path in dirs or prefixes & paths:
            continue
        paths.add(path)
        dirs |= prefixes
    leaves = []
    for i, path in enumerate(sorted(paths)):
        size = draw(st.integers(0, 1 << 40))
        etag = draw(st.sampled_from([f"{i:032x}", f"{i:032x}-3", "odd-etag"]))
        leaves.append(ManifestLeaf(path, f"v{i}", WHEN, size, etag))
    return leaves


def shuffled(node: Any, rng: random.Random) -> Any:
    if not isinstance(node, dict):
        return node
    items = [(k, shuffled(v, rng)) for k, v in node.items()]
    rng.shuffle(items)
    return dict(items)


def columns(index: ManifestIndex) -> dict[str, bytes]:
    return {name: np.ascontiguousarray(col).tobytes() for name, col in index._c.items()}


@given(trees(), st.integers(0, 1 << 30))
@settings(max_examples=60, deadline=None)
def test_shuffled_copies_of_a_manifest_give_identical_node_ids(
    leaves: list[ManifestLeaf], seed: int
) -> None:
    assume(leaves)
    manifest = build_manifest(leaves)
    checksum = zarr_checksum_of(leaves)
    reference = parse_manifest(
        format_manifest(manifest).encode(), zarr_id="z", expected_checksum=checksum
    )
    rng = random.Random(seed)
    for _ in range(3):
        copy = dict(manifest)
        copy["entries"] = shuffled(manifest["entries"], rng)
        text = json.dumps(copy, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]))
        index = parse_manifest(text.encode(), zarr_id="z", expected_checksum=checksum)
        assert columns(index) == columns(reference)
        assert index._odd_etags == reference._odd_etags
    # breadth-first, children in bytewise name order: a path's id does not depend on the copy
    for leaf in leaves:
        node = reference.resolve(leaf.path)
        assert node is not None and reference.path(node) == leaf.path
        obj = reference.entry_object(node)
        assert (obj.version_id, obj.size, obj.etag) == (leaf.version_id, leaf.size, leaf.etag)
    assert reference.recompute_checksum() == checksum


def test_node_ids_are_breadth_first_in_name_order() -> None:
    leaves = [ManifestLeaf(p, "v", WHEN, 1, "0" * 32) for p in ("b/x", "a/y/z", "c", "a/w")]
    manifest = build_manifest(leaves)
    index = parse_manifest(
        format_manifest(manifest).encode(), zarr_id="z", expected_checksum=zarr_checksum_of(leaves)
    )
    order = [index.path(n) for n in range(index.n_nodes)]
    assert order == ["", "a", "b", "c", "a/w", "a/y", "b/x", "a/y/z"]


# --- damaged index files --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str, dict[str, bytes]]:
    leaves = [
        ManifestLeaf(
            f"{i % 7}/{i % 5}/{i}", f"vid{i}", WHEN, i * 11, f"{i:032x}" if i % 3 else "odd"
        )
        for i in range(300)
    ]
    checksum = zarr_checksum_of(leaves)
    index = parse_manifest(
        format_manifest(build_manifest(leaves)).encode(), zarr_id="z", expected_checksum=checksum
    )
    path = tmp_path_factory.mktemp("index") / "i.arrow"
    index.write(path)
    return path.read_bytes(), checksum, columns(index)


@given(data=st.data())
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_a_damaged_index_file_is_refused_never_served(
    index_file: tuple[bytes, str, dict[str, bytes]], tmp_path: Path, data: st.DataObject
) -> None:
    original, checksum, expected = index_file
    damaged = bytearray(original)
    how = data.draw(st.sampled_from(["flip", "truncate", "zero-run"]))
    if how == "flip":
        at = data.draw(st.integers(0, len(damaged) - 1))
        damaged[at] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "truncate":
        damaged = damaged[: data.draw(st.integers(0, len(damaged) - 1))]
    else:
        at = data.draw(st.integers(0, len(damaged) - 1))
        damaged[at : at + 64] = bytes(len(damaged[at : at + 64]))
    path = tmp_path / f"{data.draw(st.integers(0, 1 << 30))}.arrow"
    path.write_bytes(bytes(damaged))
    try:
        loaded = ManifestIndex.load(path, zarr_id="z", checksum=checksum)
    except ManifestError:
        return
    assert columns(loaded) == expected  # only a change that altered nothing may pass
