"""Running under systemd: readiness (`Type=notify`), journald-friendly logs, the template unit.

The notification protocol is tested against a datagram socket the test binds itself, standing in
for systemd's `$NOTIFY_SOCKET` (a path, and one in the abstract namespace), first directly and then
around a real foreground mount: READY=1 must arrive only once the mount is live, STOPPING=1 when it
is being stopped. The journal format is tested on the formatter and on `setup_logging` in a
subprocess whose stderr is the file `$JOURNAL_STREAM` names. The unit file is checked with
`systemd-analyze verify` where it is installed, and its ExecStart with zarrfs's own parser.
"""

from __future__ import annotations

import logging
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import (
    EXIT_DEADLINE,
    MOUNT_DEADLINE,
    require,
    require_fuse,
    stop_mount,
    zarrfs_command,
)
from conftest import Mounted as MountedProcess
from zarrfs.demo.sample import V1, SampleDandiset
from zarrfs.faces import systemd
from zarrfs.faces.cli import build_parser, config_from_args

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "contrib" / "systemd" / "zarrfs@.service"
EXAMPLE_CONF = REPO / "contrib" / "systemd" / "example.conf"


# --- sd_notify ------------------------------------------------------------------------------------


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket in the abstract namespace and its `$NOTIFY_SOCKET` spelling."""
    name = f"zarrfs-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield sock, "@" + name


def receive(sock: socket.socket, timeout: float = 5.0) -> bytes:
    readable, _, _ = select.select([sock], [], [], timeout)
    assert readable, "nothing was sent"
    return sock.recv(4096)


def test_notify_sends_one_datagram_to_a_path_socket() -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s,
    ):
        path = os.path.join(tmp, "notify")  # short: AF_UNIX paths end at 107 bytes
        s.bind(path)
        assert systemd.notify("READY=1\nSTATUS=x", environ={"NOTIFY_SOCKET": path})
        assert receive(s) == b"READY=1\nSTATUS=x"


def test_notify_to_the_abstract_namespace(abstract_socket: tuple[socket.socket, str]) -> None:
    sock, address = abstract_socket
    assert systemd.notify("STOPPING=1", environ={"NOTIFY_SOCKET": address})
    assert receive(sock) == b"STOPPING=1"


def test_nobody_to_notify_is_not_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert not systemd.notify("READY=1", environ={})
    assert not systemd.notify("READY=1", environ={"NOTIFY_SOCKET": ""})
    assert caplog.records == []
    # a socket that went away, and a transport this implementation does not speak: logged, False
    assert not systemd.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not systemd.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]


@pytest.mark.fuse
def test_a_foreground_mount_notifies_ready_once_live_and_stopping(
    sample: SampleDandiset, tmp_path: Path, abstract_socket: tuple[socket.socket, str]
) -> None:
    require_fuse()
    sock, address = abstract_socket
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "zarrfs.log"
    command = zarrfs_command(
        "mount", "-f", f"{sample.dandiset_id}@{V1}", str(mnt),
        "--endpoint-url", sample.endpoint_url, "--cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": address},
        )
    mounted = MountedProcess(mnt, process, log)
    try:
        deadline = time.monotonic() + MOUNT_DEADLINE
        while not select.select([sock], [], [], 0.1)[0]:
            assert process.poll() is None, f"the daemon exited:\n{mounted.output()}"
            assert time.monotonic() < deadline, f"no READY=1:\n{mounted.output()}"
        ready = sock.recv(4096).decode()
        assert os.path.ismount(mnt)  # live by the time systemd hears of it
        assert ready.splitlines() == [
            "READY=1",
            f"STATUS=serving {sample.dandiset_id}@{V1} at {mnt}",
        ]
        assert (mnt / "dandiset.yaml").read_bytes() == sample.versions[V1].files["dandiset.yaml"]
        process.send_signal(signal.SIGTERM)
        assert receive(sock, EXIT_DEADLINE) == b"STOPPING=1"
        assert process.wait(timeout=EXIT_DEADLINE) == 0
        assert not os.path.ismount(mnt)
    finally:
        stop_mount(mounted)


# --- journald -------------------------------------------------------------------------------------


def record(level: int, message: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("zarrfs.faces.mount", level, __file__, 1, message, (), exc_info)


@pytest.mark.parametrize(
    ("level", "prefix"),
    [(logging.CRITICAL, "<2>"), (logging.ERROR, "<3>"), (logging.WARNING, "<4>"),
     (logging.INFO, "<6>"), (logging.DEBUG, "<7>"), (logging.INFO + 5, "<6>"), (1, "<7>")],
)  # fmt: skip
def test_journal_lines_carry_their_syslog_priority(level: int, prefix: str) -> None:
    assert (
        systemd.JournalFormatter().format(record(level, "hello"))
        == f"{prefix}zarrfs.faces.mount: hello"
    )


def test_every_line_of_a_traceback_keeps_the_priority() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError as e:
        text = systemd.JournalFormatter().format(record(logging.ERROR, "two\nlines", e))
    lines = text.splitlines()
    assert lines[:2] == ["<3>zarrfs.faces.mount: two", "<3>lines"]
    assert "<3>Traceback (most recent call last):" in lines
    assert lines[-2:] == ["<3>ValueError: bad", "<3>value"]
    assert all(line.startswith("<3>") for line in lines)


def test_stderr_is_journal_only_for_the_stream_named(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        st = os.fstat(a.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert systemd.stderr_is_journal(a.fileno(), env)
        assert not systemd.stderr_is_journal(b.fileno(), env)  # inherited, stderr redirected
        for value in ("", "12", "a:b", f"{st.st_dev}:", ":1"):
            assert not systemd.stderr_is_journal(a.fileno(), {"JOURNAL_STREAM": value})
        assert not systemd.stderr_is_journal(a.fileno(), {})


LOG_SOME = (
    "import logging; from zarrfs.faces.logs import setup_logging; setup_logging(False); "
    "log = logging.getLogger('zarrfs.t'); log.error('boom'); log.info('fine'); log.debug('no')"
)


def test_foreground_logging_under_systemd_drops_timestamps(tmp_path: Path) -> None:
    """`setup_logging` for stderr: journal lines when stderr is the journal's stream, else the
    usual timestamped lines."""
    stderr = tmp_path / "stderr"
    for journal in (True, False):
        with open(stderr, "w") as out:
            st = os.fstat(out.fileno())
            env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
            if journal:
                env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            subprocess.run(
                [sys.executable, "-c", LOG_SOME], stderr=out, env=env, check=True, timeout=60
            )
        lines = stderr.read_text().splitlines()
        if journal:
            assert lines == ["<3>zarrfs.t: boom", "<6>zarrfs.t: fine"]
        else:
            assert len(lines) == 2
            assert re.fullmatch(r"\d{4}-\d\d-\d\d [\d:,]+ ERROR zarrfs\.t: boom", lines[0])


# --- the unit -------------------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    """`Section.Key` -> values, in order (systemd unit syntax: comments, sections, Key=Value)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def environment_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def expand(command: str, env: dict[str, str]) -> list[str]:
    """systemd's ExecStart expansion: `${VAR}` is one word, `$VAR` is split on whitespace."""
    words: list[str] = []
    for word in shlex.split(command):
        if match := re.fullmatch(r"\$\{(\w+)\}", word):
            words.append(env[match[1]])
        elif match := re.fullmatch(r"\$(\w+)", word):
            words += env[match[1]].split()
        else:
            words.append(word)
    return words


def test_the_unit_runs_a_foreground_notify_mount_that_zarrfs_accepts() -> None:
    settings = unit_settings(UNIT)
    assert settings["Service.Type"] == ["notify"]
    assert settings["Service.KillMode"] == ["mixed"]  # SIGTERM to the daemon, which unmounts
    assert settings["Service.EnvironmentFile"] == ["/etc/zarrfs/%i.conf"]
    # a private mount namespace would hide the mount from everyone else
    namespaced = {"PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateDevices", "PrivateMounts",
                  "ReadOnlyPaths", "InaccessiblePaths", "BindPaths", "TemporaryFileSystem",
                  "RootDirectory", "DynamicUser", "MountFlags"}  # fmt: skip
    assert not {key.split(".", 1)[1] for key in settings} & namespaced
    (exec_start,) = settings["Service.ExecStart"]
    binary, verb, *args = expand(exec_start, environment_file(EXAMPLE_CONF))
    assert binary == "/usr/local/bin/zarrfs" and verb == "mount"
    config = config_from_args(build_parser().parse_args([verb, *args]))
    assert config.foreground and config.allow_other
    assert str(config.source) == "000123@0.251101.1200"
    assert str(config.mountpoint) == "/mnt/dandi/000123"
    assert (config.uid, config.gid, config.umask) == (1000, 1000, 0o027)
    assert str(config.cache_dir) == "/var/cache/zarrfs"


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "systemd-analyze is not installed (apt-get install systemd)")
    assert analyze is not None
    # an instance of the template, with its paths pointed at files that exist here
    zarrfs_bin = Path(sys.executable).with_name("zarrfs")
    text = UNIT.read_text().replace("/usr/local/bin/zarrfs", str(zarrfs_bin))
    text = text.replace("/etc/zarrfs/%i.conf", str(tmp_path / "%i.conf"))
    (tmp_path / "zarrfs@test.service").write_text(text)
    shutil.copy(EXAMPLE_CONF, tmp_path / "test.conf")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / "zarrfs@test.service")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "zarrfs" in line] == [], result.stderr
