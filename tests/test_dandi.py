"""Tier 1: SOURCE parsing and asset records, without I/O."""

from __future__ import annotations

import json

import pytest

from conftest import REFERENCE_SAMPLES
from zarrfs.archive.assets import parse_asset_record, parse_asset_records, s3_key_from_url
from zarrfs.archive.sources import parse_source
from zarrfs.config import MountSource as Source
from zarrfs.errors import SourceError

SAMPLE = REFERENCE_SAMPLES


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("000123@0.251101.1200", Source("000123", "0.251101.1200")),
        ("000123@draft", Source("000123", "draft")),
        ("000123@LATEST", Source("000123", "latest")),
        ("DANDI:000123/0.251101.1200", Source("000123", "0.251101.1200")),
        ("dandi:000108/draft", Source("000108", "draft")),
        (
            "https://dandiarchive.org/dandiset/000123/0.251101.1200",
            Source("000123", "0.251101.1200"),
        ),
        ("https://dandiarchive.org/dandiset/000123/latest/", Source("000123", "latest")),
        (
            "https://dandiarchive.org/dandiset/000123/draft/files?location=sub-1",
            Source("000123", "draft"),
        ),
        ("dandi", Source()),
        ("dandi://dandi", Source()),
        ("DANDI://dandi/", Source()),
        ("000123", Source("000123")),
        ("DANDI:000123", Source("000123")),
        ("dandi://dandi/000123", Source("000123")),
        ("dandi://dandi/000123@draft", Source("000123", "draft")),
        (
            "dandi://dandi/000123@0.251101.1200/sub-01/x.ome.zarr/0",
            Source("000123", "0.251101.1200", "sub-01/x.ome.zarr/0"),
        ),
        ("dandi://dandi/000123@latest/sub-01/", Source("000123", "latest", "sub-01")),
    ],
)
def test_sources(text: str, expected: Source) -> None:
    assert parse_source(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("00012", "six digits"),
        ("dandi://dandi-staging/000123", "unknown DANDI instance"),
        ("dandi://dandi/000123/sub-01", "names a path but no version"),
        ("dandi://dandi/000123@draft/a/../b", "reserved name"),
        ("dandi://dandi/000123@draft/a//b", "empty name"),
        ("123@0.251101.1200", "six digits"),
        ("000123@1.0", "bad version"),
        ("000123@0.2511.1200", "bad version"),
        ("https://dandiarchive.org/dandiset/000123", "names no version"),
        ("https://example.org/dandiset/000123/draft", "cannot parse SOURCE"),
        ("", "cannot parse SOURCE"),
        ("000123@", "cannot parse SOURCE"),
    ],
)
def test_bad_sources(text: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        parse_source(text)


def test_real_blob_record() -> None:
    row = json.loads((SAMPLE / "asset-record-blob-000027.json").read_text())
    asset = parse_asset_record(row["metadata"])
    assert asset.path == "sub-RAT123/sub-RAT123.nwb"
    assert asset.blob_key == "blobs/2db/af0/2dbaf0fd-5003-4a0a-b4c0-bc8cdbdb3826"
    assert asset.size == 18792
    assert asset.blob_etag == "6ec084ca9d3be17ec194a8f700d65344-1"
    assert not asset.is_zarr and asset.problem is None
    assert (
        asset.mtime_ns == 1603289435457789000
    )  # blobDateModified 2020-10-21T10:10:35.457789-04:00


def test_zarr_record_and_url_shapes() -> None:
    zid = "9eea4d89-c304-4a94-9117-66334b704cbd"
    record = {
        "path": "sub-1/x.ome.zarr",
        "contentSize": 5,
        "encodingFormat": "application/x-zarr",
        "contentUrl": [
            f"https://dandiarchive.s3.us-east-2.amazonaws.com/zarr/{zid}/",
            "https://api.dandiarchive.org/api/assets/x/download/",
        ],
        "digest": {"dandi:dandi-zarr-checksum": "481a2f77ab786a0f45aafd5db0971caa-0--0"},
        "dateModified": "2023-03-02T17:10:45.742644-05:00",
    }
    asset = parse_asset_record(record)
    assert asset.is_zarr and asset.zarr_id == zid and asset.problem is None
    assert asset.zarr_checksum == "481a2f77ab786a0f45aafd5db0971caa-0--0"
    record["digest"] = {"dandi:dandi-zarr-checksum": None}
    assert "checksum" in (parse_asset_record(record).problem or "")
    assert s3_key_from_url("https://s3.amazonaws.com/dandiarchive/blobs/a%20b") == "blobs/a b"
    assert s3_key_from_url("https://api.dandiarchive.org/api/assets/x/download/") is None


def test_records_with_unusable_paths_are_skipped() -> None:
    good = {"path": "a.nwb", "contentSize": 1, "contentUrl": []}
    bad = [
        {"path": "../etc/passwd", "contentSize": 1},
        {"path": "/abs", "contentSize": 1},
        {"path": "a//b", "contentSize": 1},
        {"contentSize": 1},
        {"path": "x", "contentSize": -1},
        7,
    ]
    assets = parse_asset_records([good, *bad])
    assert [a.path for a in assets] == ["a.nwb"]
    assert "no S3 URL" in (assets[0].problem or "")


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 1 << 20])
def test_streamed_json_array_equals_json_loads(chunk_size: int) -> None:
    import io

    from zarrfs.archive.assets import iter_json_array

    items = [{"path": f"a/{i}.nwb", "x": "é" * (i % 5), "n": [i, {"k": None}]} for i in range(50)]
    for doc in (
        json.dumps(items),
        json.dumps(items, indent=2),
        "[]",
        " [ ] ",
        json.dumps([1, 22, 333]),
    ):
        got = list(iter_json_array(io.BytesIO(doc.encode()), chunk_size=chunk_size))
        assert got == json.loads(doc)
    for bad in ("{}", "[1, 2", "[1 2]", "[{]", ""):
        with pytest.raises(ValueError):
            list(iter_json_array(io.BytesIO(bad.encode()), chunk_size=chunk_size))
