"""What the read benchmarks (`read.py`, `compare.py`) share: publishing, mounting, measuring the host.

Owns: writing a dandiset version into a `LocalS3` the way the archive holds one (Zarr objects put
once, a blob uploaded as a DANDI-sized multipart upload, the schema-2 manifest, `assets.jsonld`,
`dandiset.yaml`); starting and stopping a mount of it with zarrfs or a peer (`rclone mount`, with
and without `--vfs-cache-mode full`, and `s3fs`), in the foreground or in the background as a user
would; the page-cache drop; a process's peak RSS and CPU seconds; the machine description printed
with figures.

Never does: time a workload or judge a figure (the scripts do). It ends only the processes it
started, by PID, after `fusermount3 -u -z` on their own mountpoint.

Peers mount the bucket root and read the live `zarr/<id>/` and `blobs/...` keys, anonymously, with
the `AWS_*` variables removed (rclone refuses `AWS_CA_BUNDLE`). Every key is written once, so the live
objects are the pinned versions zarrfs reads.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from zarrfs.archive.digests import EtagHasher, dandi_part_sizes
from zarrfs.demo.locals3 import LocalS3
from zarrfs.demo.sample import (
    ManifestLeaf,
    blob_key,
    build_manifest,
    format_manifest,
    manifest_key,
    to_yaml,
    upload_as_dandi,
    zarr_checksum_of,
)

#: Seconds a mount may take to become live.
MOUNT_DEADLINE = 60.0
#: Seconds a daemon may take to exit after its lazy unmount.
EXIT_DEADLINE = 15.0
#: Mount tools, and the package each comes in.
ZARRFS = "zarrfs"
PEERS = ("rclone", "rclone-full", "s3fs")
PEER_PACKAGE = {"rclone": "rclone", "rclone-full": "rclone", "s3fs": "s3fs"}
S3_URL = "https://dandiarchive.s3.amazonaws.com"
MiB = 1 << 20


def say(*args: object) -> None:
    print(*args, flush=True)


def check(what: str, got: bytes, want: bytes) -> None:
    """Stop the run when `got` is not exactly `want`."""
    if got != want:
        raise SystemExit(
            f"FAIL: {what}: read {len(got)} bytes that differ from the {len(want)} written"
        )


# --- publishing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZarrAsset:
    path: str  # asset path in the dandiset
    zarr_id: str
    leaves: tuple[ManifestLeaf, ...]  # what S3 answered for each object put
    checksum: str


@dataclass(frozen=True, slots=True)
class BlobAsset:
    path: str
    blob_id: str
    key: str
    size: int
    etag: str  # the dandi-etag, which is also the S3 ETag
    version_id: str


def put_zarr(s3: LocalS3, path: str, files: Mapping[str, bytes], threads: int = 32) -> ZarrAsset:
    """Put every file of a Zarr once under `zarr/<new id>/` and write its manifest."""
    client, bucket = s3.client, s3.bucket
    zarr_id = str(uuid.uuid4())
    now = datetime.now(UTC).replace(microsecond=0).isoformat()

    def put(item: tuple[str, bytes]) -> ManifestLeaf:
        name, body = item
        r = client.put_object(Bucket=bucket, Key=f"zarr/{zarr_id}/{name}", Body=body)
        return ManifestLeaf(name, r["VersionId"], now, len(body), r["ETag"].strip('"'))

    with ThreadPoolExecutor(threads) as pool:
        leaves = tuple(pool.map(put, files.items()))
    checksum = zarr_checksum_of(leaves)
    client.put_object(
        Bucket=bucket,
        Key=manifest_key(zarr_id, checksum),
        Body=format_manifest(build_manifest(leaves)).encode(),
    )
    return ZarrAsset(path, zarr_id, leaves, checksum)


def upload_blob(s3: LocalS3, path: str, data: bytes) -> BlobAsset:
    """Upload `data` as DANDI does: one multipart upload in 64 MiB parts; its ETag is the dandi-etag."""
    blob_id = str(uuid.uuid4())
    key = blob_key(blob_id)
    etag, version_id = upload_as_dandi(s3.client, s3.bucket, key, data)
    if version_id is None:
        raise RuntimeError(f"the bucket gave {key} no VersionId: is it versioned?")
    return BlobAsset(path, blob_id, key, len(data), etag, version_id)


def upload_blob_parts(
    s3: LocalS3, path: str, size: int, read: Callable[[int, int], bytes]
) -> BlobAsset:
    """`upload_blob` for a blob too big to hold: `read(offset, length)` makes each 64 MiB part when
    it is sent, and the dandi-etag is computed from the parts as they go."""
    client, bucket = s3.client, s3.bucket
    blob_id = str(uuid.uuid4())
    key = blob_key(blob_id)
    hasher = EtagHasher(size)
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    parts, offset = [], 0
    for number, part_size in enumerate(dandi_part_sizes(size), start=1):
        body = read(offset, part_size)
        hasher.update(body)
        part = client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number, Body=body
        )
        parts.append({"PartNumber": number, "ETag": part["ETag"]})
        offset += part_size
    done = client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    etag = hasher.etag(multipart=True)
    if done["ETag"].strip('"') != etag:
        raise RuntimeError(f"S3 ETag {done['ETag']} of {key} is not the dandi-etag {etag}")
    version_id = done.get("VersionId")
    if version_id is None:
        raise RuntimeError(f"the bucket gave {key} no VersionId: is it versioned?")
    return BlobAsset(path, blob_id, key, size, etag, version_id)


def publish(
    s3: LocalS3,
    dandiset: str,
    version: str,
    zarrs: Sequence[ZarrAsset],
    blobs: Sequence[BlobAsset],
) -> None:
    """Write `assets.jsonld` and `dandiset.yaml` of `dandiset@version` holding these assets."""
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    records = [
        {
            "identifier": str(uuid.uuid4()),
            "path": blob.path,
            "contentSize": blob.size,
            "encodingFormat": "application/x-nwb",
            "contentUrl": [f"{S3_URL}/{blob.key}"],
            "digest": {"dandi:dandi-etag": blob.etag},
            "dateModified": now,
        }
        for blob in blobs
    ] + [
        {
            "identifier": str(uuid.uuid4()),
            "path": z.path,
            "contentSize": sum(x.size for x in z.leaves),
            "encodingFormat": "application/x-zarr",
            "contentUrl": [f"{S3_URL}/zarr/{z.zarr_id}/"],
            "digest": {"dandi:dandi-zarr-checksum": z.checksum},
            "dateModified": now,
        }
        for z in zarrs
    ]
    client, bucket = s3.client, s3.bucket
    prefix = f"dandisets/{dandiset}/{version}/"
    client.put_object(Bucket=bucket, Key=prefix + "assets.jsonld", Body=json.dumps(records))
    metadata = {"identifier": f"DANDI:{dandiset}", "name": "read benchmark", "version": version}
    client.put_object(Bucket=bucket, Key=prefix + "dandiset.yaml", Body=to_yaml(metadata))


# --- mounts -------------------------------------------------------------------------------------


def peer_env() -> dict[str, str]:
    """The environment without AWS_* (rclone refuses AWS_CA_BUNDLE; peers read anonymously)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def missing_tools(tools: Sequence[str]) -> dict[str, str]:
    """Tool -> the `apt-get install` line for each tool of `tools` that is not installed."""
    missing = {}
    for tool in tools:
        binary = PEER_PACKAGE.get(tool)
        if binary is not None and shutil.which(binary) is None:
            missing[tool] = f"apt-get install -y {PEER_PACKAGE[tool]}"
    return missing


def zarrfs_help() -> str:
    """`zarrfs mount --help`, to detect options that not every version has."""
    return subprocess.run(
        [sys.executable, "-m", "zarrfs", "mount", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@dataclass(frozen=True, slots=True)
class Target:
    """What a mount serves: the Zarr and the blob of one published version (and a big blob, when
    the benchmark has one)."""

    dandiset: str
    version: str
    zarr: ZarrAsset
    blob: BlobAsset
    big: BlobAsset | None = None

    def zarr_root(self, tool: str, mnt: Path) -> Path:
        return mnt / self.zarr.path if tool == ZARRFS else mnt / "zarr" / self.zarr.zarr_id

    def blob_path(self, tool: str, mnt: Path, blob: BlobAsset | None = None) -> Path:
        blob = blob or self.blob
        return mnt / blob.path if tool == ZARRFS else mnt / blob.key


def mount_command(
    tool: str,
    s3: LocalS3,
    target: Target,
    mnt: Path,
    cache: Path,
    *,
    foreground: bool,
    zarrfs_options: Sequence[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """argv and environment that mount `target` (zarrfs) or the bucket root (peers) at `mnt`."""
    if tool == ZARRFS:
        command = [
            sys.executable, "-m", "zarrfs", "mount", f"{target.dandiset}@{target.version}",
            str(mnt), "--endpoint-url", s3.endpoint_url, "--cache-dir", str(cache),
            "--manifest-root", f"s3://{s3.bucket}/zarr-manifest/", *zarrfs_options,
        ]  # fmt: skip
        if foreground:
            command.insert(4, "-f")
        else:
            command += ["--log-file", str(cache.parent / "zarrfs.log")]
        return command, dict(os.environ)
    env = peer_env()
    if tool in ("rclone", "rclone-full"):
        command = ["rclone", "mount", f"bench:{s3.bucket}", str(mnt), "--read-only"]
        if tool == "rclone-full":
            command += ["--vfs-cache-mode", "full", "--cache-dir", str(cache)]
        if not foreground:
            command.append("--daemon")
        env |= {
            "RCLONE_CONFIG": "/dev/null",
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ENDPOINT": s3.endpoint_url,
        }
        return command, env
    if tool == "s3fs":
        opts = f"url={s3.endpoint_url},use_path_request_style,public_bucket=1,ro"
        return ["s3fs", s3.bucket, str(mnt), *(["-f"] if foreground else []), "-o", opts], env
    raise ValueError(f"unknown mount tool {tool!r}")


def processes_with_argument(argument: Path) -> list[int]:
    """PIDs of live processes that have `argument` as one of their arguments."""
    needle = os.fsencode(argument)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in argv:
            pids.append(int(entry))
    return pids


def _is_fusermount(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return os.path.basename(argv0).startswith(b"fusermount")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Mount:
    """A live mount: the daemon's PID, and the launcher process we spawned."""

    tool: str
    mnt: Path
    log: Path
    process: subprocess.Popen[bytes]
    daemon_pid: int
    #: Seconds from spawning the command to the mountpoint being live.
    ready_after: float
    #: Seconds from spawning the command to a listing of the root answered (a mount may be live
    #: before it serves: zarrfs starts its core behind a live mountpoint).
    serving_after: float
    #: CPU seconds (user + system) the mount took until it served: the daemon's so far, plus the
    #: launcher's when the command put the daemon in the background (None if unreadable).
    cpu_to_serve: float | None = None

    def cpu_seconds(self) -> float | None:
        """The daemon's CPU seconds so far."""
        return cpu_seconds(self.daemon_pid)

    def peak_rss(self) -> int | None:
        return peak_rss(self.daemon_pid)

    def stop(self) -> None:
        """Lazy unmount, then wait for the daemon to exit; terminate it (by PID) if it does not."""
        if os.path.ismount(self.mnt):
            subprocess.run(
                ["fusermount3", "-u", "-z", str(self.mnt)], check=False, capture_output=True
            )
        deadline = time.monotonic() + EXIT_DEADLINE
        while _alive(self.daemon_pid) and time.monotonic() < deadline:
            if self.process.poll() is None and self.process.pid == self.daemon_pid:
                try:
                    self.process.wait(timeout=EXIT_DEADLINE)
                except subprocess.TimeoutExpired:
                    break
            else:
                time.sleep(0.02)
        if _alive(self.daemon_pid):
            os.kill(self.daemon_pid, 15)  # our own daemon, by PID
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=EXIT_DEADLINE)


def start_mount(
    tool: str,
    s3: LocalS3,
    target: Target,
    mnt: Path,
    cache: Path,
    *,
    foreground: bool = True,
    zarrfs_options: Sequence[str] = (),
) -> Mount:
    """Start a mount and return once `mnt` is live (fail with the tool's log if it dies)."""
    mnt.mkdir(parents=True, exist_ok=True)
    log = mnt.parent / f"{tool}.log"
    command, env = mount_command(
        tool, s3, target, mnt, cache, foreground=foreground, zarrfs_options=zarrfs_options
    )
    children_before = _children_cpu()
    with log.open("ab") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    while not os.path.ismount(mnt):
        if time.perf_counter() - start > MOUNT_DEADLINE:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
            process.terminate()
            process.wait()
            raise RuntimeError(f"{tool}: {mnt} not mounted after {MOUNT_DEADLINE} s")
        if foreground and process.poll() is not None:
            raise RuntimeError(f"{command} exited {process.returncode}:\n{log.read_text()}")
        time.sleep(0.002)
    ready_after = time.perf_counter() - start
    os.listdir(mnt)
    serving_after = time.perf_counter() - start
    if foreground:
        cpu = cpu_seconds(process.pid)
        return Mount(tool, mnt, log, process, process.pid, ready_after, serving_after, cpu)
    # a background mount: the launcher exits once the mount is live; the daemon remains
    if process.wait(timeout=MOUNT_DEADLINE) != 0:
        raise RuntimeError(f"{command} exited {process.returncode}:\n{log.read_text()}")
    # the daemon, not the fusermount3 that keeps watch for auto_unmount (it names mnt too)
    pids = [p for p in processes_with_argument(mnt) if not _is_fusermount(p)]
    if len(pids) != 1:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
        raise RuntimeError(f"{tool}: expected one daemon with {mnt} in its arguments, got {pids}")
    daemon_cpu = cpu_seconds(pids[0])
    launcher_cpu = _children_cpu() - children_before  # the launcher, reaped by the wait above
    cpu = None if daemon_cpu is None else daemon_cpu + launcher_cpu
    return Mount(tool, mnt, log, process, pids[0], ready_after, serving_after, cpu)


# --- the host -----------------------------------------------------------------------------------


def drop_caches() -> bool:
    """Write back and drop the page, dentry and inode caches (root only); False if not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def peak_rss(pid: int) -> int | None:
    """VmHWM of a process in bytes, or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


#: Clock ticks per second of /proc/<pid>/stat's CPU times.
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far, all its threads (utime + stime of
    /proc/<pid>/stat, in clock ticks: 10 ms steps), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after the command name: state is field 3 of stat(5), utime 14 and stime 15
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_info(latency_ms: float, stream_bandwidth_mb: float = 0.0) -> list[str]:
    repo = Path(__file__).resolve().parent.parent
    commit = subprocess.run(
        ["git", "-C", str(repo), "describe", "--always", "--dirty", "--exclude", "*"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    lines = [
        f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit or '?'}",
        f"{platform.node()}: {platform.system()} {platform.release()}, "
        f"{len(os.sched_getaffinity(0))} CPUs ({cpu}), {memory:.1f} GiB RAM, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at start, Python {platform.python_version()}",
        f"local S3: moto, {latency_ms:g} ms added per response"
        + (
            f", every response body paced to {stream_bandwidth_mb:g} MB/s"
            if stream_bandwidth_mb > 0
            else ", response bodies unpaced"
        ),
    ]
    for tool, arg in (("rclone", "version"), ("s3fs", "--version")):
        if shutil.which(tool):
            out = subprocess.run([tool, arg], capture_output=True, text=True, check=False)
            lines.append(f"{tool}: {(out.stdout or out.stderr).splitlines()[0]}")
    return lines
