"""`zarrfs demo`: a sample dandiset in an embedded local S3, two versions mounted side by side.

Owns: orchestrating the demo: start `LocalS3`, write the sample (`sample.build_sample`, the same
builder the tests use), run one `zarrfs mount -f` daemon per published version, show that the
versions differ through real clients (zarr-python, h5py), print what to try, and unmount everything
on Ctrl-C (or at once with `--check`). Never implements filesystem behaviour itself.
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

from ..errors import MountError

DEMO_DIR = "zarrfs-demo"
READY_TIMEOUT = 60.0


def _mount(
    source: str, path: Path, endpoint: str, cache: Path, log: Path, debug: bool
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


def _show_differences(mounts: dict[str, Path]) -> bool:
    """Read the same data through both mounts with real clients; True if all checks held."""
    import h5py
    import numpy as np
    import zarr

    from .sample import ARRAY_PATH, EPHYS_PATH, OME_PATH

    (v1, p1), (v2, p2) = mounts.items()
    ok = True
    print("\nzarr-python, level 0 of the OME-Zarr, first chunk corner, through each mount:")
    values = {}
    for version, path in mounts.items():
        level0 = zarr.open_array(str(path / OME_PATH / "0"), mode="r")
        values[version] = np.asarray(level0[0, 0, :3, :6])
        print(f"  {version}: {values[version].tolist()}")
    if np.array_equal(values[v1], values[v2]):
        print("  !! the versions should differ here")
        ok = False
    else:
        print("  -> v1 still reads the published v1 chunk although v2 overwrote it in place")
    a1 = np.asarray(zarr.open_array(str(p1 / ARRAY_PATH), mode="r")[...])
    a2 = np.asarray(zarr.open_array(str(p2 / ARRAY_PATH), mode="r")[...])
    changed = int(np.count_nonzero(a1 != a2))
    print(f"Zarr format 3 array: {changed} of {a1.size} values differ between {v1} and {v2}")
    ok = ok and changed > 0
    with h5py.File(p2 / EPHYS_PATH, "r") as f:
        data = f["acquisition/ElectricalSeries/data"]
        print(
            f"h5py: {EPHYS_PATH}: ElectricalSeries {data.shape} {data.dtype}, "
            f"first samples {data[0, :4].tolist()}"
        )
    return ok


def run_demo(args: argparse.Namespace) -> int:
    from .locals3 import LocalS3
    from .sample import V1, V2, build_sample

    base = (args.mountpoint or Path(DEMO_DIR)).absolute()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="zarrfs-demo-"))
    log = work / "mounts.log"
    print(f"starting a local S3 and writing the sample dandiset (work dir {work}) ...")
    with LocalS3() as s3:
        sample = build_sample(s3)
        dandiset = sample.dandiset_id
        mounts: dict[str, Path] = {}
        processes: list[tuple[Path, subprocess.Popen[bytes]]] = []
        try:
            for version in (V1, V2):
                source = f"{dandiset}@{version}"
                path = base / source
                processes.append(
                    (path, _mount(source, path, s3.endpoint_url, work / "cache", log, args.debug))
                )
                mounts[version] = path
                print(f"mounted {source} at {path}")
            ok = _show_differences(mounts)
            p1, p2 = (shlex.quote(str(p)) for p in mounts.values())
            print(f"""
Try:
  ls -l {p1}/sub-01/sub-01_sample.ome.zarr/0/0/0
  diff <(xxd {p1}/sub-01/sub-01_sample.ome.zarr/.zattrs) <(xxd {p2}/sub-01/sub-01_sample.ome.zarr/.zattrs)
  python -c "import zarr; [print(v, zarr.open_array(v + '/sub-01/sub-01_sample.ome.zarr/0', mode='r')[0, 0, :2, :4]) for v in ('{p1}', '{p2}')]"
  getfattr -d {p1}/sub-01/sub-01_sample.ome.zarr/0/0/0/0/0
  zarrfs mount {dandiset}@{V1} /another/dir --endpoint-url {s3.endpoint_url}
Local S3 endpoint: {s3.endpoint_url}   mount log: {log}""")
            if args.check:
                print("demo check " + ("passed" if ok else "FAILED"))
                return 0 if ok else 1
            try:
                print("\nPress Ctrl-C to unmount and stop.", flush=True)
                while all(p.poll() is None for _, p in processes):
                    signal.signal(signal.SIGTERM, signal.default_int_handler)
                    time.sleep(0.5)
                print("a mount process exited; stopping", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                print("\nunmounting ...")
                return 0
        finally:
            for path, process in processes:
                _unmount(path, process)
