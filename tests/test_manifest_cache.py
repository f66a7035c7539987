"""ManifestCache against hostile roots and shared cache dirs: size-bounded downloads, the oversized
index, the disk store's cap, loads that outlive their requester, one fetch across processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from zarrfs.archive.assets import AssetRecord
from zarrfs.config import S3Settings
from zarrfs.demo.sample import ManifestLeaf, build_manifest, format_manifest, zarr_checksum_of
from zarrfs.errors import ManifestError
from zarrfs.io.cache_dir import read_checked, write_checked
from zarrfs.io.remote import Remote
from zarrfs.manifest_cache import ManifestCache, manifest_url, max_manifest_bytes

WHEN = "2025-11-01T12:00:00+00:00"
NOWHERE = S3Settings(endpoint_url="http://127.0.0.1:9")


def make_zarr(root: Path, n: int, *, pad: int = 0) -> AssetRecord:
    """A manifest of `n` files under a file:// root (padded with `pad` spaces of whitespace)."""
    leaves = [ManifestLeaf(f"0/{i}", f"v{i}", WHEN, i, f"{i:032x}") for i in range(n)]
    zarr_id, checksum = str(uuid.uuid4()), zarr_checksum_of(leaves)
    target = Path(manifest_url(str(root), zarr_id, checksum))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(format_manifest(build_manifest(leaves)) + " " * pad)
    return AssetRecord(
        zarr_id, f"{zarr_id[:4]}.zarr", 0, 0, zarr_id=zarr_id, zarr_checksum=checksum
    )


def cache(remote: Remote, roots: list[Path], cache_dir: Path, **kw: Any) -> ManifestCache:
    return ManifestCache(
        remote,
        roots=[f"file://{r}/" for r in roots],
        cache_dir=cache_dir,
        memory_budget=kw.pop("memory_budget", 1 << 30),
        **kw,
    )


@pytest.mark.trio
async def test_a_manifest_larger_than_its_checksum_allows_is_refused(tmp_path: Path) -> None:
    padded, honest = tmp_path / "padded", tmp_path / "honest"
    asset = make_zarr(padded, 3, pad=2 << 20)  # 3 files cannot take 2 MiB
    assert asset.zarr_checksum is not None
    assert max_manifest_bytes(asset.zarr_checksum) < 2 << 20
    same = Path(manifest_url(str(honest), asset.zarr_id or "", asset.zarr_checksum))
    same.parent.mkdir(parents=True)
    same.write_text(
        Path(manifest_url(str(padded), asset.zarr_id or "", asset.zarr_checksum))
        .read_text()
        .rstrip()
    )
    async with Remote.open(NOWHERE) as remote:
        only_padded = cache(remote, [padded], tmp_path / "c1")
        with pytest.raises(ManifestError, match=r"is more than the .* allowed"):
            await only_padded.get(asset)
        # a good copy in the next root is used
        both = cache(remote, [padded, honest], tmp_path / "c2")
        assert (await both.get(asset)).n_files == 3


@pytest.mark.trio
async def test_an_index_over_the_memory_budget_is_kept_not_reloaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    roots = tmp_path / "roots"
    big, small = make_zarr(roots, 2000), make_zarr(roots, 10)
    async with Remote.open(NOWHERE) as remote:
        manifests = cache(remote, [roots], tmp_path / "c", memory_budget=1000)
        first = await manifests.get(big)
        loads = dict(manifests.stats)
        for _ in range(5):
            assert await manifests.get(big) is first
        assert manifests.stats["disk_loads"] == loads["disk_loads"]
        assert manifests.stats["fetches"] == loads["fetches"] == 1
        warnings = [r for r in caplog.records if "exceeds the manifest memory budget" in r.message]
        assert len(warnings) == 1
        await manifests.get(small)  # the small one fits the LRU; the big one stays
        assert await manifests.get(big) is first


@pytest.mark.trio
@pytest.mark.parametrize("suffix", [".json", ".arrow"])
async def test_the_disk_store_is_capped_least_recently_loaded_first(
    tmp_path: Path, suffix: str
) -> None:
    roots = tmp_path / "roots"
    assets = [make_zarr(roots, 500) for _ in range(4)]
    form = {"document_max_files": 1000 if suffix == ".json" else 0}
    async with Remote.open(NOWHERE) as remote:
        manifests = cache(remote, [roots], tmp_path / "c", **form)
        for i, asset in enumerate(assets):
            await manifests.get(asset)  # stored before it returns (no service nursery)
            path = manifests.stored_path(asset.zarr_id or "", asset.zarr_checksum or "")
            assert path.suffix == suffix
            os.utime(path, (1000 + i, 1000 + i))  # loaded in this order
        size, count = manifests.usage()
        assert count == 4
        capped = cache(remote, [roots], tmp_path / "c", disk_budget=size // 2, **form)
        _, removed = capped.sweep()
        assert removed == 2 and capped.usage()[0] <= size // 2
        kept = [
            a for a in assets if capped.stored_path(a.zarr_id or "", a.zarr_checksum or "").exists()
        ]
        assert kept == assets[2:]


@pytest.mark.trio
async def test_a_small_manifest_is_kept_as_its_document_and_checked_on_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A manifest of at most `document_max_files` files is stored as the document it was fetched
    as, with a content checksum (no converted index, so no pyarrow); loading it checks that and
    verifies the document against its Zarr checksum again. A later cache serves it without fetching;
    a damaged or substituted copy is discarded (logged) and fetched again, never served."""
    roots = tmp_path / "roots"
    asset, other = make_zarr(roots, 50), make_zarr(roots, 60)
    assert asset.zarr_id and asset.zarr_checksum and other.zarr_id and other.zarr_checksum
    published = Path(manifest_url(str(roots), asset.zarr_id, asset.zarr_checksum)).read_bytes()
    another = Path(manifest_url(str(roots), other.zarr_id, other.zarr_checksum)).read_bytes()

    async def load() -> tuple[ManifestCache, int]:
        manifests = cache(remote, [roots], tmp_path / "c", document_max_files=50)
        index = await manifests.get(asset)
        return manifests, index.n_files

    async with Remote.open(NOWHERE) as remote:
        first, n = await load()
        stored = first.stored_path(asset.zarr_id, asset.zarr_checksum)
        assert n == 50 and stored.suffix == ".json" and read_checked(stored) == published
        assert not first.index_path(asset.zarr_id, asset.zarr_checksum).exists()
        assert first.stats["fetches"] == 1
        again, n = await load()
        assert n == 50 and (again.stats["fetches"], again.stats["disk_loads"]) == (0, 1)
        whole = stored.read_bytes()
        for damage, why in (
            # a VersionId is not covered by the Zarr checksum: the content checksum catches it
            (lambda: stored.write_bytes(whole.replace(b'"v1"', b'"v9"')), "does not match its"),
            (lambda: stored.write_bytes(whole[: len(whole) // 2]), "does not match its checksum"),
            (lambda: write_checked(stored, another), "discarding cached manifest"),
        ):
            damage()
            assert stored.read_bytes() != whole
            caplog.clear()
            healed, n = await load()
            assert n == 50 and healed.stats["fetches"] == 1, why
            assert "discarding" in caplog.text and why in caplog.text
            assert stored.read_bytes() == whole  # stored again, whole
        # one more file than documents may have: stored as an index
        bigger = make_zarr(roots, 51)
        assert bigger.zarr_id and bigger.zarr_checksum
        manifests = cache(remote, [roots], tmp_path / "c", document_max_files=50)
        assert (await manifests.get(bigger)).n_files == 51
        big_index = manifests.stored_path(bigger.zarr_id, bigger.zarr_checksum)
        assert big_index.suffix == ".arrow" and big_index.exists()
        # an index that an older zarrfs stored for the small manifest goes at the next sweep
        superseded = manifests.index_path(asset.zarr_id, asset.zarr_checksum)
        (await manifests.get(asset)).write(superseded)
        assert manifests.sweep() == (0, 1)
        assert not superseded.exists() and big_index.exists() and stored.exists()


@pytest.mark.trio
async def test_a_requester_giving_up_does_not_cancel_the_load(tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    asset = make_zarr(roots, 2000)
    async with Remote.open(NOWHERE) as remote:
        manifests = cache(remote, [roots], tmp_path / "c")
        async with trio.open_nursery() as service:
            manifests.service_nursery = service
            with trio.CancelScope() as impatient:
                impatient.cancel()
                await manifests.get(asset)
            assert impatient.cancelled_caught
            index = await manifests.get(asset)  # the same load, finished in the service nursery
            assert index.n_files == 2000 and manifests.stats["fetches"] == 1
            service.cancel_scope.cancel()


@pytest.mark.trio
async def test_an_older_releases_index_of_a_small_manifest_is_still_read(tmp_path: Path) -> None:
    """A cache dir filled by an older release holds small manifests as Arrow indexes (a dir warmed
    on a login node for compute nodes that cannot download): they are read, not fetched again, and
    the sweep keeps them as long as no document replaces them."""
    roots = tmp_path / "roots"
    asset = make_zarr(roots, 50)
    assert asset.zarr_id and asset.zarr_checksum
    async with Remote.open(NOWHERE) as remote:
        older = cache(remote, [roots], tmp_path / "c", document_max_files=0)
        assert (await older.get(asset)).n_files == 50
        index = older.index_path(asset.zarr_id, asset.zarr_checksum)
        assert index.exists()
        offline = cache(remote, [tmp_path / "nowhere"], tmp_path / "c")  # no root has it
        assert offline.keeps_document(asset.zarr_checksum)
        assert (await offline.get(asset)).n_files == 50
        assert (offline.stats["fetches"], offline.stats["disk_loads"]) == (0, 1)
        assert offline.sweep() == (0, 0) and index.exists()


def test_a_damaged_checked_file_reads_as_absent_where_it_cannot_be_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "doc.json"
    write_checked(path, b'{"a": 1}')
    assert read_checked(path) == b'{"a": 1}'
    path.write_bytes(path.read_bytes().replace(b"1}", b"2}"))

    def read_only(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    assert read_checked(path) is None and path.exists()
    assert "does not match its checksum" in caplog.text


@pytest.mark.trio
@pytest.mark.parametrize("writer", ["write_checked", "_write_index"])
async def test_a_small_index_is_served_before_it_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    """The first entry into a Zarr does not wait for its manifest to be written to the cache dir
    (as its document or as an index); the cross-process lock is held until it is, so another
    process finds it there (no fetch)."""
    import zarrfs.manifest_cache as mc

    roots = tmp_path / "roots"
    asset = make_zarr(roots, 500)
    assert asset.zarr_id is not None and asset.zarr_checksum is not None
    release = threading.Event()
    write = getattr(mc, writer)

    def blocked_write(*args: Any) -> Any:
        release.wait(10)
        return write(*args)

    monkeypatch.setattr(mc, writer, blocked_write)
    form = {"document_max_files": 1000 if writer == "write_checked" else 0}
    async with Remote.open(NOWHERE) as remote:
        first = cache(remote, [roots], tmp_path / "c", **form)
        other = cache(remote, [roots], tmp_path / "c", **form)  # another process, same cache dir
        path = first.stored_path(asset.zarr_id, asset.zarr_checksum)
        async with trio.open_nursery() as service:
            first.service_nursery = service
            assert (await first.get(asset)).n_files == 500
            assert not path.exists()  # served while its write still waits
            got: list[int] = []

            async def load_other() -> None:
                got.append((await other.get(asset)).n_files)

            service.start_soon(load_other)
            with trio.fail_after(10):
                while other.stats["lock_waits"] == 0:
                    await trio.sleep(0.01)
            release.set()
            with trio.fail_after(10):
                while not got:
                    await trio.sleep(0.01)
            assert got == [500] and path.exists()
            assert (first.stats["fetches"], other.stats["fetches"]) == (1, 0)
            assert other.stats["disk_loads"] == 1
            service.cancel_scope.cancel()


# --- one fetch across processes ----------------------------------------------------------------


class CountingServer:
    """Serves files under `root` over HTTP slowly, counting GETs per path."""

    def __init__(self, root: Path, delay: float) -> None:
        self.counts: dict[str, int] = {}
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with lock:
                    outer.counts[self.path] = outer.counts.get(self.path, 0) + 1
                time.sleep(delay)
                path = root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_root(tmp_path: Path) -> Iterator[tuple[CountingServer, AssetRecord]]:
    root = tmp_path / "served"
    asset = make_zarr(root, 3000)
    server = CountingServer(root, delay=1.0)
    yield server, asset
    server.close()


def load_in_process(url: str, cache_dir: str, zarr_id: str, checksum: str, start: float) -> int:
    """In a fresh process: wait for the common start time, load the manifest, return its files."""

    async def main() -> int:
        async with Remote.open(NOWHERE) as remote:
            manifests = ManifestCache(
                remote, roots=[url], cache_dir=Path(cache_dir), memory_budget=1 << 30
            )
            await trio.sleep(max(0.0, start - time.time()))
            index = await manifests.get_index(zarr_id, checksum, "test")
            return index.n_files

    return trio.run(main)


def test_processes_sharing_a_cache_dir_fetch_each_manifest_once(
    slow_root: tuple[CountingServer, AssetRecord], tmp_path: Path
) -> None:
    server, asset = slow_root
    start = time.time() + 3.0  # every process is up by then: they all start cold at once
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(
            load_in_process,
            [(server.url, str(tmp_path / "cache-dir"), asset.zarr_id, asset.zarr_checksum, start)]
            * 4,
        )
    assert results == [3000] * 4
    assert sum(server.counts.values()) == 1, server.counts  # one GET for all four processes


def test_max_manifest_bytes_grows_with_the_file_count() -> None:
    from zarrfs import config

    empty = "481a2f77ab786a0f45aafd5db0971caa-0--0"
    assert max_manifest_bytes(empty) == config.MANIFEST_BASE_BYTES
    big = "6ddc4625befef8d6f9796835648162be-1305320--710206390"
    assert max_manifest_bytes(big) > 162_000_000  # the largest real manifest fits
    assert json.dumps(big)
