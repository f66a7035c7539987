"""zarrfs archive-mount benchmark: the whole archive as one lazy mount, over 20 ms per request.

    python benchmarks/archive.py [--quick] [--dandisets N] [--entered N] [--keys N] [--json OUT]

Starts a local S3 (moto, own process) and the fake DANDI API, both answering 20 ms late, holding
1,000 dandisets (200 of them with a published version in the bucket) and one draft Zarr of 100,000
small objects with no manifest anywhere. Mounts the archive (`zarrfs mount dandi MNT ...`) with cold
caches and prints one table of figures (see benchmarks/README.md):

- mount-to-ready of the archive mount;
- the first `ls -l` of `dandisets/`, and the API and S3 requests it made;
- daemon RSS after entering the 200 dandisets, with the default and with small `--version-memory`;
- building the draft Zarr's manifest by listing the bucket: time, ListObjectVersions requests, the
  daemon's own log lines, and a raw boto3 listing of the same prefix (what moto costs).

Nothing is written to RESULTS.md automatically; `--json OUT` writes the figures as JSON. Every daemon
is unmounted and ended by its PID, the servers are stopped, and the scratch directory is deleted
unless `--keep`. Never changes zarrfs or the bucket's layout rules: it only builds data, mounts, and
reads. Single-threaded apart from the upload pool and the fake API's server threads.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import boto3
import numpy as np
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig
from scale import Report, fmt_s, machine_info, proc_status, say, spread

from zarrfs.demo.fake_api import FakeDandiAPI
from zarrfs.demo.locals3 import WRITER_KEY, LocalS3
from zarrfs.demo.sample import (
    PUBLIC_API_URL,
    PUBLIC_S3_URL,
    SCHEMA_CONTEXT,
    SCHEMA_VERSION,
    ManifestLeaf,
    blob_key,
    format_api_time,
    format_iso_micro,
    to_yaml,
    zarr_checksum_of,
)

LATENCY = 0.02
FULL = {"dandisets": 1000, "entered": 200, "keys": 100_000, "repeat": 3}
QUICK = {"dandisets": 1000, "entered": 50, "keys": 10_000, "repeat": 2}
#: `--version-memory` of the RSS runs: the default, the issue's small one, and one the entered
#: versions certainly overflow.
VERSION_MEMORIES = ("256M", "8M", "1M")
#: `max_page_size` of the fake API in the `ls` runs: the archive's (zarrfs asks for 1,000 a page) and
#: DRF's default page size, for an API that ignored `page_size`.
PAGE_SIZES = (1000, 100)
SEED_THREADS = 32
MOUNT_DEADLINE = 120.0
MB = 1 << 20
BUCKET = "dandiarchive"
ZARR_DANDISET_VERSION = "draft"
ZARR_ASSET_PATH = "sub-BIG/sub-BIG_sample-1_SPIM.ome.zarr"
CHUNKS_PER_Z = 2500  # y, x in 0..49 below each z directory


# --- the archive's content --------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """One published version written into the bucket (an entered dandiset)."""

    dandiset_id: str
    version: str
    records: list[dict[str, Any]]
    #: Files and directories a walk of the version sees (dandiset.yaml included, root excluded).
    n_files: int
    n_dirs: int


@dataclass(frozen=True)
class BigZarr:
    """The draft Zarr with no manifest: its keys (sizes and MD5s), id and checksum."""

    zarr_id: str
    dandiset_id: str
    leaves: list[ManifestLeaf]
    checksum: str
    seed: int

    @property
    def total_size(self) -> int:
        return sum(leaf.size for leaf in self.leaves)


def zarr_body(seed: int, path: str, size: int) -> bytes:
    """The bytes of a Zarr key: reproducible from its path, so nothing is kept in memory."""
    return hashlib.shake_256(f"{seed}:{path}".encode()).digest(size)


def zarr_keys(n: int) -> list[str]:
    """An OME-Zarr-like layout of `n` keys: three metadata files and chunks 0/0/0/<z>/<y>/<x>."""
    meta = [".zattrs", ".zgroup", "0/.zarray"]
    chunks = [
        f"0/0/0/{i // CHUNKS_PER_Z}/{i % CHUNKS_PER_Z // 50}/{i % 50}" for i in range(n - len(meta))
    ]
    return meta + chunks


def make_big_zarr(n_keys: int, dandiset_id: str, seed: int) -> BigZarr:
    rng = np.random.default_rng([seed, 7])
    sizes = rng.integers(64, 1024, size=n_keys)
    leaves = []
    for path, size in zip(zarr_keys(n_keys), sizes, strict=True):
        body = zarr_body(seed, path, int(size))
        leaves.append(ManifestLeaf(path, "?", "", len(body), hashlib.md5(body).hexdigest()))
    zarr_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    return BigZarr(zarr_id, dandiset_id, leaves, zarr_checksum_of(leaves), seed)


def blob_record(
    path: str, size: int, modified: datetime, rng: np.random.Generator
) -> dict[str, Any]:
    """An `assets.jsonld` item for an NWB blob, with the fields the archive writes."""
    asset_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    blob_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    parts = max(1, -(-size // (64 << 20)))
    return {
        "@context": SCHEMA_CONTEXT,
        "access": [{"schemaKey": "AccessRequirements", "status": "dandi:OpenAccess"}],
        "approach": [{"name": "electrophysiological approach", "schemaKey": "ApproachType"}],
        "blobDateModified": format_iso_micro(modified - timedelta(days=3)),
        "contentSize": size,
        "contentUrl": [
            f"{PUBLIC_API_URL}/assets/{asset_id}/download/",
            f"{PUBLIC_S3_URL}/{blob_key(blob_id)}",
        ],
        "dateModified": format_iso_micro(modified),
        "digest": {
            "dandi:dandi-etag": f"{rng.bytes(16).hex()}-{parts}",
            "dandi:sha2-256": rng.bytes(32).hex(),
        },
        "encodingFormat": "application/x-nwb",
        "id": f"dandiasset:{asset_id}",
        "identifier": asset_id,
        "measurementTechnique": [
            {"name": "spike sorting technique", "schemaKey": "MeasurementTechniqueType"}
        ],
        "path": path,
        "schemaKey": "Asset",
        "schemaVersion": SCHEMA_VERSION,
        "variableMeasured": ["ElectricalSeries", "Units"],
        "wasAttributedTo": [
            {"identifier": path.split("/")[0][4:], "schemaKey": "Participant", "sex": {}}
        ],
        "wasGeneratedBy": [
            {
                "name": "Metadata generation",
                "schemaKey": "Activity",
                "startDate": modified.isoformat(),
            }
        ],
    }


def api_row(record: dict[str, Any], *, zarr_id: str | None = None) -> dict[str, Any]:
    modified = record["dateModified"]
    blob = None if zarr_id else record["contentUrl"][1].rsplit("/", 1)[-1]
    stamp = format_api_time(datetime.fromisoformat(modified))
    return {
        "asset_id": record["identifier"],
        "blob": blob,
        "zarr": zarr_id,
        "path": record["path"],
        "size": record["contentSize"],
        "created": stamp,
        "modified": stamp,
        "metadata": record,
    }


def version_metadata(
    dandiset_id: str, version: str, records: list[dict[str, Any]]
) -> dict[str, Any]:
    url = f"https://dandiarchive.org/dandiset/{dandiset_id}/{version}"
    published = (
        datetime.strptime(version, "0.%y%m%d.%H%M").replace(tzinfo=UTC)
        if version != "draft"
        else None
    )
    name = f"Synthetic dandiset {dandiset_id} of the zarrfs archive benchmark"
    metadata: dict[str, Any] = {
        "@context": SCHEMA_CONTEXT,
        "access": [{"schemaKey": "AccessRequirements", "status": "dandi:OpenAccess"}],
        "assetsSummary": {
            "schemaKey": "AssetsSummary",
            "numberOfBytes": sum(int(r["contentSize"]) for r in records),
            "numberOfFiles": len(records),
            "dataStandard": [
                {
                    "schemaKey": "StandardsType",
                    "name": "Neurodata Without Borders (NWB)",
                    "identifier": "RRID:SCR_015242",
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
        "dateCreated": "2025-01-06T09:00:00+00:00",
        "description": f"{name}.",
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
    if published is not None:
        metadata["datePublished"] = format_iso_micro(published)
        metadata["doi"] = f"10.48324/dandi.{dandiset_id}/{version}"
    return metadata


@dataclass
class Archive:
    """What the fake API and the bucket hold."""

    ids: list[str]
    entered: list[Version]
    big: BigZarr
    api_dandisets: dict[str, dict[str, Any]]
    api_zarrs: dict[str, dict[str, Any]]
    #: S3 key -> body, for everything but the big Zarr's keys.
    objects: dict[str, bytes] = field(default_factory=dict)


def make_archive(n_dandisets: int, n_entered: int, n_keys: int, seed: int) -> Archive:
    """`n_dandisets` dandisets (ids 000001...); every `n_dandisets // n_entered`-th has one published
    version in the bucket with 4-60 NWB assets; the first one that has none holds the big Zarr in
    its draft."""
    rng = np.random.default_rng([seed, 1])
    ids = [f"{i:06d}" for i in range(1, n_dandisets + 1)]
    step = max(1, n_dandisets // max(1, n_entered))
    entered_ids = set(ids[::step][:n_entered])
    zarr_dandiset = next(i for i in ids if i not in entered_ids)
    big = make_big_zarr(n_keys, zarr_dandiset, seed)
    api: dict[str, dict[str, Any]] = {}
    objects: dict[str, bytes] = {}
    entered: list[Version] = []
    base = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
    for n, dandiset_id in enumerate(ids):
        created = base + timedelta(hours=7 * n)
        draft_records: list[dict[str, Any]] = []
        versions: dict[str, dict[str, Any]] = {}
        latest: str | None = None
        if dandiset_id in entered_ids:
            published = created + timedelta(days=30)
            version = published.strftime("0.%y%m%d.%H%M")
            n_assets = int(np.clip(rng.lognormal(np.log(16), 0.8), 4, 60))
            subjects = max(1, n_assets // int(rng.integers(1, 5)))
            records = []
            for a in range(n_assets):
                subject = f"sub-{a % subjects:03d}"
                path = f"{subject}/{subject}_ses-{a // subjects:02d}_ecephys.nwb"
                size = int(rng.lognormal(np.log(200 * MB), 1.5))
                records.append(blob_record(path, size, created + timedelta(minutes=a), rng))
            records.sort(key=lambda r: str(r["path"]))
            metadata = version_metadata(dandiset_id, version, records)
            prefix = f"dandisets/{dandiset_id}/{version}/"
            objects[prefix + "assets.jsonld"] = (json.dumps(records, indent=2) + "\n").encode()
            objects[prefix + "dandiset.jsonld"] = (json.dumps(metadata, indent=2) + "\n").encode()
            objects[prefix + "dandiset.yaml"] = to_yaml(metadata).encode()
            dirs = {r["path"].split("/")[0] for r in records}
            entered.append(Version(dandiset_id, version, records, len(records) + 1, len(dirs)))
            versions[version] = {"metadata": metadata, "assets": [api_row(r) for r in records]}
            draft_records = records
            latest = version
        draft_rows = [api_row(r) for r in draft_records]
        if dandiset_id == zarr_dandiset:
            record = zarr_record(big, created)
            draft_records = [record]
            draft_rows = [api_row(record, zarr_id=big.zarr_id)]
        draft_metadata = version_metadata(dandiset_id, "draft", draft_records)
        objects[f"dandisets/{dandiset_id}/draft/dandiset.yaml"] = to_yaml(draft_metadata).encode()
        versions["draft"] = {"metadata": draft_metadata, "assets": draft_rows}
        api[dandiset_id] = {"most_recent_published_version": latest, "versions": versions}
    zarrs = {
        big.zarr_id: {
            "name": ZARR_ASSET_PATH.rsplit("/", 1)[-1],
            "dandiset": big.dandiset_id,
            "zarr_id": big.zarr_id,
            "status": "Complete",
            "checksum": big.checksum,
            "file_count": len(big.leaves),
            "size": big.total_size,
        }
    }
    return Archive(ids, entered, big, api, zarrs, objects)


def zarr_record(big: BigZarr, modified: datetime) -> dict[str, Any]:
    asset_id = str(uuid.uuid5(uuid.NAMESPACE_URL, big.zarr_id))
    return {
        "@context": SCHEMA_CONTEXT,
        "contentSize": big.total_size,
        "contentUrl": [
            f"{PUBLIC_API_URL}/assets/{asset_id}/download/",
            f"{PUBLIC_S3_URL}/zarr/{big.zarr_id}/",
        ],
        "dateModified": format_iso_micro(modified),
        "digest": {"dandi:dandi-zarr-checksum": big.checksum},
        "encodingFormat": "application/x-zarr",
        "id": f"dandiasset:{asset_id}",
        "identifier": asset_id,
        "path": ZARR_ASSET_PATH,
        "schemaKey": "Asset",
        "schemaVersion": SCHEMA_VERSION,
    }


# --- seeding ----------------------------------------------------------------------------------------


def writer(s3: LocalS3) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=WRITER_KEY,
        aws_secret_access_key=WRITER_KEY,
        region_name="us-east-1",
        config=BotoConfig(max_pool_connections=SEED_THREADS, retries={"max_attempts": 10}),
    )


def put_many(s3: LocalS3, items: Iterator[tuple[str, bytes]], total: int, what: str) -> float:
    """PUT every (key, body) with a thread pool; checks each ETag; returns seconds."""
    client = writer(s3)
    started = time.perf_counter()
    done = 0

    def put(item: tuple[str, bytes]) -> None:
        key, body = item
        etag = client.put_object(Bucket=s3.bucket, Key=key, Body=body)["ETag"].strip('"')
        if etag != hashlib.md5(body).hexdigest():
            raise RuntimeError(f"PUT {key}: ETag {etag} is not the MD5 of the body")

    with ThreadPoolExecutor(SEED_THREADS) as pool:
        for _ in pool.map(put, items):
            done += 1
            if done % 10_000 == 0:
                elapsed = time.perf_counter() - started
                say(f"  {what}: {done:,}/{total:,} ({done / elapsed:.0f}/s)")
    return time.perf_counter() - started


def big_zarr_items(big: BigZarr) -> Iterator[tuple[str, bytes]]:
    for leaf in big.leaves:
        yield f"zarr/{big.zarr_id}/{leaf.path}", zarr_body(big.seed, leaf.path, leaf.size)


# --- counting requests --------------------------------------------------------------------------


class S3Requests:
    """Counts the requests the local S3 answers, with moto's own request recorder (enabled by
    `MOTO_RECORDER_FILEPATH` in the server's environment and started over `/moto-api/`)."""

    def __init__(self, endpoint: str, path: Path) -> None:
        self.endpoint = endpoint
        self.path = path
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _post(self, action: str) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/recorder/{action}", data=b"", method="POST"
        )
        with self._opener.open(request, timeout=60) as response:
            response.read()

    def start(self) -> None:
        self._post("reset-recording")
        self._post("start-recording")

    def stop(self) -> Counter[str]:
        """Stop recording; the requests since `start`, by kind."""
        self._post("stop-recording")
        kinds: Counter[str] = Counter()
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                entry = json.loads(line)
                kinds[request_kind(entry["method"], entry["url"])] += 1
        return kinds


def request_kind(method: str, url: str) -> str:
    split = urlsplit(url)
    query = parse_qs(split.query, keep_blank_values=True)
    parts = split.path.lstrip("/").split("/", 1)
    on_bucket = len(parts) == 1 or not parts[1]
    if method == "GET" and on_bucket:
        if "versions" in query:
            return "ListObjectVersions"
        if query.get("list-type") == ["2"]:
            return "ListObjectsV2"
        return "ListObjects" if not query else "GET " + ",".join(sorted(query))
    if method == "GET":
        return "GetObject"
    if method == "HEAD":
        return "HeadObject"
    return method


def kinds_text(kinds: Counter[str]) -> str:
    if not kinds:
        return "none"
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))


def api_kinds(paths: list[str]) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for path in paths:
        route = re.sub(r"/[0-9]{6}/", "/<id>/", urlsplit(path).path)
        route = re.sub(r"/zarr/[0-9a-f-]{36}/", "/zarr/<id>/", route)
        route = re.sub(r"/versions/[^/]+/", "/versions/<v>/", route)
        kinds[route] += 1
    return kinds


# --- daemons ------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def find_daemon(mnt: Path) -> int | None:
    """The PID of the background daemon serving `mnt` (a descendant of ours: its command line
    names the mountpoint and carries `--ready-fd`)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(mnt).encode() in argv and b"--ready-fd" in argv:
            return int(entry.name)
    return None


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@dataclass
class Daemon:
    """One archive mount: `python -m zarrfs mount dandi MNT ...`, in the background (the command
    returns once the mount is live) or with `-f` (ready when `os.path.ismount`)."""

    mnt: Path
    cache: Path
    log: Path
    endpoint: str
    api_url: str
    extra: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    pid: int | None = None

    def command(self, *, foreground: bool) -> list[str]:
        return [
            sys.executable, "-m", "zarrfs", "mount", "dandi", str(self.mnt),
            *(["-f"] if foreground else ["--log-file", str(self.log)]),
            "--endpoint-url", self.endpoint,
            "--api-url", self.api_url,
            "--cache-dir", str(self.cache),
            "--manifest-root", f"s3://{BUCKET}/zarr-manifest/",
            *self.extra,
        ]  # fmt: skip

    def start_background(self) -> float:
        """`zarrfs mount` as a user runs it; returns the seconds until it returned (mount live)."""
        self.mnt.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        done = subprocess.run(self.command(foreground=False), capture_output=True, check=False)
        elapsed = time.perf_counter() - started
        self.pid = find_daemon(self.mnt)
        if done.returncode != 0 or not os.path.ismount(self.mnt):
            raise RuntimeError(
                f"zarrfs mount failed ({done.returncode}): {done.stderr.decode()}\n{self.output()}"
            )
        return elapsed

    def start_foreground(self) -> float:
        """Spawn with `-f` and poll `os.path.ismount`; returns spawn-to-ready seconds."""
        self.mnt.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            started = time.perf_counter()
            self.process = subprocess.Popen(
                self.command(foreground=True), stdout=out, stderr=subprocess.STDOUT
            )
        self.pid = self.process.pid
        deadline = started + MOUNT_DEADLINE
        while not os.path.ismount(self.mnt):
            if self.process.poll() is not None:
                raise RuntimeError(f"zarrfs exited ({self.process.returncode}):\n{self.output()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"not mounted within {MOUNT_DEADLINE} s:\n{self.output()}")
            time.sleep(0.002)
        return time.perf_counter() - started

    def status(self) -> dict[str, int]:
        assert self.pid is not None
        return proc_status(self.pid)

    def cpu(self) -> float:
        assert self.pid is not None
        return cpu_seconds(self.pid)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        """Unmount (which ends the daemon); a daemon still there after 30 s is ended by PID."""
        if os.path.ismount(self.mnt):
            subprocess.run(
                ["fusermount3", "-u", "-z", str(self.mnt)], check=False, capture_output=True
            )
        pid, self.pid = self.pid, None
        process, self.process = self.process, None
        if process is not None:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        elif pid is not None and not wait_gone(pid, 30):
            os.kill(pid, 15)
            if not wait_gone(pid, 10):
                os.kill(pid, 9)


# --- measurements ---------------------------------------------------------------------------------


def run_ls(path: Path) -> tuple[float, int]:
    """`ls -l PATH` (readdir, then lstat of every entry); seconds and lines printed."""
    started = time.perf_counter()
    done = subprocess.run(
        ["ls", "-l", str(path)], capture_output=True, env={**os.environ, "LC_ALL": "C"}, check=False
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"ls -l {path} failed: {done.stderr.decode(errors='replace')[:2000]}")
    return elapsed, done.stdout.count(b"\n")


def walk_version(root: Path) -> tuple[int, int]:
    """List every directory of a version and stat every file: (files, directories) seen."""
    files = dirs = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    dirs += 1
                    stack.append(Path(entry.path))
                else:
                    os.stat(entry.path)
                    files += 1
    return files, dirs


def raw_list_versions(endpoint: str, prefix: str) -> tuple[float, int, int]:
    """An anonymous boto3 ListObjectVersions of `prefix`, every page: seconds, pages, live keys."""
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-2",
        config=BotoConfig(signature_version=UNSIGNED),
    )
    started = time.perf_counter()
    pages = keys = 0
    params: dict[str, Any] = {"Bucket": BUCKET, "Prefix": prefix}
    while True:
        page = client.list_object_versions(**params)
        pages += 1
        keys += sum(1 for v in page.get("Versions", []) if v.get("IsLatest"))
        if not page.get("IsTruncated"):
            return time.perf_counter() - started, pages, keys
        params["KeyMarker"] = page["NextKeyMarker"]
        params["VersionIdMarker"] = page["NextVersionIdMarker"]


def mib(n: float) -> str:
    return f"{n / MB:.1f} MiB"


# --- the benchmark --------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    scratch: Path
    s3: LocalS3
    api: FakeDandiAPI
    archive: Archive
    requests: S3Requests
    report: Report = field(default_factory=Report)
    results: dict[str, Any] = field(default_factory=dict)
    daemons: list[Daemon] = field(default_factory=list)
    count: int = 0

    def daemon(self, tag: str, *extra: str) -> Daemon:
        self.count += 1
        d = Daemon(
            mnt=self.scratch / f"mnt-{tag}-{self.count}",
            cache=self.scratch / f"cache-{tag}-{self.count}",
            log=self.scratch / f"zarrfs-{tag}-{self.count}.log",
            endpoint=self.s3.endpoint_url,
            api_url=self.api.url,
            extra=extra,
        )
        self.daemons.append(d)
        return d

    def counted(self, action: Callable[[], Any]) -> tuple[Any, Counter[str], Counter[str]]:
        """Run `action`; its result, and the S3 and API requests made meanwhile, by kind."""
        api_before = len(self.api.requests)
        self.requests.start()
        try:
            result = action()
        finally:
            s3_kinds = self.requests.stop()
        return result, s3_kinds, api_kinds(self.api.requests[api_before:])

    # A ------------------------------------------------------------------------------------------

    def mount_to_ready(self) -> None:
        repeat = self.args.repeat + 2
        say(f"A: mount-to-ready of the archive mount, x{repeat} each way, fresh cache dirs")
        background, foreground, rss = [], [], []
        kinds: Counter[str] = Counter()
        api: Counter[str] = Counter()
        for _ in range(repeat):
            d = self.daemon("A")
            t, s3_kinds, api_kinds_ = self.counted(d.start_background)
            background.append(t)
            kinds += s3_kinds
            api += api_kinds_
            if d.pid is not None:
                rss.append(d.status()["VmRSS"])
            assert sorted(os.listdir(d.mnt)) == ["dandisets", "zarrs"]
            d.stop()
            d = self.daemon("A-f")
            foreground.append(d.start_foreground())
            d.stop()
        self.report.add(
            "mount-to-ready, archive mount: `zarrfs mount dandi MNT` returns (mount live)",
            spread(background),
        )
        self.report.add(
            "mount-to-ready, archive mount: `-f`, spawn to `ismount`", spread(foreground)
        )
        self.report.add(
            "requests while mounting (all runs)",
            f"S3: {kinds_text(kinds)}; API: {kinds_text(api)}",
        )
        if rss:
            self.report.add("daemon RSS at ready (VmRSS)", f"{mib(max(rss))} (max of {len(rss)})")
        self.results["mount_to_ready"] = {
            "background_s": background,
            "foreground_s": foreground,
            "rss_at_ready": rss,
            "s3_requests": dict(kinds),
            "api_requests": dict(api),
        }

    # B ------------------------------------------------------------------------------------------

    def first_ls(self) -> None:
        n = len(self.archive.ids)
        say(f"B: first `ls -l dandisets/` of {n:,} dandisets, {LATENCY * 1000:.0f} ms per request")
        out: dict[str, Any] = {}
        page_url = f"{self.api.url}/dandisets/?page_size=1000"
        for page_size in PAGE_SIZES:
            self.api.max_page_size = page_size
            cold, warm, cpu = [], [], []
            kinds: Counter[str] = Counter()
            api: Counter[str] = Counter()
            for _ in range(self.args.repeat):
                d = self.daemon(f"B{page_size}")
                d.start_foreground()
                cpu_before = d.cpu()
                (t, lines), s3_kinds, api_kinds_ = self.counted(
                    functools.partial(run_ls, d.mnt / "dandisets")
                )
                cpu.append(d.cpu() - cpu_before)
                if lines != n + 1:  # "total 0" and one line per dandiset
                    raise RuntimeError(f"ls -l printed {lines} lines, expected {n + 1}")
                cold.append(t)
                kinds, api = s3_kinds, api_kinds_
                warm.append(run_ls(d.mnt / "dandisets")[0])
                d.stop()
            # what the requests alone cost: the same API pages fetched by a plain HTTP client
            fetch = []
            for _ in range(self.args.repeat):
                started = time.perf_counter()
                url: str | None = page_url
                while url:
                    with urllib.request.urlopen(url, timeout=60) as response:
                        url = json.loads(response.read())["next"]
                fetch.append(time.perf_counter() - started)
            label = f"API pages of {page_size:,}"
            self.report.add(f"first `ls -l dandisets/`, {n:,} dandisets, {label}", spread(cold))
            self.report.add(
                f"  requests it made ({label})", f"API: {kinds_text(api)}; S3: {kinds_text(kinds)}"
            )
            self.report.add(f"  the same API pages fetched by urllib ({label})", spread(fetch))
            self.report.add(f"  daemon CPU time during the first `ls -l` ({label})", spread(cpu))
            self.report.add(
                f"  second `ls -l dandisets/` on the same mount ({label})", spread(warm)
            )
            out[str(page_size)] = {
                "first_ls_s": cold,
                "second_ls_s": warm,
                "daemon_cpu_s": cpu,
                "urllib_pages_s": fetch,
                "api_requests": dict(api),
                "s3_requests": dict(kinds),
            }
        self.api.max_page_size = PAGE_SIZES[0]
        self.results["first_ls"] = out

    # C ------------------------------------------------------------------------------------------

    def enter_dandisets(self) -> None:
        versions = self.archive.entered
        nodes = sum(v.n_files + v.n_dirs + 1 for v in versions)
        say(
            f"C: enter {len(versions)} dandisets (list releases/<v>/, stat every file), "
            f"--version-memory {', '.join(VERSION_MEMORIES)}"
        )
        out: dict[str, Any] = {
            "versions": len(versions),
            "assets": sum(len(v.records) for v in versions),
            "nodes": nodes,
            "runs": {},
        }
        for budget in VERSION_MEMORIES:
            d = self.daemon(f"C{budget}", "--version-memory", budget)
            d.start_foreground()
            at_ready = d.status()
            run_ls(d.mnt / "dandisets")
            after_ls = d.status()
            started = time.perf_counter()
            cpu_before = d.cpu()

            def enter_all(d: Daemon = d) -> tuple[list[float], list[tuple[int, int]]]:
                per_dandiset: list[float] = []
                timeline: list[tuple[int, int]] = []
                for i, version in enumerate(versions, 1):
                    root = d.mnt / "dandisets" / version.dandiset_id / "releases" / version.version
                    t0 = time.perf_counter()
                    files, dirs = walk_version(root)
                    per_dandiset.append(time.perf_counter() - t0)
                    if (files, dirs) != (version.n_files, version.n_dirs):
                        raise RuntimeError(
                            f"{root}: {files} files, {dirs} dirs; "
                            f"expected {version.n_files}, {version.n_dirs}"
                        )
                    if i % 50 == 0 or i == len(versions):
                        timeline.append((i, d.status()["VmRSS"]))
                return per_dandiset, timeline

            (per_dandiset, timeline), s3_kinds, api = self.counted(enter_all)
            total = time.perf_counter() - started
            cpu = d.cpu() - cpu_before
            end = d.status()
            entered = d.output().count("entered dandisets/")
            d.stop()
            self.report.add(
                f"daemon RSS after entering {len(versions)} dandisets, --version-memory {budget}",
                f"VmRSS {mib(end['VmRSS'])} (at ready {mib(at_ready['VmRSS'])}, after `ls` "
                f"{mib(after_ls['VmRSS'])}; every 50: "
                + ", ".join(mib(r) for _, r in timeline)
                + f"); VmHWM {mib(end['VmHWM'])}; RssAnon {mib(end['RssAnon'])}, "
                f"RssFile {mib(end['RssFile'])}",
            )
            self.report.add(
                f"  entering them ({budget}): time, requests",
                f"{fmt_s(total)} in all, {fmt_s(statistics.median(per_dandiset))} median per "
                f"dandiset, daemon CPU {cpu:.1f} s; S3: {kinds_text(s3_kinds)}; "
                f"API: {kinds_text(api)}; versions resolved (log): {entered}",
            )
            out["runs"][budget] = {
                "rss_at_ready": at_ready["VmRSS"],
                "rss_after_ls": after_ls["VmRSS"],
                "rss_timeline": timeline,
                "end": end,
                "seconds": total,
                "per_dandiset_s": per_dandiset,
                "daemon_cpu_s": cpu,
                "s3_requests": dict(s3_kinds),
                "api_requests": dict(api),
                "resolved": entered,
            }
        self.report.notes.append(
            f"entered versions: {out['assets']:,} assets in all ({out['assets'] / len(versions):.0f} "
            f"per version), {nodes:,} nodes; at 400 B per node (`tree.NODE_BYTES`, the LRU's weight) "
            f"that is {mib(nodes * 400)} of `--version-memory`"
        )
        self.results["enter"] = out

    # D ------------------------------------------------------------------------------------------

    def listing(self) -> None:
        big = self.archive.big
        n = len(big.leaves)
        say(f"D: seed the {n:,}-key draft Zarr (no manifest anywhere)")
        seed_s = put_many(self.s3, big_zarr_items(big), n, "zarr keys")
        say(f"  seeded in {seed_s:.0f} s ({n / seed_s:.0f} PUT/s)")
        self.results["listing"] = {"keys": n, "seed_s": seed_s}
        say("D: build its manifest by listing, through the mount")
        d = self.daemon("D")
        d.start_foreground()
        zroot = d.mnt / "dandisets" / big.dandiset_id / ZARR_DANDISET_VERSION / ZARR_ASSET_PATH
        resolve_s = time.perf_counter()
        assert os.stat(zroot).st_mode & 0o040000  # resolves the draft, needs no manifest
        resolve_s = time.perf_counter() - resolve_s
        before = d.status()
        cpu_before = d.cpu()
        started = time.perf_counter()
        names, s3_kinds, api = self.counted(lambda: sorted(os.listdir(zroot)))
        elapsed = time.perf_counter() - started
        cpu = d.cpu() - cpu_before
        after = d.status()
        if names != [".zattrs", ".zgroup", "0"]:
            raise RuntimeError(f"listing of the Zarr root: {names}")
        for leaf in (big.leaves[0], big.leaves[len(big.leaves) // 2], big.leaves[-1]):
            if (zroot / leaf.path).read_bytes() != zarr_body(big.seed, leaf.path, leaf.size):
                raise RuntimeError(f"{leaf.path}: bytes differ from what was written")
        log = d.output()
        d.stop()
        listed = re.search(
            r"listed .* (\d+) keys, \d+ bytes, (\d+) requests in ([\d.]+) s \((\d+) keys/s\)", log
        )
        indexed = re.search(r"indexed manifest of .* in ([\d.]+) s", log)
        if listed is None or int(listed.group(1)) != n:
            raise RuntimeError(f"no 'listed ... {n} keys' line in the daemon log:\n{log[-3000:]}")
        say("D: a raw boto3 ListObjectVersions of the same prefix")
        raw_s, raw_pages, raw_keys = raw_list_versions(self.s3.endpoint_url, f"zarr/{big.zarr_id}/")
        if raw_keys != n:
            raise RuntimeError(f"raw listing found {raw_keys} keys, expected {n}")
        log_lines = [
            line
            for line in log.splitlines()
            if re.search(r"zarrfs\.(zarr_listing|manifest_cache)", line)
        ]
        self.report.add(
            f"manifest of a {n:,}-key draft Zarr built by listing: first `ls` of its root",
            f"{fmt_s(elapsed)} (daemon CPU {cpu:.1f} s)",
        )
        self.report.add("  requests", f"S3: {kinds_text(s3_kinds)}; API: {kinds_text(api)}")
        self.report.add(
            "  daemon log: listing / conversion (parse, verify, index)",
            f"{listed.group(3)} s for {listed.group(2)} requests ({listed.group(4)} keys/s) / "
            f"{indexed.group(1) if indexed else '?'} s",
        )
        self.report.add(
            "  raw boto3 ListObjectVersions of the same prefix (moto + latency only)",
            f"{fmt_s(raw_s)}, {raw_pages} pages ({raw_s / raw_pages * 1000:.0f} ms a page)",
        )
        self.report.add(
            "  daemon RSS before / after the listing / VmHWM",
            f"{mib(before['VmRSS'])} / {mib(after['VmRSS'])} / {mib(after['VmHWM'])} (RssAnon "
            f"{mib(before['RssAnon'])} -> {mib(after['RssAnon'])}, RssFile "
            f"{mib(before['RssFile'])} -> {mib(after['RssFile'])})",
        )
        self.report.notes.append(
            f"resolving the draft (stat of the Zarr root) took {fmt_s(resolve_s)}"
        )
        self.report.notes.extend(f"daemon log: {line}" for line in log_lines)
        self.results["listing"].update(
            {
                "first_ls_s": elapsed,
                "daemon_cpu_s": cpu,
                "resolve_draft_s": resolve_s,
                "s3_requests": dict(s3_kinds),
                "api_requests": dict(api),
                "log_listing_s": float(listed.group(3)),
                "log_requests": int(listed.group(2)),
                "log_keys_per_s": int(listed.group(4)),
                "log_index_s": float(indexed.group(1)) if indexed else None,
                "raw_list_s": raw_s,
                "raw_pages": raw_pages,
                "rss_before": before["VmRSS"],
                "rss_after": after["VmRSS"],
                "vmhwm": after["VmHWM"],
                "log_lines": log_lines,
            }
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 50 dandisets entered, 10,000 keys"
    )
    p.add_argument("--dandisets", type=int, help="dandisets the API lists (default 1,000)")
    p.add_argument("--entered", type=int, help="dandisets entered (default 200; --quick 50)")
    p.add_argument(
        "--keys", type=int, help="keys of the draft Zarr (default 100,000; --quick 10,000)"
    )
    p.add_argument(
        "--repeat", type=int, help="repetitions of the cheap figures (default 3; --quick 2)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the figures as JSON")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "zarrfs-bench-archive",
                   help="scratch space (default %(default)s)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the scratch dir (logs, caches)")
    p.add_argument(
        "--only", choices=["ready", "ls", "enter", "listing"], action="append",
        help="run only these parts (repeatable)",
    )  # fmt: skip
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    args.dandisets = args.dandisets or sizes["dandisets"]
    args.entered = min(args.entered or sizes["entered"], args.dandisets - 1)
    args.keys = max(10, args.keys or sizes["keys"])
    args.repeat = max(1, args.repeat or sizes["repeat"])
    parts = args.only or ["ready", "ls", "enter", "listing"]

    say("zarrfs archive-mount benchmark")
    info = machine_info()
    for k, v in info:
        say(f"  {k}: {v}")
    params = (
        f"dandisets={args.dandisets:,} entered={args.entered} keys={args.keys:,} "
        f"repeat={args.repeat} latency={LATENCY * 1000:.0f} ms (S3 and API) seed={args.seed}"
    )
    say(f"  parameters: {params}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=args.work_dir))
    recording = scratch / "moto-requests.jsonl"
    os.environ["MOTO_RECORDER_FILEPATH"] = str(recording)  # read by the S3 server process
    started = time.perf_counter()
    say("setup: generating the archive")
    archive = make_archive(args.dandisets, args.entered, args.keys, args.seed)
    s3 = LocalS3(latency=LATENCY)
    api = FakeDandiAPI(archive.api_dandisets, archive.api_zarrs, latency=LATENCY)
    bench: Bench | None = None
    try:
        s3.start()
        api.start()
        say(f"  local S3 {s3.endpoint_url} (pid {s3.pid}), fake API {api.url}")
        t = put_many(s3, iter(archive.objects.items()), len(archive.objects), "metadata")
        say(f"  {len(archive.objects):,} metadata objects in {t:.1f} s")
        bench = Bench(args, scratch, s3, api, archive, S3Requests(s3.endpoint_url, recording))
        if "ready" in parts:
            bench.mount_to_ready()
        if "ls" in parts:
            bench.first_ls()
        if "enter" in parts:
            bench.enter_dandisets()
        if "listing" in parts:
            bench.listing()
    finally:
        for d in bench.daemons if bench is not None else []:
            try:
                d.stop()
            except Exception as e:  # keep cleaning up
                say(f"cleanup of {d.mnt}: {e}")
        api.stop()
        s3.stop()
        if args.keep:
            say(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    assert bench is not None
    say("")
    say(f"zarrfs archive-mount benchmark{' (QUICK)' if args.quick else ''}, {params}")
    for k, v in info:
        say(f"  {k}: {v}")
    say(f"  total run time: {time.perf_counter() - started:.0f} s")
    say("")
    say(bench.report.table())
    say("")
    for note in bench.report.notes:
        say(f"- {note}")
    if args.json:
        document = {
            "machine": dict(info),
            "parameters": {
                "dandisets": args.dandisets,
                "entered": args.entered,
                "keys": args.keys,
                "repeat": args.repeat,
                "latency_s": LATENCY,
                "seed": args.seed,
                "quick": args.quick,
            },
            "figures": bench.results,
            "table": [f.__dict__ for f in bench.report.figures],
            "notes": bench.report.notes,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
