"""The sample dandiset: one builder for `zarrfs demo`, the test suite and the benchmarks.

Owns: writing into a `LocalS3` bucket exactly what the DANDI archive would hold for a dandiset
with two published versions and a draft (see DANDI-FORMATS.md): immutable blobs (real NWB files
written with pynwb) uploaded as DANDI-sized multipart uploads, Zarrs (format 2 OME-Zarr and a format 3 array) edited in place
between versions, one schema-2 manifest per observed Zarr state under `zarr-manifest/`, and the
five metadata files per version under `dandisets/<id>/<version>/`. It returns a `SampleDandiset`
describing every byte a mount of each version must serve, and the values written into each Zarr
array and NWB series.

Never does: FUSE, reading through zarrfs, or touching anything but its own bucket; it never
overwrites or deletes a `blobs/` key. zarr and pynwb (the `demo` extra) are imported inside the
functions that write with them only. Single-threaded apart from a private upload pool. Everything is
deterministic (the NWB files' object ids too) except asset, blob and Zarr uuids, S3 VersionIds and
S3 LastModified times.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import numpy as np
from zarr_checksum.tree import ZarrChecksumTree

from zarrfs.archive.digests import EtagHasher, dandi_part_sizes

if TYPE_CHECKING:
    from zarrfs.demo.locals3 import LocalS3

#: The two published versions and the draft, in publication order.
V1 = "0.251101.1200"
V2 = "0.251102.1200"
DRAFT = "draft"
VERSIONS = (V1, V2, DRAFT)

#: Hosts written into metadata: always the real archive's, whatever endpoint holds the data.
PUBLIC_S3_URL = "https://dandiarchive.s3.amazonaws.com"
PUBLIC_API_URL = "https://api.dandiarchive.org/api"
SCHEMA_VERSION = "0.6.10"
SCHEMA_CONTEXT = (
    f"https://raw.githubusercontent.com/dandi/schema/master/releases/{SCHEMA_VERSION}/context.json"
)

#: Asset paths of the sample.
EPHYS_PATH = "sub-01/sub-01_ses-1_ecephys.nwb"
OME_PATH = "sub-01/sub-01_sample.ome.zarr"
ARRAY_PATH = "sub-02/sub-02_array.zarr"
BEHAVIOR_PATH = "sub-02/sub-02_behavior.nwb"
BLOB_PATHS = (EPHYS_PATH, BEHAVIOR_PATH)
ZARR_PATHS = (OME_PATH, ARRAY_PATH)

#: The OME-Zarr's axes, in the order of its levels' dimensions (also each level's
#: `_ARRAY_DIMENSIONS`, the attribute xarray reads dimension names from in Zarr format 2).
OME_AXES = ("c", "z", "y", "x")

#: Zarr entries (relative to the Zarr root) the in-place edits touch, per version, compared with the
#: previous version. Tests check the bucket against these.
OME_V2_OVERWRITTEN = ("0/0/0/0/0",)
OME_V2_DELETED = ("0/0/1/1/1",)
OME_V2_ADDED = ("0/1/0/0/2",)
OME_V2_METADATA_CHANGED = (".zattrs",)
ARRAY_V2_OVERWRITTEN = ("c/1/1",)
OME_DRAFT_OVERWRITTEN = ("1/0/0/1/1",)
#: Chunks absent (fill value) in every version.
OME_ALWAYS_ABSENT = ("0/1/1/2/2",)
ARRAY_ALWAYS_ABSENT = ("c/2/1",)

#: Manifest fields, in order (schema version 2).
MANIFEST_FIELDS = ("versionId", "lastModified", "size", "ETag")


_SEED = 20251101
_DANDISET_CREATED = datetime(2025, 10, 30, 9, 0, tzinfo=UTC)
_BLOB_MODIFIED = {
    EPHYS_PATH: datetime(2025, 10, 29, 14, 3, 27, 512204, tzinfo=UTC),
    BEHAVIOR_PATH: datetime(2025, 10, 29, 14, 7, 2, 90311, tzinfo=UTC),
}
#: When the assets of each state were (notionally) created or last changed.
_STATE_EDITED = {
    V1: datetime(2025, 11, 1, 11, 0, tzinfo=UTC),
    V2: datetime(2025, 11, 2, 11, 0, tzinfo=UTC),
    DRAFT: datetime(2025, 11, 3, 9, 30, tzinfo=UTC),
}
_PUBLISHED = {
    V1: datetime(2025, 11, 1, 12, 0, tzinfo=UTC),
    V2: datetime(2025, 11, 2, 12, 0, tzinfo=UTC),
}


@dataclass(frozen=True, slots=True)
class SampleVersion:
    """Everything one version (or the draft) of the sample holds, as a mount must serve it."""

    version: str
    #: Every file of the mounted tree (relative to the dandiset root) -> its exact bytes.
    files: dict[str, bytes]
    #: The asset records of `assets.jsonld`, sorted by path.
    assets: list[dict[str, Any]]
    #: API rows (`asset_id, blob, zarr, path, size, created, modified, metadata`) for the fake API.
    asset_rows: list[dict[str, Any]]
    asset_ids: dict[str, str]
    blob_ids: dict[str, str]
    blob_keys: dict[str, str]
    zarr_ids: dict[str, str]
    zarr_checksums: dict[str, str]
    #: Asset path -> S3 key of the manifest of the Zarr's state in this version.
    manifest_keys: dict[str, str]
    #: Asset path -> the manifest bytes as written to S3.
    manifests: dict[str, bytes]
    #: `"<asset path>/<array path>"` (just the asset path for a root array) -> expected contents.
    arrays: dict[str, np.ndarray]
    #: The version metadata (`dandiset.jsonld`).
    metadata: dict[str, Any]
    #: File name -> bytes of `dandiset.jsonld`, `dandiset.yaml`, `assets.jsonld`, `assets.yaml`,
    #: `collection.jsonld`.
    metadata_files: dict[str, bytes]
    #: S3 prefix of the metadata files, `dandisets/<id>/<version>/`.
    metadata_prefix: str
    #: Publication time (None for the draft).
    published: datetime | None
    #: Asset path -> dateModified of its record.
    modified: dict[str, datetime]


@dataclass(frozen=True, slots=True)
class SampleDandiset:
    """The sample as written into the bucket: one `SampleVersion` per version and the draft."""

    dandiset_id: str
    bucket: str
    endpoint_url: str
    versions: dict[str, SampleVersion]
    most_recent_published_version: str = V2
    blob_paths: tuple[str, ...] = BLOB_PATHS
    zarr_paths: tuple[str, ...] = ZARR_PATHS
    #: Blob path -> what pynwb wrote into it (blobs are the same in every version).
    nwb: dict[str, NWBContents] = field(default_factory=dict)


# --- pure helpers ------------------------------------------------------------------------------


def dandi_etag(data: bytes) -> str:
    """The `dandi:dandi-etag` of `data`: S3's multipart ETag with DANDI part sizing."""
    hasher = EtagHasher(len(data))
    hasher.update(data)
    return hasher.etag(multipart=True)


def upload_as_dandi(
    client: Any, bucket: str, key: str, data: bytes, content_type: str | None = None
) -> tuple[str, str | None]:
    """Upload `data` to `key` as DANDI uploads a blob (one multipart upload in DANDI's part sizes),
    check that S3's ETag is the dandi-etag, and return (that ETag, the new VersionId)."""
    extra = {"ContentType": content_type} if content_type else {}
    upload = client.create_multipart_upload(Bucket=bucket, Key=key, **extra)
    parts, offset = [], 0
    for number, size in enumerate(dandi_part_sizes(len(data)), start=1):
        part = client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=data[offset : offset + size],
        )
        parts.append({"PartNumber": number, "ETag": part["ETag"]})
        offset += size
    done = client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    etag = dandi_etag(data)
    if done["ETag"].strip('"') != etag:
        raise RuntimeError(f"S3 ETag {done['ETag']} of {key} is not the dandi-etag {etag}")
    return etag, done.get("VersionId")


def blob_key(blob_id: str) -> str:
    """`blobs/<u[0:3]>/<u[3:6]>/<u>`."""
    return f"blobs/{blob_id[0:3]}/{blob_id[3:6]}/{blob_id}"


def manifest_key(zarr_id: str, checksum: str) -> str:
    """`zarr-manifest/<z[0:3]>/<z[3:6]>/<z>/<checksum>.json` in the bucket."""
    return f"zarr-manifest/{zarr_id[0:3]}/{zarr_id[3:6]}/{zarr_id}/{checksum}.json"


def format_iso_seconds(value: datetime) -> str:
    """ISO 8601 in UTC, whole seconds, with offset: `2025-11-01T12:00:01+00:00`."""
    return value.astimezone(UTC).replace(microsecond=0).isoformat()


def format_iso_micro(value: datetime) -> str:
    """ISO 8601 with microseconds and offset, as in asset records."""
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def format_api_time(value: datetime) -> str:
    """The API's `created`/`modified` style: `2023-03-02T22:10:45.985334Z`."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class ManifestLeaf:
    """One current S3 object version of a Zarr entry."""

    path: str
    version_id: str
    last_modified: str
    size: int
    etag: str


def zarr_checksum_of(leaves: Iterable[ManifestLeaf]) -> str:
    """The Zarr checksum of these entries, via the reference `zarr_checksum` package."""
    tree = ZarrChecksumTree()
    for leaf in leaves:
        tree.add_leaf(path=Path(leaf.path), size=leaf.size, digest=leaf.etag)
    return tree.process().digest


def build_manifest(leaves: Iterable[ManifestLeaf]) -> dict[str, Any]:
    """A schema-2 manifest (see DANDI-FORMATS) for a Zarr whose current entries are `leaves`."""
    items = sorted(leaves, key=lambda leaf: leaf.path)
    entries: dict[str, Any] = {}
    for leaf in items:
        *dirs, name = leaf.path.split("/")
        node = entries
        for part in dirs:
            node = node.setdefault(part, {})
        node[name] = [leaf.version_id, leaf.last_modified, leaf.size, leaf.etag]
    statistics = {
        "entries": len(items),
        "depth": max((leaf.path.count("/") for leaf in items), default=0),
        "totalSize": sum(leaf.size for leaf in items),
        "lastModified": max((leaf.last_modified for leaf in items), default=None),
        "zarrChecksum": zarr_checksum_of(items),
    }
    return {
        "schemaVersion": 2,
        "fields": list(MANIFEST_FIELDS),
        "statistics": statistics,
        "entries": _sorted_tree(entries),
    }


def _sorted_tree(node: dict[str, Any]) -> dict[str, Any]:
    return {k: _sorted_tree(v) if isinstance(v, dict) else v for k, v in sorted(node.items())}


def format_manifest(manifest: Mapping[str, Any]) -> str:
    """Serialize like the real manifests: one space of indent per level, arrays on one line."""

    def emit(value: Any, level: int) -> str:
        if isinstance(value, Mapping):
            if not value:
                return "{}"
            pad = " " * (level + 1)
            items = [f"{pad}{json.dumps(k)}: {emit(v, level + 1)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + "\n" + " " * level + "}"
        if isinstance(value, list | tuple):
            return json.dumps(list(value), separators=(",", ":"))
        return json.dumps(value)

    return emit(manifest, 0)


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def to_yaml(value: Any) -> str:
    """A small YAML emitter for JSON-like data (strings always double-quoted, JSON escapes)."""

    def scalar(v: Any) -> str:
        if isinstance(v, Mapping):
            return "{}"
        if isinstance(v, list | tuple):
            return "[]"
        return json.dumps(v)

    def key(k: str) -> str:
        return k if _PLAIN_KEY.fullmatch(k) else json.dumps(k)

    def is_block(v: Any) -> bool:
        return isinstance(v, Mapping | list | tuple) and bool(v)

    def emit(v: Any, indent: int) -> list[str]:
        pad = " " * indent
        lines: list[str] = []
        if isinstance(v, Mapping):
            for k, item in v.items():
                if is_block(item):
                    lines.append(f"{pad}{key(k)}:")
                    lines.extend(emit(item, indent + 2))
                else:
                    lines.append(f"{pad}{key(k)}: {scalar(item)}")
        else:
            for item in v:
                if is_block(item):
                    sub = emit(item, indent + 2)
                    sub[0] = f"{pad}- {sub[0][indent + 2 :]}"
                    lines.extend(sub)
                else:
                    lines.append(f"{pad}- {scalar(item)}")
        return lines

    if not is_block(value):
        return scalar(value) + "\n"
    return "\n".join(emit(value, 0)) + "\n"


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- sample contents ---------------------------------------------------------------------------


#: Values written into the NWB blobs' metadata (tests compare what pynwb reads back with these).
EPHYS_IDENTIFIER = "zarrfs-sample-ecephys"
BEHAVIOR_IDENTIFIER = "zarrfs-sample-behavior"
_EPHYS_START = datetime(2025, 10, 1, 10, 0, tzinfo=UTC)
_BEHAVIOR_START = datetime(2025, 10, 2, 10, 0, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class NWBSeries:
    """One time series written into an NWB blob, as pynwb must read it back."""

    #: Its object id (`NWBFile.objects[object_id]` after reading) and HDF5 group path.
    object_id: str
    path: str
    neurodata_type: str
    data: np.ndarray
    unit: str
    conversion: float
    rate: float | None = None
    starting_time: float | None = None
    timestamps: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class NWBContents:
    """What pynwb wrote into one NWB blob (the same bytes in every version)."""

    identifier: str
    session_description: str
    session_start_time: datetime
    #: HDF5 path of the series' group (`acquisition/ElectricalSeries`) -> what was written.
    series: dict[str, NWBSeries]
    #: Electrode table columns as written (`x`, `y`, `z`, `location`, `group_name`); empty when the
    #: file has no electrodes.
    electrodes: dict[str, np.ndarray]


class _SeededUUIDs:
    """uuid4-shaped strings drawn from a seeded RNG: hdmf gives every container a random object id,
    and the sample's blobs must be the same bytes on every build."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.rng.bytes(16), version=4)


def write_nwb(nwbfile: Any, path: Path) -> bytes:
    """Write `nwbfile` with pynwb at `path` and return the file's bytes."""
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(path), mode="w") as io:
        io.write(nwbfile)
    return path.read_bytes()


def _series_of(container: Any, path: str, data: np.ndarray, **extra: Any) -> NWBSeries:
    return NWBSeries(
        object_id=container.object_id,
        path=path,
        neurodata_type=type(container).__name__,
        data=data,
        unit=container.unit,
        conversion=float(container.conversion),
        **extra,
    )


def _make_ephys_nwb(rng: np.random.Generator, tmp: Path) -> tuple[bytes, NWBContents]:
    """A real NWB file (pynwb): 8 electrodes on one shank, a 30 kHz int16 ElectricalSeries
    (24,000 x 8, chunked and gzip-compressed as DANDI uploads usually are) and a small camera
    ImageSeries (20 frames of 48 x 64 uint8)."""
    from hdmf.backends.hdf5 import H5DataIO
    from pynwb import NWBFile
    from pynwb.ecephys import ElectricalSeries
    from pynwb.file import Subject
    from pynwb.image import ImageSeries

    nwb = NWBFile(
        session_description="sample extracellular recording",
        identifier=EPHYS_IDENTIFIER,
        session_start_time=_EPHYS_START,
        file_create_date=[_BLOB_MODIFIED[EPHYS_PATH]],
        experimenter=["Doe, Jane"],
        lab="zarrfs lab",
        institution="zarrfs institute",
        subject=Subject(subject_id="01", species="Mus musculus", sex="F", age="P90D"),
    )
    device = nwb.create_device(name="probe0", description="32-site silicon probe (8 used)")
    shank = nwb.create_electrode_group(
        name="shank0", description="the probe's first shank", location="CA1", device=device
    )
    electrodes: dict[str, np.ndarray] = {
        "x": np.zeros(8),
        "y": np.arange(8, dtype=np.float64) * 20.0,
        "z": np.full(8, -1200.0),
        "location": np.array(["CA1"] * 8),
        "group_name": np.array(["shank0"] * 8),
    }
    for i in range(8):
        nwb.add_electrode(
            x=float(electrodes["x"][i]),
            y=float(electrodes["y"][i]),
            z=float(electrodes["z"][i]),
            location="CA1",
            group=shank,
        )
    t = np.arange(24_000, dtype=np.float64)[:, None]
    wave = 800 * np.sin(t / 37.0 + np.arange(8)[None, :])
    voltage = (wave + rng.normal(0, 60, size=(24_000, 8))).astype(np.int16)
    ephys = ElectricalSeries(
        name="ElectricalSeries",
        description="raw voltage",
        data=H5DataIO(voltage, chunks=(4000, 8), compression="gzip", compression_opts=4),
        electrodes=nwb.create_electrode_table_region(list(range(8)), "all electrodes"),
        rate=30000.0,
        starting_time=0.0,
        conversion=1.95e-7,
    )
    nwb.add_acquisition(ephys)
    y, x = np.mgrid[0:48, 0:64]
    frames = np.stack(
        [(96 + 64 * np.sin((x + 3 * i) / 7.0) * np.cos(y / 9.0)) for i in range(20)]
    ) + rng.integers(0, 32, size=(20, 48, 64))
    frames = frames.astype(np.uint8)
    video = ImageSeries(
        name="ImageSeries",
        description="head camera",
        data=H5DataIO(frames, chunks=(1, 48, 64)),
        unit="n.a.",
        format="raw",
        rate=30.0,
        starting_time=0.0,
    )
    nwb.add_acquisition(video)
    data = write_nwb(nwb, tmp / "ecephys.nwb")
    series = [
        _series_of(ephys, "acquisition/ElectricalSeries", voltage, rate=30000.0, starting_time=0.0),
        _series_of(video, "acquisition/ImageSeries", frames, rate=30.0, starting_time=0.0),
    ]
    contents = NWBContents(
        identifier=EPHYS_IDENTIFIER,
        session_description="sample extracellular recording",
        session_start_time=_EPHYS_START,
        series={s.path: s for s in series},
        electrodes=electrodes,
    )
    return data, contents


def _make_behavior_nwb(rng: np.random.Generator, tmp: Path) -> tuple[bytes, NWBContents]:
    """A real NWB file (pynwb): a 60 Hz SpatialSeries of 2-D positions with timestamps, in a
    `behavior` processing module's Position."""
    from pynwb import NWBFile
    from pynwb.behavior import Position, SpatialSeries

    nwb = NWBFile(
        session_description="sample open-field session",
        identifier=BEHAVIOR_IDENTIFIER,
        session_start_time=_BEHAVIOR_START,
        file_create_date=[_BLOB_MODIFIED[BEHAVIOR_PATH]],
        lab="zarrfs lab",
    )
    positions = np.cumsum(rng.normal(0, 0.01, size=(6000, 2)), axis=0)
    timestamps = np.arange(6000, dtype=np.float64) / 60.0
    spatial = SpatialSeries(
        name="SpatialSeries",
        description="head position",
        data=positions,
        timestamps=timestamps,
        reference_frame="arena corner",
    )
    module = nwb.create_processing_module(name="behavior", description="tracked behavior")
    module.add(Position(name="Position", spatial_series=spatial))
    data = write_nwb(nwb, tmp / "behavior.nwb")
    series = _series_of(
        spatial, "processing/behavior/Position/SpatialSeries", positions, timestamps=timestamps
    )
    contents = NWBContents(
        identifier=BEHAVIOR_IDENTIFIER,
        session_description="sample open-field session",
        session_start_time=_BEHAVIOR_START,
        series={series.path: series},
        electrodes={},
    )
    return data, contents


def _ome_zattrs(levels: int, omero: bool) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "multiscales": [
            {
                "version": "0.4",
                "name": "sample",
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "z", "type": "space", "unit": "micrometer"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": [
                    {
                        "path": str(level),
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [1.0, 2.0, 0.5 * 2**level, 0.5 * 2**level]}
                        ],
                    }
                    for level in range(levels)
                ],
                "type": "stride",
            }
        ]
    }
    if omero:
        attrs["omero"] = {
            "name": "sample",
            "version": "0.4",
            "channels": [
                {
                    "label": "DAPI",
                    "color": "0000FF",
                    "active": True,
                    "window": {"start": 0, "end": 6000, "min": 0, "max": 65535},
                },
                {
                    "label": "GFP",
                    "color": "00FF00",
                    "active": True,
                    "window": {"start": 0, "end": 6000, "min": 0, "max": 65535},
                },
            ],
        }
    return attrs


def _ome_levels_v1(rng: np.random.Generator) -> list[np.ndarray]:
    """Level 0 is (c=2, z=4, y=96, x=96) uint16; levels 1 and 2 are strided in y and x."""
    y, x = np.mgrid[0:96, 0:96]
    base = 300 + 200 * np.sin(y / 9.0) * np.cos(x / 13.0)
    level0 = np.empty((2, 4, 96, 96), dtype=np.uint16)
    for c in range(2):
        for z in range(4):
            noise = rng.integers(0, 50, size=(96, 96))
            level0[c, z] = (base + 100 * c + 20 * z + noise).astype(np.uint16)
    # Regions of fill value: chunk 0/1/0/0/2 (added in v2) and 0/1/1/2/2 (always absent).
    level0[1, 0:2, 0:32, 64:96] = 0
    level0[1, 2:4, 64:96, 64:96] = 0
    return [level0, level0[..., ::2, ::2].copy(), level0[..., ::4, ::4].copy()]


def _array_v1(rng: np.random.Generator) -> np.ndarray:
    data = (np.arange(40 * 30, dtype=np.float32).reshape(40, 30) / 7.0).astype(np.float32)
    data += rng.normal(0, 1, size=(40, 30)).astype(np.float32)
    data[32:40, 16:30] = 0  # chunk c/2/1 is all fill value
    return data


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (a Zarr written locally) as `relative/path -> bytes`."""
    out: dict[str, bytes] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = Path(dirpath) / name
            out[full.relative_to(root).as_posix()] = full.read_bytes()
    return dict(sorted(out.items()))


# --- the builder -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Blob:
    blob_id: str
    data: bytes
    etag: str
    sha256: str


@dataclass(slots=True)
class _ZarrState:
    zarr_id: str
    files: dict[str, bytes]
    arrays: dict[str, np.ndarray]


@dataclass(slots=True)
class _Builder:
    s3: LocalS3
    dandiset_id: str
    blobs: dict[str, _Blob] = field(default_factory=dict)
    zarrs: dict[str, _ZarrState] = field(default_factory=dict)
    asset_ids: dict[str, str] = field(default_factory=dict)
    asset_modified: dict[str, datetime] = field(default_factory=dict)
    last_checksums: dict[str, str] = field(default_factory=dict)
    written_manifests: set[str] = field(default_factory=set)
    versions: dict[str, SampleVersion] = field(default_factory=dict)

    # S3 writes ---------------------------------------------------------------------------------

    def put(self, key: str, body: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self.s3.client.put_object(Bucket=self.s3.bucket, Key=key, Body=body, **extra)

    def upload_blob(self, path: str, data: bytes) -> None:
        blob_id = str(uuid.uuid4())
        etag, _ = upload_as_dandi(
            self.s3.client, self.s3.bucket, blob_key(blob_id), data, "application/octet-stream"
        )
        self.blobs[path] = _Blob(blob_id=blob_id, data=data, etag=etag, sha256=_sha256(data))

    def sync_zarr(
        self, path: str, new_files: dict[str, bytes], arrays: dict[str, np.ndarray]
    ) -> None:
        """Make `zarr/<z>/` hold `new_files`: put what is new or changed, delete what is gone."""
        state = self.zarrs.get(path)
        if state is None:
            state = _ZarrState(zarr_id=str(uuid.uuid4()), files={}, arrays={})
            self.zarrs[path] = state
        prefix = f"zarr/{state.zarr_id}/"
        puts = [(k, v) for k, v in new_files.items() if state.files.get(k) != v]
        deletes = [k for k in state.files if k not in new_files]
        client, bucket = self.s3.client, self.s3.bucket

        def put_one(item: tuple[str, bytes]) -> None:
            client.put_object(Bucket=bucket, Key=prefix + item[0], Body=item[1])

        def delete_one(name: str) -> None:
            client.delete_object(Bucket=bucket, Key=prefix + name)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(put_one, puts))
            list(pool.map(delete_one, deletes))
        state.files = dict(new_files)
        state.arrays = {k: v.copy() for k, v in arrays.items()}

    # publishing --------------------------------------------------------------------------------

    def current_leaves(self, zarr_id: str) -> list[ManifestLeaf]:
        prefix = f"zarr/{zarr_id}/"
        paginator = self.s3.client.get_paginator("list_object_versions")
        leaves: list[ManifestLeaf] = []
        for page in paginator.paginate(Bucket=self.s3.bucket, Prefix=prefix):
            for item in page.get("Versions", []):
                if not item["IsLatest"]:
                    continue
                leaves.append(
                    ManifestLeaf(
                        path=item["Key"][len(prefix) :],
                        version_id=item["VersionId"],
                        last_modified=format_iso_seconds(item["LastModified"]),
                        size=int(item["Size"]),
                        etag=item["ETag"].strip('"'),
                    )
                )
        return leaves

    def publish(self, version: str, *, also_draft: bool) -> None:
        zarr_checksums: dict[str, str] = {}
        manifest_keys: dict[str, str] = {}
        manifests: dict[str, bytes] = {}
        sizes: dict[str, int] = {}
        for path, state in sorted(self.zarrs.items()):
            leaves = self.current_leaves(state.zarr_id)
            manifest = build_manifest(leaves)
            checksum = manifest["statistics"]["zarrChecksum"]
            key = manifest_key(state.zarr_id, checksum)
            body = format_manifest(manifest).encode()
            if key not in self.written_manifests:
                self.put(key, body, "application/json")
                self.written_manifests.add(key)
            zarr_checksums[path] = checksum
            manifest_keys[path] = key
            manifests[path] = body
            sizes[path] = manifest["statistics"]["totalSize"]
            if self.last_checksums.get(path) != checksum:
                self.asset_ids[path] = str(uuid.uuid4())
                self.asset_modified[path] = _STATE_EDITED[version]
                self.last_checksums[path] = checksum
        for path in self.blobs:
            if path not in self.asset_ids:
                self.asset_ids[path] = str(uuid.uuid4())
                self.asset_modified[path] = _STATE_EDITED[version]

        records = [self.record(path, zarr_checksums, sizes) for path in sorted(self.asset_ids)]
        rows = [self.row(record) for record in records]
        targets = [version, DRAFT] if also_draft and version != DRAFT else [version]
        for target in targets:
            self.write_version(target, records, rows, zarr_checksums, manifest_keys, manifests)

    def record(
        self, path: str, zarr_checksums: Mapping[str, str], sizes: Mapping[str, int]
    ) -> dict[str, Any]:
        asset_id = self.asset_ids[path]
        record: dict[str, Any] = {"@context": SCHEMA_CONTEXT}
        if path in self.blobs:
            blob = self.blobs[path]
            record["blobDateModified"] = format_iso_micro(_BLOB_MODIFIED[path])
            record["contentSize"] = len(blob.data)
            s3_url = f"{PUBLIC_S3_URL}/{blob_key(blob.blob_id)}"
            digest = {"dandi:dandi-etag": blob.etag, "dandi:sha2-256": blob.sha256}
            encoding = "application/x-nwb"
        else:
            record["contentSize"] = sizes[path]
            s3_url = f"{PUBLIC_S3_URL}/zarr/{self.zarrs[path].zarr_id}/"
            digest = {"dandi:dandi-zarr-checksum": zarr_checksums[path]}
            encoding = "application/x-zarr"
        record["contentUrl"] = [f"{PUBLIC_API_URL}/assets/{asset_id}/download/", s3_url]
        record["dateModified"] = format_iso_micro(self.asset_modified[path])
        record["digest"] = digest
        record["encodingFormat"] = encoding
        record["id"] = f"dandiasset:{asset_id}"
        record["identifier"] = asset_id
        record["path"] = path
        record["schemaKey"] = "Asset"
        record["schemaVersion"] = SCHEMA_VERSION
        return record

    def row(self, record: Mapping[str, Any]) -> dict[str, Any]:
        path = record["path"]
        modified = self.asset_modified[path]
        return {
            "asset_id": record["identifier"],
            "blob": self.blobs[path].blob_id if path in self.blobs else None,
            "zarr": self.zarrs[path].zarr_id if path in self.zarrs else None,
            "path": path,
            "size": record["contentSize"],
            "created": format_api_time(modified),
            "modified": format_api_time(modified),
            "metadata": dict(record),
        }

    def version_metadata(self, version: str, records: list[dict[str, Any]]) -> dict[str, Any]:
        ident = f"DANDI:{self.dandiset_id}"
        url = f"https://dandiarchive.org/dandiset/{self.dandiset_id}/{version}"
        published = _PUBLISHED.get(version)
        metadata: dict[str, Any] = {
            "@context": SCHEMA_CONTEXT,
            "access": [{"schemaKey": "AccessRequirements", "status": "dandi:OpenAccess"}],
            "assetsSummary": {
                "schemaKey": "AssetsSummary",
                "numberOfBytes": sum(int(r["contentSize"]) for r in records),
                "numberOfFiles": len(records),
                "numberOfSubjects": 2,
                "dataStandard": [
                    {
                        "schemaKey": "StandardsType",
                        "name": "Neurodata Without Borders (NWB)",
                        "identifier": "RRID:SCR_015242",
                    },
                    {
                        "schemaKey": "StandardsType",
                        "name": "OME/NGFF Standard",
                        "identifier": "DOI:10.25504/FAIRsharing.9af712",
                    },
                ],
                "variableMeasured": ["ElectricalSeries", "SpatialSeries"],
            },
            "citation": f"Doe, Jane (2025) zarrfs sample dandiset (Version {version}) [Data set]. "
            f"DANDI Archive. {url}",
            "contributor": [
                {
                    "schemaKey": "Person",
                    "name": "Doe, Jane",
                    "email": "jane.doe@example.org",
                    "roleName": ["dcite:ContactPerson", "dcite:Creator"],
                    "includeInCitation": True,
                }
            ],
            "dateCreated": format_iso_micro(_DANDISET_CREATED),
            "description": "A small dandiset built by zarrfs.demo.sample: two NWB blobs, an OME-Zarr "
            "(Zarr format 2) and a Zarr format 3 array, edited in place between versions.",
            "id": f"{ident}/{version}",
            "identifier": ident,
            "license": ["spdx:CC-BY-4.0"],
            "manifestLocation": [
                f"{PUBLIC_S3_URL}/dandisets/{self.dandiset_id}/{version}/assets.yaml"
            ],
            "name": "zarrfs sample dandiset",
            "repository": "https://dandiarchive.org/",
            "schemaKey": "Dandiset",
            "schemaVersion": SCHEMA_VERSION,
            "url": url,
            "version": version,
        }
        if published is not None:
            metadata["datePublished"] = format_iso_micro(published)
            metadata["doi"] = f"10.48324/dandi.{self.dandiset_id}/{version}"
            metadata["publishedBy"] = {
                "id": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, url)}",
                "name": "DANDI publish",
                "startDate": format_iso_micro(published),
                "endDate": format_iso_micro(published),
                "wasAssociatedWith": [
                    {
                        "id": "RRID:SCR_017571",
                        "name": "DANDI API",
                        "version": "0.1.0",
                        "schemaKey": "Software",
                    }
                ],
                "schemaKey": "PublishActivity",
            }
        return dict(sorted(metadata.items()))

    def write_version(
        self,
        version: str,
        records: list[dict[str, Any]],
        rows: list[dict[str, Any]],
        zarr_checksums: dict[str, str],
        manifest_keys: dict[str, str],
        manifests: dict[str, bytes],
    ) -> None:
        version_records = [json.loads(json.dumps(r)) for r in records]
        metadata = self.version_metadata(version, version_records)
        collection = {
            "@context": SCHEMA_CONTEXT,
            "@type": "prov:Collection",
            "hasMember": [r["id"] for r in version_records],
            "id": metadata["id"],
        }
        metadata_files = {
            "dandiset.jsonld": _json_bytes(metadata),
            "dandiset.yaml": to_yaml(metadata).encode(),
            "assets.jsonld": _json_bytes(version_records),
            "assets.yaml": to_yaml(version_records).encode(),
            "collection.jsonld": _json_bytes(collection),
        }
        prefix = f"dandisets/{self.dandiset_id}/{version}/"
        for name, body in metadata_files.items():
            kind = "application/json" if name.endswith(".jsonld") else "text/yaml"
            self.put(prefix + name, body, kind)

        files: dict[str, bytes] = {"dandiset.yaml": metadata_files["dandiset.yaml"]}
        arrays: dict[str, np.ndarray] = {}
        for path, blob in self.blobs.items():
            files[path] = blob.data
        for path, state in self.zarrs.items():
            for name, data in state.files.items():
                files[f"{path}/{name}"] = data
            for array_path, array in state.arrays.items():
                arrays[f"{path}/{array_path}" if array_path else path] = array.copy()

        self.versions[version] = SampleVersion(
            version=version,
            files=dict(sorted(files.items())),
            assets=version_records,
            asset_rows=[json.loads(json.dumps(r)) for r in rows],
            asset_ids={r["path"]: r["identifier"] for r in version_records},
            blob_ids={p: b.blob_id for p, b in self.blobs.items()},
            blob_keys={p: blob_key(b.blob_id) for p, b in self.blobs.items()},
            zarr_ids={p: z.zarr_id for p, z in self.zarrs.items()},
            zarr_checksums=dict(zarr_checksums),
            manifest_keys=dict(manifest_keys),
            manifests=dict(manifests),
            arrays=arrays,
            metadata=metadata,
            metadata_files=metadata_files,
            metadata_prefix=prefix,
            published=_PUBLISHED.get(version),
            modified={p: self.asset_modified[p] for p in self.asset_ids},
        )


def build_sample(s3: LocalS3, dandiset_id: str = "000123") -> SampleDandiset:
    """Write the sample dandiset (versions `V1`, `V2` and the draft) into `s3`'s bucket.

    Takes a few seconds. The bucket must not already hold this dandiset.
    """
    import numcodecs
    import zarr
    from zarr.storage import LocalStore

    rng = np.random.default_rng(_SEED)
    with tempfile.TemporaryDirectory(prefix="zarrfs-sample-") as tmp:
        builder = _Builder(s3=s3, dandiset_id=dandiset_id)

        # Blobs: real NWB files written with pynwb, immutable, uploaded once. hdmf draws each
        # container's object id from uuid4: seeded here so that every build writes the same bytes.
        nwb: dict[str, NWBContents] = {}
        with mock.patch("hdmf.container.uuid4", _SeededUUIDs(_SEED)):
            for path, make in ((EPHYS_PATH, _make_ephys_nwb), (BEHAVIOR_PATH, _make_behavior_nwb)):
                blob, nwb[path] = make(rng, Path(tmp))
                builder.upload_blob(path, blob)

        # The OME-Zarr (Zarr format 2, "/" chunk keys, zlib; each level's .zattrs names its axes).
        ome_root = Path(tmp) / "ome.zarr"
        ome_store = LocalStore(str(ome_root))
        levels = _ome_levels_v1(rng)
        group = zarr.open_group(
            ome_store, mode="w", zarr_format=2, attributes=_ome_zattrs(len(levels), omero=False)
        )
        for index, level in enumerate(levels):
            array = group.create_array(
                str(index),
                shape=level.shape,
                chunks=(1, 2, 32, 32),
                dtype=level.dtype,
                fill_value=0,
                chunk_key_encoding={"name": "v2", "separator": "/"},
                compressors=numcodecs.Zlib(level=5),
                # as xarray-based OME-Zarr writers leave them: xarray needs dimension names
                attributes={"_ARRAY_DIMENSIONS": list(OME_AXES)},
            )
            array[...] = level

        # The Zarr format 3 array (default chunk keys `c/...`, zstd).
        array_root = Path(tmp) / "array.zarr"
        array_store = LocalStore(str(array_root))
        data = _array_v1(rng)
        v3 = zarr.create_array(
            array_store,
            shape=data.shape,
            chunks=(16, 16),
            dtype=data.dtype,
            fill_value=0.0,
            zarr_format=3,
            attributes={"description": "zarrfs sample float32 array", "units": "a.u."},
        )
        v3[...] = data

        def ome_arrays() -> dict[str, np.ndarray]:
            return {str(i): level for i, level in enumerate(levels)}

        def sync() -> None:
            builder.sync_zarr(OME_PATH, read_tree(ome_root), ome_arrays())
            builder.sync_zarr(ARRAY_PATH, read_tree(array_root), {"": data})

        sync()
        builder.publish(V1, also_draft=True)

        # In-place edits between V1 and V2.
        level0 = zarr.open_array(ome_store, path="0", mode="r+")
        edit_rng = np.random.default_rng(_SEED + 2)
        levels[0][0, 0:2, 0:32, 0:32] = edit_rng.integers(5000, 6000, size=(2, 32, 32))
        levels[0][0, 2:4, 32:64, 32:64] = 0
        levels[0][1, 0:2, 0:32, 64:96] = edit_rng.integers(7000, 8000, size=(2, 32, 32))
        level0[0, 0:2, 0:32, 0:32] = levels[0][0, 0:2, 0:32, 0:32]
        level0[0, 2:4, 32:64, 32:64] = levels[0][0, 2:4, 32:64, 32:64]
        level0[1, 0:2, 0:32, 64:96] = levels[0][1, 0:2, 0:32, 64:96]
        zarr.open_group(ome_store, mode="r+").attrs.update(_ome_zattrs(len(levels), omero=True))
        data[16:32, 16:30] = (-1.5 * data[16:32, 16:30] + 3.25).astype(np.float32)
        zarr.open_array(array_store, mode="r+")[16:32, 16:30] = data[16:32, 16:30]
        sync()
        builder.publish(V2, also_draft=True)

        # One more in-place edit: the draft.
        level1 = zarr.open_array(ome_store, path="1", mode="r+")
        levels[1][0, 0:2, 32:48, 32:48] = edit_rng.integers(9000, 9500, size=(2, 16, 16))
        level1[0, 0:2, 32:48, 32:48] = levels[1][0, 0:2, 32:48, 32:48]
        sync()
        builder.publish(DRAFT, also_draft=False)

    return SampleDandiset(
        dandiset_id=dandiset_id,
        bucket=s3.bucket,
        endpoint_url=s3.endpoint_url,
        versions={v: builder.versions[v] for v in VERSIONS},
        nwb=nwb,
    )
