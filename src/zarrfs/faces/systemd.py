"""What a mount tells systemd: readiness (the sd_notify protocol) and journald-friendly log lines.

Owns: `notify` (a state string such as `READY=1` sent as one datagram to `$NOTIFY_SOCKET`, the
protocol of sd_notify(3), written out here because it is ten lines and libsystemd would be a C
dependency) and the log format for a stderr that systemd connects to the journal
(`JournalFormatter`: no timestamp, since journald adds its own, and an sd-daemon(3) priority prefix
`<N>` on every line, so that `journalctl -p err` finds errors). Never raises: a unit without
`Type=notify`, a socket that went away or a stderr that is not the journal only mean that there is
nobody to tell.

Concurrency: `notify` is synchronous and does not block (one datagram with MSG_DONTWAIT); it may be
called from the event loop.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

#: sd-daemon(3) priorities (syslog levels) for Python's logging levels.
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY = 7


def notify(state: str, *, environ: dict[str, str] | None = None) -> bool:
    """Send `state` (newline-separated `KEY=value` assignments, e.g. `READY=1`) to the service
    manager; True if it was sent. Without `$NOTIFY_SOCKET` (not started by systemd as
    `Type=notify`) there is nobody to tell: False, silently. An address starting with `@` is in
    the abstract namespace; only AF_UNIX sockets are supported (not `vsock:`)."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        log.warning("NOTIFY_SOCKET=%s: only AF_UNIX sockets are supported", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), socket.MSG_DONTWAIT, target)
    except OSError as e:
        log.warning("could not notify the service manager at %s: %s", address, e.strerror or e)
        return False
    return True


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (an unknown level gets the next one up)."""
    for level, prio in _PRIORITIES:
        if levelno >= level:
            return prio
    return _DEBUG_PRIORITY


class JournalFormatter(logging.Formatter):
    """`<N>name: message` on every line of the record (a traceback included: journald reads a
    stream line by line, each line its own entry with its own priority), and no timestamp."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def stderr_is_journal(fd: int = 2, environ: dict[str, str] | None = None) -> bool:
    """Whether `fd` is the stream systemd connected to the journal: `$JOURNAL_STREAM` is
    `<device>:<inode>` of that stream, and it must be this very file (the variable is inherited by
    children whose stderr may go elsewhere, as systemd.exec(5) warns)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))
