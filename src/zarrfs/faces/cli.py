"""Command line: arguments -> a frozen `Config`, logging, user-facing errors -> exit codes.

Owns: `zarrfs mount|unmount|demo`, the `mount.zarrfs` helper for /etc/fstab, daemonizing a mount
(a fork of this process; the parent returns 0 only once the child reports the mount serving, else
prints the child's one-line error and exits non-zero; a `/dev/fd/N` mountpoint's descriptor is
inherited by the child) and exit codes. Never calls FUSE or S3 itself: `mount.serve` does.

Exit codes: 0 success; 1 unexpected internal error; 2 bad usage or SOURCE; 3 dandiset or version not
found; 4 mountpoint or FUSE problem; 5 remote data unavailable (S3/API unreachable, bad metadata);
6 `verify` found a file that differs, could not be read, or was not published.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from hashlib import sha1
from pathlib import Path

from zarrfs import __version__
from zarrfs import config as cfg
from zarrfs.errors import DataError, MountError, UserError
from zarrfs.faces import runtime
from zarrfs.faces.logs import close_logging, setup_logging
from zarrfs.io.cache_dir import make_private_dir

log = logging.getLogger("zarrfs")

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_REMOTE = 5
EXIT_VERIFY = 6


EXIT_CODES = """exit codes:
  0  done (mounted, unmounted, listed, verified)
  1  unexpected internal error (a bug: please report it with the log)
  2  bad usage, bad SOURCE or unknown -o option
  3  dandiset, version or path not found
  4  mountpoint missing, not a directory, already mounted, or the FUSE mount failed
  5  remote data unavailable (S3 or API unreachable, unreadable metadata)
  6  verification failed: bytes read through the mount differ from what was published,
     or could not be read"""

EXAMPLES = {
    "mount": """examples:
  zarrfs mount 000108@0.230623.1735 /mnt/dandi        one published version
  zarrfs mount dandi /mnt/dandi                        the whole archive (dandisets/, zarrs/)
  zarrfs mount 000108 /mnt/dandi                       every version, side by side
  zarrfs mount dandi://dandi/000108@draft/sub-1 /mnt/x  one directory of the draft
  zarrfs mount --cache-dir /scratch/zarrfs -o allow_other 000108@latest /mnt/dandi""",
    "ls": """examples:
  zarrfs ls dandi://dandi/000108@draft/sub-1/x.ome.zarr/0
  zarrfs ls -l 000108@0.230623.1735/sub-1          names, sizes, VersionIds and ETags""",
    "info": """examples:
  zarrfs info 000108@0.230623.1735                 assets, size, Zarrs, manifests cached
  zarrfs info /mnt/dandi/sub-1/x.ome.zarr/0/0/0    what a mounted file is a copy of""",
    "verify": """examples:
  zarrfs verify /mnt/dandi/sub-1/x.ome.zarr        recompute the Zarr checksum from the bytes
  zarrfs verify /mnt/dandi/sub-1/x.nwb             recompute the blob's dandi-etag""",
    "virtual-zarr": """examples:
  zarrfs virtual-zarr 000108@0.230623.1735/sub-1/sub-1_ecephys.nwb -o refs.json
then, without zarrfs:
  fsspec.get_mapper("reference://", fo="refs.json", remote_protocol="https")""",
    "stats": """examples:
  zarrfs stats /mnt/dandi""",
    "cache": """examples:
  zarrfs cache info
  zarrfs cache warm 000108@0.230623.1735 'sub-*/*.ome.zarr' metadata   index manifests
  zarrfs cache warm --data 000108@0.230623.1735 sub-1               also every byte below sub-1
  zarrfs cache clear 000108@0.230623.1735""",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zarrfs",
        description="Mount DANDI data read-only (one version, a dandiset, or the whole archive), "
        "every file pinned to the exact S3 object version that was published; list, inspect, "
        "verify and cache it without mounting.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zarrfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def verb(name: str, help_: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=description or help_,
            epilog=EXAMPLES.get(name, ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    m = verb("mount", "mount SOURCE (the archive, a dandiset, a version) at MOUNTPOINT")
    m.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    m.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    add_mount_options(m)

    u = verb("unmount", "unmount a zarrfs mount (also a dead one)")
    u.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    u.add_argument("-z", "--lazy", action="store_true", help="detach even if busy")

    ls = verb(
        "ls",
        "list a directory of SOURCE without mounting (name and size per line)",
        "List what a mount would show at SOURCE[/PATH], without mounting: one entry per line, "
        "its name and its size (a directory's total when known).",
    )
    ls.add_argument("source", metavar="SOURCE[/PATH]", help=SOURCE_HELP)
    ls.add_argument(
        "-l", "--long", action="store_true", help="also the S3 VersionId and ETag of each file"
    )
    add_connection_options(ls)

    i = verb(
        "info",
        "what SOURCE holds, or what a mounted PATH is a copy of",
        "For SOURCE: its version, assets, total size, Zarrs and which manifests are cached "
        "locally. For a PATH under a zarrfs mount: its type, size and provenance (the "
        "user.zarrfs.* attributes of --xattr, without needing them).",
    )
    i.add_argument("target", metavar="SOURCE|PATH")
    add_connection_options(i)

    v = verb(
        "verify",
        "read a mounted Zarr, directory or file and check every byte against the published digests",
        "Read every file at or below PATH through the mount, hash the bytes, and compare with what "
        "was published: each file's ETag (MD5, or DANDI's multipart etag), and for a Zarr its "
        "checksum recomputed with zarr_checksum. Goes on past what it cannot read, names every "
        "file that differs, could not be read or was not published, and ends with a summary. "
        "Exits 0 only if every file was read and matches (6 if not).",
    )
    v.add_argument("path", metavar="PATH", type=Path)
    v.add_argument("--debug", action="store_true")

    vz = verb(
        "virtual-zarr",
        "write the virtual Zarr view of an HDF5 (NWB) file as kerchunk references",
        "Build the virtual Zarr view of the HDF5 file at SOURCE/PATH (what --virtual-zarr shows "
        "as PATH.zarr) and write it as kerchunk references (format 1) whose chunks point at the "
        "blob's HTTPS URL pinned by its S3 VersionId, for fsspec users without zarrfs.",
    )
    vz.add_argument("source", metavar="SOURCE/PATH", help=SOURCE_HELP)
    vz.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="where to write them (default: stdout)"
    )
    add_connection_options(vz, dash_o=False)

    st = verb(
        "stats", "requests, bytes, cache hits, retries, errors and latency of a running mount"
    )
    st.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    st.add_argument("--debug", action="store_true")

    c = verb("cache", "what the cache dir holds; clear it; warm it before a job")
    csub = c.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    ci = csub.add_parser("info", help="what the cache dir holds (indexes, blocks, sizes)")
    add_connection_options(ci)
    cc = csub.add_parser("clear", help="remove cached data: everything, or what SOURCE left")
    cc.add_argument("source", metavar="SOURCE", nargs="?")
    add_connection_options(cc)
    cw = csub.add_parser(
        "warm",
        help="fetch and index SOURCE's manifests (and with --data the bytes of PATHs)",
        description="Fetch and index the manifests of SOURCE's Zarrs; with --data also read the "
        "bytes of every file matching PATH (globs relative to SOURCE; 'metadata' means every "
        ".zarray/.zattrs/.zgroup/.zmetadata/zarr.json) into the disk block cache. How a login "
        "node fills a shared cache before a cluster job.",
    )
    cw.add_argument("source", metavar="SOURCE")
    cw.add_argument("paths", metavar="PATH", nargs="*")
    cw.add_argument("--data", action="store_true", help="also read the bytes into the disk cache")
    add_connection_options(cw)

    d = verb(
        "demo",
        "build a sample archive in an embedded local S3 and mount it (Ctrl-C to stop)",
    )
    d.add_argument(
        "mountpoint",
        metavar="MOUNTPOINT",
        type=Path,
        nargs="?",
        help="where to mount it (default: ./zarrfs-demo)",
    )
    d.add_argument(
        "--check",
        action="store_true",
        help="run the demo's checks and exit instead of waiting for Ctrl-C",
    )
    d.add_argument("--debug", action="store_true")
    return parser


SOURCE_HELP = (
    "dandi (the whole archive), 000123 (every version), 000123@0.251101.1200, 000123@draft, "
    "000123@latest, DANDI:000123/draft, https://dandiarchive.org/dandiset/000123/latest, "
    "dandi://dandi/000123@draft/sub-01"
)


def add_mount_options(p: argparse.ArgumentParser) -> None:
    """The connection options, then what only a mount has."""
    add_connection_options(p)
    p.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    p.add_argument(
        "--uid", metavar="UID", help="owner every entry shows (default: the user who mounts)"
    )
    p.add_argument(
        "--gid", metavar="GID", help="group every entry shows (default: the mounting user's group)"
    )
    p.add_argument(
        "--umask",
        metavar="OCTAL",
        help="applied to 0777 (directories) and 0666 (files); write bits are always cleared "
        "(default: 022, i.e. 0555 and 0444)",
    )
    p.add_argument(
        "--xattr",
        action="store_true",
        dest="xattrs",
        help="serve user.zarrfs.s3_url/etag extended attributes (slows `ls -l`)",
    )
    p.add_argument(
        "--consolidate",
        action="store_true",
        help="show a consolidated .zmetadata in Zarr format 2 hierarchies without one (built from "
        "their metadata when first entered; not part of the published data)",
    )
    p.add_argument(
        "--virtual-zarr",
        action="store_true",
        help="show each HDF5 blob (NWB file) also as a Zarr store, <name>.zarr beside it, whose "
        "chunks are byte ranges of the pinned blob (built when first entered)",
    )
    p.add_argument(
        "--read-ahead",
        default="1M",
        metavar="SIZE",
        help="the kernel's readahead for the mount, set when permitted (root); 0 keeps the "
        "kernel's 128K (default: %(default)s)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics",
    )
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("--log-file", type=Path, help="log file of a background mount")


def add_connection_options(p: argparse.ArgumentParser, *, dash_o: bool = True) -> None:
    """What every verb that reads the archive takes, with the same names and defaults (`dash_o`
    False: but `-o OPTIONS`, for a verb whose `-o` is its output file)."""
    p.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="S3 endpoint (default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, or AWS)",
    )
    p.add_argument("--bucket", default=cfg.DEFAULT_BUCKET, help="bucket (default: %(default)s)")
    p.add_argument("--region", default=cfg.DEFAULT_REGION, help="region (default: %(default)s)")
    p.add_argument(
        "--manifest-root",
        metavar="URL",
        action="append",
        dest="manifest_roots",
        help="where Zarr manifests live (s3://, https://, file://); repeatable, tried in "
        "order (default: s3://<bucket>/zarr-manifest/, then the DataLad mirror)",
    )
    p.add_argument(
        "--api-url",
        default=cfg.DEFAULT_API_URL,
        help="DANDI API, only for draft/latest (default: %(default)s)",
    )
    p.add_argument("--cache-dir", type=Path, help=f"default: {cfg.default_cache_dir()}")
    p.add_argument(
        "--memory-cache-size",
        default="512M",
        metavar="SIZE",
        help="in-memory block cache budget (default: %(default)s)",
    )
    p.add_argument(
        "--cache-size",
        metavar="SIZE",
        help="disk block cache under the cache dir, shareable between mounts and nodes (default: "
        "a tenth of the free space, at most 50G; 0 disables it)",
    )
    p.add_argument(
        "--manifest-memory",
        default="1G",
        metavar="SIZE",
        help="budget for loaded manifest indexes (default: %(default)s)",
    )
    p.add_argument(
        "--manifest-cache-size",
        default="8G",
        metavar="SIZE",
        help="cap of the on-disk store of converted manifest indexes (default: %(default)s)",
    )
    p.add_argument(
        "--signed",
        action="store_true",
        help="sign requests with AWS credentials (default: anonymous)",
    )
    p.add_argument(
        "--version-memory",
        default="256M",
        metavar="SIZE",
        help="budget for resolved versions an archive or dandiset mount keeps (default: "
        "%(default)s)",
    )
    p.set_defaults(options=[])
    if dash_o:
        p.add_argument(
            "-o",
            dest="options",
            action="append",
            default=[],
            metavar="OPTIONS",
            help="comma-separated mount options (allow_other, endpoint_url=..., bucket=..., "
            "cache_dir=..., ...)",
        )
    p.add_argument("--debug", action="store_true", help="debug logging (implies nothing else)")


_O_KEYS = {
    "endpoint_url",
    "bucket",
    "region",
    "api_url",
    "cache_dir",
    "memory_cache_size",
    "manifest_memory",
    "manifest_cache_size",
    "version_memory",
    "cache_size",
    "metrics_port",
    "read_ahead",
    "manifest_root",
    "log_file",
    "uid",
    "gid",
    "umask",
}
_O_IGNORED = {
    "ro",
    "rw",
    "nodev",
    "nosuid",
    "noexec",
    "auto",
    "noauto",
    "user",
    "users",
    "_netdev",
    "defaults",
    "nofail",
    "exec",
    "dev",
    "suid",
}


def apply_o_options(args: argparse.Namespace) -> None:
    """Fold `-o a,b=c` into the parsed arguments (mount(8)/fstab style)."""
    for group in args.options:
        for item in filter(None, (s.strip() for s in group.split(","))):
            key, _, value = item.partition("=")
            key = key.replace("-", "_")
            if key == "allow_other":
                args.allow_other = True
            elif key in ("xattr", "xattrs"):
                args.xattrs = True
            elif key in ("foreground", "debug", "signed", "consolidate", "virtual_zarr"):
                setattr(args, key, True)
            elif key == "manifest_root":
                args.manifest_roots = [*(args.manifest_roots or []), value]
            elif key in _O_KEYS and value:
                setattr(args, key, Path(value) if key in ("cache_dir", "log_file") else value)
            elif key in _O_IGNORED or key.startswith("x-"):
                continue
            else:
                raise UserError(f"unknown mount option {item!r}")


def config_from_args(args: argparse.Namespace) -> cfg.Config:
    from dataclasses import replace

    from zarrfs.archive.sources import parse_source

    apply_o_options(args)
    source = parse_source(args.source)
    try:
        connection = cfg.config_from_options(
            source,
            endpoint_url=args.endpoint_url,
            bucket=args.bucket,
            region=args.region,
            manifest_root=args.manifest_roots,
            api_url=args.api_url,
            cache_dir=args.cache_dir,
            memory_cache_size=args.memory_cache_size,
            cache_size=args.cache_size,
            manifest_memory=args.manifest_memory,
            manifest_cache_size=args.manifest_cache_size,
            version_memory=args.version_memory,
            signed=args.signed,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    mountpoint = getattr(args, "mountpoint", None)
    uid, gid, umask = _ownership(args)
    return replace(
        connection,
        mountpoint=runtime.real_path(mountpoint) if mountpoint is not None else Path("/"),
        foreground=getattr(args, "foreground", False),
        debug=args.debug,
        allow_other=getattr(args, "allow_other", False),
        uid=uid,
        gid=gid,
        umask=umask,
        xattrs=getattr(args, "xattrs", False),
        consolidate=getattr(args, "consolidate", False),
        virtual_zarr=getattr(args, "virtual_zarr", False),
        metrics_port=_port(getattr(args, "metrics_port", None)),
        kernel_readdir_cache=cfg.env_switch(cfg.KERNEL_READDIR_CACHE_ENV),
        zero_message_open=cfg.env_switch(cfg.ZERO_MESSAGE_OPEN_ENV),
        read_ahead=_size("read ahead", getattr(args, "read_ahead", None), cfg.DEFAULT_READ_AHEAD),
    )


def _ownership(args: argparse.Namespace) -> tuple[int | None, int | None, int]:
    """`--uid`, `--gid` (numbers) and `--umask` (octal), range-checked; for verbs without them,
    the defaults."""
    ids: list[int | None] = []
    for name in ("uid", "gid"):
        text = getattr(args, name, None)
        if text is None:
            ids.append(None)
        elif text.isascii() and text.isdigit() and int(text) < 0xFFFFFFFF:
            ids.append(int(text))  # (uid_t)-1 is no id: chown(2) reads it as "unchanged"
        else:
            raise UserError(f"bad {name} {text!r}: use a number (e.g. {name}=1000)")
    text = getattr(args, "umask", None)
    if text is None:
        return ids[0], ids[1], cfg.DEFAULT_UMASK
    try:
        umask = int(text, 8)
    except ValueError:
        umask = -1
    if not 0 <= umask <= 0o777:
        raise UserError(f"bad umask {text!r}: use octal digits (e.g. umask=027)")
    return ids[0], ids[1], umask


def _size(what: str, value: object, default: int) -> int:
    if value is None:
        return default
    try:
        return cfg.parse_size(str(value))
    except ValueError:
        raise UserError(f"bad {what} size {value!r}: use bytes or a size such as 4M") from None


def _port(value: object) -> int | None:
    if value is None:
        return None
    try:
        port = int(str(value))
    except ValueError:
        raise UserError(f"bad metrics port {value!r}") from None
    if not 0 <= port < 65536:
        raise UserError(f"bad metrics port {value!r}")
    return port


def _exit_code(e: BaseException) -> int:
    if isinstance(e, UserError):
        return e.exit_code
    if isinstance(e, DataError):
        return EXIT_REMOTE
    return EXIT_INTERNAL


def _fail(message: str, code: int) -> int:
    print(f"zarrfs: error: {message}", file=sys.stderr)
    return code


def default_log_file(config: cfg.Config) -> Path:
    tag = sha1(str(config.mountpoint).encode()).hexdigest()[:10]
    name = config.source.dandiset_id or "archive"
    return config.cache_dir / "logs" / f"mount-{name}-{tag}.log"


def run_mount(args: argparse.Namespace) -> int:
    from zarrfs.faces.mount import check_mountpoint

    config = config_from_args(args)
    check_mountpoint(config.mountpoint)
    if not config.foreground:
        return _spawn_background(config, args)
    reopen_log = setup_logging(config.debug, args.log_file)
    try:
        _serve_foreground(config, None, reopen_log)
    except (UserError, DataError) as e:
        return _fail(str(e), _exit_code(e))
    except KeyboardInterrupt:
        return 130
    finally:
        close_logging()
    return EXIT_OK


def _run_daemon(config: cfg.Config, ready_fd: int, log_file: Path) -> int:
    """The process of a background mount: logs to `log_file`, says READY or ERROR on `ready_fd`."""
    reopen_log = setup_logging(config.debug, log_file)
    os.chdir("/")  # a daemon must not keep the caller's working directory busy
    try:
        _serve_foreground(config, ready_fd, reopen_log)
    except (UserError, DataError) as e:
        log.error("%s", e)
        _report(ready_fd, f"ERROR {_exit_code(e)} {e}")
        return _exit_code(e)
    except KeyboardInterrupt:
        return 130
    finally:
        close_logging()
    return EXIT_OK


def _serve_foreground(
    config: cfg.Config, ready_fd: int | None, reopen_log: Callable[[], None] | None
) -> None:
    import trio

    from zarrfs.faces.mount import serve

    def ready() -> None:
        if ready_fd is not None:
            _report(ready_fd, "READY")

    trio.run(lambda: serve(config, on_ready=ready, reopen_log=reopen_log))


def _report(fd: int, line: str) -> None:
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
        os.close(fd)
    except OSError:
        pass


def _spawn_background(config: cfg.Config, args: argparse.Namespace) -> int:
    """Fork the mount's daemon and return once it reports the mount serving, or failed.

    A fork, not a new interpreter: this process has already imported what the mount needs (pyfuse3,
    trio, the FUSE adapter: some 0.2 s), and nothing here has started a thread. The child starts a
    session of its own (no terminal), reads /dev/null and writes to the log file."""
    if threading.active_count() > 1:  # a fork would copy locks other threads may hold
        raise UserError(
            "a background mount cannot be started from a process that runs threads: "
            "run `zarrfs mount` as a command, or with --foreground"
        )
    log_file = (args.log_file or default_log_file(config)).absolute()
    make_private_dir(log_file.parent)
    os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    from zarrfs.faces.mount import fuse_fd

    passed_fd = fuse_fd(config.mountpoint)  # /dev/fd/N: the child serves the same descriptor
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = EXIT_INTERNAL
        try:
            os.close(read_fd)
            os.setsid()
            _detach_stdio(log_file)
            _close_fds_but(write_fd, passed_fd)  # what the caller left open is not the daemon's
            code = _run_daemon(config, write_fd, log_file)
        except BaseException:
            log.exception("the mount process failed")
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(write_fd)
    try:
        message = _wait_for_child(read_fd, pid, cfg.MOUNT_READY_TIMEOUT)
    except BaseException:  # Ctrl-C while waiting: no mount may outlive the command that failed
        _stop_child(pid, config.mountpoint if passed_fd is None else None)
        raise
    finally:
        os.close(read_fd)
    if message == "READY":
        return EXIT_OK
    _stop_child(pid, config.mountpoint if passed_fd is None else None)
    if message.startswith("ERROR "):
        _, status, text = message.split(" ", 2)
        return _fail(text, int(status))
    return _fail(f"{message} (see {log_file})", EXIT_INTERNAL)


def _close_fds_but(*keep: int | None) -> None:
    """Close every descriptor above 2 except `keep` (a fork inherits them all: a lock the caller
    holds, the far end of a pipe it waits on)."""
    start = 3
    for fd in sorted(k for k in keep if k is not None and k >= 3):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, os.sysconf("SC_OPEN_MAX"))


def _stop_child(pid: int, mountpoint: Path | None) -> None:
    """End a daemon that did not get ready (it unmounts on SIGTERM; `auto_unmount` covers a crash),
    and make sure nothing stays mounted at `mountpoint` (None: a /dev/fd/N mount, the caller's)."""
    with contextlib.suppress(ChildProcessError, ProcessLookupError):
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + cfg.CHILD_STOP_WAIT
            while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
                time.sleep(0.05)
    if mountpoint is not None and os.path.ismount(mountpoint):
        _fusermount(mountpoint, lazy=True)


def _detach_stdio(log_file: Path) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log_file, os.O_WRONLY | os.O_APPEND)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(devnull)
    os.close(out)


def _wait_for_child(fd: int, pid: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buffer = b""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return f"the mount did not become ready within {timeout:.0f} s"
        readable, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
                return f"the mount process exited with status {code} before it was ready"
            buffer += chunk
    return buffer.split(b"\n", 1)[0].decode("utf-8", "replace")


def _fusermount(mountpoint: Path, *, lazy: bool) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise MountError("fusermount3 not found (install the fuse3 package)")
    command = [tool, "-u", *(["-z"] if lazy else []), str(mountpoint)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def is_mounted(path: Path) -> bool:
    """True for a live mount and for a dead one (daemon gone: stat fails with ENOTCONN); give the
    real path (`runtime.real_path`), as /proc/self/mounts has it."""
    try:
        if os.path.ismount(path):
            return True
    except OSError:
        pass
    return str(path) in runtime.mounted_paths()


def _quiet_logging(debug: bool) -> None:
    setup_logging(debug)
    if not debug:
        logging.getLogger().setLevel(logging.ERROR)  # the output is the answer; errors are lines


def run_ls(args: argparse.Namespace) -> int:
    """`zarrfs ls SOURCE[/PATH]`: what a mount would show there, one entry per line."""
    import trio

    from zarrfs.faces.verbs import list_entries

    config = config_from_args(args)
    _quiet_logging(config.debug)
    for line in trio.run(list_entries, config, args.long):
        print(line)
    return EXIT_OK


def run_info(args: argparse.Namespace) -> int:
    import trio

    from zarrfs.faces import verbs

    _quiet_logging(args.debug)
    target = Path(args.target)
    if os.path.exists(target):
        lines = trio.run(verbs.info_path, target)
    else:
        args.source = args.target
        lines = trio.run(verbs.info_source, config_from_args(args))
    print("\n".join(lines))
    return EXIT_OK


def run_verify(args: argparse.Namespace) -> int:
    """`zarrfs verify PATH`: 0 only when every file below PATH was read and matched; 6 when
    anything differs or could not be read (each named on stdout, with a summary), also when PATH
    itself cannot be read."""
    import trio

    from zarrfs.faces.verbs import describe_os_error, verify

    _quiet_logging(args.debug)
    try:
        os.stat(args.path)
    except FileNotFoundError:
        raise MountError(f"{args.path} does not exist") from None
    except OSError as e:  # EIO, a dead mount (ENOTCONN), ...
        return _fail(f"cannot verify {args.path}: {describe_os_error(e)}", EXIT_VERIFY)
    try:
        verdict = trio.run(verify, args.path)
    except OSError as e:  # verify reports what it cannot read; this is a last resort
        return _fail(f"cannot verify {args.path}: {describe_os_error(e)}", EXIT_VERIFY)
    print("\n".join(verdict.lines))
    return EXIT_OK if verdict.ok else EXIT_VERIFY


def run_stats(args: argparse.Namespace) -> int:
    from zarrfs.faces.verbs import stats_lines

    print("\n".join(stats_lines(args.mountpoint)))
    return EXIT_OK


def run_cache(args: argparse.Namespace) -> int:
    import trio

    from zarrfs.faces import verbs

    _quiet_logging(args.debug)
    cache_dir = (args.cache_dir or cfg.default_cache_dir()).absolute()
    if args.cache_command == "info":
        lines = verbs.cache_info(cache_dir)
    elif args.cache_command == "clear":
        config = config_from_args(args) if args.source else None
        lines = verbs.cache_clear(config, cache_dir)
    else:
        logging.getLogger().setLevel(logging.WARNING if not args.debug else logging.DEBUG)
        lines = trio.run(verbs.cache_warm, config_from_args(args), args.paths, args.data)
    print("\n".join(lines))
    return EXIT_OK


def run_virtual_zarr(args: argparse.Namespace) -> int:
    """`zarrfs virtual-zarr SOURCE/PATH [-o FILE]`: the references on stdout or in FILE (written
    whole or not at all), a summary line on stderr."""
    import json

    import trio

    from zarrfs.faces.verbs import virtual_zarr_refs

    config = config_from_args(args)
    _quiet_logging(config.debug)
    refs, summary = trio.run(virtual_zarr_refs, config)
    text = json.dumps(refs, separators=(",", ":"))
    if args.output is None:
        print(text)
    else:
        tmp = args.output.with_name(f".{args.output.name}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, args.output)
        except OSError as e:
            raise UserError(f"cannot write {args.output}: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)
    print(summary, file=sys.stderr)
    return EXIT_OK


def run_unmount(args: argparse.Namespace) -> int:
    mountpoint = runtime.real_path(args.mountpoint)  # as /proc/self/mounts has it, also when dead
    if not is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is not mounted")
    result = _fusermount(mountpoint, lazy=args.lazy)
    if result.returncode != 0:
        raise MountError(result.stderr.strip() or f"unmounting {mountpoint} failed")
    return EXIT_OK


def skip_httpx_cli() -> None:
    """Keep `import httpx` from importing httpx's own command line client (`httpx._main`): where
    click, pygments and rich are installed (click comes with zarr_checksum), `httpx/__init__`
    imports all three: 30 ms at every start with a warm page cache (the core's imports took 57 ms
    with them, 25 ms without), about 40 ms with a cold one, between the mount going live and the
    core serving. This process never runs that client, so `httpx.main` becomes httpx's own
    stand-in, which says the client cannot run here. (tests/test_entrypoints.py fails if an httpx
    release stops tolerating the missing module.)"""
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


#: The variables that size the thread pools of the BLAS libraries numpy may be built with
#: (OpenBLAS, as in numpy's wheels; MKL; an OpenMP build of either).
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


def single_threaded_blas() -> None:
    """Give the BLAS library numpy loads a pool of one thread. zarrfs uses numpy for the columns of
    manifest indexes and never calls BLAS, but OpenBLAS starts a thread per usable core when numpy
    is imported (63 more on a 64-core node, counted against the user's process limit) and takes
    longer to load for it (43-47 ms against 38 ms with 2 cores). Set before numpy is imported (in
    the background once a mount of a version with Zarrs serves, or when a verb first reads a
    manifest), whatever the environment says: the values a job sets are for its own computations,
    not for the daemon. (The HDF5 worker of `virtual.extract` gets the same values from its own
    `WORKER_ENV`.)"""
    for name in BLAS_THREAD_VARIABLES:
        os.environ[name] = "1"


def console_main(argv: Sequence[str] | None = None) -> int:
    """The `zarrfs` command (and `python -m zarrfs`): `main` in a process of its own, which it may
    set up for itself (`skip_httpx_cli`, `single_threaded_blas`). A program that calls `main`
    directly keeps its httpx, its environment and its children's environment as they were."""
    skip_httpx_cli()
    single_threaded_blas()
    return main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "mount":
            return run_mount(args)
        if args.command == "unmount":
            return run_unmount(args)
        if args.command == "ls":
            return run_ls(args)
        if args.command == "info":
            return run_info(args)
        if args.command == "verify":
            return run_verify(args)
        if args.command == "stats":
            return run_stats(args)
        if args.command == "virtual-zarr":
            return run_virtual_zarr(args)
        if args.command == "cache":
            return run_cache(args)
        if args.command == "demo":
            from zarrfs.demo import missing_requirements

            if missing := missing_requirements():
                raise UserError(
                    f"zarrfs demo needs the demo extra ({', '.join(missing)} missing): "
                    "pip install 'zarrfs[demo]' (scripts/setup.sh installs it)"
                )
            from zarrfs.demo.run import run_demo

            return run_demo(args)
    except (UserError, DataError) as e:
        return _fail(str(e), _exit_code(e))
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def mount_helper_args(argv: Sequence[str]) -> list[str] | None:
    """Translate mount(8)'s helper call `SOURCE DIR [-sfnv] [-N NS] [-o OPTS] [-t TYPE]` into
    `zarrfs mount` arguments; None for a fake mount (`-f`), which must do nothing."""
    positional: list[str] = []
    options: list[str] = []
    items = iter(argv)
    for item in items:
        if item == "-o":
            options += ["-o", next(items, "")]
        elif item in ("-N", "-t"):
            next(items, None)  # namespace / filesystem type: nothing for us to do
        elif item.startswith("-") and len(item) > 1 and set(item[1:]) <= set("sfnvr"):
            if "f" in item[1:]:
                return None
        else:
            positional.append(item)
    return ["mount", *positional, *options]


def mount_helper_main(argv: Sequence[str] | None = None) -> int:
    """`mount.zarrfs SOURCE MOUNTPOINT [-o OPTIONS]`, as mount(8) calls it for fstab entries."""
    args = mount_helper_args(list(sys.argv[1:] if argv is None else argv))
    return EXIT_OK if args is None else console_main(args)
