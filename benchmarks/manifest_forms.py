"""What each stored form of a manifest costs to load again (`config.MANIFEST_DOCUMENT_MAX_FILES`).

The index store keeps a small manifest as its document, parsed and verified again on every load, and
a big one as an Arrow index file, loaded with pyarrow (`manifest_cache`). This prints, for manifests
of growing file counts, the document's size, the time `parse_manifest` takes to parse and verify it,
the Arrow file's size and the time `ManifestIndex.load` takes (pyarrow already imported), each the
median of `--repeat` runs in this process, and the time a fresh interpreter takes to import pyarrow
(what the first Arrow load of a process pays besides, with the page cache as it is).

    python benchmarks/manifest_forms.py
    python benchmarks/manifest_forms.py --files 1000,10000,100000 --repeat 7

Writes only to a temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from zarrfs.demo.sample import ManifestLeaf, build_manifest, format_manifest
from zarrfs.manifests.index import ManifestIndex
from zarrfs.manifests.parse import parse_manifest


def leaves(n: int) -> list[ManifestLeaf]:
    """`n` chunk files, 100 per directory, with VersionIds and ETags as long as S3's."""
    return [
        ManifestLeaf(
            f"0/{i // 100}/{i % 100}",
            f"v{i:031d}",
            "2025-11-01T12:00:00+00:00",
            4096 + i,
            f"{i:032x}",
        )
        for i in range(n)
    ]


def timed(repeat: int, call: Callable[[], object]) -> float:
    """Median seconds of `repeat` calls of `call`."""
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def pyarrow_import_seconds() -> float:
    """Seconds a fresh interpreter (numpy already imported) takes to import pyarrow and its IPC."""
    code = (
        "import time, numpy; t = time.perf_counter(); import pyarrow, pyarrow.ipc; "
        "print(time.perf_counter() - t)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", default="100,1000,5118,10000,20000,50000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print("| files | document | parse and verify | Arrow file | Arrow load |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.files.split(",")):
            manifest = build_manifest(leaves(n))
            document = format_manifest(manifest).encode()
            checksum = manifest["statistics"]["zarrChecksum"]

            def parse(document: bytes = document, checksum: str = checksum) -> ManifestIndex:
                return parse_manifest(document, zarr_id="z", expected_checksum=checksum)

            parsing = timed(args.repeat, parse)
            path = Path(tmp) / f"{n}.arrow"
            parse().write(path)
            loading = timed(
                args.repeat,
                lambda p=path, c=checksum: ManifestIndex.load(p, zarr_id="z", checksum=c),
            )
            print(
                f"| {n:,} | {len(document):,} B | {parsing * 1e3:.1f} ms "
                f"| {path.stat().st_size:,} B | {loading * 1e3:.2f} ms |"
            )
    imports = [pyarrow_import_seconds() for _ in range(3)]
    print(
        f"\nimporting pyarrow in a fresh interpreter: {', '.join(f'{s * 1e3:.0f} ms' for s in imports)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
