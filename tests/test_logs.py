"""A log file is written by a thread of its own: logging never waits for the file (a log under a
hung NFS cache dir must not stop the event loop), drops are counted and reported, and logrotate's
move is followed."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from zarrfs.faces.logs import LogWriter

STUCK_AT_EXIT = """
import logging, sys, threading
from pathlib import Path
from zarrfs.faces.logs import close_logging, setup_logging
setup_logging(False, Path(sys.argv[1]))
writer = logging.getLogger().handlers[0]
writer.file.write = lambda record: threading.Event().wait()  # a hung NFS server
logging.getLogger("zarrfs").info("stuck")
close_logging()
logging.getLogger("zarrfs").error("the last traceback")
"""


def _record(i: int) -> logging.LogRecord:
    return logging.makeLogRecord(
        {
            "name": "zarrfs.test",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "line %d",
            "args": (i,),
        }
    )


def test_logging_never_waits_for_a_stuck_file(tmp_path: Path) -> None:
    path = tmp_path / "zarrfs.log"
    writer = LogWriter(path, max_records=10)
    stuck, entered = threading.Event(), threading.Event()
    handle = writer.file.write

    def slow_handle(record: logging.LogRecord) -> None:
        entered.set()
        stuck.wait()  # the file system does not answer
        handle(record)

    writer.file.write = slow_handle  # type: ignore[method-assign]
    writer.handle(_record(0))
    assert entered.wait(5)
    done = threading.Event()

    def log_many() -> None:
        for i in range(1, 1001):
            writer.handle(_record(i))
        done.set()

    thread = threading.Thread(target=log_many)
    thread.start()
    assert done.wait(5), "a log call waited for the stuck file"
    assert writer.dropped >= 1000 - 10
    writer.file.write = handle  # type: ignore[method-assign]
    stuck.set()
    writer.close()
    lines = path.read_text().splitlines()
    assert lines[0].endswith("line 0")
    assert any(
        line.endswith(f"{writer.dropped} log lines were dropped (the log file did not keep up)")
        for line in lines
    )
    kept = [line for line in lines if "zarrfs.test: line" in line]
    assert len(kept) == 1 + 10  # the one being written, then what the queue held
    assert not any(line.endswith("line 1000") for line in lines)


def test_reopens_after_logrotate_moved_the_file(tmp_path: Path) -> None:
    path = tmp_path / "zarrfs.log"
    writer = LogWriter(path)
    writer.handle(_record(1))
    rotated = tmp_path / "zarrfs.log.1"
    for _ in range(500):  # let the first line reach the file before moving it
        if path.exists() and "line 1" in path.read_text():
            break
        threading.Event().wait(0.01)
    path.rename(rotated)
    writer.reopen()
    writer.handle(_record(2))
    writer.close()
    assert "line 1" in rotated.read_text() and "line 2" not in rotated.read_text()
    assert "line 2" in path.read_text()


def test_a_stuck_log_file_does_not_keep_the_process_from_ending(tmp_path: Path) -> None:
    """The writer thread hangs in a write: the process still ends (logging.shutdown waits on no
    lock the thread holds), and what is logged after close_logging goes to stderr."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", STUCK_AT_EXIT, str(tmp_path / "zarrfs.log")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "ERROR zarrfs: the last traceback" in result.stderr
