"""Synthetic DANDI data for `scale.py`: a manifest shaped like the largest real one, and a dandiset of
thousands of small Zarrs, written into a `LocalS3` bucket exactly as the archive would hold them.

The big manifest is an OME-Zarr (format 2) of five multiscale levels `0/` .. `4/`, each an array of
chunk keys `<level>/<t>/<c>/<z>/<y>/<x>` (five directory levels below the root, as in the real
1,305,320-entry manifest). Level 0 holds most entries; its `0/0/0/` directory holds exactly
`Z_DIRS` (10,000) z-directories, the directory `ls -l` is timed on. VersionIds are 32 random characters
of `[A-Za-z0-9._]`, ETags random MD5 hex digests, sizes log-normal around 400 KB, lastModified spread
over eight hours, and the file is written the way real manifests are (one space of indent per level,
one entry array per line, about 122 bytes per entry).

Generation is streamed: each level's chunk tree is emitted directory by directory (never a dict of all
entries) and its Merkle digest is computed bottom-up with the reference `zarr_checksum` classes as it is
emitted. The expensive part (the five level subtrees, ~160 MB for 1.3M entries) is cached on disk keyed
by the parameters; per run only the root and level metadata files are real S3 objects (uploaded, so a
read through the mount can be checked), and the manifest is assembled around the cached subtrees.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from zarr_checksum.checksum import ZarrChecksum, ZarrChecksumManifest

from zarrfs.demo.sample import (
    PUBLIC_API_URL,
    PUBLIC_S3_URL,
    SCHEMA_CONTEXT,
    SCHEMA_VERSION,
    ManifestLeaf,
    build_manifest,
    format_iso_micro,
    format_iso_seconds,
    format_manifest,
    manifest_key,
    to_yaml,
    zarr_checksum_of,
)

#: Bump when the generated layout changes (invalidates the on-disk generator cache).
GENERATOR_VERSION = 3
#: z-directories in level 0's `0/0/0/`: the 10,000-entry directory of the `ls -l` figure.
Z_DIRS = 10_000
LEVELS = 5
#: Root files (.zattrs, .zgroup) plus one .zarray per level.
META_FILES = 2 + LEVELS
MIN_ENTRIES = 20_000
BIG_DIR = "0/0/0"  # relative to the Zarr root
_VID_ALPHABET = np.frombuffer(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._", dtype=np.uint8
)
_MTIME_BASE = datetime(2022, 6, 27, 15, 0, 0, tzinfo=UTC)
_MTIME_WINDOW = 8 * 3600


# --- layout -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How `entries` chunk keys are spread over the five levels."""

    entries: int  # total files, metadata included
    side: int  # y and x chunk counts of level 0 (halved, rounded up, per level)
    level0: int  # chunk files in level 0 (ragged: the first `level0 % Z_DIRS` z-dirs get one more)
    per_level: tuple[int, ...]  # chunk files per level (level 0 first)

    @property
    def n_dirs(self) -> int:
        """Directories of the Zarr (root excluded)."""
        n = 0
        for level in range(LEVELS):
            n += 1 + 1 + 1  # <level>, <level>/0 (t), <level>/0/0 (c)
            zs, counts = self.z_counts(level)
            n += zs
            for k in counts:
                n += math.ceil(k / self.xs(level))
        return n

    def xs(self, level: int) -> int:
        return max(1, -(-self.side // (1 << level)))

    def z_counts(self, level: int) -> tuple[int, list[int]]:
        """(z-directories, chunk files per z-directory) of `level`."""
        if level == 0:
            base, extra = divmod(self.level0, Z_DIRS)
            return Z_DIRS, [base + (1 if z < extra else 0) for z in range(Z_DIRS)]
        zs = math.ceil(Z_DIRS / 2**level)
        return zs, [self.xs(level) ** 2] * zs


def plan(entries: int) -> Layout:
    if entries < MIN_ENTRIES:
        raise SystemExit(f"--entries must be at least {MIN_ENTRIES}")
    side = 1
    while True:
        others = [
            math.ceil(Z_DIRS / 2**lv) * max(1, math.ceil(side / 2**lv)) ** 2
            for lv in range(1, LEVELS)
        ]
        level0 = entries - META_FILES - sum(others)
        if level0 < Z_DIRS:
            raise SystemExit(f"--entries {entries} is too small for the layout")
        if level0 <= Z_DIRS * side * side:
            return Layout(entries, side, level0, (level0, *others))
        side += 1


# --- generating one level's chunk subtree ------------------------------------------------------


@dataclass
class Digest:
    digest: str
    count: int
    size: int
    newest: str  # newest lastModified (ISO), for statistics


def _sorted_names(n: int) -> list[str]:
    return sorted(str(i) for i in range(n))


def _random_columns(
    rng: np.random.Generator, n: int
) -> tuple[list[str], list[str], list[int], list[str]]:
    """VersionIds, ETags, sizes and lastModified strings for `n` chunk objects."""
    idx = rng.integers(0, len(_VID_ALPHABET), size=(n, 32), dtype=np.uint8)
    raw = _VID_ALPHABET[idx].tobytes().decode("ascii")
    vids = [raw[i : i + 32] for i in range(0, 32 * n, 32)]
    hexes = rng.bytes(16 * n).hex()
    etags = [hexes[i : i + 32] for i in range(0, 32 * n, 32)]
    sizes = np.clip(rng.lognormal(mean=math.log(400_000), sigma=0.6, size=n), 200, 4 << 20)
    seconds = np.sort(rng.integers(0, _MTIME_WINDOW, size=n))
    base = np.datetime64(_MTIME_BASE.replace(tzinfo=None), "s")
    stamps = np.datetime_as_string(base + seconds.astype("timedelta64[s]"), unit="s")
    mtimes = [f"{s}+00:00" for s in stamps.tolist()]
    return vids, etags, sizes.astype(np.int64).tolist(), mtimes


def write_level_subtree(out: TextIO, layout: Layout, level: int, seed: int) -> Digest:
    """Emit `"0": {...}` (the t-directory of `level`, at indent 3) and return its digest."""
    rng = np.random.default_rng([seed, level])
    n = layout.per_level[level]
    vids, etags, sizes, mtimes = _random_columns(rng, n)
    zs, counts = layout.z_counts(level)
    xs = layout.xs(level)
    row = 0
    pad_z, pad_y, pad_x = " " * 5, " " * 6, " " * 7
    z_digests: list[ZarrChecksum] = []
    newest = ""
    out.write('   "0": {\n    "0": {\n')
    z_names = _sorted_names(zs)
    # rows are assigned in numeric (z, y, x) order, i.e. upload order; emission is in name order
    z_first_row = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    for zi, z in enumerate(z_names):
        zn = int(z)
        k = counts[zn]
        ys = math.ceil(k / xs)
        out.write(f'{pad_z}"{z}": {{\n')
        y_digests: list[ZarrChecksum] = []
        y_names = _sorted_names(ys)
        for yi, y in enumerate(y_names):
            yn = int(y)
            width = min(xs, k - yn * xs)
            x_names = _sorted_names(width)
            out.write(f'{pad_y}"{y}": {{\n')
            files: list[ZarrChecksum] = []
            lines = []
            for x in x_names:
                row = z_first_row[zn] + yn * xs + int(x)
                vid, etag, size, mtime = vids[row], etags[row], sizes[row], mtimes[row]
                lines.append(f'{pad_x}"{x}": ["{vid}", "{mtime}", {size}, "{etag}"]')
                files.append(ZarrChecksum(digest=etag, name=x, size=size))
                if mtime > newest:
                    newest = mtime
            out.write(",\n".join(lines))
            out.write(f"\n{pad_y}}}" + (",\n" if yi < len(y_names) - 1 else "\n"))
            d = ZarrChecksumManifest(files=files).generate_digest()
            y_digests.append(ZarrChecksum(digest=d.digest, name=y, size=d.size))
        out.write(f"{pad_z}}}" + (",\n" if zi < len(z_names) - 1 else "\n"))
        d = ZarrChecksumManifest(directories=y_digests).generate_digest()
        z_digests.append(ZarrChecksum(digest=d.digest, name=z, size=d.size))
    out.write("    }\n   }")
    c = ZarrChecksumManifest(directories=z_digests).generate_digest()
    t = ZarrChecksumManifest(
        directories=[ZarrChecksum(digest=c.digest, name="0", size=c.size)]
    ).generate_digest()
    assert t.count == n, (t.count, n)
    return Digest(t.digest, t.count, t.size, newest)


def generated_subtrees(
    cache_root: Path, entries: int, seed: int, log: Any = print
) -> tuple[Layout, list[Path], list[Digest]]:
    """The five level subtrees for (entries, seed): from the generator cache, or generated now."""
    layout = plan(entries)
    key = f"v{GENERATOR_VERSION}-e{entries}-s{seed}"
    folder = cache_root / key
    meta_path = folder / "meta.json"
    paths = [folder / f"level-{lv}.jsonfrag" for lv in range(LEVELS)]
    if meta_path.exists() and all(p.exists() for p in paths):
        meta = json.loads(meta_path.read_text())
        return layout, paths, [Digest(**d) for d in meta["digests"]]
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    digests = []
    started = time.monotonic()
    for lv in range(LEVELS):
        with open(tmp / paths[lv].name, "w", buffering=1 << 20) as out:
            digests.append(write_level_subtree(out, layout, lv, seed))
        log(
            f"  generated level {lv}: {layout.per_level[lv]:,} chunk entries ({time.monotonic() - started:.0f} s)"
        )
    (tmp / "meta.json").write_text(
        json.dumps({"layout": asdict(layout), "digests": [asdict(d) for d in digests]})
    )
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return layout, paths, digests


# --- the big Zarr in the bucket ---------------------------------------------------------------


@dataclass
class BigZarr:
    zarr_id: str
    checksum: str
    entries: int
    n_dirs: int
    total_size: int
    manifest_bytes: int
    manifest_key: str
    real_files: dict[str, bytes]  # path in the Zarr -> bytes (objects that really exist)
    layout: Layout


def _zattrs() -> bytes:
    axes = [
        {"name": "t", "type": "time", "unit": "second"},
        {"name": "c", "type": "channel"},
        {"name": "z", "type": "space", "unit": "micrometer"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    datasets = [
        {
            "path": str(lv),
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, 1.0, 2.0 * 2**lv, 0.4 * 2**lv, 0.4 * 2**lv]}
            ],
        }
        for lv in range(LEVELS)
    ]
    attrs = {"multiscales": [{"version": "0.4", "name": "big", "axes": axes, "datasets": datasets}]}
    return json.dumps(attrs, indent=4).encode()


def _zarray(layout: Layout, level: int) -> bytes:
    zs, _ = layout.z_counts(level)
    xs = layout.xs(level)
    meta = {
        "chunks": [1, 1, 1, 1024, 1024],
        "compressor": {"blocksize": 0, "clevel": 5, "cname": "zstd", "id": "blosc", "shuffle": 1},
        "dimension_separator": "/",
        "dtype": "<u2",
        "fill_value": 0,
        "filters": None,
        "order": "C",
        "shape": [1, 1, zs, xs * 1024, xs * 1024],
        "zarr_format": 2,
    }
    return json.dumps(meta, indent=4).encode()


def _leaf(s3: Any, zarr_id: str, path: str, body: bytes) -> tuple[list[Any], ZarrChecksum]:
    key = f"zarr/{zarr_id}/{path}"
    put = s3.client.put_object(Bucket=s3.bucket, Key=key, Body=body)
    head = s3.client.head_object(Bucket=s3.bucket, Key=key, VersionId=put["VersionId"])
    etag = put["ETag"].strip('"')
    assert etag == hashlib.md5(body).hexdigest()
    row = [put["VersionId"], format_iso_seconds(head["LastModified"]), len(body), etag]
    return row, ZarrChecksum(digest=etag, name=path.rsplit("/", 1)[-1], size=len(body))


def _row(row: list[Any]) -> str:
    return json.dumps(row)  # ", " separators, like the real files


def put_big_zarr(
    s3: Any, work: Path, gen_cache: Path, entries: int, seed: int, log: Any = print
) -> BigZarr:
    """Assemble the big manifest around the cached level subtrees, upload it and its real objects."""
    layout, frags, digests = generated_subtrees(gen_cache, entries, seed, log)
    zarr_id = str(uuid.uuid4())
    real = {".zattrs": _zattrs(), ".zgroup": b'{\n    "zarr_format": 2\n}'}
    for lv in range(LEVELS):
        real[f"{lv}/.zarray"] = _zarray(layout, lv)
    rows = {}
    sums = {}
    for path, body in real.items():
        rows[path], sums[path] = _leaf(s3, zarr_id, path, body)
    level_digests = []
    for lv in range(LEVELS):
        d = ZarrChecksumManifest(
            files=[sums[f"{lv}/.zarray"]],
            directories=[ZarrChecksum(digest=digests[lv].digest, name="0", size=digests[lv].size)],
        ).generate_digest()
        level_digests.append(ZarrChecksum(digest=d.digest, name=str(lv), size=d.size))
    root = ZarrChecksumManifest(
        files=[sums[".zattrs"], sums[".zgroup"]], directories=level_digests
    ).generate_digest()
    assert root.count == entries, (root.count, entries)
    newest = max([d.newest for d in digests] + [r[1] for r in rows.values()])
    stats = {
        "entries": root.count,
        "depth": 5,
        "totalSize": root.size,
        "lastModified": newest,
        "zarrChecksum": root.digest,
    }
    manifest_file = work / "big-manifest.json"
    with open(manifest_file, "w", buffering=1 << 20) as out:
        out.write(
            '{\n "schemaVersion": 2,\n "fields": ["versionId", "lastModified", "size", "ETag"],\n'
        )
        out.write(' "statistics": {\n')
        out.write(",\n".join(f'  "{k}": {json.dumps(v)}' for k, v in stats.items()))
        out.write('\n },\n "entries": {\n')
        out.write(f'  ".zattrs": {_row(rows[".zattrs"])},\n  ".zgroup": {_row(rows[".zgroup"])},\n')
        for lv in range(LEVELS):
            out.write(f'  "{lv}": {{\n   ".zarray": {_row(rows[f"{lv}/.zarray"])},\n')
            with open(frags[lv]) as frag:
                shutil.copyfileobj(frag, out, 1 << 20)
            out.write("\n  }" + (",\n" if lv < LEVELS - 1 else "\n"))
        out.write(" }\n}\n")
    key = manifest_key(zarr_id, root.digest)
    from boto3.s3.transfer import TransferConfig

    s3.client.upload_file(
        str(manifest_file),
        s3.bucket,
        key,
        ExtraArgs={"ContentType": "application/json"},
        Config=TransferConfig(multipart_threshold=1 << 40),
    )
    size = manifest_file.stat().st_size
    manifest_file.unlink()
    return BigZarr(
        zarr_id=zarr_id,
        checksum=root.digest,
        entries=root.count,
        n_dirs=layout.n_dirs,
        total_size=root.size,
        manifest_bytes=size,
        manifest_key=key,
        real_files=real,
        layout=layout,
    )


# --- dandisets ------------------------------------------------------------------------------


def zarr_record(
    path: str, zarr_id: str, checksum: str, size: int, modified: datetime
) -> dict[str, Any]:
    """An `assets.jsonld` item for a Zarr, in the shape `zarrfs.demo.sample` writes."""
    asset_id = str(uuid.uuid4())
    return {
        "@context": SCHEMA_CONTEXT,
        "contentSize": size,
        "contentUrl": [
            f"{PUBLIC_API_URL}/assets/{asset_id}/download/",
            f"{PUBLIC_S3_URL}/zarr/{zarr_id}/",
        ],
        "dateModified": format_iso_micro(modified),
        "digest": {"dandi:dandi-zarr-checksum": checksum},
        "encodingFormat": "application/x-zarr",
        "id": f"dandiasset:{asset_id}",
        "identifier": asset_id,
        "path": path,
        "schemaKey": "Asset",
        "schemaVersion": SCHEMA_VERSION,
    }


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def put_version(
    s3: Any, dandiset_id: str, version: str, records: list[dict[str, Any]], name: str
) -> None:
    """Write `assets.jsonld`, `assets.yaml`-less metadata: `dandiset.yaml`, `dandiset.jsonld`, `assets.jsonld`."""
    url = f"https://dandiarchive.org/dandiset/{dandiset_id}/{version}"
    published = datetime.strptime(version, "0.%y%m%d.%H%M").replace(tzinfo=UTC)
    metadata = {
        "@context": SCHEMA_CONTEXT,
        "access": [{"schemaKey": "AccessRequirements", "status": "dandi:OpenAccess"}],
        "assetsSummary": {
            "schemaKey": "AssetsSummary",
            "numberOfBytes": sum(int(r["contentSize"]) for r in records),
            "numberOfFiles": len(records),
            "dataStandard": [
                {
                    "schemaKey": "StandardsType",
                    "name": "OME/NGFF Standard",
                    "identifier": "DOI:10.25504/FAIRsharing.9af712",
                }
            ],
        },
        "citation": f"Doe, Jane (2025) {name} (Version {version}) [Data set]. DANDI Archive. {url}",
        "contributor": [
            {
                "schemaKey": "Person",
                "name": "Doe, Jane",
                "roleName": ["dcite:ContactPerson", "dcite:Creator"],
                "includeInCitation": True,
            }
        ],
        "datePublished": format_iso_micro(published),
        "description": f"{name}: synthetic dandiset for the zarrfs scale benchmark.",
        "doi": f"10.48324/dandi.{dandiset_id}/{version}",
        "id": f"DANDI:{dandiset_id}/{version}",
        "identifier": f"DANDI:{dandiset_id}",
        "license": ["spdx:CC-BY-4.0"],
        "name": name,
        "repository": "https://dandiarchive.org/",
        "schemaKey": "Dandiset",
        "schemaVersion": SCHEMA_VERSION,
        "url": url,
        "version": version,
    }
    prefix = f"dandisets/{dandiset_id}/{version}/"
    files = {
        "dandiset.jsonld": (_json_bytes(metadata), "application/json"),
        "dandiset.yaml": (to_yaml(metadata).encode(), "text/yaml"),
        "assets.jsonld": (_json_bytes(records), "application/json"),
    }
    for fname, (body, kind) in files.items():
        s3.client.put_object(Bucket=s3.bucket, Key=prefix + fname, Body=body, ContentType=kind)


def put_big_dandiset(s3: Any, big: BigZarr, dandiset_id: str, version: str) -> None:
    record = zarr_record(
        "big.zarr", big.zarr_id, big.checksum, big.total_size, datetime(2022, 6, 28, tzinfo=UTC)
    )
    put_version(s3, dandiset_id, version, [record], "zarrfs scale benchmark: one 1.3M-entry Zarr")


def put_many_zarrs_dandiset(
    s3: Any, dandiset_id: str, version: str, n_zarrs: int, seed: int, with_manifests: int = 3
) -> list[dict[str, Any]]:
    """A dandiset of `n_zarrs` small OME-Zarrs, each with its own id and checksum.

    Only the first `with_manifests` get a manifest in the bucket: a mount must fetch none.
    """
    rng = np.random.default_rng([seed, 99])
    records = []
    per_subject = 10
    modified = datetime(2024, 3, 1, tzinfo=UTC)
    for i in range(n_zarrs):
        subject, sample = divmod(i, per_subject)
        path = (
            f"sub-{subject:04d}/ses-01/micr/"
            f"sub-{subject:04d}_ses-01_sample-{sample:02d}_SPIM.ome.zarr"
        )
        vids, etags, sizes, mtimes = _random_columns(rng, 4)
        names = [".zattrs", ".zgroup", "0/.zarray", "0/0/0/0/0/0"]
        leaves = [
            ManifestLeaf(path=p, version_id=v, last_modified=m, size=int(sz), etag=e)
            for p, v, e, sz, m in zip(names, vids, etags, sizes, mtimes, strict=True)
        ]
        zarr_id = str(uuid.uuid4())
        checksum = zarr_checksum_of(leaves)
        if i < with_manifests:
            body = format_manifest(build_manifest(leaves)).encode()
            s3.client.put_object(Bucket=s3.bucket, Key=manifest_key(zarr_id, checksum), Body=body)
        records.append(
            zarr_record(
                path,
                zarr_id,
                checksum,
                sum(x.size for x in leaves),
                modified + timedelta(minutes=i),
            )
        )
    put_version(s3, dandiset_id, version, records, f"zarrfs scale benchmark: {n_zarrs} Zarrs")
    return records
