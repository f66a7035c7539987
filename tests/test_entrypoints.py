"""The two ways users start zarrfs besides `zarrfs mount`: the demo and `scripts/mount.sh`.

Both run as real subprocesses with real FUSE mounts, and must leave nothing mounted behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require, require_fuse
from zarrfs.demo.sample import EPHYS_PATH, V1, SampleDandiset

REPO = Path(__file__).resolve().parents[1]
MOUNT_SH = REPO / "scripts" / "mount.sh"
pytestmark = pytest.mark.fuse


def mounts_under(base: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(base))]


def script_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    env["ZARRFS"] = str(Path(sys.executable).with_name("zarrfs"))
    return env


def test_demo_check_mounts_the_archive_and_cleans_up(tmp_path: Path) -> None:
    require_fuse()
    result = subprocess.run(
        [sys.executable, "-m", "zarrfs", "demo", str(tmp_path), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "demo check passed" in out
    assert f"mounted the whole archive (dandi) at {tmp_path}" in out
    assert "zarr.open_array" in out  # the one-liner to try
    assert "reads the same values: True" in out and "latest -> releases/" in out
    assert mounts_under(tmp_path) == []


def test_demo_unmounts_on_ctrl_c(tmp_path: Path) -> None:
    require_fuse()
    process = subprocess.Popen(
        [sys.executable, "-m", "zarrfs", "demo", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 180
        seen = ""
        while "Press Ctrl-C" not in seen:
            line = process.stdout.readline()
            assert line, f"demo ended early:\n{seen}"
            seen += line
            assert time.monotonic() < deadline
        assert len(mounts_under(tmp_path)) == 1
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert mounts_under(tmp_path) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for path in mounts_under(tmp_path):
            subprocess.run(["fusermount3", "-u", "-z", path], check=False)


def test_mount_sh_runs_the_command_and_passes_its_exit_code(
    sample: SampleDandiset, tmp_path: Path
) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    blob = sample.versions[V1].files[EPHYS_PATH]
    command = f'test "$(stat -c %s {mnt}/{EPHYS_PATH})" = {len(blob)} && exit 7'
    result = subprocess.run(
        [str(MOUNT_SH), f"000123@{V1}", str(mnt), "--endpoint-url", sample.endpoint_url,
         "--cache-dir", str(tmp_path / "cache"), "--", "sh", "-c", command],
        capture_output=True, text=True, timeout=120, check=False, env=script_env(),
    )  # fmt: skip
    assert result.returncode == 7, result.stderr
    assert not os.path.ismount(mnt)
    # the command keeps the script's standard input (a pipeline feeding a job)
    piped = subprocess.run(
        [str(MOUNT_SH), f"000123@{V1}", str(mnt), "--endpoint-url", sample.endpoint_url,
         "--cache-dir", str(tmp_path / "cache"), "--", "sh", "-c", 'read x && test "$x" = hello'],
        input="hello\n", capture_output=True, text=True, timeout=120, check=False, env=script_env(),
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert not os.path.ismount(mnt)


def test_mount_sh_failure_and_sigterm(sample: SampleDandiset, tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    bad = subprocess.run(
        [str(MOUNT_SH), "000123@0.990101.0000", str(mnt), "--endpoint-url", sample.endpoint_url,
         "--", "true"],
        capture_output=True, text=True, timeout=120, check=False, env=script_env(),
    )  # fmt: skip
    assert bad.returncode == 3 and "not found" in bad.stderr
    assert not os.path.ismount(mnt)
    # a long-running job is stopped by SIGTERM, and the mount still goes away
    process = subprocess.Popen(
        [str(MOUNT_SH), f"000123@{V1}", str(mnt), "--endpoint-url", sample.endpoint_url,
         "--cache-dir", str(tmp_path / "cache"), "--", "sleep", "300"],
        env=script_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 143
        assert not os.path.ismount(mnt)
    finally:
        if process.poll() is None:
            process.kill()
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_mount_sh_unmounts_a_mountpoint_whose_name_has_a_space(
    sample: SampleDandiset, tmp_path: Path
) -> None:
    """/proc/mounts escapes a space as \\040: mount.sh still finds its mount and removes it."""
    require_fuse()
    mnt = tmp_path / "m n t"
    result = subprocess.run(
        [str(MOUNT_SH), f"000123@{V1}", str(mnt), "--endpoint-url", sample.endpoint_url,
         "--cache-dir", str(tmp_path / "cache"), "--", "test", "-f", str(mnt / "dandiset.yaml")],
        capture_output=True, text=True, timeout=120, check=False, env=script_env(),
    )  # fmt: skip
    try:
        assert result.returncode == 0, result.stderr
        assert mounts_under(tmp_path) == []
    finally:
        for line in mounts_under(tmp_path):
            subprocess.run(["fusermount3", "-u", "-z", line.replace("\\040", " ")], check=False)


def test_filesystem_imports_nothing_of_the_demo_extra() -> None:
    """`pip install zarrfs` has no moto/boto3: mounting must not import them (nor the demo); and
    the manifest machinery (numpy, pyarrow, zarr_checksum) waits until a Zarr is entered."""
    heavy = ("moto", "boto3", "zarr", "h5py", "pynwb", "numpy", "pyarrow", "zarr_checksum")
    code = (
        "import sys, zarrfs.faces.cli, zarrfs.faces.mount, zarrfs.fs.filesystem, zarrfs.manifest_cache;"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}"
        " or m.startswith('zarrfs.demo') or m == 'zarrfs.manifests.index'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def _last_line(code: str, env: dict[str, str] | None = None) -> str:
    """The last line a fresh interpreter running `code` prints."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return result.stdout.splitlines()[-1]


def _then(entry: str, report: str) -> str:
    """Code that runs `zarrfs --version` through `entry` of `zarrfs.faces.cli`, then `report`."""
    return (
        f"from zarrfs.faces.cli import {entry}\n"
        f"try:\n    {entry}(['--version'])\nexcept SystemExit:\n    pass\n{report}"
    )


def test_the_command_does_not_import_httpx_s_command_line_client() -> None:
    """`httpx/__init__` imports its own command line client (click, pygments, rich: 30-40 ms at
    every start) when they are installed, as they are here; the `zarrfs` command never runs it, so
    its process skips it. A program that calls `main` itself keeps httpx whole."""
    import importlib.util

    cli_deps = ("click", "pygments", "rich")
    missing = [name for name in cli_deps if importlib.util.find_spec(name) is None]
    require(not missing, f"httpx's command-line client cannot load here ({missing} missing)")
    report = (
        "import sys, httpx\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {cli_deps!r}),"
        " sys.modules.get('httpx._main') is not None)"
    )
    assert _last_line(_then("console_main", report)) == "[] False"
    library = _last_line(_then("main", report))
    assert library.endswith("True") and "'rich.console'" in library


def test_the_command_gives_blas_one_thread() -> None:
    """numpy's OpenBLAS starts a thread per usable core when it is imported; the `zarrfs` command
    never calls BLAS, so its process imports numpy with a pool of one thread, even where the
    environment asks for more. A program that calls `main` itself keeps its own setting."""
    growth = (
        "import os\nbefore = len(os.listdir('/proc/self/task'))\nimport numpy\n"
        "print(len(os.listdir('/proc/self/task')) - before, os.environ['OPENBLAS_NUM_THREADS'])"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    library = _last_line(_then("main", growth), env)
    require(
        not library.startswith("0 "),
        "numpy's BLAS starts no thread of its own here (one usable CPU, or not OpenBLAS)",
    )
    assert library == "1 2"  # the caller's setting, and the thread it asked for
    assert _last_line(_then("console_main", growth), env) == "0 1"


def test_demo_without_the_extra_says_how_to_get_it() -> None:
    # a module set to None in sys.modules is one that cannot be imported
    code = "import sys; sys.modules['moto'] = None; from zarrfs.faces.cli import main; sys.exit(main(['demo']))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "zarrfs: error: zarrfs demo needs the demo extra (moto[server] missing): "
        "pip install 'zarrfs[demo]' (scripts/setup.sh installs it)"
    )


def test_building_and_loading_an_index_does_not_import_pandas(tmp_path: Path) -> None:
    """pyarrow imports pandas (0.3 s) for `pa.array`, `pa.table` and `to_numpy` when pandas is
    installed, as it is in most scientific environments (and in the test extra): a first entry
    into a Zarr, or a remount over a cached index, must not pay for it."""
    import importlib.util

    from zarrfs.demo.sample import ManifestLeaf, build_manifest, format_manifest, zarr_checksum_of

    assert importlib.util.find_spec("pandas") is not None  # the test extra brings it (xarray)
    when = "2025-11-01T12:00:00+00:00"
    leaves = [ManifestLeaf(f"0/{i}", "v1", when, 10 + i, f"{i:032x}") for i in range(50)]
    (tmp_path / "m.json").write_text(format_manifest(build_manifest(leaves)))
    zarr_id = "11111111-1111-4111-8111-111111111111"
    code = f"""
import sys
from pathlib import Path
from zarrfs.manifests.index import ManifestIndex
from zarrfs.manifests.parse import parse_manifest
built = parse_manifest(Path({str(tmp_path / "m.json")!r}).read_bytes(), zarr_id={zarr_id!r},
                            expected_checksum={zarr_checksum_of(leaves)!r})
built.write(Path({str(tmp_path / "i.arrow")!r}))
loaded = ManifestIndex.load(Path({str(tmp_path / "i.arrow")!r}), zarr_id={zarr_id!r},
                            checksum={zarr_checksum_of(leaves)!r})
assert loaded.n_files == 50, loaded.n_files
print(sorted(m for m in sys.modules if m.split('.')[0] == 'pandas'))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
