"""What this machine allows before zarrfs does anything: the floors under compare.py's rows.

Some of compare.py's targets compare zarrfs with something that pays less than any Python FUSE
daemon can: rclone (one Go binary) for mount-to-ready, tmpfs (never cold) for a remount whose page
cache was dropped. This prints, on this machine, what the stack alone costs, so that a miss can be
told apart from a floor:

- **imports, page cache dropped** (what `mount live` waits for): a fresh interpreter doing nothing,
  importing trio, trio and pyfuse3 (the FUSE binding the design card names, which imports trio
  itself), and zarrfs's command and mount modules (all a mount imports before it goes live); then
  numpy (what serving a Zarr's index needs, imported in the background once a mount serves);
- **the disk, page cache dropped** (what a remount over the disk cache reads from): a file of
  `--size` MiB read once in 1 MiB `read` calls through the page cache (unbuffered in Python), as the
  disk cache's files are read. Put `--dir` on the cache dir's filesystem: the default, the system's
  temporary directory, is tmpfs on some machines.

Each figure is the median of `--repeat` runs, every one after a `drop_caches` (root only: without it
the figures are warm, and the script says so). An interpreter is timed from its spawn until its code
has run, not until it has torn itself down.

    python benchmarks/floors.py
    python benchmarks/floors.py --repeat 5 --size 256

Writes one scratch file under `--dir` (default: the system's temporary directory), removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness import drop_caches

from zarrfs.faces.cli import BLAS_THREAD_VARIABLES

MiB = 1 << 20

#: (label, the code a fresh interpreter runs)
IMPORTS = (
    ("python -c pass", "pass"),
    ("import trio", "import trio"),
    ("import trio, pyfuse3", "import trio, pyfuse3"),
    ("zarrfs's imports before the mount is live", "import zarrfs.faces.cli, zarrfs.faces.mount"),
    ("import numpy", "import numpy"),
)


#: The environment the `zarrfs` command gives itself (`faces.cli.single_threaded_blas`), so that
#: numpy loads as it does in the daemon.
DAEMON_ENV = {**os.environ, **dict.fromkeys(BLAS_THREAD_VARIABLES, "1")}


def cold_median(run: Callable[[], object], repeat: int) -> float:
    """The median seconds of `run` over `repeat` runs, each after a `drop_caches` (which does
    nothing without root: `main` says so)."""
    times = []
    for _ in range(repeat):
        drop_caches()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def start_interpreter(code: str) -> Callable[[], object]:
    """A fresh interpreter running `code`, timed until its code has run: `os._exit` skips the
    teardown (30-40 ms with trio loaded), which is not part of going live."""
    command = [sys.executable, "-c", f"{code}\nimport os\nos._exit(0)"]
    return lambda: subprocess.run(command, check=True, env=DAEMON_ENV)


def read_file(path: Path) -> Callable[[], object]:
    """`path` read once in 1 MiB `read` calls."""

    def run() -> None:
        with path.open("rb", buffering=0) as f:
            while f.read(MiB):
                pass

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--size", type=int, default=128, help="MiB read from the disk")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the scratch file goes (the cache dir's filesystem)",
    )
    args = parser.parse_args()
    dropped = drop_caches()
    print(f"{'figure':<48} {'seconds':>8}")
    for label, code in IMPORTS:
        print(f"{label:<48} {cold_median(start_interpreter(code), args.repeat):8.3f}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        path = Path(scratch) / "floor.bin"
        with path.open("wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())
        seconds = cold_median(read_file(path), args.repeat)
    print(
        f"{f'read {args.size} MiB from the disk':<48} {seconds:8.3f}  ({args.size / seconds:.0f} MiB/s)"
    )
    if not dropped:
        print("note: not allowed to drop the page cache (run as root): these figures are warm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
