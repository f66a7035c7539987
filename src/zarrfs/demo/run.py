"""`zarrfs demo`: the whole (sample) archive in one mount, as its WebDAV view used to show it.

Owns: orchestrating the demo: start `LocalS3` and write the sample into it (`sample.build_sample`,
the same builder the tests use), start the fake DANDI API (`fake_api`), run one `zarrfs mount -f
dandi` daemon, show through real clients (zarr-python, pynwb) that each published version still
serves its own bytes after the Zarr was edited in place, that `latest` and `draft` are there and
that an old Zarr checksum is reachable under `zarrs/`, print what to try, and unmount on Ctrl-C (or
at once with `--check`). Never implements filesystem behaviour itself.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zarrfs.errors import MountError

DEMO_DIR = "zarrfs-demo"
READY_TIMEOUT = 60.0


def _mount(
    source: str,
    path: Path,
    endpoint: str,
    cache: Path,
    log: Path,
    debug: bool,
    extra: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    path.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(path):
        raise MountError(f"{path} is already mounted (a previous demo?): zarrfs unmount {path}")
    command = [
        sys.executable,
        "-m",
        "zarrfs",
        "mount",
        "-f",
        source,
        str(path),
        "--endpoint-url",
        endpoint,
        "--cache-dir",
        str(cache),
        "--xattr",  # so that `getfattr` shows where each file comes from
        *extra,
    ]
    if debug:
        command.append("--debug")
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    deadline = time.monotonic() + READY_TIMEOUT
    while not os.path.ismount(path):
        if process.poll() is not None:
            raise MountError(f"mounting {source} failed; log: {log}\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            process.terminate()
            raise MountError(f"mounting {source} timed out; log: {log}")
        time.sleep(0.05)
    return process


def _unmount(path: Path, process: subprocess.Popen[bytes]) -> None:
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, capture_output=True)
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _show_differences(mnt: Path, zarr_path: Path) -> bool:
    """Read the same data through the archive mount's versions with real clients; True if every
    check held."""
    import numpy as np
    import zarr
    from pynwb import NWBHDF5IO

    from zarrfs.demo.sample import ARRAY_PATH, EPHYS_PATH, OME_PATH, V1, V2

    releases = mnt / "dandisets" / "000123" / "releases"
    p1, p2 = releases / V1, releases / V2
    ok = True
    print("\nzarr-python, level 0 of the OME-Zarr, first chunk corner, in each version:")
    values = {}
    for version, path in ((V1, p1), (V2, p2)):
        level0 = zarr.open_array(str(path / OME_PATH / "0"), mode="r")
        values[version] = np.asarray(level0[0, 0, :3, :6])
        print(f"  releases/{version}: {values[version].tolist()}")
    if np.array_equal(values[V1], values[V2]):
        print("  !! the versions should differ here")
        ok = False
    else:
        print(f"  -> {V1} still reads its published chunk although {V2} overwrote it in place")
    old = np.asarray(zarr.open_array(str(zarr_path / "0"), mode="r")[0, 0, :3, :6])
    same = np.array_equal(old, values[V1])
    print(f"  zarrs/.../<{V1}'s checksum>.zarr reads the same values: {same}")
    ok = ok and same
    a1 = np.asarray(zarr.open_array(str(p1 / ARRAY_PATH), mode="r")[...])
    a2 = np.asarray(zarr.open_array(str(p2 / ARRAY_PATH), mode="r")[...])
    changed = int(np.count_nonzero(a1 != a2))
    print(f"Zarr format 3 array: {changed} of {a1.size} values differ between {V1} and {V2}")
    ok = ok and changed > 0
    latest = os.readlink(mnt / "dandisets" / "000123" / "latest")
    print(f"dandisets/000123/latest -> {latest}")
    ok = ok and latest == f"releases/{V2}"
    with NWBHDF5IO(str(p2 / EPHYS_PATH), mode="r") as io:
        nwb = io.read()
        ephys = nwb.acquisition["ElectricalSeries"]
        video = nwb.acquisition["ImageSeries"]
        print(
            f"pynwb: {EPHYS_PATH}: ElectricalSeries {ephys.data.shape} {ephys.data.dtype} "
            f"at {ephys.rate:g} Hz on {len(ephys.electrodes.table)} electrodes, first samples "
            f"{ephys.data[0, :4].tolist()}; ImageSeries {video.data.shape} {video.data.dtype}"
        )
    draft = sorted(os.listdir(mnt / "dandisets" / "000123" / "draft"))
    print(f"dandisets/000123/draft: {draft}")
    return ok


def run_demo(args: argparse.Namespace) -> int:
    from zarrfs.demo.fake_api import FakeDandiAPI
    from zarrfs.demo.locals3 import LocalS3
    from zarrfs.demo.sample import OME_PATH, V1, build_sample

    mnt = (args.mountpoint or Path(DEMO_DIR)).absolute()
    mnt.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="zarrfs-demo-"))
    log = work / "mount.log"
    print(f"starting a local S3 and writing the sample dandiset (work dir {work}) ...")
    with LocalS3() as s3:
        sample = build_sample(s3)
        api = FakeDandiAPI(sample).start()
        extra = ("--api-url", api.url, "--manifest-root", f"s3://{s3.bucket}/zarr-manifest/")
        process = _mount("dandi", mnt, s3.endpoint_url, work / "cache", log, args.debug, extra)
        try:
            print(f"mounted the whole archive (dandi) at {mnt}")
            zarr_id = sample.versions[V1].zarr_ids[OME_PATH]
            checksum = sample.versions[V1].zarr_checksums[OME_PATH]
            zarr_path = mnt / "zarrs" / zarr_id[:3] / zarr_id[3:6] / zarr_id / f"{checksum}.zarr"
            ok = _show_differences(mnt, zarr_path)
            d = shlex.quote(str(mnt / "dandisets" / "000123"))
            z = shlex.quote(str(zarr_path))
            print(f"""
Try:
  ls {shlex.quote(str(mnt))}/dandisets/000123/releases
  ls -l {d}/latest {d}/draft/sub-01
  python -c "import zarr; [print(v, zarr.open_array('{d}/releases/' + v + '/sub-01/sub-01_sample.ome.zarr/0', mode='r')[0, 0, :2, :4]) for v in ('0.251101.1200', '0.251102.1200')]"
  ls {z}
  getfattr -d {d}/releases/{V1}/sub-01/sub-01_sample.ome.zarr/0/0/0/0/0
  zarrfs ls dandi://dandi/000123@{V1}/sub-01 --endpoint-url {s3.endpoint_url} --api-url {api.url}
Local S3 endpoint: {s3.endpoint_url}   fake API: {api.url}   mount log: {log}""")
            if args.check:
                print("demo check " + ("passed" if ok else "FAILED"))
                return 0 if ok else 1
            try:
                print("\nPress Ctrl-C to unmount and stop.", flush=True)
                while process.poll() is None:
                    signal.signal(signal.SIGTERM, signal.default_int_handler)
                    time.sleep(0.5)
                print("the mount process exited; stopping", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                print("\nunmounting ...")
                return 0
        finally:
            _unmount(mnt, process)
            api.stop()
