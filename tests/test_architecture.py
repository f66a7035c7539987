"""The layers of `src/zarrfs/` hold: import-linter checks the contracts in pyproject.toml (faces
above the domain, the domain above the archive, manifests and I/O, all above base; parsing without
FUSE; pyfuse3 only in the FUSE face; aiobotocore only in s3_reader; the demo apart). Also: every module
opens with a docstring, as a reader of `src/zarrfs/` expects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "zarrfs"


def test_import_contracts_hold() -> None:
    code = "import sys; from importlinter.cli import lint_imports_command; lint_imports_command()"
    result = subprocess.run(
        [sys.executable, "-c", code, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "0 broken" in report and "Contracts: " in report, report


def test_every_module_says_what_it_owns() -> None:
    missing = [
        str(path.relative_to(SRC))
        for path in sorted(SRC.rglob("*.py"))
        if not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert missing == []


def test_the_package_builds_without_warnings(tmp_path: Path) -> None:
    """pyproject.toml uses no deprecated form (setuptools stops building a table `license` after
    2027-02-18): building the wheel says nothing but what it built."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = [line for line in output.splitlines() if "warn" in line.lower()]
    # pip's own notes about package indexes configured on this machine are not the build's
    assert [line for line in lines if "Location 'file:" not in line] == [], output
    assert [p.name for p in tmp_path.glob("zarrfs-*.whl")], output
