"""Reliability at archive scale (each defect of the second review, proved on the core without a
mount unless a mount is what it is about): descriptors bounded whatever the number of Zarrs, a bug in a
background task failing only its own work, a stalled cache dir bypassed, lookups never queued behind
prefetch nor waiting without bound, `--consolidate` surviving eviction and outages, an outage never
answered as "does not exist", nothing kept per name that does not exist, leases on shared indexes.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from zarrfs import config, errors, manifest_cache
from zarrfs.archive import levels
from zarrfs.archive.sources import parse_source
from zarrfs.config import Config, S3Settings
from zarrfs.demo.fake_api import FakeDandiAPI
from zarrfs.demo.locals3 import LocalS3
from zarrfs.demo.sample import (
    OME_PATH,
    PUBLIC_S3_URL,
    V1,
    V2,
    ManifestLeaf,
    SampleDandiset,
    build_manifest,
    format_manifest,
    manifest_key,
)
from zarrfs.errors import DataError, NotFound, RemoteError
from zarrfs.fs.core import open_filesystem
from zarrfs.io.scheduler import Priority, Ticket

ROOT = "s3://dandiarchive/zarr-manifest/"


@pytest.fixture(scope="module")
def api(sample: SampleDandiset) -> Iterator[FakeDandiAPI]:
    with FakeDandiAPI(sample) as fake:
        yield fake


def core_config(
    sample: SampleDandiset, api_url: str, cache: Path, source: str = "dandi", **kw: Any
) -> Config:
    return Config(
        source=parse_source(source),
        mountpoint=Path("/"),
        s3=S3Settings(endpoint_url=sample.endpoint_url, bucket=sample.bucket),
        manifest_roots=kw.pop("manifest_roots", (ROOT,)),
        api_url=api_url,
        cache_dir=cache,
        **kw,
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def zarr_dir(sample: SampleDandiset, version: str = V1) -> str:
    zarr_id = sample.versions[version].zarr_ids[OME_PATH]
    return f"zarrs/{zarr_id[:3]}/{zarr_id[3:6]}/{zarr_id}"


# --- 2. a bug in a background task fails its own work only ------------------------------------


@pytest.mark.trio
@pytest.mark.internal_errors  # injected on purpose
async def test_a_bug_in_a_resolution_fails_that_version_only(
    sample: SampleDandiset, api: FakeDandiAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_filesystem(core_config(sample, api.url, tmp_path)) as fs:
        resolve = fs.catalog.resolve

        async def buggy(source: Any) -> Any:
            if source.version == V2:
                raise RuntimeError("a bug in resolving")
            return await resolve(source)

        monkeypatch.setattr(fs.catalog, "resolve", buggy)
        for _ in range(2):
            with pytest.raises(DataError, match="internal error"):
                await fs.walk(f"dandisets/000123/releases/{V2}/{OME_PATH}")
        # the service nursery (the mount) survived: everything else is served
        assert (
            await fs.getattr(await fs.walk(f"dandisets/000123/releases/{V1}/{OME_PATH}"))
        ).is_dir
    assert sum(errors.internal_errors.values()) == 2
    assert len(errors.internal_errors) == 1  # one place: one traceback, then counts


@pytest.mark.trio
@pytest.mark.internal_errors
async def test_a_bug_in_a_manifest_load_fails_that_zarr_only(
    sample: SampleDandiset, api: FakeDandiAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zarrfs.manifests import parse as manifest

    bad = sample.versions[V2].zarr_checksums[OME_PATH]
    parse = manifest.parse_manifest

    def buggy(data: bytes, **kw: Any) -> Any:
        if kw["expected_checksum"] == bad:
            raise KeyError("a bug in parsing")
        return parse(data, **kw)

    monkeypatch.setattr(manifest, "parse_manifest", buggy)
    async with open_filesystem(core_config(sample, api.url, tmp_path)) as fs:
        with pytest.raises(DataError, match="internal error"):
            await fs.walk(f"dandisets/000123/releases/{V2}/{OME_PATH}/.zattrs")
        await fs.walk(f"dandisets/000123/releases/{V1}/{OME_PATH}/.zattrs")
    assert len(errors.internal_errors) == 1


class BadNextLinkAPI:
    """An API whose draft asset list pages to a `next` URL that does not parse."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(
                    {"count": 2, "next": "http://[::1/api/broken?page=2", "results": []}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.trio
async def test_a_malformed_next_link_is_eio_for_the_draft_only(
    sample: SampleDandiset, tmp_path: Path
) -> None:
    bad = BadNextLinkAPI()
    try:
        async with open_filesystem(core_config(sample, bad.url, tmp_path, "000123")) as fs:
            draft = await fs.walk("draft")
            with pytest.raises(RemoteError, match="not an http"):
                await fs.opendir(draft)
            assert (await fs.getattr(await fs.walk(f"{V1}/{OME_PATH}/0"))).is_dir
    finally:
        bad.close()


# --- 6. a cache dir that stops answering is bypassed, never waited for -------------------------


@pytest.mark.trio
async def test_a_hung_cache_dir_delays_nothing(
    sample: SampleDandiset, api: FakeDandiAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading an index, taking the manifest lock and writing an index all hang (an NFS server that
    stopped answering): a lookup into the Zarr still answers (served from S3 and memory) soon after
    the stall timeout, the event loop never blocks meanwhile, and later lookups do not wait at all."""
    monkeypatch.setattr(config, "DISK_CACHE_STALL_TIMEOUT", 0.5)
    hang = threading.Event()

    def hung(*args: Any, **kw: Any) -> Any:
        hang.wait(30)
        raise OSError("the NFS server came back too late")

    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await trio.sleep(0.01)

    try:
        async with open_filesystem(core_config(sample, api.url, tmp_path, f"000123@{V1}")) as fs:
            monkeypatch.setattr(manifest_cache, "_load_index", hung)
            monkeypatch.setattr(manifest_cache, "_try_flock", hung)
            monkeypatch.setattr(manifest_cache, "_write_index", hung)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                started = time.monotonic()
                with trio.fail_after(5):
                    chunk = await fs.walk(f"{OME_PATH}/0/0/0/0/0")
                    data = await fs.read(await fs.open(chunk), 0, 1 << 20)
                first = time.monotonic() - started
                assert data == sample.versions[V1].files[f"{OME_PATH}/0/0/0/0/0"]
                assert fs.gate is not None and fs.gate.stalled
                started = time.monotonic()
                await fs.opendir(await fs.walk(sample.zarr_paths[1]))  # another: bypassed at once
                assert time.monotonic() - started < 0.4
                nursery.cancel_scope.cancel()
            gaps = [b - a for a, b in itertools.pairwise(ticks)]
            assert max(gaps) < 0.25, f"the event loop blocked for {max(gaps):.2f} s"
            assert first < 3.0
    finally:
        hang.set()


# --- 7. lookups are demand: never behind prefetch, never without a deadline --------------------


@pytest.mark.trio
async def test_a_lookup_is_not_queued_behind_prefetch(
    sample: SampleDandiset, api: FakeDandiAPI, tmp_path: Path
) -> None:
    async with open_filesystem(core_config(sample, api.url, tmp_path, f"000123@{V1}")) as fs:
        slots = fs.reader.slots
        release = trio.Event()

        async def prefetch() -> None:
            async with slots.slot(Ticket(Priority.PREFETCH, flow="blob")):
                await release.wait()

        async with trio.open_nursery() as nursery:
            for _ in range(slots.background_max + 8):  # every background slot taken, more waiting
                nursery.start_soon(prefetch)
            await trio.testing.wait_all_tasks_blocked()
            assert slots.waiting(Priority.PREFETCH) == 8
            with trio.fail_after(10):  # the manifest (and the chunk) are fetched as demand
                await fs.walk(f"{OME_PATH}/0/.zarray")
            release.set()


class SilentServer:
    """Accepts connections and never answers (a manifest root that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"

    def close(self) -> None:
        self.sock.close()


@pytest.mark.trio
async def test_a_lookup_has_a_deadline(
    sample: SampleDandiset, api: FakeDandiAPI, tmp_path: Path
) -> None:
    silent = SilentServer()
    try:
        config_ = core_config(
            sample, api.url, tmp_path, f"000123@{V1}", manifest_roots=(silent.url,)
        )
        async with open_filesystem(config_) as fs:
            fs.read_deadline = 1.5
            zarr = await fs.walk(OME_PATH)
            started = time.monotonic()
            with pytest.raises(RemoteError, match="no answer within"):
                await fs.lookup(zarr, b".zattrs")
            assert time.monotonic() - started < 3.0
    finally:
        silent.close()


# --- 8. --consolidate: the .zmetadata survives eviction, and an outage does not remove it ------


@pytest.mark.trio
async def test_consolidated_metadata_survives_eviction_and_outages(
    sample: SampleDandiset, api: FakeDandiAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_ = core_config(sample, api.url, tmp_path, consolidate=True, version_memory=1)
    v1 = f"dandisets/000123/releases/{V1}/{OME_PATH}"
    v2 = f"dandisets/000123/releases/{V2}/{OME_PATH}"
    async with open_filesystem(config_) as fs:
        read = fs.stack.blocks.read
        failing = {"on": True}

        async def outage(ref: Any, *args: Any, **kw: Any) -> bytes:
            if failing["on"] and ref.key.endswith((".zattrs", ".zgroup", ".zarray")):
                raise RemoteError(f"{ref.key}: S3 unreachable")
            return await read(ref, *args, **kw)

        monkeypatch.setattr(fs.stack.blocks, "read", outage)
        with pytest.raises(RemoteError):
            await fs.walk(f"{v1}/.zmetadata")  # an outage: EIO now, not "no .zmetadata" for good
        failing["on"] = False
        first = await fs.walk(f"{v1}/.zmetadata")
        document = await fs.read(await fs.open(first), 0, 1 << 20)
        assert set(json.loads(document)["metadata"]) >= {".zgroup", "0/.zarray"}
        await fs.walk(f"{v2}/.zmetadata")  # the other version: v1 is evicted (version_memory=1)
        again = await fs.walk(f"{v1}/.zmetadata")  # resolved anew, into the same inodes
        assert again == first and await fs.read(await fs.open(again), 0, 1 << 20) == document


# --- 9. an outage is EIO, never "does not exist" -------------------------------------------------


@pytest.mark.trio
async def test_unreachable_roots_and_api_are_eio_not_enoent(
    sample: SampleDandiset, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    config_ = core_config(sample, f"{dead}/api", tmp_path, manifest_roots=(f"{dead}/manifests/",))
    zarr_id = sample.versions[V1].zarr_ids[OME_PATH]
    checksum = sample.versions[V1].zarr_checksums[OME_PATH]
    async with open_filesystem(config_) as fs:
        level = await fs.walk(f"zarrs/{zarr_id[:3]}/{zarr_id[3:6]}")
        for _ in range(2):  # and not remembered as an answer
            with pytest.raises(RemoteError):
                await fs.lookup(level, zarr_id.encode())
            with pytest.raises(RemoteError):
                await fs.opendir(level)  # not an empty listing
    # the roots unreachable, the API up: a Zarr by exact checksum is EIO, not ENOENT
    with FakeDandiAPI(sample) as api:
        config_ = replace(config_, api_url=api.url)
        async with open_filesystem(config_) as fs:
            ids = await fs.walk(f"zarrs/{zarr_id[:3]}/{zarr_id[3:6]}/{zarr_id}")
            with pytest.raises(RemoteError, match="no manifest root could be asked"):
                await fs.lookup(ids, f"{checksum}.zarr".encode())


@pytest.mark.trio
async def test_current_checksum_is_an_error_when_the_api_is_down(
    sample: SampleDandiset, tmp_path: Path
) -> None:
    config_ = core_config(sample, f"http://127.0.0.1:{closed_port()}/api", tmp_path)
    async with open_filesystem(config_) as fs:
        with pytest.raises(RemoteError):
            await fs.catalog.current_checksum(sample.versions[V1].zarr_ids[OME_PATH])


# --- 10. nothing is kept per name that does not exist -----------------------------------------


@pytest.mark.trio
async def test_probing_names_under_zarrs_keeps_nothing(
    sample: SampleDandiset, api: FakeDandiAPI, tmp_path: Path
) -> None:
    async with open_filesystem(core_config(sample, api.url, tmp_path)) as fs:
        await fs.walk(zarr_dir(sample))  # one that exists
        kept = (fs.levels.kept, fs.inodes._next_plain)
        for i in range(300):
            probe = uuid.UUID(int=i + 1)
            text = str(probe)
            parent = await fs.walk(f"zarrs/{text[:3]}/{text[3:6]}")  # derived: nothing kept
            with pytest.raises(NotFound):
                await fs.lookup(parent, text.encode())
        assert (fs.levels.kept, fs.inodes._next_plain) == kept


@pytest.mark.trio
async def test_failed_manifest_loads_are_bounded(
    sample: SampleDandiset, api: FakeDandiAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "FAILURES_REMEMBERED", 5)
    async with open_filesystem(core_config(sample, api.url, tmp_path)) as fs:
        parent = await fs.walk(zarr_dir(sample))
        for i in range(20):
            with pytest.raises(NotFound):
                await fs.lookup(parent, f"{i:032x}-1--{i}.zarr".encode())
        assert len(fs.manifests._failures) <= 5


def test_the_pins_of_mounts_that_are_gone_are_swept(tmp_path: Path) -> None:
    cache = manifest_cache.ManifestCache(
        None,  # type: ignore[arg-type]  # sweeping needs no remote
        roots=["file:///nowhere/"],
        cache_dir=tmp_path,
        memory_budget=1,
    )
    tmp = tmp_path / "tmp"
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = tmp / manifest_cache.pins_dir_name(dead.pid, "aaaa")  # this host, no such process
    alive = tmp / manifest_cache.pins_dir_name(os.getpid(), "bbbb")
    elsewhere = tmp / "pins-another-host-1-cccc"  # another node's: only its lease counts
    lapsed = tmp / "pins-another-host-2-dddd"
    for directory in (gone, alive, elsewhere, lapsed):
        directory.mkdir(parents=True)
        (directory / "0.json").write_text("{}")
    old = time.time() - 2 * config.STALE_TEMP_AGE
    os.utime(lapsed, (old, old))
    assert cache.sweep_stale_temp_files() == 2
    assert not gone.exists() and not lapsed.exists()
    assert alive.exists() and elsewhere.exists()


# --- 11. an index another process may have mapped is never deleted ------------------------------


def write_manifest(root: Path, n: int) -> tuple[str, str]:
    leaves = [
        ManifestLeaf(f"0/{i}", f"v{i}", "2025-11-01T12:00:00+00:00", i, f"{i:032x}")
        for i in range(n)
    ]
    manifest = build_manifest(leaves)
    zarr_id, checksum = str(uuid.uuid4()), manifest["statistics"]["zarrChecksum"]
    target = Path(manifest_cache.manifest_url(str(root), zarr_id, checksum))
    target.parent.mkdir(parents=True)
    target.write_text(format_manifest(manifest))
    return zarr_id, checksum


@pytest.mark.trio
async def test_mapped_indexes_are_leased_and_never_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zarrfs.io.remote import Remote

    monkeypatch.setattr(config, "INDEX_MAP_MIN", 20_000)  # indexes of 1,000 files are mapped
    roots = tmp_path / "roots"
    big = write_manifest(roots, 1000)
    small = write_manifest(roots, 10)
    async with Remote.open(S3Settings(endpoint_url=f"http://127.0.0.1:{closed_port()}")) as remote:

        def make(**kw: Any) -> manifest_cache.ManifestCache:
            return manifest_cache.ManifestCache(
                remote,
                roots=[f"file://{roots}/"],
                cache_dir=tmp_path / "c",
                memory_budget=1 << 30,
                document_max_files=0,  # stored as indexes, whose leases this is about
                **kw,
            )

        node_a = make()
        mapped = await node_a.get_index(*big, "big")
        in_memory = await node_a.get_index(*small, "small")
        assert mapped.mapped is not None and in_memory.mapped is None
        now = time.time()
        assert os.stat(mapped.mapped).st_mtime > now + config.INDEX_LEASE / 2  # leased
        small_path = node_a.index_path(*small)
        assert os.stat(small_path).st_mtime <= now + 1
        node_b = make(disk_budget=0)  # another node, whose sweep wants everything gone
        _, removed = node_b.sweep()
        assert removed == 1 and not small_path.exists()  # an unleased index goes
        assert mapped.mapped.exists()  # the leased one stays
        assert in_memory.n_files == 10 and in_memory.lookup(0, b"0") is not None  # nothing mapped
        # a lapsed lease (its holder gone) is an ordinary file again
        os.utime(mapped.mapped, (now - 10, now - 10))
        assert node_b.sweep()[1] == 1 and not mapped.mapped.exists()


def test_loaded_indexes_hold_no_descriptor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zarrfs.base.resources import open_descriptors
    from zarrfs.manifests.index import ManifestIndex
    from zarrfs.manifests.parse import parse_manifest

    monkeypatch.setattr(config, "INDEX_MAP_MIN", 20_000)
    loaded = []
    before = open_descriptors()
    for n in (10, 1000) * 20:
        leaves = [
            ManifestLeaf(f"{i}", f"v{i}", "2025-11-01T12:00:00+00:00", i, f"{i:032x}")
            for i in range(n)
        ]
        manifest = build_manifest(leaves)
        checksum = manifest["statistics"]["zarrChecksum"]
        index = parse_manifest(
            format_manifest(manifest).encode(), zarr_id="z", expected_checksum=checksum
        )
        path = tmp_path / f"{len(loaded)}.arrow"
        index.write(path)
        loaded.append(ManifestIndex.load(path, zarr_id="z", checksum=checksum))
    assert sum(i.mapped is not None for i in loaded) == 20
    assert open_descriptors() == before
    assert all(i.lookup(0, b"5") is not None for i in loaded)


# --- 12. an impossible version name is just a name ---------------------------------------------


def test_publication_time_of_an_impossible_version_is_zero() -> None:
    assert levels.publication_time_ns("0.231399.9999") == 0
    assert levels.publication_time_ns("0.231101.1200") > 0


@pytest.mark.trio
async def test_releases_with_an_impossible_version_list(
    local_s3: LocalS3, sample: SampleDandiset, api: FakeDandiAPI, tmp_path: Path
) -> None:
    for version in ("0.231399.9999", "0.231101.1200"):
        prefix = f"dandisets/000781/{version}/"
        local_s3.client.put_object(Bucket=local_s3.bucket, Key=prefix + "assets.jsonld", Body=b"[]")
    async with open_filesystem(core_config(sample, api.url, tmp_path, "000781")) as fs:
        root = await fs.opendir(1)
        names = [name for name, _, _ in await fs.readdir(root, 0)]
        assert names == [b"0.231101.1200", b"0.231399.9999", b"draft"]


# --- 1. descriptors: a version of 1,500 Zarrs under `ulimit -n 1024` --------------------------

ZARRS = 1500


@pytest.fixture(scope="module")
def many_zarrs(local_s3: LocalS3) -> dict[str, bytes]:
    """A published version of ZARRS small Zarrs (one chunk each, its own Zarr id and manifest)."""
    client, bucket = local_s3.client, local_s3.bucket
    now = "2025-11-05T12:00:00+00:00"

    def publish(i: int) -> tuple[dict[str, Any], str, bytes]:
        zarr_id = str(uuid.uuid4())
        body = f"chunk of zarr {i}\n".encode() * (1 + i % 7)
        put = client.put_object(Bucket=bucket, Key=f"zarr/{zarr_id}/0", Body=body)
        leaf = ManifestLeaf("0", put["VersionId"], now, len(body), put["ETag"].strip('"'))
        manifest = build_manifest([leaf])
        checksum = manifest["statistics"]["zarrChecksum"]
        client.put_object(
            Bucket=bucket,
            Key=manifest_key(zarr_id, checksum),
            Body=format_manifest(manifest).encode(),
        )
        path = f"z{i:04d}.zarr"
        record = {
            "identifier": str(uuid.uuid4()),
            "path": path,
            "contentSize": len(body),
            "encodingFormat": "application/x-zarr",
            "contentUrl": [f"{PUBLIC_S3_URL}/zarr/{zarr_id}/"],
            "digest": {"dandi:dandi-zarr-checksum": checksum},
            "dateModified": now,
        }
        return record, path, body

    with ThreadPoolExecutor(16) as pool:
        published = list(pool.map(publish, range(ZARRS)))
    prefix = "dandisets/000782/0.251105.1200/"
    client.put_object(
        Bucket=bucket,
        Key=prefix + "assets.jsonld",
        Body=json.dumps([r for r, _, _ in published]).encode(),
    )
    return {path: body for _, path, body in published}


@pytest.mark.fuse
def test_a_version_of_1500_zarrs_is_walked_under_ulimit_1024(
    many_zarrs: dict[str, bytes], sample: SampleDandiset, tmp_path: Path
) -> None:
    from conftest import inject, require_fuse, start_mount, stop_mount

    require_fuse()
    limited = inject(  # the daemon starts with a soft and hard limit of 1,024 descriptors
        tmp_path / "site",
        "import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))\n",
    )
    mounted = start_mount(
        tmp_path,
        "000782@0.251105.1200",
        "--manifest-root",
        ROOT,
        endpoint=sample.endpoint_url,
        cache=tmp_path / "cache",
        env=limited,
    )
    try:
        status = Path(f"/proc/{mounted.process.pid}/limits").read_text()
        assert any(
            line.startswith("Max open files") and "1024" in line for line in status.splitlines()
        )

        def walk(path: str) -> bytes:
            names = os.listdir(mounted.path / path)
            assert names == ["0"]
            return (mounted.path / path / "0").read_bytes()

        paths = sorted(many_zarrs)
        with ThreadPoolExecutor(8) as pool:
            got = dict(zip(paths, pool.map(walk, paths), strict=True))
        assert got == many_zarrs  # every byte exact
        fds = len(os.listdir(f"/proc/{mounted.process.pid}/fd"))
        assert fds < config.FD_BUDGET, f"the daemon holds {fds} descriptors"
    finally:
        stop_mount(mounted)
