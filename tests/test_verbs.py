"""The verbs besides mount, as a user runs them: info, cache (info, warm, clear), verify, stats, and
Prometheus metrics; including a remount over a warmed cache with S3 unreachable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ForwardingProxy, Mounted, inject
from zarrfs.demo.sample import ARRAY_PATH, EPHYS_PATH, OME_PATH, V1, SampleDandiset

pytestmark = pytest.mark.fuse
ROOT = "s3://dandiarchive/zarr-manifest/"


def zarrfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "zarrfs", *args], capture_output=True, text=True, check=False
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def connection(sample: SampleDandiset, cache: Path) -> list[str]:
    return [
        "--endpoint-url",
        sample.endpoint_url,
        "--cache-dir",
        str(cache),
        "--manifest-root",
        ROOT,
    ]


def test_info_warm_and_clear_a_source(sample: SampleDandiset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    source = f"{sample.dandiset_id}@{V1}"
    state = sample.versions[V1]
    info = zarrfs("info", source, *connection(sample, cache)).stdout.splitlines()
    assert info[:5] == [
        f"version: {source}",
        "assets: 4",
        f"total size: {sum(a['contentSize'] for a in state.assets)} bytes"
        f" ({sum(a['contentSize'] for a in state.assets) / 2**30:.2f} GiB)",
        "zarrs: 2",
        f"manifests cached locally: 0 of 2 (in {cache})",
    ]
    warm = zarrfs("cache", "warm", source, *connection(sample, cache)).stdout
    assert "indexed the manifests of 2 Zarrs" in warm
    info = zarrfs("info", source, *connection(sample, cache)).stdout
    assert "manifests cached locally: 2 of 2" in info
    data = zarrfs(
        "cache", "warm", "--data", source, "sub-01", "metadata", *connection(sample, cache)
    )
    assert "files" in data.stdout and "into" in data.stdout
    listing = zarrfs("cache", "info", "--cache-dir", str(cache)).stdout
    blocks = next(line for line in listing.splitlines() if line.startswith("disk blocks:"))
    assert int(blocks.split()[2]) > 0
    cleared = zarrfs("cache", "clear", source, *connection(sample, cache)).stdout
    kept = [line for line in cleared.splitlines() if "/manifests/" in line]
    assert len(kept) == 2 and all(line.endswith(".json") for line in kept)  # small: documents
    assert (
        "manifests cached locally: 0 of 2"
        in zarrfs("info", source, *connection(sample, cache)).stdout
    )
    everything = zarrfs("cache", "clear", "--cache-dir", str(cache)).stdout
    assert "blocks" in everything
    assert not (cache / "blocks").exists()


def test_a_warmed_cache_serves_a_remount_with_s3_unreachable(
    mount: Callable[..., Mounted], sample: SampleDandiset, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    source = f"{sample.dandiset_id}@{V1}"
    zarrfs("cache", "warm", "--data", source, "sub-01", *connection(sample, cache))
    mounted = mount(source, "--manifest-root", ROOT, cache_dir=cache, endpoint="http://127.0.0.1:9")
    files = sample.versions[V1].files
    for rel, data in files.items():
        if rel.startswith("sub-01/"):
            assert (mounted.path / rel).read_bytes() == data, rel
    # every byte came from the cache dir: version, manifests, blocks (S3 cannot be reached)


def test_info_of_a_mounted_path(mount: Callable[..., Mounted], sample: SampleDandiset) -> None:
    mounted = mount(f"{sample.dandiset_id}@{V1}", "--manifest-root", ROOT)
    state = sample.versions[V1]
    rel = f"{OME_PATH}/.zgroup"
    lines = zarrfs("info", str(mounted.path / rel)).stdout.splitlines()
    assert "type: file" in lines and f"size: {len(state.files[rel])}" in lines
    assert f"asset_id: {state.asset_ids[OME_PATH]}" in lines
    assert any(line.startswith("s3_url: s3://dandiarchive/zarr/") for line in lines)
    zarr = zarrfs("info", str(mounted.path / OME_PATH)).stdout
    assert f"zarr_checksum: {state.zarr_checksums[OME_PATH]}" in zarr
    root = zarrfs("info", str(mounted.path)).stdout
    assert f"version: {sample.dandiset_id}@{V1}" in root


def test_verify_recomputes_the_published_digests(
    mount: Callable[..., Mounted], sample: SampleDandiset
) -> None:
    mounted = mount(f"{sample.dandiset_id}@{V1}", "--manifest-root", ROOT, "--consolidate")
    state = sample.versions[V1]
    for rel in (OME_PATH, ARRAY_PATH):
        result = zarrfs("verify", str(mounted.path / rel))
        assert f"zarr checksum: {state.zarr_checksums[rel]}" in result.stdout
        assert "verified:" in result.stdout
    inner = zarrfs("verify", str(mounted.path / OME_PATH / "0"))
    assert "zarr checksum:" in inner.stdout and "verified:" in inner.stdout
    blob = zarrfs("verify", str(mounted.path / EPHYS_PATH))
    assert "verified:" in blob.stdout and "1 files" in blob.stdout
    whole = zarrfs("verify", str(mounted.path))
    assert "verified:" in whole.stdout


FLIP = """
import zarrfs.fs.filesystem as f
_read = f.Filesystem.read
async def read(self, handle, offset, size, **kwargs):
    data = await _read(self, handle, offset, size, **kwargs)
    if handle.path.endswith("0/0/0/0/0") and offset == 0 and data:
        data = bytes([data[0] ^ 1]) + data[1:]
    return data
f.Filesystem.read = read
"""


def test_verify_fails_when_the_bytes_differ(
    mount: Callable[..., Mounted], sample: SampleDandiset, tmp_path: Path
) -> None:
    """The control: a daemon made to serve one wrong byte is caught (exit 6, the file named)."""
    mounted = mount(
        f"{sample.dandiset_id}@{V1}", "--manifest-root", ROOT, env=inject(tmp_path / "i", FLIP)
    )
    result = zarrfs("verify", str(mounted.path / OME_PATH), check=False)
    assert result.returncode == 6, result.stdout + result.stderr
    assert "MISMATCH" in result.stdout and "0/0/0/0/0" in result.stdout
    assert "FAILED" in result.stdout


class DamagingProxy(ForwardingProxy):
    """Damages the body of every GET whose path ends with one of `targets` (and drops the checksum
    headers): the daemon can never read those objects, so reading them through the mount is EIO."""

    def __init__(self, upstream: str, *targets: str) -> None:
        super().__init__(upstream, drop_checksums=True)
        self.targets = targets

    def alter(self, path: str, body: bytes) -> bytes:
        if body and path.endswith(self.targets):
            return bytes([body[0] ^ 1]) + body[1:]
        return body


def test_verify_goes_on_past_what_it_cannot_read_and_names_it(
    mount: Callable[..., Mounted], sample: SampleDandiset
) -> None:
    """One chunk the mount answers with EIO (damaged in transit every time) and one Zarr whose
    manifest is damaged (it cannot be listed): verify names each, checks everything else, ends with
    a summary and exits 6, without a traceback."""
    state = sample.versions[V1]
    chunk = f"{OME_PATH}/0/0/0/0/0"
    proxy = DamagingProxy(
        sample.endpoint_url,
        f"zarr/{state.zarr_ids[OME_PATH]}/0/0/0/0/0",
        state.manifest_keys[ARRAY_PATH],
    )
    try:
        mounted = mount(f"{sample.dandiset_id}@{V1}", "--manifest-root", ROOT, endpoint=proxy.url)
        result = zarrfs("verify", str(mounted.path / OME_PATH), check=False)
        assert result.returncode == 6, result.stdout + result.stderr
        out = result.stdout
        assert f"UNREADABLE {mounted.path / chunk}: Input/output error (EIO)" in out, out
        in_zarr = sum(1 for rel in state.files if rel.startswith(OME_PATH + "/"))
        assert (
            f"summary: {in_zarr - 1} files verified, 0 mismatched, 1 unreadable, 0 unexpected"
            in out
        )
        assert "FAILED" in out and "MISMATCH" not in out

        whole = zarrfs("verify", str(mounted.path), check=False)
        assert whole.returncode == 6, whole.stdout + whole.stderr
        out = whole.stdout
        assert f"UNREADABLE {mounted.path / chunk}: Input/output error (EIO)" in out, out
        unlisted = [line for line in out.splitlines() if str(mounted.path / ARRAY_PATH) in line]
        assert len(unlisted) == 1 and unlisted[0].startswith("UNREADABLE "), out
        assert "cannot list" in unlisted[0], out
        checked = sum(
            1
            for rel in state.files
            if not rel.startswith(ARRAY_PATH + "/") and rel.rsplit("/", 1)[-1] != "dandiset.yaml"
        )
        assert f"summary: {checked - 1} files verified, 0 mismatched, 2 unreadable" in out, out
        assert mounted.process.poll() is None
    finally:
        proxy.close()


VANISH = """
import zarrfs.fs.filesystem as f
from zarrfs.errors import NotFound
_lookup = f.Filesystem.lookup
async def lookup(self, parent, name):
    if name == b".zattrs":
        raise NotFound("gone")
    return await _lookup(self, parent, name)
f.Filesystem.lookup = lookup
"""


def test_verify_names_files_that_vanished_from_the_mount(
    mount: Callable[..., Mounted], sample: SampleDandiset, tmp_path: Path
) -> None:
    """Files the mount lists but no longer finds (ENOENT on open): each named with its error, the
    rest verified, exit 6."""
    mounted = mount(
        f"{sample.dandiset_id}@{V1}", "--manifest-root", ROOT, env=inject(tmp_path / "i", VANISH)
    )
    state = sample.versions[V1]
    in_zarr = [rel for rel in state.files if rel.startswith(OME_PATH + "/")]
    gone = [rel for rel in in_zarr if rel.endswith("/.zattrs")]
    assert gone
    result = zarrfs("verify", str(mounted.path / OME_PATH), check=False)
    assert result.returncode == 6, result.stdout + result.stderr
    for rel in gone:
        line = f"UNREADABLE {mounted.path / rel}: No such file or directory (ENOENT)"
        assert line in result.stdout, result.stdout
    assert (
        f"summary: {len(in_zarr) - len(gone)} files verified, 0 mismatched, "
        f"{len(gone)} unreadable, 0 unexpected"
    ) in result.stdout


def test_stats_and_metrics_of_a_running_mount(
    mount: Callable[..., Mounted], sample: SampleDandiset
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mounted = mount(
        f"{sample.dandiset_id}@{V1}", "--manifest-root", ROOT, "--metrics-port", str(port)
    )
    for rel, data in sample.versions[V1].files.items():
        assert (mounted.path / rel).read_bytes() == data
    import time

    deadline = time.monotonic() + 10
    while True:
        lines = dict(
            line.split(": ", 1) for line in zarrfs("stats", str(mounted.path)).stdout.splitlines()
        )
        if int(lines["reads.count"]) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert int(lines["reads.count"]) > 0 and int(lines["s3.requests"]) > 0
    assert lines["reads.errors"] == "0" and lines["internal_errors"] == "0"
    assert "read_latency_seconds.p50" in lines and "memory_hit_ratio" in lines
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "zarrfs_reads_count" in text and "zarrfs_s3_requests" in text
    assert json.loads(json.dumps(lines))  # plain strings, one per line
    assert os.path.ismount(mounted.path)
