"""The soak benchmark in quick mode, as a behaviour test: a real mount under 32 random readers and
injected S3 faults serves no wrong byte, fails no read outside the fault windows, leaks nothing and
keeps running. `benchmarks/soak.py` judges all that itself (exit status); this test also checks the
JSON it writes, so that a soak that silently did nothing (no reads, no faults) cannot pass.

Nothing here is timed: the subprocess timeout only keeps a hung run from blocking CI forever.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_fuse

pytestmark = pytest.mark.fuse

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"
#: A hung daemon makes the soak wait up to zarrfs's read deadline before it gives up on a reader.
RUN_LIMIT = 600.0
FAULT_KINDS = ("slowdown", "reset", "truncate", "slow", "flip")


def test_quick_soak_serves_every_byte_right_under_faults(tmp_path: Path) -> None:
    require_fuse()
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(SOAK), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT,
        check=False,
    )
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    figures = json.loads(out.read_text())
    assert figures["pass"] is True, report
    assert figures["wrong_bytes"] == 0 and figures["short_reads"] == 0, report
    assert figures["errors_outside"] == 0, report
    assert figures["daemon_log"]["read_failures_outside"] == 0, report
    assert figures["reads"] >= 500, report
    assert figures["reads_outside"] > 0 and figures["reads_inside"] > 0, report
    for kind in FAULT_KINDS:
        assert figures["faults"][kind] > 0, f"no {kind} fault injected\n{report}"
    # the daemon really retried and really caught damaged bodies
    assert figures["daemon_log"]["retries"] > 0, report
    assert figures["daemon_log"]["damaged_in_transit"] > 0, report
    assert figures["daemon_log"]["internal_errors"] == 0, report
    assert {w["mode"] for w in figures["windows"]} == {"clean", *FAULT_KINDS, "mixed"}
