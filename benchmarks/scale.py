"""zarrfs scale benchmark: a 1.3M-entry Zarr and a 5,000-Zarr dandiset, through real FUSE mounts.

    python benchmarks/scale.py [--entries N] [--zarrs N] [--quick] [--repeat N] [--profile-parse]

Starts a local S3 (moto, own process), writes two synthetic published dandisets into it (see
`scale_data.py`), then mounts them with `python -m zarrfs mount -f ...` subprocesses and prints one
table: figure / measured / target / PASS or MISS (targets from issue 3). Nothing is written to
RESULTS.md automatically. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyfuse3
import scale_data as sd

from zarrfs import config, fuse_ops
from zarrfs.demo.locals3 import LocalS3

BIG_DANDISET = ("000950", "0.251105.1200")
MANY_DANDISET = ("000951", "0.251105.1300")
FULL_ENTRIES = 1_305_320
FULL_ZARRS = 5_000
QUICK_ENTRIES = 100_000
QUICK_ZARRS = 500
MOUNT_DEADLINE = 180.0
MB = 1 << 20
T = TypeVar("T")


def say(*args: object) -> None:
    print(*args, flush=True)


# --- machine ----------------------------------------------------------------------------------


def machine_info() -> list[tuple[str, str]]:
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    # The warm `find` rate depends on it (see patches/README.md).
    cached = fuse_ops.kernel_readdir_cache_supported() and config.env_switch(
        config.KERNEL_READDIR_CACHE_ENV
    )
    readdir_cache = "yes" if cached else "no"
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty", "--exclude", "*"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return [
        ("date", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("zarrfs commit", commit),
        ("nproc", f"{len(os.sched_getaffinity(0))} ({cpu})"),
        ("memory", mem),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("kernel", platform.release()),
        ("pyfuse3", f"{pyfuse3.__version__}, kernel caches directory listings: {readdir_cache}"),
        ("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


# --- a mount daemon -------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of `pid`, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


@dataclass
class Daemon:
    """One `python -m zarrfs mount -f` subprocess (started and ended by PID only)."""

    source: str
    mnt: Path
    endpoint: str
    cache: Path
    log: Path
    manifest_memory: str
    bucket: str
    process: subprocess.Popen[bytes] | None = None
    ready_s: float = 0.0

    def start(self) -> float:
        """Spawn and wait until `os.path.ismount`; returns spawn-to-ready seconds."""
        self.mnt.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "zarrfs", "mount", "-f", self.source, str(self.mnt),
            "--endpoint-url", self.endpoint,
            "--cache-dir", str(self.cache),
            "--manifest-memory", self.manifest_memory,
            "--manifest-root", f"s3://{self.bucket}/zarr-manifest/",
        ]  # fmt: skip
        with open(self.log, "ab") as out:
            started = time.perf_counter()
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = started + MOUNT_DEADLINE
        while not os.path.ismount(self.mnt):
            if self.process.poll() is not None:
                raise RuntimeError(f"zarrfs exited ({self.process.returncode}):\n{self.output()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"not mounted within {MOUNT_DEADLINE} s:\n{self.output()}")
            time.sleep(0.002)
        os.listdir(self.mnt)  # answered once the core is ready (it starts after the mount is live)
        self.ready_s = time.perf_counter() - started
        return self.ready_s

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run(
                ["fusermount3", "-u", "-z", str(self.mnt)], check=False, capture_output=True
            )
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            process.wait(timeout=30)  # an external unmount ends the daemon
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


# --- results --------------------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    measured: str
    target: str
    ok: bool | None  # None: informational


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, measured: str, target: str = "", ok: bool | None = None) -> None:
        self.figures.append(Figure(name, measured, target, ok))
        mark = "" if ok is None else ("  PASS" if ok else "  MISS")
        say(f"  -> {name}: {measured}{'  (target ' + target + ')' if target else ''}{mark}")

    def table(self) -> str:
        rows = [("figure", "measured", "target", "result")]
        for f in self.figures:
            result = "" if f.ok is None else ("PASS" if f.ok else "MISS")
            rows.append((f.name, f.measured, f.target or "-", result or "info"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in rows
        ]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def run_lines(command: list[str]) -> int:
    """Run `command`, return how many lines it printed (fails loudly on a non-zero exit)."""
    proc = subprocess.run(command, capture_output=True, env={**os.environ, "LC_ALL": "C"})
    if proc.returncode != 0:
        raise RuntimeError(f"{command} failed: {proc.stderr.decode(errors='replace')[:2000]}")
    return proc.stdout.count(b"\n")


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1000:.0f} ms"


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return fmt_s(values[0])
    return f"{fmt_s(statistics.median(values))} (median of {len(values)}: {', '.join(fmt_s(v) for v in values)})"


def log_seconds(text: str, pattern: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1) if m else None


# --- the benchmark ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--entries",
        type=int,
        help=f"files in the big Zarr (default {FULL_ENTRIES:,}; --quick {QUICK_ENTRIES:,})",
    )
    p.add_argument(
        "--zarrs",
        type=int,
        help=f"Zarr assets in the many-Zarr dandiset (default {FULL_ZARRS:,}; --quick {QUICK_ZARRS})",
    )
    p.add_argument("--quick", action="store_true", help="scaled-down smoke run")
    p.add_argument(
        "--repeat", type=int, default=3, help="repetitions of the cheap figures (default 3)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--manifest-memory", default="1G", help="--manifest-memory of the daemons (default 1G)"
    )
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "zarrfs-bench",
                   help="generator cache and scratch space (default %(default)s)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the scratch dir (mount logs, caches)")
    p.add_argument("--profile-parse", action="store_true",
                   help="also cProfile zarrfs.manifests.parse.parse_manifest on the big manifest in-process")  # fmt: skip
    args = p.parse_args(argv)
    entries = args.entries or (QUICK_ENTRIES if args.quick else FULL_ENTRIES)
    n_zarrs = args.zarrs or (QUICK_ZARRS if args.quick else FULL_ZARRS)
    repeat = max(1, args.repeat)
    full = entries >= FULL_ENTRIES  # per-entry figures are only comparable at the real size

    say("zarrfs scale benchmark")
    info = machine_info()
    for k, v in info:
        say(f"  {k}: {v}")
    say(
        f"  parameters: entries={entries:,} zarrs={n_zarrs:,} repeat={repeat} seed={args.seed} manifest-memory={args.manifest_memory}"
    )

    args.work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=args.work_dir))
    report = Report()
    daemons: list[Daemon] = []
    s3 = LocalS3()
    try:
        s3.start()
        say(f"local S3: {s3.endpoint_url} (pid {s3.pid})")

        # --- setup ---------------------------------------------------------------------------
        say(f"setup: big Zarr of {entries:,} entries (generator cache {args.work_dir / 'gen'})")
        t_setup, big = timed(
            lambda: sd.put_big_zarr(s3, scratch, args.work_dir / "gen", entries, args.seed, say)
        )
        assert isinstance(big, sd.BigZarr)
        sd.put_big_dandiset(s3, big, *BIG_DANDISET)
        report.notes.append(
            f"big manifest: {big.entries:,} files + {big.n_dirs:,} directories, {big.manifest_bytes / MB:.1f} MiB "
            f"JSON ({big.manifest_bytes / big.entries:.0f} B/entry), level 0 = {big.layout.per_level[0]:,} files, "
            f"`{sd.BIG_DIR}/` = {sd.Z_DIRS:,} entries; setup {t_setup:.1f} s"
        )
        say("  " + report.notes[-1])
        say(f"setup: dandiset of {n_zarrs:,} Zarrs")
        t_many, _ = timed(
            lambda: sd.put_many_zarrs_dandiset(s3, *MANY_DANDISET, n_zarrs, args.seed)
        )
        say(f"  done in {t_many:.1f} s")

        def daemon(source: tuple[str, str], cache: Path, tag: str) -> Daemon:
            d = Daemon(
                source=f"{source[0]}@{source[1]}", mnt=scratch / f"mnt-{tag}", endpoint=s3.endpoint_url,
                cache=cache, log=scratch / f"zarrfs-{tag}.log", manifest_memory=args.manifest_memory,
                bucket=s3.bucket,
            )  # fmt: skip
            daemons.append(d)
            return d

        n_nodes = big.entries + big.n_dirs  # below big.zarr
        cache = scratch / "cache-big"

        # --- A: first access with a fresh cache ---------------------------------------------
        say("A: first access into big.zarr, fresh cache dir")
        d = daemon(BIG_DANDISET, cache, "A")
        d.start()
        zroot = d.mnt / "big.zarr"
        before = d.status()
        t_first, listed = timed(lambda: os.listdir(zroot))
        after = d.status()
        expected_root = {".zattrs", ".zgroup", *map(str, range(sd.LEVELS))}
        assert set(listed) == expected_root, listed
        fetched = log_seconds(
            d.output(), r"fetched manifest of big\.zarr \(\d+ bytes\) from \S+ in ([\d.]+) s"
        )
        indexed = log_seconds(d.output(), r"indexed manifest of big\.zarr: .* in ([\d.]+) s")
        report.add(
            "first access into the big Zarr (download, parse, verify, index, cache)",
            fmt_s(t_first),
            "≤ 15 s",
            t_first <= 15,
        )
        report.notes.append(
            f"first access: daemon log says download {fetched} s, convert {indexed} s"
        )
        growth = after["VmRSS"] - before["VmRSS"]
        per_entry = growth / big.entries
        report.add(
            "daemon RSS growth per loaded entry (after first access)",
            f"{per_entry:.0f} B ({growth / MB:.0f} MiB: {before['VmRSS'] / MB:.0f} -> {after['VmRSS'] / MB:.0f} MiB; "
            f"anon +{(after['RssAnon'] - before['RssAnon']) / MB:.0f} MiB, file +{(after['RssFile'] - before['RssFile']) / MB:.0f} MiB)"
            + ("" if full else "; not judged below full size: fixed overhead dominates"),
            "≤ 150 B", (per_entry <= 150) if full else None,
        )  # fmt: skip
        report.add(
            "peak RSS during the first conversion (VmHWM)",
            f"{after['VmHWM'] / MB:.0f} MiB",
            "≤ 1.5 GiB",
            after["VmHWM"] <= 1.5 * 1024 * MB,
        )
        # a real read, pinned to its VersionId
        for path, body in big.real_files.items():
            assert (zroot / path).read_bytes() == body, path
        st = os.stat(zroot / sd.BIG_DIR / "0" / "0" / "0")
        assert st.st_size > 0
        t_find1, n1 = timed(lambda: run_lines(["find", str(zroot)]))
        t_find2, n2 = timed(lambda: run_lines(["find", str(zroot)]))
        assert n1 == n2 == n_nodes + 1, (n1, n2, n_nodes + 1)
        rate = n2 / t_find2
        report.add(
            "`find big.zarr`, warm (second run)",
            f"{rate:,.0f} entries/s ({n2:,} in {t_find2:.2f} s; first run {t_find1:.2f} s)"
            + ("" if full else f"; not judged below full size: {big.n_dirs / big.entries:.2f} dirs per file"),
            "≥ 50,000 entries/s", (rate >= 50_000) if full else None,
        )  # fmt: skip
        walked = d.status()
        report.add(
            "daemon RSS growth per entry after walking every entry",
            f"{(walked['VmRSS'] - before['VmRSS']) / big.entries:.0f} B (RSS {walked['VmRSS'] / MB:.0f} MiB; "
            f"anon {walked['RssAnon'] / MB:.0f} MiB, file {walked['RssFile'] / MB:.0f} MiB)",
        )  # fmt: skip
        d.stop()
        index_files = list((cache / "manifests").rglob("*.arrow"))
        report.notes.append(
            f"on-disk index: {sum(f.stat().st_size for f in index_files) / MB:.0f} MiB ({len(index_files)} file)"
        )

        # --- B: restart from the disk cache, then `ls -l` of the 10,000-entry directory -------
        say(f"B: restart with the same cache dir (x{repeat}), then ls -l of {sd.BIG_DIR}/")
        restarts, ls_cold, ls_warm, rss_restart = [], [], [], []
        for r in range(repeat):
            d = daemon(BIG_DANDISET, cache, f"B{r}")
            d.start()
            zroot = d.mnt / "big.zarr"
            before = d.status()
            t, listed = timed(lambda: os.listdir(zroot))  # noqa: B023
            assert set(listed) == expected_root
            restarts.append(t)
            rss_restart.append(d.status()["VmRSS"] - before["VmRSS"])
            t, n = timed(lambda: run_lines(["ls", "-l", str(zroot / sd.BIG_DIR)]))  # noqa: B023
            assert n == sd.Z_DIRS + 1, n  # "total" line + entries
            ls_cold.append(t)
            ls_warm.append(timed(lambda: run_lines(["ls", "-l", str(zroot / sd.BIG_DIR)]))[0])  # noqa: B023
            assert "fetched manifest" not in d.output()
            d.stop()
        report.add(
            "the same after restart, from the disk cache",
            spread(restarts),
            "≤ 1 s",
            statistics.median(restarts) <= 1,
        )
        report.add(
            "daemon RSS growth after loading from the disk cache",
            f"{statistics.median(rss_restart) / MB:.1f} MiB",
        )
        report.add(
            f"`ls -l` of the {sd.Z_DIRS:,}-entry directory, cold (fresh mount, index loaded)",
            spread(ls_cold),
            "≤ 1 s",
            statistics.median(ls_cold) <= 1,
        )
        report.add(
            f"`ls -l` of the {sd.Z_DIRS:,}-entry directory, warm (second listing)", spread(ls_warm)
        )

        say("C: ls -l as the very first operation of a fresh mount (index load included)")
        d = daemon(BIG_DANDISET, cache, "C")
        d.start()
        t, n = timed(lambda: run_lines(["ls", "-l", str(d.mnt / "big.zarr" / sd.BIG_DIR)]))
        assert n == sd.Z_DIRS + 1
        d.stop()
        report.add(
            f"`ls -l` of the {sd.Z_DIRS:,}-entry directory as the first operation (incl. index load)",
            fmt_s(t),
        )

        # --- D: the many-Zarr dandiset -------------------------------------------------------
        say(f"D: mount the {n_zarrs:,}-Zarr dandiset (x{repeat}, fresh cache dir each)")
        ready, rss = [], []
        for r in range(repeat):
            mcache = scratch / f"cache-many-{r}"
            d = daemon(MANY_DANDISET, mcache, f"D{r}")
            ready.append(d.start())
            rss.append(d.status()["VmRSS"])
            if r < repeat - 1:
                d.stop()
        report.add(
            f"mount-to-ready, {n_zarrs:,}-Zarr dandiset (spawn to ismount)",
            spread(ready),
            "≤ 3 s",
            statistics.median(ready) <= 3,
        )
        report.add(
            f"daemon RSS, {n_zarrs:,}-Zarr dandiset, no Zarr opened",
            f"{max(rss) / MB:.0f} MiB (max of {len(rss)})",
            "≤ 150 MiB",
            max(rss) <= 150 * MB,
        )
        # walk the dandiset tree, stat every Zarr root, never look inside one
        zarr_roots = 0
        t_walk_start = time.perf_counter()
        stack: list[str | Path] = [d.mnt]
        while stack:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.name.endswith(".zarr"):
                        assert e.stat().st_mode & 0o040000
                        zarr_roots += 1
                    elif e.is_dir():
                        stack.append(e.path)
        t_walk = time.perf_counter() - t_walk_start
        assert zarr_roots == n_zarrs, zarr_roots
        manifests = (
            [f for f in (mcache / "manifests").rglob("*") if f.is_file()]
            if (mcache / "manifests").exists()
            else []
        )
        no_fetch = not manifests and "fetched manifest" not in d.output()
        rss_walk = d.status()["VmRSS"]
        report.add(
            "no manifest fetched by mounting + walking the tree + stat of every Zarr root",
            f"{'yes' if no_fetch else 'NO'}: {len(manifests)} cached manifests, walk {fmt_s(t_walk)}, RSS {rss_walk / MB:.0f} MiB",
            "0 manifests", no_fetch,
        )  # fmt: skip
        # and opening one Zarr fetches exactly its manifest
        first = sorted(d.mnt.glob("sub-0000/ses-01/micr/*.zarr"))[0]
        assert sorted(os.listdir(first)) == [".zattrs", ".zgroup", "0"], os.listdir(first)
        # the manifest is stored in the background after the listing is answered (a small one as
        # its document, a big one as an Arrow index): wait for it
        deadline = time.perf_counter() + 30
        while not (
            manifests := [
                *(mcache / "manifests").rglob("*.json"),
                *(mcache / "manifests").rglob("*.arrow"),
            ]
        ):
            assert time.perf_counter() < deadline, "no index written 30 s after the listing"
            time.sleep(0.05)
        assert len(manifests) == 1, manifests
        d.stop()

        if args.profile_parse:
            profile_parse(s3, big, scratch)
    finally:
        for d in daemons:
            try:
                d.stop()
            except Exception as e:  # keep cleaning up
                say(f"cleanup of {d.mnt}: {e}")
        s3.stop()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            say(f"kept {scratch}")

    say("")
    say(
        f"zarrfs scale benchmark, {'QUICK ' if args.quick else ''}entries={entries:,} zarrs={n_zarrs:,}"
    )
    for k, v in info:
        say(f"  {k}: {v}")
    say("")
    say(report.table())
    say("")
    for note in report.notes:
        say(f"- {note}")
    misses = [f.name for f in report.figures if f.ok is False]
    say(f"\n{len(misses)} target(s) missed" + (": " + "; ".join(misses) if misses else ""))
    return 0


def profile_parse(s3: LocalS3, big: sd.BigZarr, scratch: Path) -> None:
    """cProfile `parse_manifest` on the big manifest, in this process (top 25 by own time)."""
    import cProfile
    import pstats

    from zarrfs.manifests.parse import parse_manifest

    body = s3.client.get_object(Bucket=s3.bucket, Key=big.manifest_key)["Body"].read()
    say(f"profile: parse_manifest on {len(body) / MB:.0f} MiB")
    prof = cProfile.Profile()
    started = time.perf_counter()
    prof.enable()
    index = parse_manifest(body, zarr_id=big.zarr_id, expected_checksum=big.checksum)
    prof.disable()
    say(
        f"  parse_manifest: {time.perf_counter() - started:.1f} s under cProfile, {index.n_nodes:,} nodes"
    )
    out = scratch / "parse.prof"
    prof.dump_stats(out)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    sys.exit(main())
