"""The soak benchmark in quick mode, as a behaviour test: a real mount under 32 random readers and
injected S3 faults serves no wrong byte, fails no read outside the fault windows, leaks nothing and
keeps running. `benchmarks/soak.py` judges all that itself (exit status); this test also checks the
JSON it writes, so that a soak that silently did nothing (no reads, no faults) cannot pass.

The archive scenario (`--archive --quick`): an archive mount walking 1,500 Zarrs under
`ulimit -n 1024`, its cache dir on a filesystem that stops answering for 12 s, serves every byte and
name right with no failed read, notices the stall, keeps serving through it and uses the cache dir
again afterwards, and keeps its descriptors within its budget.

Nothing here is timed: the subprocess timeout only keeps a hung run from blocking CI forever.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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


# --- the archive scenario ---------------------------------------------------------------------------

#: The daemon's descriptor limit in the archive scenario (soft and hard).
NOFILE = 1024


@pytest.fixture(scope="module")
def archive_soak(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One quick run of the archive scenario: its figures and the end of its output."""
    require_fuse()
    out = tmp_path_factory.mktemp("archive-soak") / "soak.json"
    result = subprocess.run(
        [sys.executable, str(SOAK), "--archive", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT,
        check=False,
    )
    report = result.stdout[-8000:] + result.stderr[-3000:]
    assert out.exists(), report
    assert result.returncode in (0, 1), report  # 1: a criterion failed, named below
    return json.loads(out.read_text()), report


def test_quick_archive_soak_serves_every_byte_through_a_stalled_cache_dir_under_ulimit_1024(
    archive_soak: tuple[dict[str, Any], str],
) -> None:
    figures, report = archive_soak
    failed = {c["name"] for c in figures["criteria"] if not c["ok"]}
    assert failed == set(), report
    # every byte and every name right, no read or listing failed, nothing hung
    assert figures["wrong_bytes"] == 0 and figures["wrong_names"] == 0, report
    assert figures["errors"] == 0, report
    assert figures["reads"] >= 1000 and figures["zarrs_walked"] >= 200, report
    # the stall really happened: the daemon timed out on the cache dir and bypassed it ...
    stall, daemon = figures["stall"], figures["daemon_stats"]
    assert stall["stallfs_requests_waited"] > 0, report
    assert daemon["cache_dir.stalls"] >= 1 and daemon["cache_dir.bypassed"] > 0, report
    # ... while reads went on, each slowed by the stall timeout once at most (with slack)
    assert stall["reads_completed_after_noticed"] > 0, report
    assert stall["longest_read_overlapping_s"] <= 10.0, report
    # and it used the cache dir again once the bypass was over
    assert figures["reuse"]["cache_dir_operations"] > 0, report
    assert figures["reuse"]["stallfs_requests"] > 0, report
    # descriptors: the limit was in force and the daemon stayed far below it, within its budget
    fds = figures["descriptors"]
    assert fds["limit"] == NOFILE and daemon["descriptors.limit"] == NOFILE, report
    assert fds["proc_max"] <= fds["budget"] < NOFILE, report
    assert daemon["descriptors.peak"] <= fds["budget"], report
    assert figures["daemon_log"]["emfile"] == 0, report
    assert figures["daemon_log"]["internal_errors"] == 0, report
    assert figures["daemon_log"]["tracebacks"] == 0, report


def test_quick_archive_soak_leaves_nothing_open_in_the_cache_dir(
    archive_soak: tuple[dict[str, Any], str],
) -> None:
    figures, report = archive_soak
    assert figures["descriptors"]["under_cache_dir_at_end"] == [], report
    assert figures["descriptors"]["flocks_at_end"] == 0, report
