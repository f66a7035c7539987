"""Where a process of zarrfs logs: stderr (journal-style under systemd), or a file written by a thread.

Owns: `setup_logging` (levels, formats, the quieting of chatty libraries) and `LogWriter`, which
writes a log file from a thread of its own: the event loop only hands each record to a bounded queue
and never waits, so a log file on a hung NFS server (the default log of a background mount is under
the cache dir, which may be shared) cannot stop a mount from serving. When the queue is full,
records are dropped and counted, and the count is written once the file takes lines again. The file
is created 0600; it is reopened when logrotate moves it (checked at every line, and on SIGHUP). At
the end of a process the writer gets a bounded time to finish (`close_logging`), and what is logged
after that goes to stderr, which a background mount points at the same file.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import queue
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zarrfs.faces import systemd
from zarrfs.io.cache_dir import make_private_dir

#: Records waiting for the writer thread at most; more are dropped (and counted).
QUEUE_RECORDS = 10_000
#: Seconds the writer gets to write what is queued when the process ends.
CLOSE_WAIT = 5.0
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Loggers of libraries that say too much at INFO.
NOISY = (
    "botocore",
    "aiobotocore",
    "httpx",
    "httpcore",
    "urllib3",
    "werkzeug",
    "asyncio",
    "pyfuse3",
)

_REOPEN = object()
_STOP = object()


class _LogFile:
    """The log file as the writer thread writes it: a plain file (not a `logging.Handler`, whose
    lock `logging.shutdown` would wait on while the thread is stuck in a hung write), reopened when
    the path no longer names the file it has open (logrotate moved it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.formatter = logging.Formatter(LINE_FORMAT)
        self._file: Any = None
        self._identity: tuple[int, int] | None = None

    def write(self, record: logging.LogRecord) -> None:
        self.reopen_if_moved()
        if self._file is None:
            self._open()
        self._file.write(self.formatter.format(record) + "\n")
        self._file.flush()

    def reopen_if_moved(self) -> None:
        try:
            st = os.stat(self.path)
            identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            identity = None
        if self._file is not None and identity != self._identity:
            self.close()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")
        st = os.fstat(fd)
        self._identity = (st.st_dev, st.st_ino)

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


class LogWriter(logging.Handler):
    """A handler that queues records for a thread writing them to `path`; see the module
    docstring."""

    def __init__(self, path: Path, max_records: int = QUEUE_RECORDS) -> None:
        super().__init__()
        self.file = _LogFile(path)
        self.queue: queue.Queue[object] = queue.Queue(max_records)
        self.dropped = 0
        self.stopped = False
        self._thread = threading.Thread(target=self._write, name="zarrfs-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # formatted here (arguments and traceback become text), written there; a copy, as
            # other handlers may see the record too
            queued = logging.makeLogRecord(record.__dict__)
            queued.msg, queued.args = self.format(record), None
            queued.exc_info = queued.exc_text = queued.stack_info = None
            self.queue.put_nowait(queued)
        except queue.Full:
            self.dropped += 1
        except Exception:
            self.handleError(record)

    def reopen(self) -> None:
        """Reopen the file (SIGHUP after logrotate), in the writer thread."""
        with contextlib.suppress(queue.Full):  # (the writer checks at every line anyway)
            self.queue.put_nowait(_REOPEN)

    def close(self, timeout: float = CLOSE_WAIT) -> None:
        """Let the writer write what is queued, waiting at most `timeout` seconds in all, then
        stop taking lines (a thread stuck in a hung write is left behind: it is a daemon)."""
        if not self.stopped:
            self.stopped = True
            with contextlib.suppress(queue.Full):
                self.queue.put_nowait(_STOP)
            self._thread.join(timeout)
        super().close()

    def _write(self) -> None:
        reported = 0
        while True:
            item = self.queue.get()
            try:
                if item is _STOP:
                    self.file.close()
                    return
                if item is _REOPEN:
                    self.file.reopen_if_moved()
                    continue
                assert isinstance(item, logging.LogRecord)
                if self.dropped > reported:
                    lost = self.dropped - reported
                    reported = self.dropped
                    self.file.write(
                        logging.makeLogRecord(
                            {
                                "name": __name__,
                                "levelno": logging.WARNING,
                                "levelname": "WARNING",
                                "msg": f"{lost} log lines were dropped (the log file did not "
                                "keep up)",
                            }
                        )
                    )
                self.file.write(item)
            except Exception as e:  # a full or broken disk: say so where someone may see it
                with contextlib.suppress(Exception):
                    sys.stderr.write(f"zarrfs: cannot write the log file {self.file.path}: {e}\n")


def setup_logging(debug: bool, log_file: Path | None = None) -> Callable[[], None] | None:
    """Log to `log_file` (mode 0600; through a `LogWriter`) or to stderr.

    Returns the function that reopens the log file (for SIGHUP), or None when logging to stderr.
    """
    handler: logging.Handler
    reopen: Callable[[], None] | None = None
    if log_file is not None:
        make_private_dir(log_file.parent)
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        writer = LogWriter(log_file)
        handler, reopen = writer, writer.reopen
    else:
        handler = logging.StreamHandler(sys.stderr)
        if systemd.stderr_is_journal(sys.stderr.fileno()):
            # run by systemd: journald adds the time; `<N>` prefixes carry each line's priority
            handler.setFormatter(systemd.JournalFormatter())
        else:
            handler.setFormatter(logging.Formatter(LINE_FORMAT))
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, LogWriter):
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.INFO if debug else logging.WARNING)
    return reopen


def close_logging() -> None:
    """At the end of a process: let the log writer write what it has queued (a bounded wait),
    then log what comes after (a last traceback) to stderr, which a background mount points at its
    log file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, LogWriter):
            handler.close()
            root.removeHandler(handler)
            fallback = logging.StreamHandler(sys.stderr)
            fallback.setFormatter(logging.Formatter(LINE_FORMAT))
            root.addHandler(fallback)
