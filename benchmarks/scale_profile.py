"""Profile one scale figure of `scale.py` and try daemon-side variants (diagnostics, not a benchmark).

    python benchmarks/scale_profile.py find  [--entries N] [--profiler py-spy|py-spy-native|strace] [--cold]
                                             [--variant none|noxattr|noopendir] [--pythonpath DIR]
    python benchmarks/scale_profile.py ls    ...    # `ls -l` of the 10,000-entry directory, x2
    python benchmarks/scale_profile.py parse [--entries N] [--variant fastdigest]
                                             # timing, RSS timeline and cProfile of parse_manifest

`find`/`ls` mount the big Zarr, load its index, run the command (find: once to warm up, then twice,
or with `--cold` once, the first pass, profiled; ls: twice) and print timings, optionally recording the daemon with py-spy (`pip install py-spy`) or
counting its syscalls with `strace -c` (one FUSE request = one read + one writev on /dev/fuse).

Variants monkeypatch the daemon (never the sources) to measure a proposed change:
  noxattr    getxattr/listxattr reply ENOSYS: the kernel then stops sending xattr requests
  noopendir  opendir replies ENOSYS: the kernel stops sending opendir/releasedir and caches readdir
             results (FOPEN_CACHE_DIR). Needs a pyfuse3 whose readdir receives the inode when there
             is no file handle: pass its directory with --pythonpath (see benchmarks/RESULTS.md).
  fastdigest (parse) Merkle digests serialized directly instead of via dataclasses.asdict
`--pythonpath DIR` puts DIR first on the daemon's PYTHONPATH (e.g. a locally built, patched pyfuse3).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale
import scale_data as sd
from harness import _CLOCK_TICKS

from zarrfs.demo.locals3 import LocalS3

_ENOSYS = "import errno, pyfuse3\nasync def _enosys(self, *a):\n    raise pyfuse3.FUSEError(errno.ENOSYS)\n"
VARIANTS = {
    "none": "",
    "noxattr": _ENOSYS
    + "from zarrfs.fuse_ops import ZarrfsOperations as O\nO.getxattr = O.listxattr = _enosys\n",
    "fastdigest": "",  # parse only: see fast_generate_digest
    "noopendir": _ENOSYS
    + "from zarrfs.fuse_ops import ZarrfsOperations as O\nO.opendir = _enosys\n",
}


class VariantDaemon(scale.Daemon):
    """A `Daemon` started through a wrapper script that applies a variant before
    `zarrfs.faces.cli.console_main`."""

    wrapper: Path | None = None

    def start(self) -> float:
        real_popen = subprocess.Popen

        def popen(command: list[str], **kw: object) -> subprocess.Popen[bytes]:
            assert command[1:3] == ["-m", "zarrfs"]
            return real_popen([command[0], str(self.wrapper), *command[3:]], **kw)  # type: ignore[call-overload,no-any-return]

        subprocess.Popen = popen  # type: ignore[assignment,misc]
        try:
            return super().start()
        finally:
            subprocess.Popen = real_popen  # type: ignore[misc]


def user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS


def summarize_pyspy(path: Path, top: int = 30) -> None:
    total: Counter[str] = Counter()
    own: Counter[str] = Counter()
    n = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n += int(count)
        for frame in set(frames):
            total[frame] += int(count)
        own[frames[-1]] += int(count)
    print(f"py-spy: {n} samples of the daemon")
    print("  inclusive:")
    for frame, c in total.most_common(top):
        print(f"    {100 * c / n:5.1f}%  {frame}")
    print("  own time:")
    for frame, c in own.most_common(top // 2):
        print(f"    {100 * c / n:5.1f}%  {frame}")


def run_fuse(args: argparse.Namespace, scratch: Path) -> None:
    if args.pythonpath:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(args.pythonpath), os.environ.get("PYTHONPATH", "")]
        )
    wrapper = scratch / "wrapper.py"
    wrapper.write_text(
        VARIANTS[args.variant]
        + "import sys\nfrom zarrfs.faces.cli import console_main\nsys.exit(console_main())\n"
    )
    with LocalS3() as s3:
        big = sd.put_big_zarr(s3, scratch, args.work_dir / "gen", args.entries, 1, print)
        sd.put_big_dandiset(s3, big, *scale.BIG_DANDISET)
        d = VariantDaemon(
            source="@".join(scale.BIG_DANDISET), mnt=scratch / "mnt", endpoint=s3.endpoint_url,
            cache=scratch / "cache", log=scratch / "zarrfs.log", manifest_memory="1G", bucket=s3.bucket,
        )  # fmt: skip
        d.wrapper = wrapper
        d.start()
        try:
            zroot = d.mnt / "big.zarr"
            t, _ = scale.timed(lambda: os.listdir(zroot))
            print(f"first access {t:.2f} s")
            command = (
                ["find", str(zroot)]
                if args.what == "find"
                else ["ls", "-l", str(zroot / sd.BIG_DIR)]
            )
            if args.what == "find" and not args.cold:
                t, n = scale.timed(lambda: scale.run_lines(command))
                print(f"find #1 (warm-up): {t:.2f} s, {n:,} lines")
            out = scratch / "profile.txt"
            spy = None
            if args.profiler.startswith("py-spy"):
                py_spy = Path(sys.executable).with_name("py-spy")
                spy_cmd = [
                    str(py_spy) if py_spy.exists() else "py-spy",
                    "record",
                    "-p",
                    str(d.pid),
                    "-r",
                    "250",
                    "-f",
                    "raw",
                    "-o",
                    str(out),
                ]
                if args.profiler == "py-spy-native":
                    spy_cmd.append("--native")
                spy = subprocess.Popen(spy_cmd, stderr=subprocess.DEVNULL)
            elif args.profiler == "strace":
                spy = subprocess.Popen(
                    ["strace", "-c", "-f", "-p", str(d.pid), "-o", str(out)],
                    stderr=subprocess.DEVNULL,
                )
            if spy is not None:
                time.sleep(1.5)
            for i in (1,) if args.cold else (2, 3):
                user, system = user_system(d.pid)
                t, n = scale.timed(lambda: scale.run_lines(command))
                rate = f", {n / t:,.0f} lines/s" if args.what == "find" else ""
                user_after, system_after = user_system(d.pid)
                print(
                    f"{args.what} #{i if args.what == 'find' else i - 1}: {t:.2f} s, {n:,} lines{rate}"
                    f", daemon CPU {user_after - user:.2f} s user + {system_after - system:.2f} s system"
                )
            if spy is not None:
                spy.send_signal(2)
                spy.wait()
                if args.profiler == "strace":
                    print(out.read_text())
                else:
                    summarize_pyspy(out)
        finally:
            d.stop()


def fast_generate_digest(self: Any) -> Any:
    """`ZarrChecksumManifest.generate_digest` without `dataclasses.asdict` (same bytes hashed)."""
    from zarr_checksum.checksum import ZarrDirectoryDigest

    files = sorted(self.files, key=lambda c: c.name)
    dirs = sorted(self.directories, key=lambda c: c.name)
    count = len(files) + sum(ZarrDirectoryDigest.parse(d.digest).count for d in dirs)
    size = sum(f.size for f in files) + sum(d.size for d in dirs)
    doc = {
        "directories": [{"digest": d.digest, "name": d.name, "size": d.size} for d in dirs],
        "files": [{"digest": f.digest, "name": f.name, "size": f.size} for f in files],
    }
    md5 = hashlib.md5(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()
    return ZarrDirectoryDigest(md5=md5, count=count, size=size)


def run_parse(args: argparse.Namespace, scratch: Path) -> None:
    import cProfile
    import pstats
    import threading

    from zarrfs.manifests.parse import parse_manifest

    if args.variant == "fastdigest":
        # parse_manifest still checks the result against the reference checksum of the generator
        from zarr_checksum.checksum import ZarrChecksumManifest

        ZarrChecksumManifest.generate_digest = fast_generate_digest  # type: ignore[method-assign]

    with LocalS3() as s3:
        big = sd.put_big_zarr(s3, scratch, args.work_dir / "gen", args.entries, 1, print)
        body = s3.client.get_object(Bucket=s3.bucket, Key=big.manifest_key)["Body"].read()

    def rss() -> int:
        return scale.proc_status(os.getpid())["VmRSS"] // (1 << 20)

    samples: list[tuple[float, int]] = []
    done = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not done.wait(0.05):
            samples.append((time.perf_counter() - t0, rss()))

    sampler = threading.Thread(target=sample)
    sampler.start()
    index = parse_manifest(body, zarr_id=big.zarr_id, expected_checksum=big.checksum)
    elapsed = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak = max(samples, key=lambda s: s[1])
    print(
        f"parse_manifest: {elapsed:.2f} s for {index.n_nodes:,} nodes, RSS peak {peak[1]} MiB at {peak[0]:.1f} s"
    )
    for t, r in samples[:: max(1, len(samples) // 12)]:
        print(f"  {t:5.1f} s  {r} MiB")
    del index
    profile = cProfile.Profile()
    profile.enable()
    parse_manifest(body, zarr_id=big.zarr_id, expected_checksum=big.checksum)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(20)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=["find", "ls", "parse"])
    p.add_argument("--entries", type=int, default=scale.FULL_ENTRIES)
    p.add_argument(
        "--profiler", choices=["none", "py-spy", "py-spy-native", "strace"], default="none"
    )
    p.add_argument("--variant", choices=sorted(VARIANTS), default="none")
    p.add_argument(
        "--cold", action="store_true",
        help="find: profile the first pass (listings not yet cached by the kernel), then stop",
    )  # fmt: skip
    p.add_argument("--pythonpath", type=Path)
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "zarrfs-bench")
    args = p.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="profile-", dir=args.work_dir) as tmp:
        if args.what == "parse":
            run_parse(args, Path(tmp))
        else:
            run_fuse(args, Path(tmp))


if __name__ == "__main__":
    main()
