"""What building the virtual Zarr view of an HDF5/NWB blob costs (`--virtual-zarr`, issue 17).

    python benchmarks/virtual_extract.py            # 4 files, 20 ms + 100 MB/s, 3 runs: about 4 min
    python benchmarks/virtual_extract.py --quick    # smaller files, 1 run: about 1 min
    python benchmarks/virtual_extract.py --small-chunks 200000 --json out.json

Files (written here):

  tiny.h5           one 4 KiB dataset: the floor (the worker process's start, h5py's import);
  large.nwb         the 64 MiB NWB of tests/test_virtual_nwb.py::write_large_nwb (four 16 MiB
                    ElectricalSeries in 1 MiB chunks, interleaved with small TimeSeries);
  small_chunks.h5   one dataset of `--small-chunks` chunks (default 100,000) of 2 KiB (int16,
                    random, uncompressed), written by h5py in one call, its default file format
                    (version 1 B-tree chunk index, as pynwb writes);
  many_groups.nwb   a pynwb session with many small groups and datasets: a units table (1,000
                    units, ragged spike times, a string column), a trials table (5,000 trials, 4
                    columns) and 300 small TimeSeries in a processing module.

For each file, each run:

  local    `zarrfs.virtual.extract` on the local file with a counting `read` (the same call
           `extract_local` makes, plus a counter): the extractor's reads (requests the worker sent;
           aligned 4 KiB blocks, up to 64 per request), their bytes (and % of the file), seconds;
           the view's chunk files, inline files and serialized size (`to_bytes`); and
           `extract_local` itself, timed;
  mount    a fresh `zarrfs mount --virtual-zarr` of the version (fresh cache dir) over a LocalS3
           adding 20 ms to every response and pacing bodies to 100 MB/s: the first
           `os.listdir(x.zarr)`, its seconds, and the S3 requests and bytes it caused (the local
           S3's own counters), and the daemon's log line (what the extractor asked for, its
           seconds); then a second mount over the same cache dir (the stored view).

Checks: every array of each local view is compared with h5py (`tests/test_virtual_extract.py
::check_store`, untimed); through the mount, the root listing equals the local view's and 50 chunk
files (or all, if fewer) equal the blob's bytes at their offsets. The issue's bound is judged for
large.nwb: building its view moves at most max(4 MiB, 10 %) of the file, both in the extractor's
reads (local) and from S3 (mount). Prints Markdown tables; `--json FILE` writes the raw figures.
See benchmarks/README.md ("NWB as a virtual Zarr").
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np
import trio

MiB = 1 << 20
DANDISET = "000918"
VERSION = "0.251210.1300"
FAST_RANGE_MIN_SIZE = 8 * MiB
SETTLE = 0.3
BUILT = re.compile(
    r"built the virtual Zarr view of (?P<what>\S+): (?P<chunks>\d+) chunks, (?P<inline>\d+) "
    r"inline files, (?P<mib>[\d.]+) MiB of the blob read by the extractor in (?P<s>[\d.]+) s"
)


def say(*args: object) -> None:
    print(*args, flush=True)


# --- the files ------------------------------------------------------------------------------------


def write_tiny(path: Path) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(1024, dtype="i4"))


def write_small_chunks(path: Path, n_chunks: int, chunk_bytes: int = 2048) -> None:
    import h5py

    per = chunk_bytes // 2
    data = np.random.default_rng(918).integers(-(2**15), 2**15, size=n_chunks * per, dtype="i2")
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data, chunks=(per,))


def write_many_groups(path: Path, units: int, trials: int, series: int) -> None:
    import pynwb
    from pynwb.file import Subject

    rng = np.random.default_rng(919)
    nwb = pynwb.NWBFile(
        session_description="many small groups and datasets",
        identifier="zarrfs-virtual-extract-groups",
        session_start_time=datetime(2025, 12, 10, 13, 0, tzinfo=UTC),
        subject=Subject(subject_id="01", species="Mus musculus", sex="F", age="P90D"),
    )
    device = nwb.create_device(name="probe")
    group = nwb.create_electrode_group(
        name="shank0", description="s", location="CA1", device=device
    )
    for i in range(32):
        nwb.add_electrode(group=group, location="CA1", x=float(i), y=0.0, z=0.0)
    nwb.add_unit_column(name="quality", description="curation label")
    duration = 3600.0
    for u in range(units):
        spikes = np.sort(rng.uniform(0, duration, size=int(rng.integers(100, 1500))))
        nwb.add_unit(spike_times=spikes, electrodes=[u % 32], quality=("good", "mua")[u % 2])
    nwb.add_trial_column(name="correct", description="whether the trial was correct")
    nwb.add_trial_column(name="response_time", description="seconds")
    nwb.add_trial_column(name="stimulus", description="stimulus name")
    for i in range(trials):
        start = duration * i / trials
        nwb.add_trial(
            start_time=start, stop_time=start + 0.5, correct=bool(i % 3),
            response_time=float(rng.uniform(0.1, 0.4)), stimulus=f"grating_{i % 8}",
        )  # fmt: skip
    behavior = nwb.create_processing_module(name="behavior", description="behavioural signals")
    for i in range(series):
        behavior.add(
            pynwb.TimeSeries(
                name=f"signal{i:03d}", data=rng.standard_normal(500).astype("f4"),
                unit="a.u.", rate=50.0, description=f"signal {i}",
            )
        )  # fmt: skip
    with pynwb.NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)


# --- measuring ------------------------------------------------------------------------------------


@dataclass
class Local:
    reads: int
    bytes: int
    seconds: float
    extract_local_seconds: float
    chunks: int
    inline_files: int
    view_bytes: int
    arrays_checked: int = 0
    skipped: int = 0


def extract_counting(path: Path) -> tuple[Any, int, int, float]:
    """The view of `path` built by `extract` with a counting read: (view, reads, bytes, seconds)."""
    from zarrfs.virtual import extract

    reads = moved = 0
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size

        async def read(offset: int, length: int) -> bytes:
            nonlocal reads, moved
            reads += 1
            moved += length
            parts = []
            while length:
                data = os.pread(fd, length, offset)
                if not data:
                    raise EOFError(offset)
                parts.append(data)
                offset += len(data)
                length -= len(data)
            return b"".join(parts)

        async def run() -> Any:
            return await extract(read, size, deadline=trio.current_time() + 600)

        start = time.perf_counter()
        view = trio.run(run)
        seconds = time.perf_counter() - start
    return view, reads, moved, seconds


def measure_local(path: Path, check: bool) -> tuple[Local, Any]:
    from zarrfs.virtual import extract_local

    view, reads, moved, seconds = extract_counting(path)
    start = time.perf_counter()
    again = extract_local(path, timeout=600)
    local_seconds = time.perf_counter() - start
    data = view.to_bytes()
    if again.to_bytes() != data:
        raise SystemExit(f"FAIL: {path.name}: extract_local built another view than extract")
    out = Local(reads, moved, seconds, local_seconds, view.chunk_count, len(view.inline), len(data))
    if check:
        from test_virtual_extract import check_view

        compared, skipped = check_view(path, view)  # raises if any array differs from h5py
        out.arrays_checked, out.skipped = len(compared), len(skipped)
    return out, view


class Counter:
    def __init__(self, s3: Any) -> None:
        self.s3 = s3

    def settled(self) -> Any:
        last = self.s3.stats()
        since = time.monotonic()
        while time.monotonic() - since < SETTLE:
            time.sleep(0.05)
            now = self.s3.stats()
            if (now.requests, now.bytes_sent) != (last.requests, last.bytes_sent):
                last, since = now, time.monotonic()
        return last


def measure_mount(
    s3: Any, target: Any, name: str, view: Any, local: Path, work: Path
) -> dict[str, Any]:
    """First entry on a fresh mount, then on a second mount with the stored view."""
    from harness import ZARRFS, start_mount

    counter = Counter(s3)
    base = Path(tempfile.mkdtemp(prefix="mount-", dir=work))
    cache = base / "cache"
    out: dict[str, Any] = {}
    blob = local.read_bytes()
    try:
        for phase in ("first entry", "stored view"):
            m = start_mount(
                ZARRFS, s3, target, base / phase.replace(" ", "-") / "mnt", cache,
                zarrfs_options=["--virtual-zarr"],
            )  # fmt: skip
            try:
                os.listdir(m.mnt)  # the version resolved: not part of the view's cost
                root = m.mnt / f"{name}.zarr"
                load = os.getloadavg()[0]
                before = counter.settled()
                start = time.perf_counter()
                error = None
                try:
                    names = os.listdir(root)
                except OSError as e:  # e.g. EIO: the extraction ran out of time; said in the table
                    names, error = [], f"{errno.errorcode.get(e.errno or 0, e.errno)}"
                seconds = time.perf_counter() - start
                d = counter.settled() - before
                log = m.log.read_text(errors="replace")
                built = BUILT.search(log)
                out[phase] = {
                    "seconds": seconds, "requests": d.requests, "gets": d.by_kind.get("GET", 0),
                    "bytes": d.bytes_sent, "load": load,
                    "extractor_mib": float(built["mib"]) if built else None,
                    "extractor_seconds": float(built["s"]) if built else None,
                    "error": error,
                }  # fmt: skip
                if error is not None:
                    reason = [line for line in log.splitlines() if "virtual Zarr view" in line]
                    out[phase]["log"] = reason[-1][-300:] if reason else None
                    say(f"  {name}.zarr: {error} after {seconds:.0f} s: {out[phase]['log']}")
                    break  # a second mount would try (and wait) again
                if sorted(names) != sorted(view.listdir("") or []):
                    raise SystemExit(f"FAIL: {name}.zarr lists {names} through the mount")
                if phase == "first entry":
                    check_chunks(root, view, blob, name)
            finally:
                m.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def check_chunks(root: Path, view: Any, blob: bytes, name: str, sample: int = 50) -> None:
    """Chunk files read through the mount equal the blob's bytes where the view says they are."""
    rows = list(range(view.chunk_count))
    random.Random(0).shuffle(rows)
    for row in rows[:sample]:
        path, ref = view.chunk_at(row)
        if (root / path).read_bytes() != blob[ref.offset : ref.offset + ref.length]:
            raise SystemExit(f"FAIL: {name}.zarr/{path} through the mount differs from the blob")


# --- report ---------------------------------------------------------------------------------------


@dataclass
class Results:
    machine: list[str]
    settings: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    local: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    mount: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    bound: dict[str, Any] = field(default_factory=dict)
    duration: float = 0.0


def median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def report(r: Results) -> str:
    s = r.settings
    lines = [f"- {line}" for line in r.machine]
    lines += [
        f"- `python benchmarks/virtual_extract.py{s['argv']}`; {s['runs']} run(s), medians; "
        f"the run took {r.duration / 60:.1f} min",
        "",
        "Local file (`extract` with a counting read; `extract_local` timed apart):",
        "",
        "| file | size MiB | extractor reads | MiB read | % of the file | s | extract_local s "
        "| chunk files | inline files | view KiB | arrays checked / skipped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in r.local.items():
        size = r.files[name]["size"]
        first = rows[0]
        lines.append(
            f"| {name} | {size / MiB:.1f} | {median(rows, 'reads'):.0f} "
            f"| {median(rows, 'bytes') / MiB:.2f} | {100 * median(rows, 'bytes') / size:.2f} % "
            f"| {median(rows, 'seconds'):.2f} | {median(rows, 'extract_local_seconds'):.2f} "
            f"| {first['chunks']:,} | {first['inline_files']:,} | {first['view_bytes'] / 1024:,.0f} "
            f"| {first['arrays_checked']} / {first['skipped']} |"
        )
    lines += [
        "",
        f"Through a mount (LocalS3: {s['latency'] * 1000:.0f} ms per response, bodies paced to "
        f"{s['stream_bandwidth_mb_s']:g} MB/s): the first `os.listdir(x.zarr)`:",
        "",
        "| file | first entry s | S3 GETs | MiB from S3 | % of the file | extractor asked (MiB) "
        "| extractor s (log) | second mount, stored view: s / S3 requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in r.mount.items():
        size = r.files[name]["size"]
        entries: list[dict[str, Any]] = [x["first entry"] for x in rows]
        stored_views: list[dict[str, Any]] = [x["stored view"] for x in rows if "stored view" in x]
        failed = [x for x in entries if x.get("error")]
        if failed:
            lines.append(
                f"| {name} | fails ({failed[0]['error']}) after {median(failed, 'seconds'):.0f} "
                f"| {median(failed, 'gets'):.0f} | {median(failed, 'bytes') / MiB:.2f} "
                f"| {100 * median(failed, 'bytes') / size:.2f} % | - | - | - |"
            )
            continue
        lines.append(
            f"| {name} | {median(entries, 'seconds'):.2f} | {median(entries, 'gets'):.0f} "
            f"| {median(entries, 'bytes') / MiB:.2f} | {100 * median(entries, 'bytes') / size:.2f} % "
            f"| {median(entries, 'extractor_mib'):.1f} | {median(entries, 'extractor_seconds'):.1f} "
            f"| {median(stored_views, 'seconds'):.3f} / {median(stored_views, 'requests'):.0f} |"
        )
    if r.bound:
        b = r.bound
        lines += [
            "",
            f"Issue 17's bound for large.nwb ({b['size'] / MiB:.1f} MiB): at most "
            f"{b['limit'] / MiB:.2f} MiB moved. Extractor reads (local, worst run): "
            f"{b['local'] / MiB:.2f} MiB, {'PASS' if b['local'] <= b['limit'] else 'MISS'}; "
            f"from S3 through a mount (worst run): {b['s3'] / MiB:.2f} MiB, "
            f"{'PASS' if b['s3'] <= b['limit'] else 'MISS'}.",
        ]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller files, one run")
    parser.add_argument("--small-chunks", type=int, help="chunks of small_chunks.h5 (100,000)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds added per response")
    parser.add_argument(
        "--stream-bandwidth", type=float, default=100.0,
        help="MB/s every response body is paced to (0: unpaced)",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, help="runs (default 3, --quick 1)")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with h5py")
    parser.add_argument("--work-dir", type=Path, help="scratch (default: the system temp dir)")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    n_small = args.small_chunks or (20_000 if args.quick else 100_000)
    units, trials, series = (100, 500, 30) if args.quick else (1000, 5000, 300)

    from harness import Target, machine_info, publish, upload_blob

    from test_virtual_nwb import write_large_nwb
    from zarrfs.demo.locals3 import LocalS3

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="zarrfs-virtual-extract-", dir=args.work_dir))
    try:
        files = {
            "tiny.h5": work / "tiny.h5",
            "large.nwb": work / "large.nwb",
            "small_chunks.h5": work / "small_chunks.h5",
            "many_groups.nwb": work / "many_groups.nwb",
        }
        say("writing the files ...")
        write_tiny(files["tiny.h5"])
        write_large_nwb(files["large.nwb"])
        write_small_chunks(files["small_chunks.h5"], n_small)
        write_many_groups(files["many_groups.nwb"], units, trials, series)
        results = Results(
            machine=machine_info(args.latency * 1000, args.stream_bandwidth),
            settings={
                "argv": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
                "runs": runs, "small_chunks": n_small, "units": units, "trials": trials,
                "series": series, "latency": args.latency,
                "stream_bandwidth_mb_s": args.stream_bandwidth,
            },
            files={name: {"size": p.stat().st_size} for name, p in files.items()},
        )  # fmt: skip
        say("\n".join(results.machine))
        say(f"  written in {time.perf_counter() - started:.0f} s: "
            + ", ".join(f"{n} {p.stat().st_size / MiB:.1f} MiB" for n, p in files.items()))  # fmt: skip
        os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(
            max(p.stat().st_size for p in files.values()) + MiB
        )
        with LocalS3(
            latency=args.latency,
            fast_range_min_size=FAST_RANGE_MIN_SIZE,
            stream_bandwidth=args.stream_bandwidth * 1e6,
        ) as s3:
            blobs = [upload_blob(s3, f"sub-01/{n}", p.read_bytes()) for n, p in files.items()]
            publish(s3, DANDISET, VERSION, [], blobs)
            target = Target(DANDISET, VERSION, None, blobs[0])  # type: ignore[arg-type]
            for run in range(runs):
                for name, path in files.items():
                    local, view = measure_local(path, check=run == 0 and not args.no_check)
                    results.local.setdefault(name, []).append(asdict(local))
                    mounted = measure_mount(s3, target, f"sub-01/{name}", view, path, work)
                    results.mount.setdefault(name, []).append(mounted)
                    first = mounted["first entry"]
                    say(f"run {run + 1}: {name}: local {local.reads} reads, "
                        f"{local.bytes / MiB:.2f} MiB, {local.seconds:.2f} s; mount "
                        f"{first['seconds']:.2f} s, {first['gets']} GETs, "
                        f"{first['bytes'] / MiB:.2f} MiB; load {first['load']:.2f}")  # fmt: skip
        size = results.files["large.nwb"]["size"]
        results.bound = {
            "size": size,
            "limit": max(4 * MiB, size // 10),
            "local": max(x["bytes"] for x in results.local["large.nwb"]),
            "s3": max(x["first entry"]["bytes"] for x in results.mount["large.nwb"]),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.duration = time.perf_counter() - started
    say()
    say(report(results))
    if args.json:
        args.json.write_text(json.dumps(asdict(results), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
