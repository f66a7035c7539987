"""Real FUSE mounts of the sample dandiset, read by real clients (zarr-python, h5py, zarr_checksum).

Every mount runs `python -m zarrfs mount` in a subprocess against the session's local S3. V1 and V2
are mounted side by side once for the module (`pair`); tests that need their own mount (draft,
latest, a tampered manifest, the cache-only remount, background mode) make it and always unmount.
The oracle is always the exact bytes the sample published (`SampleVersion.files`), never zarrfs.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import select
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from zarr_checksum.tree import ZarrChecksumTree

from conftest import (
    EXIT_DEADLINE,
    MOUNT_DEADLINE,
    Mounted,
    processes_mentioning,
    require,
    start_mount,
    stop_mount,
    wait_until_no_process_mentions,
)
from conftest import zarrfs_command as zarrfs
from zarrfs.demo.locals3 import LocalS3
from zarrfs.demo.sample import (
    ARRAY_PATH,
    BLOB_PATHS,
    DRAFT,
    EPHYS_PATH,
    OME_ALWAYS_ABSENT,
    OME_DRAFT_OVERWRITTEN,
    OME_PATH,
    OME_V2_ADDED,
    OME_V2_DELETED,
    OME_V2_OVERWRITTEN,
    V1,
    V2,
    ZARR_PATHS,
    SampleDandiset,
    build_sample,
)
from zarrfs.faces import runtime

pytestmark = pytest.mark.fuse

TAMPER_ID = "000777"
TAMPER_BUCKET = "zarrfs-tampered"


# --- helpers --------------------------------------------------------------------------------------


def raise_error(e: OSError) -> None:
    raise e


def walk(root: Path) -> tuple[dict[str, os.stat_result], dict[str, os.stat_result]]:
    """(files, directories) under `root`, relative POSIX paths -> lstat; errors are raised."""
    files: dict[str, os.stat_result] = {}
    dirs: dict[str, os.stat_result] = {}
    for dirpath, _dirnames, filenames in os.walk(root, onerror=raise_error):
        rel = Path(dirpath).relative_to(root).as_posix()
        dirs["" if rel == "." else rel] = os.lstat(dirpath)
        for name in filenames:
            full = Path(dirpath) / name
            files[full.relative_to(root).as_posix()] = os.lstat(full)
    return files, dirs


def implied_dirs(paths: Iterator[str] | list[str]) -> set[str]:
    out = {""}
    for path in paths:
        parts = path.split("/")
        out.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return out


def manifest_entries(manifest: bytes) -> dict[str, list[Any]]:
    """Relative path -> [versionId, lastModified, size, ETag] of a schema-2 manifest."""
    out: dict[str, list[Any]] = {}

    def visit(node: dict[str, Any], prefix: str) -> None:
        for name, value in node.items():
            if isinstance(value, dict):
                visit(value, f"{prefix}{name}/")
            else:
                out[prefix + name] = value

    visit(json.loads(manifest)["entries"], "")
    return out


def iso_ns(value: str) -> int:
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def assert_errno(code: int, action: Callable[..., object], *args: object) -> None:
    """`action(*args)` raises OSError with errno `code`."""
    with pytest.raises(OSError) as info:
        action(*args)
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"


def chunk_key(zarr_id: str, rel: str) -> str:
    return f"zarr/{zarr_id}/{rel}"


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, sample: SampleDandiset
) -> Iterator[dict[str, Path]]:
    """V1 and V2 mounted side by side (separate caches) for the whole module."""
    live: list[Mounted] = []
    try:
        for version in (V1, V2):
            base = tmp_path_factory.mktemp(f"pair-{version}")
            live.append(
                start_mount(
                    base,
                    f"{sample.dandiset_id}@{version}",
                    "--xattr",
                    endpoint=sample.endpoint_url,
                    cache=base / "cache",
                )
            )
        yield {V1: live[0].path, V2: live[1].path}
    finally:
        for mounted in live:
            stop_mount(mounted)


@dataclass
class Tampered:
    s3: LocalS3
    sample: SampleDandiset
    #: The checksum the tampered V1 OME manifest's entries recompute to.
    recomputed: str


@pytest.fixture(scope="module")
def tampered() -> Iterator[Tampered]:
    """A second sample (`000777`) whose V1 OME-Zarr manifest has one ETag changed in S3.

    It lives in its own local S3 and bucket, so tampering cannot disturb the session sample (and the
    mount exercises `--bucket`).
    """
    with LocalS3(bucket=TAMPER_BUCKET) as s3:
        sample = build_sample(s3, TAMPER_ID)
        v1 = sample.versions[V1]
        doc = json.loads(v1.manifests[OME_PATH])
        entry = doc["entries"][".zattrs"]
        entry[3] = hashlib.md5(b"not the published .zattrs").hexdigest()  # same name, same size
        s3.client.put_object(
            Bucket=s3.bucket, Key=v1.manifest_keys[OME_PATH], Body=json.dumps(doc, indent=1)
        )
        tree = ZarrChecksumTree()
        for rel, (_vid, _modified, size, etag) in manifest_entries(
            json.dumps(doc).encode()
        ).items():
            tree.add_leaf(path=Path(rel), size=size, digest=etag)
        recomputed = tree.process().digest
        assert recomputed != v1.zarr_checksums[OME_PATH]
        yield Tampered(s3=s3, sample=sample, recomputed=recomputed)


# --- 1. the tree is the manifests -----------------------------------------------------------------


@pytest.mark.parametrize("version", [V1, V2])
def test_tree_sizes_modes_and_mtimes_equal_the_manifests(
    pair: dict[str, Path], sample: SampleDandiset, version: str
) -> None:
    state = sample.versions[version]
    files, dirs = walk(pair[version])
    assert sorted(files) == sorted(state.files)
    assert set(dirs) == implied_dirs(list(state.files))
    for rel, st in files.items():
        assert stat.S_ISREG(st.st_mode), rel
        assert stat.S_IMODE(st.st_mode) == 0o444, rel
        assert st.st_size == len(state.files[rel]), rel
    for rel, st in dirs.items():
        assert stat.S_ISDIR(st.st_mode), rel
        assert stat.S_IMODE(st.st_mode) == 0o555, rel
    for zarr_path in ZARR_PATHS:
        entries = manifest_entries(state.manifests[zarr_path])
        inside = {r[len(zarr_path) + 1 :] for r in files if r.startswith(zarr_path + "/")}
        assert inside == set(entries)
        for rel, (_vid, modified, size, _etag) in entries.items():
            st = files[f"{zarr_path}/{rel}"]
            assert st.st_mtime_ns == iso_ns(modified), rel
            assert st.st_size == size, rel
    for record in state.assets:
        if record["path"] in BLOB_PATHS:
            st = files[record["path"]]
            assert st.st_mtime_ns == iso_ns(record["blobDateModified"])
            assert st.st_size == record["contentSize"]


def test_readdir_lists_every_entry_of_every_directory(
    pair: dict[str, Path], sample: SampleDandiset
) -> None:
    state = sample.versions[V1]
    children: dict[str, set[str]] = {d: set() for d in implied_dirs(list(state.files))}
    for path in [*state.files, *children]:
        if path:
            parent, _, name = path.rpartition("/")
            children[parent].add(name)
    for directory, names in children.items():
        full = pair[V1] / directory
        with os.scandir(full) as it:
            listed = {e.name: e.is_dir(follow_symlinks=False) for e in it}
        assert set(listed) == names, directory
        for name, is_dir in listed.items():
            assert is_dir == (f"{directory}/{name}".lstrip("/") in children), name


# --- 2. bytes of the pinned versions --------------------------------------------------------------


def test_the_sample_really_edited_the_live_keys(local_s3: LocalS3, sample: SampleDandiset) -> None:
    """Precondition of the pinning tests: V1's bytes are no longer what the live keys hold."""
    v1, v2 = sample.versions[V1], sample.versions[V2]
    zarr_id = v1.zarr_ids[OME_PATH]
    for rel in OME_V2_OVERWRITTEN:
        live = local_s3.client.get_object(Bucket=local_s3.bucket, Key=chunk_key(zarr_id, rel))
        assert live["Body"].read() != v1.files[f"{OME_PATH}/{rel}"]
        assert v1.files[f"{OME_PATH}/{rel}"] != v2.files[f"{OME_PATH}/{rel}"]
    for rel in OME_V2_DELETED:
        with pytest.raises(local_s3.client.exceptions.NoSuchKey):
            local_s3.client.get_object(Bucket=local_s3.bucket, Key=chunk_key(zarr_id, rel))


@pytest.mark.parametrize("version", [V1, V2])
def test_every_file_has_the_bytes_of_its_pinned_version(
    pair: dict[str, Path], sample: SampleDandiset, version: str
) -> None:
    state = sample.versions[version]
    for rel, data in state.files.items():
        assert (pair[version] / rel).read_bytes() == data, rel


def test_deleted_and_added_chunks_exist_only_in_their_versions(
    pair: dict[str, Path], sample: SampleDandiset
) -> None:
    v1, v2 = sample.versions[V1], sample.versions[V2]
    for rel in OME_V2_DELETED:
        key = f"{OME_PATH}/{rel}"
        assert key in v1.files and key not in v2.files
        assert (pair[V1] / key).read_bytes() == v1.files[key]
        assert_errno(errno.ENOENT, os.stat, pair[V2] / key)
        assert_errno(errno.ENOENT, (pair[V2] / key).read_bytes)
    for rel in OME_V2_ADDED:
        key = f"{OME_PATH}/{rel}"
        assert key in v2.files and key not in v1.files
        assert (pair[V2] / key).read_bytes() == v2.files[key]
        assert_errno(errno.ENOENT, os.stat, pair[V1] / key)
        assert_errno(errno.ENOENT, (pair[V1] / key).read_bytes)


def test_partial_reads_at_odd_offsets(pair: dict[str, Path], sample: SampleDandiset) -> None:
    data = sample.versions[V1].files[EPHYS_PATH]
    with open(pair[V1] / EPHYS_PATH, "rb", buffering=0) as f:
        for offset, size in [(0, 1), (1, 4095), (len(data) - 3, 100), (len(data), 10), (12345, 1)]:
            assert os.pread(f.fileno(), size, offset) == data[offset : offset + size]


# --- 3. zarr-python -------------------------------------------------------------------------------


def array_values(node: Any) -> np.ndarray[Any, Any]:
    import zarr

    assert isinstance(node, zarr.Array), node
    return np.asarray(node[...])


def test_zarr_python_reads_each_version_from_its_own_mount(
    pair: dict[str, Path], sample: SampleDandiset
) -> None:
    import zarr

    v1, v2 = sample.versions[V1], sample.versions[V2]
    for version, other in ((V1, v2), (V2, v1)):
        arrays = sample.versions[version].arrays
        group = zarr.open_group(str(pair[version] / OME_PATH), mode="r")
        for key, expected in arrays.items():
            if not key.startswith(OME_PATH + "/"):
                continue
            got = array_values(group[key[len(OME_PATH) + 1 :]])
            np.testing.assert_array_equal(got, expected, err_msg=f"{version} {key}")
        level0 = array_values(group["0"])
        assert not np.array_equal(level0, other.arrays[f"{OME_PATH}/0"])
        array = zarr.open_array(str(pair[version] / ARRAY_PATH), mode="r")
        assert array.metadata.zarr_format == 3
        got = array_values(array)
        np.testing.assert_array_equal(got, arrays[ARRAY_PATH], err_msg=version)
        assert not np.array_equal(got, other.arrays[ARRAY_PATH])
    assert dict(zarr.open_group(str(pair[V2] / OME_PATH), mode="r").attrs).get("omero")
    assert "omero" not in dict(zarr.open_group(str(pair[V1] / OME_PATH), mode="r").attrs)


def test_consolidated_metadata_on_request(
    mount: Callable[..., Mounted], sample: SampleDandiset
) -> None:
    """--consolidate: zarr-python opens the OME-Zarr with one read of a synthesized .zmetadata and
    gets the published values; without it the mount shows exactly the published files."""
    import warnings

    import zarr

    mounted = mount(f"{sample.dandiset_id}@{V1}", "--consolidate")
    root = mounted.path / OME_PATH
    assert ".zmetadata" in os.listdir(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "consolidated metadata not found" warning
        group = zarr.open_consolidated(str(root), mode="r", zarr_format=2)
        for key, expected in sample.versions[V1].arrays.items():
            if key.startswith(OME_PATH + "/"):
                got = array_values(group[key[len(OME_PATH) + 1 :]])
                np.testing.assert_array_equal(got, expected, err_msg=key)
    assert "consolidated" in mounted.output()


# --- 4. h5py --------------------------------------------------------------------------------------


def h5_contents(source: Any) -> dict[str, Any]:
    """Every attribute and dataset value of an HDF5 file; object references (NWB files have them:
    electrode groups, `.specloc`, a table region's table) become the path they point to."""
    import h5py

    out: dict[str, Any] = {}
    with h5py.File(source, "r") as f:

        def plain(value: Any) -> Any:
            if isinstance(value, h5py.Reference):
                return ("ref", f[value].name)
            if isinstance(value, np.ndarray) and value.dtype == object:
                return [plain(v) for v in value.tolist()]
            return value

        out["/"] = {k: plain(f.attrs[k]) for k in f.attrs}

        def visit(name: str, obj: Any) -> None:
            attrs = {k: plain(obj.attrs[k]) for k in obj.attrs}
            if isinstance(obj, h5py.Dataset):
                out[name] = (plain(obj[()]), attrs)
            else:
                out[name] = attrs

        f.visititems(visit)
    return out


@pytest.mark.parametrize("blob", BLOB_PATHS)
def test_h5py_reads_blobs_through_the_mount(
    pair: dict[str, Path], sample: SampleDandiset, blob: str
) -> None:
    mounted = h5_contents(str(pair[V1] / blob))
    original = h5_contents(io.BytesIO(sample.versions[V1].files[blob]))
    assert list(mounted) == list(original)
    np.testing.assert_equal(mounted, original)
    datasets = [v for v in original.values() if isinstance(v, tuple)]
    assert any(isinstance(v[0], np.ndarray) and v[0].size >= 1000 for v in datasets)


# --- 5. zarr_checksum -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [V1, V2])
@pytest.mark.parametrize("zarr_path", ZARR_PATHS)
def test_zarr_checksum_of_the_mounted_zarr_is_the_published_one(
    pair: dict[str, Path], sample: SampleDandiset, version: str, zarr_path: str
) -> None:
    root = pair[version] / zarr_path
    files, _dirs = walk(root)
    assert files
    tree = ZarrChecksumTree()
    for rel, st in files.items():
        digest = hashlib.md5((root / rel).read_bytes()).hexdigest()
        tree.add_leaf(path=Path(rel), size=st.st_size, digest=digest)
    assert tree.process().digest == sample.versions[version].zarr_checksums[zarr_path]


# --- 6. read-only ---------------------------------------------------------------------------------


def open_and_close(path: Path, flags: int) -> None:
    os.close(os.open(path, flags, 0o644))


_FILE = EPHYS_PATH
_CHUNK = f"{OME_PATH}/{OME_V2_OVERWRITTEN[0]}"
WRITES: dict[str, Callable[[Path], object]] = {
    "open-rw": lambda m: open_and_close(m / _FILE, os.O_RDWR),
    "open-wronly": lambda m: open_and_close(m / _CHUNK, os.O_WRONLY),
    "open-append": lambda m: open_and_close(m / _FILE, os.O_WRONLY | os.O_APPEND),
    "open-trunc": lambda m: open_and_close(m / _CHUNK, os.O_RDONLY | os.O_TRUNC),
    "create-top": lambda m: open_and_close(m / "new.txt", os.O_CREAT | os.O_WRONLY | os.O_TRUNC),
    "create-in-zarr": lambda m: open_and_close(
        m / OME_PATH / "0" / "new", os.O_CREAT | os.O_WRONLY
    ),
    "mkdir": lambda m: os.mkdir(m / "newdir"),
    "mkdir-in-zarr": lambda m: os.mkdir(m / OME_PATH / "newdir"),
    "rmdir": lambda m: os.rmdir(m / OME_PATH),
    "unlink": lambda m: os.unlink(m / _FILE),
    "unlink-chunk": lambda m: os.unlink(m / _CHUNK),
    "rename": lambda m: os.rename(m / _FILE, m / "renamed.nwb"),
    "rename-chunk": lambda m: os.rename(m / _CHUNK, m / OME_PATH / "moved"),
    "symlink": lambda m: os.symlink("dandiset.yaml", m / "link"),
    "link": lambda m: os.link(m / _FILE, m / "hardlink"),
    "chmod": lambda m: os.chmod(m / _FILE, 0o644),
    "chmod-dir": lambda m: os.chmod(m / OME_PATH, 0o755),
    "chown": lambda m: os.chown(m / _FILE, 1, 1),
    "utime": lambda m: os.utime(m / _CHUNK, (0, 0)),
    "truncate": lambda m: os.truncate(m / _FILE, 0),
    "setxattr": lambda m: os.setxattr(m / _CHUNK, "user.test", b"x"),
    "removexattr": lambda m: os.removexattr(m / _CHUNK, "user.zarrfs.s3_url"),
}


@pytest.mark.parametrize("operation", list(WRITES))
def test_writes_fail_with_erofs(
    pair: dict[str, Path], sample: SampleDandiset, operation: str
) -> None:
    mnt = pair[V1]
    assert_errno(errno.EROFS, WRITES[operation], mnt)
    # Nothing changed.
    assert (mnt / _FILE).read_bytes() == sample.versions[V1].files[_FILE]
    assert (mnt / _CHUNK).read_bytes() == sample.versions[V1].files[_CHUNK]
    assert sorted(os.listdir(mnt)) == ["dandiset.yaml", "sub-01", "sub-02"]


# --- 7. a tampered manifest -----------------------------------------------------------------------


def test_tampered_manifest_gives_eio_for_that_zarr_only(tmp_path: Path, tampered: Tampered) -> None:
    sample = tampered.sample
    v1 = sample.versions[V1]
    cache = tmp_path / "cache"
    live = start_mount(
        tmp_path / "m",
        f"{TAMPER_ID}@{V1}",
        "--bucket",
        TAMPER_BUCKET,
        "--manifest-root",  # only the tampered copy: no fallback to the public mirror
        f"s3://{TAMPER_BUCKET}/zarr-manifest/",
        endpoint=tampered.s3.endpoint_url,
        cache=cache,
    )
    try:
        mnt = live.path
        zarr = mnt / OME_PATH
        assert stat.S_ISDIR(os.stat(zarr).st_mode)  # the Zarr root itself needs no manifest
        assert_errno(errno.EIO, os.listdir, zarr)
        assert_errno(errno.EIO, (zarr / ".zgroup").read_bytes)
        assert_errno(errno.EIO, (zarr / "0" / ".zarray").read_bytes)
        assert_errno(errno.EIO, os.listdir, zarr)  # still, on a second try
        # Everything else is served.
        for rel, data in v1.files.items():
            if not rel.startswith(OME_PATH + "/"):
                assert (mnt / rel).read_bytes() == data, rel
        assert sorted(os.listdir(mnt / ARRAY_PATH)) == sorted(
            {r[len(ARRAY_PATH) + 1 :].split("/")[0] for r in v1.files if r.startswith(ARRAY_PATH)}
        )
        log = live.output()
        assert OME_PATH in log
        assert v1.zarr_checksums[OME_PATH] in log
        assert tampered.recomputed in log
        assert "Traceback" not in log
        assert live.process.poll() is None, "the mount died"
        # Nothing derived from the bad manifest was persisted.
        zarr_id = v1.zarr_ids[OME_PATH]
        assert not list((cache / "manifests").rglob(f"{zarr_id}/*.*"))
    finally:
        stop_mount(live)


def test_tampered_copy_falls_back_to_a_good_copy_in_the_next_root(
    tmp_path: Path, tampered: Tampered
) -> None:
    v1 = tampered.sample.versions[V1]
    mirror = tmp_path / "mirror"
    good = mirror / v1.manifest_keys[OME_PATH].removeprefix("zarr-manifest/")
    good.parent.mkdir(parents=True)
    good.write_bytes(v1.manifests[OME_PATH])
    live = start_mount(
        tmp_path / "m",
        f"{TAMPER_ID}@{V1}",
        "--bucket",
        TAMPER_BUCKET,
        "--manifest-root",
        f"s3://{TAMPER_BUCKET}/zarr-manifest/",
        "--manifest-root",
        mirror.as_uri() + "/",
        endpoint=tampered.s3.endpoint_url,
        cache=tmp_path / "cache",
    )
    try:
        files, _dirs = walk(live.path)
        assert sorted(files) == sorted(v1.files)
        for rel, data in v1.files.items():
            assert (live.path / rel).read_bytes() == data, rel
        assert tampered.recomputed in live.output()  # the bad copy was noticed, not trusted
    finally:
        stop_mount(live)


# --- 8. negative lookups --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rel",
    [
        f"{OME_PATH}/{OME_ALWAYS_ABSENT[0]}",
        f"{OME_PATH}/0/9/9/9/9",
        f"{OME_PATH}/.zarray",
        f"{ARRAY_PATH}/c/9/9",
        "sub-01/missing.nwb",
        "sub-03",
    ],
)
def test_missing_keys_give_enoent_every_time(pair: dict[str, Path], rel: str) -> None:
    for _ in range(2):
        assert_errno(errno.ENOENT, os.stat, pair[V1] / rel)
    assert not os.path.exists(pair[V1] / rel)


def test_path_through_a_file_gives_enotdir(pair: dict[str, Path]) -> None:
    assert_errno(errno.ENOTDIR, os.stat, pair[V1] / OME_PATH / ".zgroup" / "x")
    assert_errno(errno.ENOTDIR, os.stat, pair[V1] / EPHYS_PATH / "x")


# --- 9. draft and latest through the API ----------------------------------------------------------


@pytest.mark.parametrize(("version", "expected"), [("draft", DRAFT), ("latest", V2)])
def test_draft_and_latest_through_the_api(
    mount: Callable[..., Any], sample: SampleDandiset, fake_api: str, version: str, expected: str
) -> None:
    mounted = mount(f"{sample.dandiset_id}@{version}", "--api-url", fake_api)
    state = sample.versions[expected]
    files, dirs = walk(mounted.path)
    assert sorted(files) == sorted(state.files)
    assert set(dirs) == implied_dirs(list(state.files))
    for rel, data in state.files.items():
        assert (mounted.path / rel).read_bytes() == data, rel
    if expected == DRAFT:
        for rel in OME_DRAFT_OVERWRITTEN:
            key = f"{OME_PATH}/{rel}"
            assert state.files[key] != sample.versions[V2].files[key]


# --- 10. the manifest cache survives a remount ----------------------------------------------------


def test_second_mount_needs_no_manifest_download(
    mount: Callable[..., Any], sample: SampleDandiset, tmp_path: Path
) -> None:
    state = sample.versions[V1]
    cache = tmp_path / "cache"
    source = f"{sample.dandiset_id}@{V1}"
    first = mount(source, cache_dir=cache)
    for zarr_path in ZARR_PATHS:
        assert os.listdir(first.path / zarr_path)
    subprocess.run(["fusermount3", "-u", str(first.path)], check=True, capture_output=True)
    assert first.process.wait(timeout=EXIT_DEADLINE) == 0
    assert "fetched manifest" in first.output()
    # small manifests are kept as their documents, parsed and verified again below
    assert len(list((cache / "manifests").rglob("*.json"))) == len(ZARR_PATHS)

    second = mount(source, "--manifest-root", "file:///nonexistent/", cache_dir=cache)
    files, _dirs = walk(second.path)
    assert sorted(files) == sorted(state.files)
    for rel, data in state.files.items():
        assert (second.path / rel).read_bytes() == data, rel
    assert "fetched manifest" not in second.output()
    assert "no manifest found" not in second.output()


def test_unreachable_manifest_without_cache_gives_eio(
    mount: Callable[..., Any], sample: SampleDandiset
) -> None:
    """The control for the remount test: the unreachable root really cannot serve manifests."""
    mounted = mount(f"{sample.dandiset_id}@{V1}", "--manifest-root", "file:///nonexistent/")
    assert_errno(errno.EIO, os.listdir, mounted.path / OME_PATH)
    data = sample.versions[V1].files[EPHYS_PATH]
    assert (mounted.path / EPHYS_PATH).read_bytes() == data


# --- 11. statfs and xattrs ------------------------------------------------------------------------


def test_statfs(pair: dict[str, Path], sample: SampleDandiset) -> None:
    state = sample.versions[V1]
    st = os.statvfs(pair[V1])
    assert st.f_flag & os.ST_RDONLY
    assert st.f_namemax >= 255
    assert st.f_files == len(state.assets)
    assert st.f_blocks * st.f_frsize >= sum(r["contentSize"] for r in state.assets)
    assert st.f_bavail == 0


def read_ahead_kb(mnt: Path) -> int:
    device = os.stat(mnt).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    return int(bdi.read_text())


def test_the_mount_sets_the_kernel_readahead(
    mount: Callable[..., Mounted], sample: SampleDandiset
) -> None:
    require(os.geteuid() == 0, "only root may set a mount's kernel readahead")
    source = f"{sample.dandiset_id}@{V1}"
    assert read_ahead_kb(mount(source).path) == 1024  # the default, 1M
    assert read_ahead_kb(mount(source, "--read-ahead", "4M").path) == 4096
    assert read_ahead_kb(mount(source, "-o", "read_ahead=512K").path) == 512
    # 0 keeps the kernel's own: 128 KiB (VM_READAHEAD_PAGES) for a FUSE mount
    assert read_ahead_kb(mount(source, "--read-ahead", "0").path) == 128


def test_the_readahead_is_set_through_a_symlinked_mountpoint(
    sample: SampleDandiset, tmp_path: Path
) -> None:
    """As on clusters where $HOME is a symlink: mountinfo shows the resolved path."""
    require(os.geteuid() == 0, "only root may set a mount's kernel readahead")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    mounted = start_mount(
        tmp_path / "link",
        f"{sample.dandiset_id}@{V1}",
        endpoint=sample.endpoint_url,
        cache=tmp_path / "cache",
    )
    try:
        assert read_ahead_kb(mounted.path) == 1024
    finally:
        stop_mount(mounted)


def test_mount_table_paths_are_unescaped(tmp_path: Path) -> None:
    assert runtime.unescape_mount_field(r"/tmp/a\040b\011c\134d\012e") == "/tmp/a b\tc\\d\ne"
    assert runtime.mount_device(tmp_path) is None  # not a FUSE mount


def test_xattrs_name_the_pinned_object_version(
    pair: dict[str, Path], sample: SampleDandiset
) -> None:
    seen: dict[str, str] = {}
    for version in (V1, V2):
        state = sample.versions[version]
        entries = manifest_entries(state.manifests[OME_PATH])
        zarr_id = state.zarr_ids[OME_PATH]
        for rel in (OME_V2_OVERWRITTEN[0], ".zgroup", "0/.zarray"):
            path = pair[version] / OME_PATH / rel
            vid, _modified, _size, etag = entries[rel]
            assert b"user.zarrfs.s3_url" in [n.encode() for n in os.listxattr(path)]
            url = os.getxattr(path, "user.zarrfs.s3_url").decode()
            assert url.endswith(f"{chunk_key(zarr_id, rel)}?versionId={vid}"), url
            assert os.getxattr(path, "user.zarrfs.etag").decode().strip('"') == etag
            if rel == OME_V2_OVERWRITTEN[0]:
                seen[version] = url
        assert_errno(errno.ENODATA, os.getxattr, pair[version] / OME_PATH, "user.x")
        assert_errno(errno.ENODATA, os.getxattr, pair[version] / OME_PATH / ".zgroup", "user.nope")
    assert seen[V1] != seen[V2]
    blob = os.getxattr(pair[V1] / EPHYS_PATH, "user.zarrfs.s3_url").decode()
    assert sample.versions[V1].blob_keys[EPHYS_PATH] in blob


def test_provenance_attributes(pair: dict[str, Path], sample: SampleDandiset) -> None:
    """getfattr -d shows where everything comes from: the version at the root, the checksum of
    each Zarr, the asset and the exact object version of each file."""
    state = sample.versions[V1]
    mnt = pair[V1]

    def attrs(path: Path) -> dict[str, str]:
        return {
            name.removeprefix("user.zarrfs."): os.getxattr(path, name).decode()
            for name in os.listxattr(path)
        }

    assert attrs(mnt) == {"version": f"{sample.dandiset_id}@{V1}"}
    zarr = attrs(mnt / OME_PATH)
    assert zarr == {
        "asset_id": state.asset_ids[OME_PATH],
        "zarr_id": state.zarr_ids[OME_PATH],
        "zarr_checksum": state.zarr_checksums[OME_PATH],
    }
    vid, _modified, _size, etag = manifest_entries(state.manifests[OME_PATH])[".zgroup"]
    chunk = attrs(mnt / OME_PATH / ".zgroup")
    assert chunk == {
        "asset_id": state.asset_ids[OME_PATH],
        "s3_url": f"s3://{sample.bucket}/{chunk_key(state.zarr_ids[OME_PATH], '.zgroup')}"
        f"?versionId={vid}",
        "version_id": vid,
        "etag": etag,
    }
    blob = attrs(mnt / EPHYS_PATH)
    assert blob["asset_id"] == state.asset_ids[EPHYS_PATH]
    assert blob["s3_url"] == f"s3://{sample.bucket}/{state.blob_keys[EPHYS_PATH]}"
    assert "version_id" not in blob  # a blob key is immutable: no version needed
    assert attrs(mnt / "sub-01") == {}
    yaml = attrs(mnt / "dandiset.yaml")
    assert yaml["s3_url"].endswith(f"dandisets/{sample.dandiset_id}/{V1}/dandiset.yaml")


# --- 12. background mode --------------------------------------------------------------------------


def test_background_mount_and_unmount(tmp_path: Path, sample: SampleDandiset) -> None:
    mnt = tmp_path / "background-mountpoint"
    mnt.mkdir()
    cache = tmp_path / "cache"
    source = f"{sample.dandiset_id}@{V1}"
    common = ["--endpoint-url", sample.endpoint_url, "--cache-dir", str(cache)]
    try:
        result = subprocess.run(
            zarrfs("mount", source, str(mnt), *common),
            capture_output=True,
            text=True,
            timeout=MOUNT_DEADLINE,
            check=False,
        )
        assert os.path.ismount(mnt), result.stderr  # already live when the command returned
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert processes_mentioning(mnt), "no daemon serves the mount"
        data = sample.versions[V1].files[f"{OME_PATH}/.zattrs"]
        assert (mnt / OME_PATH / ".zattrs").read_bytes() == data

        again = subprocess.run(
            zarrfs("mount", source, str(mnt), *common),
            capture_output=True,
            text=True,
            timeout=MOUNT_DEADLINE,
            check=False,
        )
        assert again.returncode == 4
        assert "already" in again.stderr and "Traceback" not in again.stderr

        unmounted = subprocess.run(
            zarrfs("unmount", str(mnt)), capture_output=True, text=True, timeout=30, check=False
        )
        assert unmounted.returncode == 0, unmounted.stderr
        assert not os.path.ismount(mnt)
        wait_until_no_process_mentions(mnt)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
        for pid in processes_mentioning(mnt):
            os.kill(pid, 15)


def test_the_daemon_keeps_no_descriptor_of_its_caller(
    tmp_path: Path, sample: SampleDandiset
) -> None:
    """The daemon is a fork of the command: what the caller left open (a lock, the write end of a
    pipe it reads until EOF) must not stay open for the life of the mount."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    read_end, write_end = os.pipe()
    common = ["--endpoint-url", sample.endpoint_url, "--cache-dir", str(tmp_path / "cache")]
    try:
        result = subprocess.run(
            zarrfs("mount", f"{sample.dandiset_id}@{V1}", str(mnt), *common),
            capture_output=True,
            text=True,
            timeout=MOUNT_DEADLINE,
            check=False,
            pass_fds=(write_end,),
        )
        assert result.returncode == 0, result.stderr
        os.close(write_end)
        write_end = -1
        assert processes_mentioning(mnt), "no daemon serves the mount"
        readable, _, _ = select.select([read_end], [], [], 5)
        assert readable and os.read(read_end, 1) == b"", "the daemon holds the caller's pipe"
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
        wait_until_no_process_mentions(mnt)


def test_ctrl_c_while_the_mount_starts_leaves_nothing_behind(
    tmp_path: Path, sample: SampleDandiset
) -> None:
    """An S3 that accepts connections and never answers: the mountpoint is live at once (fast
    start), the command waits for the version to resolve, and the user presses Ctrl-C."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    command = zarrfs("mount", f"{sample.dandiset_id}@{V1}", str(mnt), "--endpoint-url", endpoint,
                     "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + MOUNT_DEADLINE
        while not os.path.ismount(mnt):
            assert launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline, "the mountpoint never became live"
            time.sleep(0.02)
        launcher.send_signal(signal.SIGINT)
        _, err = launcher.communicate(timeout=EXIT_DEADLINE)
        assert launcher.returncode == 130, err
        assert not os.path.ismount(mnt)
        wait_until_no_process_mentions(mnt)  # the daemon is gone too
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
        silent.close()


def test_without_xattr_option_the_kernel_stops_asking(
    mount: Callable[..., Any], sample: SampleDandiset
) -> None:
    mounted = mount(f"{sample.dandiset_id}@{V1}")
    chunk = mounted.path / OME_PATH / ".zgroup"
    for _ in range(2):
        assert_errno(errno.EOPNOTSUPP, os.getxattr, chunk, "user.zarrfs.s3_url")
    for _ in range(2):
        assert_errno(errno.EOPNOTSUPP, os.listxattr, chunk)


def test_concurrent_readers_on_a_fresh_mount_get_exact_bytes(
    mount: Callable[..., Any], sample: SampleDandiset
) -> None:
    """16 threads read every file (several times, in different orders) of a fresh mount at once:
    single-flight manifest loading and block fetching under real concurrency."""
    from concurrent.futures import ThreadPoolExecutor
    from random import Random

    mounted = mount(f"{sample.dandiset_id}@{V1}")
    expected = sample.versions[V1].files
    jobs = [path for path in expected for _ in range(3)]
    Random(5).shuffle(jobs)

    def read(rel: str) -> tuple[str, bool]:
        return rel, (mounted.path / rel).read_bytes() == expected[rel]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(read, jobs))
    assert [rel for rel, ok in results if not ok] == []
    assert len(results) == 3 * len(expected)
    assert mounted.output().count("fetched manifest of") == len(sample.versions[V1].zarr_ids)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_unmounts_and_exits_cleanly(
    mount: Callable[..., Any], sample: SampleDandiset, signum: int
) -> None:
    mounted = mount(f"{sample.dandiset_id}@{V1}")
    assert (mounted.path / "dandiset.yaml").read_bytes() == sample.versions[V1].files[
        "dandiset.yaml"
    ]
    mounted.process.send_signal(signum)
    assert mounted.process.wait(timeout=EXIT_DEADLINE) == 0
    assert not os.path.ismount(mounted.path)
    assert "unmounted" in mounted.output()
