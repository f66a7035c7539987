"""Tests of the sample dandiset builder (`zarrfs.demo.sample`) and the fake API (`zarrfs.demo.fake_api`).

Owns: checking that the bucket the builder writes is what the DANDI archive would hold, using
oracles independent of the builder where possible (zarr_checksum over locally hashed bytes, a
hand-written Merkle digest, unsigned S3 GETs at each manifest VersionId, zarr-python and h5py
reads), and that the local S3's middleware (request counters, large-object fast path) answers
exactly as moto does. Never mounts anything. One moto server for the sample, one for the fast path.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import numpy as np
import pytest
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig
from zarr_checksum import compute_zarr_checksum
from zarr_checksum.generators import ZarrArchiveFile

from conftest import REFERENCE_SAMPLES
from zarrfs.demo.fake_api import MAX_PAGE_SIZE, FakeDandiAPI
from zarrfs.demo.locals3 import DIRECT_HEADER, PACED_PIECE, LocalS3
from zarrfs.demo.sample import (
    ARRAY_ALWAYS_ABSENT,
    ARRAY_PATH,
    ARRAY_V2_OVERWRITTEN,
    BLOB_PATHS,
    DRAFT,
    OME_ALWAYS_ABSENT,
    OME_DRAFT_OVERWRITTEN,
    OME_PATH,
    OME_V2_ADDED,
    OME_V2_DELETED,
    OME_V2_METADATA_CHANGED,
    OME_V2_OVERWRITTEN,
    V1,
    V2,
    VERSIONS,
    ManifestLeaf,
    SampleDandiset,
    build_manifest,
    build_sample,
    dandi_etag,
    dandi_part_sizes,
    format_manifest,
    to_yaml,
)

REFERENCE = REFERENCE_SAMPLES
REAL_MANIFEST = REFERENCE / "zarr-manifest-v2-real-509.json"
REAL_RECORD = REFERENCE / "asset-record-blob-000027.json"
EMPTY_CHECKSUM = "481a2f77ab786a0f45aafd5db0971caa-0--0"
CHECKSUM_RE = re.compile(r"([0-9a-f]{32})-([0-9]+)--([0-9]+)")
S3_URL_RE = re.compile(r"https://([a-z0-9.-]+)\.s3(?:\.[a-z0-9-]+)?\.amazonaws\.com/(.*)")


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    with LocalS3() as local:
        yield local


@pytest.fixture(scope="module")
def sample(s3: LocalS3) -> SampleDandiset:
    return build_sample(s3)


@pytest.fixture(scope="module")
def anon(s3: LocalS3) -> Any:
    """An unsigned client, as zarrfs and anonymous archive users read the bucket."""
    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name="us-east-2",
        config=BotoConfig(signature_version=UNSIGNED),
    )


@pytest.fixture(scope="module")
def api(sample: SampleDandiset) -> Iterator[FakeDandiAPI]:
    with FakeDandiAPI(sample) as server:
        yield server


# --- independent helpers ------------------------------------------------------------------------


def walk_entries(entries: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, list[Any]]]:
    for name, value in entries.items():
        if isinstance(value, dict):
            yield from walk_entries(value, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", value


def merkle_checksum(files: dict[str, tuple[str, int]]) -> str:
    """DANDI-FORMATS' Zarr checksum, written from the spec (path -> (digest, size))."""
    tree: dict[str, Any] = {}
    for path, leaf in files.items():
        *dirs, name = path.split("/")
        node = tree
        for part in dirs:
            node = node.setdefault(part, {})
        node[name] = leaf

    def digest(node: dict[str, Any]) -> tuple[str, int, int]:
        directories, leaves, count, size = [], [], 0, 0
        for name, child in node.items():
            if isinstance(child, dict):
                md5, c, s = digest(child)
                directories.append({"digest": f"{md5}-{c}--{s}", "name": name, "size": s})
                count, size = count + c, size + s
            else:
                leaves.append({"digest": child[0], "name": name, "size": child[1]})
                count, size = count + 1, size + child[1]
        body = {
            "directories": sorted(directories, key=lambda d: d["name"]),
            "files": sorted(leaves, key=lambda d: d["name"]),
        }
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=True)
        return hashlib.md5(text.encode()).hexdigest(), count, size

    md5, count, size = digest(tree)
    return f"{md5}-{count}--{size}"


def zarr_files(files: dict[str, bytes], asset_path: str) -> dict[str, bytes]:
    prefix = asset_path + "/"
    return {k[len(prefix) :]: v for k, v in files.items() if k.startswith(prefix)}


def checksum_of_bytes(entries: dict[str, bytes]) -> str:
    """zarr_checksum over locally hashed bytes: never looks at S3 ETags or manifests."""
    return compute_zarr_checksum(
        ZarrArchiveFile(path=Path(p), size=len(b), digest=hashlib.md5(b).hexdigest())
        for p, b in entries.items()
    ).digest


def http_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# --- pure units ---------------------------------------------------------------------------------


def test_local_s3_paces_bodies_to_the_stream_bandwidth() -> None:
    """`stream_bandwidth` paces a response body to the bandwidth, as one S3 connection is limited,
    and leaves the bytes whole. A piece leaves once the pieces before it have had their time, so a
    body takes at least (size - one piece) / bandwidth (a bound of size / bandwidth failed by 0.1 ms
    in a CI run)."""
    import time

    body = bytes(range(256)) * 4096  # 1 MiB
    with LocalS3(stream_bandwidth=4e6) as paced:
        paced.client.put_object(Bucket=paced.bucket, Key="k", Body=body)
        started = time.monotonic()
        assert paced.client.get_object(Bucket=paced.bucket, Key="k")["Body"].read() == body
        assert time.monotonic() - started >= (len(body) - PACED_PIECE) / 4e6  # 0.246 s at least
        ranged = paced.client.get_object(Bucket=paced.bucket, Key="k", Range="bytes=100-70099")
        assert ranged["Body"].read() == body[100:70100]


def test_manifest_format_and_statistics_reproduce_real_manifest() -> None:
    text = REAL_MANIFEST.read_text()
    real = json.loads(text)
    assert format_manifest(real) == text
    leaves = [
        ManifestLeaf(path=p, version_id=v[0], last_modified=v[1], size=v[2], etag=v[3])
        for p, v in walk_entries(real["entries"])
    ]
    rebuilt = build_manifest(reversed(leaves))
    assert rebuilt == real
    assert format_manifest(rebuilt) == text


def test_merkle_helper_agrees_with_reference() -> None:
    assert merkle_checksum({}) == EMPTY_CHECKSUM
    real = json.loads(REAL_MANIFEST.read_text())
    leaves = {p: (v[3], v[2]) for p, v in walk_entries(real["entries"])}
    assert merkle_checksum(leaves) == real["statistics"]["zarrChecksum"]
    assert build_manifest([])["statistics"] == {
        "entries": 0,
        "depth": 0,
        "totalSize": 0,
        "lastModified": None,
        "zarrChecksum": EMPTY_CHECKSUM,
    }


def test_dandi_part_sizing_and_etag() -> None:
    mib = 1 << 20
    assert dandi_part_sizes(0) == []
    assert dandi_part_sizes(1) == [1]
    assert dandi_part_sizes(64 * mib) == [64 * mib]
    assert dandi_part_sizes(64 * mib + 1) == [64 * mib, 1]
    big = 10_000 * 64 * mib
    sizes = dandi_part_sizes(big)
    assert len(sizes) == 10_000 and sum(sizes) == big
    data = b"zarrfs" * 1000
    expected = hashlib.md5(hashlib.md5(data).digest()).hexdigest() + "-1"
    assert dandi_etag(data) == expected


def test_to_yaml_round_trips() -> None:
    yaml = pytest.importorskip("yaml")
    value = {
        "@context": "x",
        "dandi:dandi-etag": "a-1",
        "empty": {},
        "none": None,
        "list": [1, 2.5, True, "yes", "null", "", "a: b", [], [{"k": [1]}], {"n": {"m": "é"}}],
        "nested": {"deep": [{"a": 1, "b": [{"c": None}]}]},
    }
    assert yaml.safe_load(to_yaml(value)) == value
    assert yaml.safe_load(to_yaml([value, value])) == [value, value]


# --- the bucket ---------------------------------------------------------------------------------


@pytest.mark.s3
def test_versions_and_contents(sample: SampleDandiset) -> None:
    assert sample.dandiset_id == "000123"
    assert list(sample.versions) == list(VERSIONS)
    for version in VERSIONS:
        state = sample.versions[version]
        assert state.version == version
        assert set(state.zarr_ids) == {OME_PATH, ARRAY_PATH}
        assert {r["path"] for r in state.assets} == {OME_PATH, ARRAY_PATH, *BLOB_PATHS}
        assert "dandiset.yaml" in state.files
        for path in BLOB_PATHS:
            assert path in state.files
        ome = zarr_files(state.files, OME_PATH)
        assert {".zgroup", ".zattrs", "0/.zarray", "1/.zarray", "2/.zarray"} <= set(ome)
        chunks = [k for k in ome if not k.rsplit("/", 1)[-1].startswith(".")]
        assert 30 <= len(chunks) <= 80
        assert "zarr.json" in zarr_files(state.files, ARRAY_PATH)
    assert sample.versions[V1].published is not None
    assert sample.versions[DRAFT].published is None


@pytest.mark.s3
def test_manifests_recompute_to_their_names(sample: SampleDandiset, anon: Any, s3: LocalS3) -> None:
    for version in VERSIONS:
        state = sample.versions[version]
        records = {r["path"]: r for r in state.assets}
        for path, zarr_id in state.zarr_ids.items():
            key = state.manifest_keys[path]
            checksum = state.zarr_checksums[path]
            shard = f"{zarr_id[0:3]}/{zarr_id[3:6]}/{zarr_id}"
            assert key == f"zarr-manifest/{shard}/{checksum}.json"
            body = anon.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
            assert body == state.manifests[path]
            assert not body.endswith(b"\n")
            manifest = json.loads(body)
            assert format_manifest(manifest).encode() == body
            assert manifest["schemaVersion"] == 2
            assert manifest["fields"] == ["versionId", "lastModified", "size", "ETag"]
            leaves = dict(walk_entries(manifest["entries"]))
            for leaf in leaves.values():
                assert len(leaf) == 4 and not leaf[3].startswith('"')
                assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", leaf[1])

            # Two independent recomputations: zarr_checksum over the manifest's (ETag, size),
            # and the spec's Merkle digest; plus zarr_checksum over the bytes the version serves.
            from_manifest = compute_zarr_checksum(
                ZarrArchiveFile(path=Path(p), size=v[2], digest=v[3]) for p, v in leaves.items()
            ).digest
            assert from_manifest == checksum == key.rsplit("/", 1)[1].removesuffix(".json")
            assert merkle_checksum({p: (v[3], v[2]) for p, v in leaves.items()}) == checksum
            entries = zarr_files(state.files, path)
            assert set(entries) == set(leaves)
            assert checksum_of_bytes(entries) == checksum
            assert records[path]["digest"] == {"dandi:dandi-zarr-checksum": checksum}
            assert records[path]["contentSize"] == sum(len(b) for b in entries.values())

            stats = manifest["statistics"]
            assert stats["zarrChecksum"] == checksum
            assert stats["entries"] == len(leaves) == int(CHECKSUM_RE.fullmatch(checksum)[2])
            assert stats["totalSize"] == sum(v[2] for v in leaves.values())
            assert stats["depth"] == max(p.count("/") for p in leaves)
            assert stats["lastModified"] == max(v[1] for v in leaves.values())


@pytest.mark.s3
def test_manifest_version_ids_serve_exact_bytes(
    sample: SampleDandiset, anon: Any, s3: LocalS3
) -> None:
    for version in VERSIONS:
        state = sample.versions[version]
        for path, zarr_id in state.zarr_ids.items():
            manifest = json.loads(state.manifests[path])
            for entry, (version_id, _modified, size, etag) in walk_entries(manifest["entries"]):
                response = anon.get_object(
                    Bucket=s3.bucket, Key=f"zarr/{zarr_id}/{entry}", VersionId=version_id
                )
                data = response["Body"].read()
                assert data == state.files[f"{path}/{entry}"], (version, path, entry)
                assert len(data) == size
                assert response["ETag"].strip('"') == etag == hashlib.md5(data).hexdigest()


@pytest.mark.s3
def test_edits_are_in_place_and_old_versions_only_reachable_by_version_id(
    sample: SampleDandiset, anon: Any, s3: LocalS3
) -> None:
    v1, v2, draft = (sample.versions[v] for v in VERSIONS)
    zarr_id = v1.zarr_ids[OME_PATH]
    assert v2.zarr_ids == v1.zarr_ids == draft.zarr_ids
    deleted = f"zarr/{zarr_id}/{OME_V2_DELETED[0]}"
    with pytest.raises(anon.exceptions.NoSuchKey):
        anon.get_object(Bucket=s3.bucket, Key=deleted)
    overwritten = OME_V2_OVERWRITTEN[0]
    head = anon.get_object(Bucket=s3.bucket, Key=f"zarr/{zarr_id}/{overwritten}")["Body"].read()
    assert head == draft.files[f"{OME_PATH}/{overwritten}"]
    assert head != v1.files[f"{OME_PATH}/{overwritten}"]
    # Every Zarr key holds exactly one version per distinct content it ever had.
    versions = s3.client.list_object_versions(Bucket=s3.bucket, Prefix=f"zarr/{zarr_id}/")
    counts: dict[str, int] = {}
    for item in versions["Versions"]:
        name = item["Key"].removeprefix(f"zarr/{zarr_id}/")
        counts[name] = counts.get(name, 0) + 1
    for name, count in counts.items():
        contents = {s.files.get(f"{OME_PATH}/{name}") for s in (v1, v2, draft)} - {None}
        assert count == len(contents), name
    markers = {m["Key"] for m in versions.get("DeleteMarkers", [])}
    assert markers == {deleted}


@pytest.mark.s3
def test_versions_differ_exactly_in_the_intended_entries(sample: SampleDandiset) -> None:
    v1, v2, draft = (sample.versions[v] for v in VERSIONS)

    def diff(a: dict[str, bytes], b: dict[str, bytes]) -> tuple[set[str], set[str], set[str]]:
        changed = {k for k in a.keys() & b.keys() if a[k] != b[k]}
        return changed, set(a) - set(b), set(b) - set(a)

    ome1, ome2, ome3 = (zarr_files(s.files, OME_PATH) for s in (v1, v2, draft))
    assert diff(ome1, ome2) == (
        set(OME_V2_OVERWRITTEN) | set(OME_V2_METADATA_CHANGED),
        set(OME_V2_DELETED),
        set(OME_V2_ADDED),
    )
    assert diff(ome2, ome3) == (set(OME_DRAFT_OVERWRITTEN), set(), set())
    arr1, arr2, arr3 = (zarr_files(s.files, ARRAY_PATH) for s in (v1, v2, draft))
    assert diff(arr1, arr2) == (set(ARRAY_V2_OVERWRITTEN), set(), set())
    assert arr2 == arr3
    for state in (v1, v2, draft):
        for absent in OME_ALWAYS_ABSENT:
            assert f"{OME_PATH}/{absent}" not in state.files
        for absent in ARRAY_ALWAYS_ABSENT:
            assert f"{ARRAY_PATH}/{absent}" not in state.files
        for path in BLOB_PATHS:
            assert state.files[path] == v1.files[path]
    assert "omero" not in json.loads(ome1[".zattrs"])
    assert "omero" in json.loads(ome2[".zattrs"])
    assert "multiscales" in json.loads(ome2[".zattrs"])

    # Unchanged entries keep their VersionId across versions; changed ones get a new one.
    leaves1 = dict(walk_entries(json.loads(v1.manifests[OME_PATH])["entries"]))
    leaves2 = dict(walk_entries(json.loads(v2.manifests[OME_PATH])["entries"]))
    for name in leaves1.keys() & leaves2.keys():
        same = name not in OME_V2_OVERWRITTEN and name not in OME_V2_METADATA_CHANGED
        assert (leaves1[name][0] == leaves2[name][0]) is same, name
    assert len({s.zarr_checksums[OME_PATH] for s in (v1, v2, draft)}) == 3
    assert v2.manifest_keys[ARRAY_PATH] == draft.manifest_keys[ARRAY_PATH]
    assert v1.manifest_keys[ARRAY_PATH] != v2.manifest_keys[ARRAY_PATH]


@pytest.mark.s3
def test_zarr_python_reads_expected_arrays(sample: SampleDandiset, tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    for version in VERSIONS:
        state = sample.versions[version]
        root = tmp_path / version
        for name, data in state.files.items():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        assert set(state.arrays) == {f"{OME_PATH}/0", f"{OME_PATH}/1", f"{OME_PATH}/2", ARRAY_PATH}
        group = zarr.open_group(str(root / OME_PATH), mode="r", zarr_format=2)
        datasets = group.attrs["multiscales"][0]["datasets"]
        assert [d["path"] for d in datasets] == ["0", "1", "2"]
        for level in ("0", "1", "2"):
            array = group[level]
            assert array.dtype == np.uint16 and array.ndim == 4
            zarray = json.loads(state.files[f"{OME_PATH}/{level}/.zarray"])
            assert zarray["dimension_separator"] == "/" and zarray["zarr_format"] == 2
            np.testing.assert_array_equal(array[...], state.arrays[f"{OME_PATH}/{level}"])
        v3 = zarr.open_array(str(root / ARRAY_PATH), mode="r")
        assert v3.metadata.zarr_format == 3 and v3.dtype == np.float32
        np.testing.assert_array_equal(v3[...], state.arrays[ARRAY_PATH])
    # The deleted chunk reads as fill value in v2, and had data in v1.
    c, z, y, x = (int(i) for i in OME_V2_DELETED[0].split("/")[1:])
    region = (c, slice(2 * z, 2 * z + 2), slice(32 * y, 32 * y + 32), slice(32 * x, 32 * x + 32))
    assert not sample.versions[V2].arrays[f"{OME_PATH}/0"][region].any()
    assert sample.versions[V1].arrays[f"{OME_PATH}/0"][region].all()


@pytest.mark.s3
def test_blobs_are_multipart_with_dandi_etag(
    sample: SampleDandiset, anon: Any, s3: LocalS3
) -> None:
    h5py = pytest.importorskip("h5py")
    for version in VERSIONS:
        state = sample.versions[version]
        records = {r["path"]: r for r in state.assets}
        for path in BLOB_PATHS:
            blob_id = state.blob_ids[path]
            key = state.blob_keys[path]
            assert key == f"blobs/{blob_id[0:3]}/{blob_id[3:6]}/{blob_id}"
            head = anon.head_object(Bucket=s3.bucket, Key=key)
            data = state.files[path]
            digest = records[path]["digest"]
            assert head["ETag"].strip('"') == digest["dandi:dandi-etag"]
            assert digest["dandi:dandi-etag"].endswith("-1")
            assert digest["dandi:sha2-256"] == hashlib.sha256(data).hexdigest()
            assert head["ContentLength"] == len(data) == records[path]["contentSize"]
            assert anon.get_object(Bucket=s3.bucket, Key=key)["Body"].read() == data
            assert records[path]["encodingFormat"] == "application/x-nwb"
            url = next(u for u in records[path]["contentUrl"] if S3_URL_RE.fullmatch(u))
            assert url == f"https://dandiarchive.s3.amazonaws.com/{key}"
    listing = s3.client.list_object_versions(Bucket=s3.bucket, Prefix="blobs/")
    keys = [v["Key"] for v in listing["Versions"]]
    assert len(keys) == len(set(keys)) == len(BLOB_PATHS)
    assert not listing.get("DeleteMarkers")
    with h5py.File(io.BytesIO(sample.versions[V1].files[BLOB_PATHS[0]]), "r") as f:
        assert f.attrs["nwb_version"].startswith("2.")  # written by pynwb
        assert f.attrs["neurodata_type"] == "NWBFile"
        data = f["/acquisition/ElectricalSeries/data"]
        assert data.dtype == np.int16 and data.size * 2 >= 200_000
        assert data.compression == "gzip" and data.chunks is not None
        assert f["/general/lab"][()] == b"zarrfs lab"


@pytest.mark.s3
def test_asset_records_and_metadata_files(sample: SampleDandiset, anon: Any, s3: LocalS3) -> None:
    yaml = pytest.importorskip("yaml")
    real = json.loads(REAL_RECORD.read_text())["metadata"]
    for version in VERSIONS:
        state = sample.versions[version]
        prefix = f"dandisets/{sample.dandiset_id}/{version}/"
        assert state.metadata_prefix == prefix
        stored = {}
        for name in (
            "dandiset.jsonld",
            "dandiset.yaml",
            "assets.jsonld",
            "assets.yaml",
            "collection.jsonld",
        ):
            stored[name] = anon.get_object(Bucket=s3.bucket, Key=prefix + name)["Body"].read()
            assert stored[name] == state.metadata_files[name]
        assets = json.loads(stored["assets.jsonld"])
        assert assets == state.assets
        assert yaml.safe_load(stored["assets.yaml"]) == assets
        metadata = json.loads(stored["dandiset.jsonld"])
        assert yaml.safe_load(stored["dandiset.yaml"]) == metadata
        assert stored["dandiset.yaml"] == state.files["dandiset.yaml"]
        assert metadata["identifier"] == f"DANDI:{sample.dandiset_id}"
        assert metadata["version"] == version
        assert metadata["id"] == f"DANDI:{sample.dandiset_id}/{version}"
        assert (
            metadata["url"] == f"https://dandiarchive.org/dandiset/{sample.dandiset_id}/{version}"
        )
        collection = json.loads(stored["collection.jsonld"])
        assert collection["hasMember"] == [a["id"] for a in assets]
        for record in assets:
            expected_keys = set(real)
            if record["encodingFormat"] == "application/x-zarr":
                expected_keys.discard("blobDateModified")
            assert set(record) == expected_keys
            assert record["id"] == f"dandiasset:{record['identifier']}"
            assert record["schemaKey"] == "Asset"
            api_url = f"https://api.dandiarchive.org/api/assets/{record['identifier']}/download/"
            assert api_url in record["contentUrl"]
            if record["path"] in state.zarr_ids:
                zarr_url = (
                    f"https://dandiarchive.s3.amazonaws.com/zarr/{state.zarr_ids[record['path']]}/"
                )
                assert zarr_url in record["contentUrl"]
                assert record["encodingFormat"] == "application/x-zarr"
    ids = {v: sample.versions[v].asset_ids for v in VERSIONS}
    for path in BLOB_PATHS:
        assert ids[V1][path] == ids[V2][path] == ids[DRAFT][path]
    assert len({ids[v][OME_PATH] for v in VERSIONS}) == 3
    assert ids[V1][ARRAY_PATH] != ids[V2][ARRAY_PATH] == ids[DRAFT][ARRAY_PATH]


@pytest.mark.s3
def test_sample_is_deterministic(sample: SampleDandiset, s3: LocalS3) -> None:
    again = build_sample(s3, dandiset_id="000124")
    for version in VERSIONS:
        first, second = sample.versions[version], again.versions[version]
        assert first.zarr_checksums == second.zarr_checksums
        assert {k: v for k, v in first.files.items() if k != "dandiset.yaml"} == {
            k: v for k, v in second.files.items() if k != "dandiset.yaml"
        }
        assert set(first.zarr_ids.values()).isdisjoint(second.zarr_ids.values())


# --- the fake API -------------------------------------------------------------------------------


@pytest.mark.s3
def test_fake_api_paginates_with_page_size_1(sample: SampleDandiset, api: FakeDandiAPI) -> None:
    for version in VERSIONS:
        state = sample.versions[version]
        url: str | None = (
            f"{api.url}/dandisets/{sample.dandiset_id}/versions/{version}/assets/"
            "?metadata=true&page_size=1"
        )
        rows: list[dict[str, Any]] = []
        pages = 0
        while url is not None:
            status, body = http_json(url)
            assert status == 200
            assert body["count"] == len(state.assets)
            assert len(body["results"]) == 1
            assert (body["previous"] is None) == (pages == 0)
            rows.extend(body["results"])
            url = body["next"]
            pages += 1
        assert pages == len(state.assets) == 4
        assert [r["metadata"] for r in rows] == state.assets
        for row in rows:
            assert set(row) == {
                "asset_id",
                "blob",
                "zarr",
                "path",
                "size",
                "created",
                "modified",
                "metadata",
            }
            assert row["asset_id"] == row["metadata"]["identifier"]
            assert row["zarr"] == state.zarr_ids.get(row["path"])
            assert row["blob"] == state.blob_ids.get(row["path"])
    status, body = http_json(
        f"{api.url}/dandisets/{sample.dandiset_id}/versions/{V1}/assets/?page_size=1&page=9"
    )
    assert status == 404


@pytest.mark.s3
def test_fake_api_dandiset_and_zarr(sample: SampleDandiset, api: FakeDandiAPI) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api", api.url)
    status, body = http_json(f"{api.url}/dandisets/{sample.dandiset_id}/")
    assert status == 200
    assert body["identifier"] == sample.dandiset_id
    assert body["most_recent_published_version"]["version"] == V2
    assert body["draft_version"]["version"] == "draft"
    draft = sample.versions[DRAFT]
    for path, zarr_id in draft.zarr_ids.items():
        status, info = http_json(f"{api.url}/zarr/{zarr_id}/")
        assert status == 200
        checksum = draft.zarr_checksums[path]
        assert info["zarr_id"] == zarr_id and info["status"] == "Complete"
        assert info["checksum"] == checksum
        assert info["file_count"] == len(zarr_files(draft.files, path))
        assert info["size"] == sum(len(b) for b in zarr_files(draft.files, path).values())
        assert info["dandiset"] == sample.dandiset_id
    assert http_json(f"{api.url}/zarr/00000000-0000-0000-0000-000000000000/") == (
        404,
        {"detail": "Not found."},
    )
    assert http_json(f"{api.url}/dandisets/999999/")[0] == 404
    missing_version = f"{api.url}/dandisets/{sample.dandiset_id}/versions/0.990101.0000/assets/"
    assert http_json(missing_version)[0] == 404
    assert any(r.startswith("/api/zarr/") for r in api.requests)


def test_fake_api_from_dicts_caps_page_size() -> None:
    rows = [
        {"asset_id": f"a{i:04d}", "blob": None, "zarr": None, "path": f"f{i:04d}", "size": 1}
        for i in range(1500)
    ]
    dandisets = {
        "000001": {
            "most_recent_published_version": None,
            "versions": {"draft": {"metadata": {"name": "x"}, "assets": rows}},
        }
    }
    with FakeDandiAPI(dandisets) as server:
        base = f"{server.url}/dandisets/000001/versions/draft/assets/"
        status, body = http_json(f"{base}?page_size=5000")
        assert status == 200 and body["count"] == 1500
        assert len(body["results"]) == MAX_PAGE_SIZE and body["next"] is not None
        assert "metadata" not in body["results"][0]
        status, body = http_json(body["next"])
        assert len(body["results"]) == 500 and body["next"] is None
        status, body = http_json(f"{server.url}/dandisets/000001/")
        assert body["most_recent_published_version"] is None
        assert body["draft_version"]["version"] == "draft"


def test_fake_api_latency_delays_every_response(monkeypatch: pytest.MonkeyPatch) -> None:
    import zarrfs.demo.fake_api as fake_api

    slept: list[float] = []
    monkeypatch.setattr(fake_api, "time", SimpleNamespace(sleep=slept.append))
    dandisets = {
        "000001": {"most_recent_published_version": None, "versions": {"draft": {"assets": []}}}
    }
    with FakeDandiAPI(dandisets, latency=0.25) as server:
        assert http_json(f"{server.url}/dandisets/")[0] == 200
        assert http_json(f"{server.url}/dandisets/999999/")[0] == 404
    assert slept == [0.25, 0.25]
    with FakeDandiAPI(dandisets) as server:
        assert http_json(f"{server.url}/dandisets/000001/")[0] == 200
    assert slept == [0.25, 0.25]


# --- the local S3 -------------------------------------------------------------------------------


def test_local_s3_lists_versions_like_stock_moto_without_copies() -> None:
    """ListObjectVersions answers as moto's own implementation does (checked against it on the same
    bucket), page by page, and keeps no copy of any version (see `zarrfs.demo.locals3`)."""
    from moto.s3.models import FakeKey, s3_backends

    with LocalS3(isolated=False) as local:
        client, bucket = local.client, local.bucket
        for key, writes in {"v/a": 2, "v/b": 1, "v/c": 1, "v/d/e": 3, "w/x": 1}.items():
            for i in range(writes):
                client.put_object(Bucket=bucket, Key=key, Body=f"{key} {i}".encode())
        client.delete_object(Bucket=bucket, Key="v/c")
        backend = next(iter(s3_backends.values()))["aws"]
        stock = type(backend).list_object_versions.__wrapped__  # type: ignore[attr-defined]

        def marked(items: list[Any]) -> list[tuple[str, str, bool]]:
            return [(i.name, i.version_id, i.is_latest) for i in items]

        tracked = len(FakeKey.instances_tracked)
        for max_keys in (1, 2, 1000):
            ours = backend.list_object_versions(bucket, prefix="v/", max_keys=max_keys)
            theirs = stock(backend, bucket, prefix="v/", max_keys=max_keys)
            assert marked(ours[0]) == marked(theirs[0]) and ours[0]
            assert marked(ours[2]) == marked(theirs[2])
            assert ours[1] == theirs[1] and ours[3:] == theirs[3:]
        paginator = client.get_paginator("list_object_versions")
        pages = list(
            paginator.paginate(Bucket=bucket, Prefix="v/", PaginationConfig={"PageSize": 2})
        )
        assert len(pages) > 2
        versions = [(v["Key"], v["VersionId"], v["IsLatest"]) for p in pages for v in p["Versions"]]
        whole = client.list_object_versions(Bucket=bucket, Prefix="v/")
        assert versions == [(v["Key"], v["VersionId"], v["IsLatest"]) for v in whole["Versions"]]
        assert [v[0] for v in versions if v[2]] == ["v/a", "v/b", "v/d/e"]
        assert [(m["Key"], m["IsLatest"]) for m in whole["DeleteMarkers"]] == [("v/c", True)]
        stock_copies = len(FakeKey.instances_tracked) - tracked
        before = len(FakeKey.instances_tracked)
        for _ in range(3):
            client.list_object_versions(Bucket=bucket, Prefix="v/")
        assert len(FakeKey.instances_tracked) == before, "ListObjectVersions kept copies"
        assert stock_copies > 0  # the oracle itself copies: the check above can fail


# --- the local S3 itself ------------------------------------------------------------------------

#: Response headers that differ between any two requests (the time, moto's random request id).
VOLATILE_HEADERS = {"date", "x-amzn-requestid"}


def raw_get(url: str, headers: dict[str, str]) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """An anonymous GET: status, reason, sorted (lower-cased name, value) headers, body."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers)
    try:
        with opener.open(request, timeout=30) as response:
            status, reason, items, body = (
                response.status,
                response.reason,
                response.getheaders(),
                response.read(),
            )
    except urllib.error.HTTPError as error:
        status, reason, items, body = error.code, error.reason, error.headers.items(), error.read()
    kept = sorted((k.lower(), v) for k, v in items if k.lower() not in VOLATILE_HEADERS)
    return status, reason, kept, re.sub(rb"<RequestId>[^<]*</RequestId>", b"", body)


@pytest.mark.s3
def test_local_s3_fast_path_answers_exactly_as_moto() -> None:
    mib = 1 << 20
    with LocalS3(fast_range_min_size=mib) as local:
        client, bucket = local.client, local.bucket
        old = hashlib.sha256(b"old").digest() * (mib // 16)  # 2 MiB, then overwritten
        new = np.random.default_rng(1).bytes(3 * mib + 123)
        first = client.put_object(Bucket=bucket, Key="big", Body=old)["VersionId"]
        client.put_object(Bucket=bucket, Key="big", Body=new)
        small = client.put_object(Bucket=bucket, Key="small", Body=b"x" * 1000)["VersionId"]
        # a multipart object, as DANDI uploads blobs
        upload = client.create_multipart_upload(Bucket=bucket, Key="multi")
        parts = []
        for number, body in enumerate((new[: 5 * mib // 2], new[5 * mib // 2 :]), start=1):
            r = client.upload_part(
                Bucket=bucket,
                Key="multi",
                UploadId=upload["UploadId"],
                PartNumber=number,
                Body=body + body if number == 1 else body,
            )
            parts.append({"PartNumber": number, "ETag": r["ETag"]})
        client.complete_multipart_upload(
            Bucket=bucket,
            Key="multi",
            UploadId=upload["UploadId"],
            MultipartUpload={"Parts": parts},
        )
        base = f"{local.endpoint_url}/{bucket}"
        urls = [
            f"{base}/big",
            f"{base}/big?versionId={first}",
            f"{base}/multi",
            f"{base}/small?versionId={small}",
            f"{base}/big?versionId=no-such-version",
            f"{base}/big?versionId={first}&partNumber=1",
            f"{base}/absent",
        ]
        ranges = [
            None,
            "bytes=0-1023",
            "bytes=1000-2000000",
            "bytes=5-",
            "bytes=-4096",
            "bytes=0-",
            "bytes=0-99999999",
            "bytes=99999999-",
            "bytes=-0",
            "bytes=10-5",
            "bytes=0-1,5-9",
            "bytes=x-y",
            "",
        ]
        before = local.stats()
        served = 0
        for url in urls:
            raw_get(url, {DIRECT_HEADER: "1"})  # moto's first answer teaches the large paths
            for rng in ranges:
                for extra in ({}, {"x-amz-checksum-mode": "ENABLED"}):
                    headers = {**extra, **({"Range": rng} if rng is not None else {})}
                    moto = raw_get(url, {**headers, DIRECT_HEADER: "1"})
                    start = local.stats().fast_path
                    fast = raw_get(url, headers)
                    served += local.stats().fast_path - start
                    assert fast == moto, (url, headers)
        after = local.stats()
    # the fast path served the three large object versions' 4 partial ranges (with and without
    # checksum mode) and 4 whole-object requests (no range, "", "0-", past the end) without it
    assert served == 3 * (4 * 2 + 4)
    delta = after - before
    assert delta.fast_path == served
    assert delta.requests == delta.by_kind["GET"] == len(urls) * (1 + 4 * len(ranges))
    assert delta.bytes_sent > 0


@pytest.mark.s3
def test_local_s3_counts_requests_and_body_bytes() -> None:
    with LocalS3() as local:
        local.client.put_object(Bucket=local.bucket, Key="k", Body=b"y" * 5000)
        anon = boto3.client(
            "s3",
            endpoint_url=local.endpoint_url,
            region_name="us-east-2",
            config=BotoConfig(signature_version=UNSIGNED),
        )
        before = local.stats()
        anon.head_object(Bucket=local.bucket, Key="k")
        assert anon.get_object(Bucket=local.bucket, Key="k", Range="bytes=0-99")["Body"].read()
        assert len(anon.get_object(Bucket=local.bucket, Key="k")["Body"].read()) == 5000
        anon.list_objects_v2(Bucket=local.bucket)
        delta = local.stats() - before
    assert delta.by_kind == {"HEAD": 1, "GET": 2, "LIST": 1}
    assert delta.requests == 4 and delta.fast_path == 0
    listing_bytes = delta.bytes_sent - 100 - 5000
    assert 0 < listing_bytes < 2000  # the listing's XML; a HEAD sends no body
