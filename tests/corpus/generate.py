"""Write the hostile-input corpus (run from the repository root: python tests/corpus/generate.py).

Every file is small and committed; this script only documents how each was made and lets them be
regenerated identically. `EXPECTED.json` in each folder maps a file to what parsing it must do: one
clear error (its type and a regular expression its message must match), never another exception.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHEN = "2025-11-01T12:00:00+00:00"
MD5 = "0123456789abcdef0123456789abcdef"


def leaf(
    size: object = 1, vid: object = "v1", when: object = WHEN, etag: object = MD5
) -> list[object]:
    return [vid, when, size, etag]


def manifest(entries: object, **top: object) -> str:
    doc = {"schemaVersion": 2, "fields": ["versionId", "lastModified", "size", "ETag"], **top}
    doc["entries"] = entries
    return json.dumps(doc, ensure_ascii=True)


def nested(depth: int) -> str:
    return manifest({}).replace(
        '"entries": {}',
        '"entries": ' + '{"d": ' * depth + '{"f": ' + json.dumps(leaf()) + "}" + "}" * depth,
    )


MANIFESTS: dict[str, tuple[str | bytes, str, str]] = {
    # name: (document, error type, message regex)
    "name-dot": (manifest({".": leaf()}), "ManifestError", "reserved name '.'"),
    "name-dotdot": (manifest({"..": {"x": leaf()}}), "ManifestError", r"reserved name '\.\.'"),
    "name-empty": (manifest({"": leaf()}), "ManifestError", "empty name"),
    "name-slash": (manifest({"a/b": leaf()}), "ManifestError", "contains '/' or NUL"),
    "name-nul": (manifest({"a\0b": leaf()}), "ManifestError", "contains '/' or NUL"),
    "name-lone-surrogate": (manifest({"\udc80": leaf()}), "ManifestError", "not valid Unicode"),
    "name-4k": (
        manifest({"n" * 4096: leaf()}),
        "ManifestError",
        r"4096 bytes long \(at most 255\)",
    ),
    "name-256-bytes-utf8": (manifest({"é" * 128: leaf()}), "ManifestError", r"256 bytes long"),
    "duplicate-file": (
        manifest({"a": leaf()})[:-2] + ', "a": ' + json.dumps(leaf()) + "}}",
        "ManifestError",
        "duplicate entry name 'a'",
    ),
    "file-dir-clash": (
        manifest({"a": leaf()})[:-2] + ', "a": {"b": ' + json.dumps(leaf()) + "}}}",
        "ManifestError",
        "duplicate entry name 'a'",
    ),
    "fields-3": (manifest({"a": ["v1", WHEN, 1]}), "ManifestError", "malformed"),
    "fields-5": (manifest({"a": [*leaf(), "x"]}), "ManifestError", "malformed"),
    "size-string": (manifest({"a": leaf(size="1")}), "ManifestError", "malformed"),
    "size-float": (manifest({"a": leaf(size=1.5)}), "ManifestError", "malformed"),
    "size-bool": (manifest({"a": leaf(size=True)}), "ManifestError", "malformed"),
    "size-negative": (
        manifest({"a": leaf(size=-1)}),
        "ManifestError",
        "size -1 of 'a' is out of range",
    ),
    "size-2-63": (manifest({"a": leaf(size=1 << 63)}), "ManifestError", "is out of range"),
    "size-2-64": (manifest({"a": leaf(size=1 << 64)}), "ManifestError", "is out of range"),
    "size-over-5tib": (
        manifest({"a": leaf(size=(5 << 40) + 1)}),
        "ManifestError",
        "is out of range",
    ),
    "versionid-empty": (
        manifest({"a": leaf(vid="")}),
        "ManifestError",
        "versionId of 'a' is empty",
    ),
    "versionid-number": (manifest({"a": leaf(vid=7)}), "ManifestError", "malformed"),
    "versionid-4k": (manifest({"a": leaf(vid="v" * 4096)}), "ManifestError", "too long"),
    "etag-number": (manifest({"a": leaf(etag=7)}), "ManifestError", "malformed"),
    "etag-lone-surrogate": (
        manifest({"a": leaf(etag="\ud800")}),
        "ManifestError",
        "ETag of 'a' is not valid Unicode",
    ),
    "mtime-garbage": (manifest({"a": leaf(when="yesterday")}), "ManifestError", "bad lastModified"),
    "mtime-no-offset": (
        manifest({"a": leaf(when="2025-11-01T12:00:00")}),
        "ManifestError",
        "without UTC offset",
    ),
    "mtime-year-2263": (
        manifest({"a": leaf(when="2263-01-01T00:00:00+00:00")}),
        "ManifestError",
        "past year 2262",
    ),
    "mtime-year-9999": (
        manifest({"a": leaf(when="9999-12-31T23:59:59+00:00")}),
        "ManifestError",
        "out of range",
    ),
    "nesting-10000": (nested(10_000), "ManifestError", "nested too deeply"),
    "schema-3": (
        manifest({}).replace('"schemaVersion": 2', '"schemaVersion": 3'),
        "ManifestError",
        "unsupported manifest schemaVersion 3",
    ),
    "schema-1": (
        json.dumps({"schemaVersion": 1, "entries": {"a/b": leaf()}}),
        "ManifestError",
        "unsupported manifest schemaVersion 1",
    ),
    "schema-missing": (
        json.dumps({"entries": {"a": leaf()}}),
        "ManifestError",
        "not a schema-2 Zarr manifest",
    ),
    "schema-string": (
        manifest({}).replace('"schemaVersion": 2', '"schemaVersion": "2"'),
        "ManifestError",
        "not a schema-2 Zarr manifest",
    ),
    "fields-string": (
        json.dumps({"schemaVersion": 2, "fields": "versionId", "entries": {"a": "v1"}}),
        "ManifestError",
        r"'fields' is a string .*\.versionid\.json",
    ),
    "fields-reordered": (
        manifest({}).replace(
            '["versionId", "lastModified", "size", "ETag"]',
            '["size", "versionId", "lastModified", "ETag"]',
        ),
        "ManifestError",
        "unsupported manifest fields",
    ),
    "bare-string-entries": (manifest({"a": "v1"}), "ManifestError", "malformed"),
    "entries-list": (manifest([leaf()]), "ManifestError", "malformed"),
    "entries-missing": (json.dumps({"schemaVersion": 2}), "ManifestError", "malformed"),
    "top-level-list": (json.dumps([1, 2]), "ManifestError", "not a schema-2 Zarr manifest"),
    "not-json": ("this is not json", "ManifestError", "not valid JSON"),
    "truncated": (manifest({"a": leaf()})[:-7], "ManifestError", "not valid JSON"),
    "empty-file": ("", "ManifestError", "not valid JSON"),
    "not-utf8": (b'{"schemaVersion": 2, "entries": {"\xff": []}}', "ManifestError", "not UTF-8"),
    "statistics-lie": (
        manifest({"a": leaf()}, statistics={"entries": 5, "totalSize": 1}),
        "IntegrityError",
        "statistics.entries is 5, found 1",
    ),
    "checksum-mismatch": (manifest({"a": leaf()}), "IntegrityError", "entries recompute to"),
}

#: Asset records (one JSON value each): "refused" (not shown, one log line), "problem" (shown, EIO).
ASSETS: dict[str, tuple[object, str, str]] = {
    "path-dotdot": ({"path": "../x.nwb", "contentSize": 1}, "refused", r"reserved name '\.\.'"),
    "path-dot": ({"path": "a/./x.nwb", "contentSize": 1}, "refused", "reserved name '.'"),
    "path-absolute": ({"path": "/etc/passwd", "contentSize": 1}, "refused", "absolute path"),
    "path-empty-component": ({"path": "a//b.nwb", "contentSize": 1}, "refused", "empty name"),
    "path-trailing-slash": ({"path": "a/b/", "contentSize": 1}, "refused", "empty name"),
    "path-empty": ({"path": "", "contentSize": 1}, "refused", "empty path"),
    "path-nul": ({"path": "a\0b.nwb", "contentSize": 1}, "refused", "contains '/' or NUL"),
    "path-lone-surrogate": (
        {"path": "a/\udc80.nwb", "contentSize": 1},
        "refused",
        "not valid Unicode",
    ),
    "path-long-component": ({"path": "a/" + "x" * 256, "contentSize": 1}, "refused", "at most 255"),
    "path-not-string": ({"path": 7, "contentSize": 1}, "refused", "not a string"),
    "path-missing": ({"contentSize": 1}, "refused", "not a string"),
    "size-missing": ({"path": "a.nwb"}, "refused", "no valid contentSize"),
    "size-negative": ({"path": "a.nwb", "contentSize": -1}, "refused", "no valid contentSize"),
    "size-float": ({"path": "a.nwb", "contentSize": 1.0}, "refused", "no valid contentSize"),
    "size-bool": ({"path": "a.nwb", "contentSize": True}, "refused", "no valid contentSize"),
    "size-2-64": ({"path": "a.nwb", "contentSize": 1 << 64}, "refused", "no valid contentSize"),
    "not-an-object": ("a string", "refused", "not an object"),
    "list": ([1, 2, 3], "refused", "not an object"),
    "no-url": ({"path": "a.nwb", "contentSize": 1}, "problem", "no S3 URL"),
    "url-not-list": ({"path": "a.nwb", "contentSize": 1, "contentUrl": 42}, "problem", "no S3 URL"),
    "url-bad-ipv6": (
        {"path": "a.nwb", "contentSize": 1, "contentUrl": ["https://[::1/blobs/x"]},
        "problem",
        "no S3 URL",
    ),
    "url-other-host": (
        {
            "path": "a.nwb",
            "contentSize": 1,
            "contentUrl": [
                "https://evil.example/blobs/000/000/00000000-0000-0000-0000-000000000000"
            ],
        },
        "problem",
        "no S3 URL",
    ),
    "zarr-no-checksum": (
        {
            "path": "a.zarr",
            "contentSize": 1,
            "encodingFormat": "application/x-zarr",
            "contentUrl": [
                "https://dandiarchive.s3.amazonaws.com/zarr/00000000-0000-0000-0000-000000000000/"
            ],
        },
        "problem",
        "no valid dandi:dandi-zarr-checksum",
    ),
    "zarr-bad-checksum": (
        {
            "path": "a.zarr",
            "contentSize": 1,
            "encodingFormat": "application/x-zarr",
            "digest": {"dandi:dandi-zarr-checksum": "not-a-checksum"},
            "contentUrl": [
                "https://dandiarchive.s3.amazonaws.com/zarr/00000000-0000-0000-0000-000000000000/"
            ],
        },
        "problem",
        "no valid dandi:dandi-zarr-checksum",
    ),
    "digest-not-dict": (
        {
            "path": "a.zarr",
            "contentSize": 1,
            "encodingFormat": "application/x-zarr",
            "digest": ["x"],
            "contentUrl": [
                "https://dandiarchive.s3.amazonaws.com/zarr/00000000-0000-0000-0000-000000000000/"
            ],
        },
        "problem",
        "no valid dandi:dandi-zarr-checksum",
    ),
    "mtime-year-9999": (
        {
            "path": "a.nwb",
            "contentSize": 1,
            "dateModified": "9999-12-31T23:59:59+00:00",
            "contentUrl": [
                "https://dandiarchive.s3.amazonaws.com/blobs/2db/af0/2dbaf0fd-5003-4a0a-b4c0-bc8cdbdb3826"
            ],
        },
        "ok",
        "",
    ),
}

#: SOURCE strings: what they parse to (as `str(MountSource)`), or "error".
SOURCES: list[tuple[str, str]] = [
    ("000123@0.251101.1200", "000123@0.251101.1200"),
    ("DANDI:000123/draft", "000123@draft"),
    ("https://dandiarchive.org/dandiset/000123/latest", "000123@latest"),
    ("000123@LATEST", "000123@latest"),
    ("  000123@draft  ", "000123@draft"),
    ("000123", "000123"),
    ("dandi", "dandi"),
    ("dandi://dandi", "dandi"),
    ("dandi://dandi/000123@draft/sub-01/x.zarr", "000123@draft/sub-01/x.zarr"),
    ("dandi://dandi/000123@draft/sub-01/../x", "error"),
    ("dandi://dandi/000123@draft/sub-01/\udc80", "error"),
    ("dandi://dandi/000123/sub-01", "error"),
    ("dandi://evil/000123", "error"),
    ("123@draft", "error"),
    ("0001234@draft", "error"),
    ("000123@", "error"),
    ("@draft", "error"),
    ("000123@0.251101", "error"),
    ("000123@0.251101.1200/../../etc", "error"),
    ("000123@draft\n", "000123@draft"),
    ("000123@dr\0aft", "error"),
    ("000123@\udc80", "error"),
    ("ｆｕｌｌｗｉｄｔｈ", "error"),
    ("٠٠٠١٢٣@draft", "error"),
    ("https://dandiarchive.org/dandiset/000123", "error"),
    ("https://evil.example/dandiset/000123/draft", "error"),
    ("http://[::1/dandiset/000123/draft", "error"),
    ("", "error"),
    ("x" * 10_000, "error"),
]


def main() -> None:
    (HERE / "manifests").mkdir(exist_ok=True)
    expected: dict[str, dict[str, str]] = {}
    for name, (doc, error, match) in MANIFESTS.items():
        data = doc if isinstance(doc, bytes) else doc.encode("utf-8", "surrogatepass")
        (HERE / "manifests" / f"{name}.json").write_bytes(data)
        expected[f"{name}.json"] = {"error": error, "match": match}
    (HERE / "manifests" / "EXPECTED.json").write_text(json.dumps(expected, indent=1) + "\n")
    (HERE / "assets").mkdir(exist_ok=True)
    expected = {}
    for name, (record, outcome, match) in ASSETS.items():
        (HERE / "assets" / f"{name}.json").write_text(json.dumps(record, ensure_ascii=True))
        expected[f"{name}.json"] = {"outcome": outcome, "match": match}
    (HERE / "assets" / "EXPECTED.json").write_text(json.dumps(expected, indent=1) + "\n")
    (HERE / "sources.json").write_text(json.dumps(SOURCES, indent=1, ensure_ascii=True) + "\n")


if __name__ == "__main__":
    main()
