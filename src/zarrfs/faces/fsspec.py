"""The fsspec face of zarrfs: protocol `zarrfs`, the same pinned reads as a mount, without FUSE.

Owns: `ZarrfsFileSystem`, an fsspec filesystem (registered for `zarrfs://` through the `fsspec.specs`
entry point) whose paths name what a mount would show:

    000123@0.251101.1200/sub-01/x.ome.zarr/0/.zarray   a published version (also @draft, @latest)
    000123/0.251101.1200/...                            a dandiset: every version side by side
    dandi/zarrs/<z[0:3]>/<z[3:6]>/<zarr id>/<checksum>.zarr/...   the whole archive

Its storage options are the command line's connection options under the same names and defaults
(`config.config_from_options`). `ls`, `info` and `find` answer from the resolved tree and the manifest
indexes (never an S3 listing of a Zarr); `cat_file`, `cat_ranges` and `open(...).read()` go through
the core's block cache with its response checks. Also owned here: the translation of domain errors
into the OSErrors fsspec readers expect (missing -> FileNotFoundError, unservable bytes -> EIO, any
write -> EROFS), and the per-process runtime that runs the core.

Never does: FUSE (nothing here imports pyfuse3), caching of its own (the core's block, disk and
manifest caches serve every read; fsspec's file caches are off unless asked for), or writes.

Concurrency: an instance holds only its options, so it pickles as its arguments and any number of
threads may use it. Each process has one runtime: a daemon thread running a trio loop, started on the
first operation in that process (after a fork or an unpickling too) and closed at exit, in which
`core.open_filesystem` runs once per source (a version, a dandiset, the archive) and set of options,
the least recently used idle ones closed beyond `config.FSSPEC_MAX_SOURCES`. Every operation is one call into that
loop (`trio.from_thread.run`), where all core state lives; the calling threads block, so readers that
parallelize (zarr-python, Dask) keep many operations in flight in the loop at once.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import trio
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from zarrfs import config as cfg
from zarrfs.archive.sources import parse_source
from zarrfs.base.refs import ObjectRef
from zarrfs.config import Config, MountSource
from zarrfs.errors import (
    DataError,
    IsADirectory,
    NotFound,
    SourceError,
    VersionNotFound,
    ZarrfsError,
    copy_error,
    errno_for,
)
from zarrfs.fs.core import open_filesystem
from zarrfs.fs.filesystem import Filesystem, OpenFile, describe_object
from zarrfs.fs.namespace import ROOT_INO, BlobRange, Entry

PROTOCOL = "zarrfs"
#: Options fsspec or its callers pass to every filesystem, meaningless here (zarr-python passes
#: `asynchronous=True`, then wraps this synchronous filesystem itself).
IGNORED_OPTIONS = frozenset(
    {"asynchronous", "loop", "use_listings_cache", "listings_expiry_time", "max_paths"}
)

log = logging.getLogger(__name__)
_DANDISET_HEAD = re.compile(r"^[0-9]{6}(@[^/@\s]+)?\Z")
T = TypeVar("T")


# --- paths --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FsspecPath:
    """A path of the face, split: the source it is in, its first component as written (names in
    answers keep it, so that callers can strip the prefix they gave), and the components below."""

    source: MountSource
    head: str
    parts: tuple[str, ...]

    def name(self, parts: Sequence[str] = ()) -> str:
        """The path of `parts` below this source, as answers spell it."""
        return "/".join((self.head, *parts))


def split_path(path: str) -> FsspecPath:
    """`000123@VERSION/...`, `000123/...` or `dandi/...` (protocol already stripped) -> the source
    and the components below it. Raises SourceError for anything else."""
    head, *rest = path.strip("/").split("/")
    parts = tuple(p for p in rest if p)
    if head.lower() == "dandi":
        return FsspecPath(MountSource(), head, parts)
    if not _DANDISET_HEAD.match(head):
        raise SourceError(
            f"{path!r} is not a zarrfs path: use 000123@VERSION/..., 000123/... or dandi/..."
        )
    return FsspecPath(parse_source(head), head, parts)


# --- errors -------------------------------------------------------------------------------------


def os_error(exc: ZarrfsError, path: str) -> OSError:
    """The OSError fsspec readers expect for a domain error (FileNotFoundError for a path that
    does not exist, so that zarr-python reads a missing chunk as its fill value; EIO for bytes
    that cannot be served as published). `OSError(errno, ...)` picks the subclass."""
    code = errno.ENOENT if isinstance(exc, (VersionNotFound, SourceError)) else errno_for(exc)
    return OSError(code, str(exc) or os.strerror(code), path)


def flag_option(name: str, value: bool | str) -> bool:
    """A yes/no storage option: a bool, or a string as fsspec's config files give them."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name}: expected true or false, not {value!r}")


def _refuse(operation: str) -> Callable[..., NoReturn]:
    def refuse(self: object, *args: Any, **kwargs: Any) -> NoReturn:
        target = str(args[0]) if args else None
        raise OSError(
            errno.EROFS,
            f"zarrfs is read-only: {operation} is not supported (it serves published data)",
            target,
        )

    refuse.__name__ = operation
    return refuse


# --- the runtime: one trio loop per process -------------------------------------------------------


@dataclass(eq=False)
class _Served:
    """One source open in the runtime: its filesystem once started (or why it failed), and how
    many operations and open files use it (internal)."""

    config: Config
    ready: trio.Event = field(default_factory=trio.Event)
    stop: trio.Event = field(default_factory=trio.Event)
    fs: Filesystem | None = None
    error: Exception | None = None
    users: int = 0
    last_used: float = 0.0


@dataclass(frozen=True, slots=True)
class _Handle:
    """An open file in the runtime (internal): it keeps its source open until released."""

    runtime: Runtime
    served: _Served
    file: OpenFile
    size: int


class Runtime:
    """The trio loop of this process, in a daemon thread, and the sources open in it."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._closing: trio.Event | None = None
        self._served: dict[Config, _Served] = {}
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="zarrfs-fsspec", daemon=True)
        self._thread.start()
        if not self._started.wait(cfg.FSSPEC_START_TIMEOUT):
            raise RuntimeError(
                f"the zarrfs runtime did not start within {cfg.FSSPEC_START_TIMEOUT:g} s"
            )
        if self._failure is not None:
            raise RuntimeError("the zarrfs runtime failed to start") from self._failure

    @property
    def alive(self) -> bool:
        return self.pid == os.getpid() and self._thread.is_alive()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn(*args)` in the loop; block until it returns (or raises) here."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def release_soon(self, handle: _Handle) -> None:
        """Release `handle` without waiting for it: for a file closed on the loop's own thread
        (the cycle collector may free an unclosed file there), where `call` cannot block."""
        nursery, token = self._nursery, self._token
        if nursery is not None and token is not None:
            token.run_sync_soon(nursery.start_soon, _release, handle)

    def close(self) -> None:
        """Close every source and stop the loop (at exit); waits at most cfg.FSSPEC_CLOSE_TIMEOUT."""
        if not self.alive or self._token is None or self._closing is None:
            return
        try:
            trio.from_thread.run_sync(self._closing.set, trio_token=self._token)
        except trio.RunFinishedError:
            return
        self._thread.join(cfg.FSSPEC_CLOSE_TIMEOUT)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # reported to the constructor if it failed to start
            self._failure = e
            self._started.set()

    async def _main(self) -> None:
        self._closing = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._started.set()
            await self._closing.wait()
            for served in self._served.values():
                served.stop.set()
            self._served.clear()
            nursery.cancel_scope.deadline = trio.current_time() + cfg.FSSPEC_CLOSE_TIMEOUT / 2

    async def sources(self) -> list[MountSource]:
        """The sources open now (or opening), least recently used first (`call` it)."""
        served = sorted(self._served.values(), key=lambda s: s.last_used)
        return [s.config.source for s in served]

    # --- sources (everything below runs in the loop) --------------------------------------------

    @asynccontextmanager
    async def using(self, config: Config) -> AsyncIterator[_Served]:
        """The started source of `config` (opened on first use), held while in the block."""
        served = await self.acquire(config)
        try:
            yield served
        finally:
            self.let_go(served)

    async def acquire(self, config: Config) -> _Served:
        served = self._served.get(config)
        if served is None:
            assert self._nursery is not None
            served = self._served[config] = _Served(config)
            self._nursery.start_soon(self._serve, served)
            self._trim()
        served.users += 1
        try:
            await served.ready.wait()
        except BaseException:
            self.let_go(served)
            raise
        if served.error is not None:
            self.let_go(served)
            raise copy_error(served.error) from served.error  # each waiter raises its own
        return served

    def let_go(self, served: _Served) -> None:
        served.users -= 1
        served.last_used = trio.current_time()

    async def _serve(self, served: _Served) -> None:
        try:
            async with open_filesystem(served.config) as fs:
                served.fs = fs
                served.ready.set()
                await served.stop.wait()
        except Exception as e:  # before it started: its users get the error; after: a bug
            if served.ready.is_set():
                log.exception("zarrfs: %s stopped on an unexpected error", served.config.source)
            else:
                served.error = e
        finally:
            if self._served.get(served.config) is served:
                del self._served[served.config]
            served.ready.set()

    def _trim(self) -> None:
        """Close the least recently used idle sources beyond cfg.FSSPEC_MAX_SOURCES."""
        idle = sorted(
            (s for s in self._served.values() if s.users == 0 and s.fs is not None),
            key=lambda s: s.last_used,
        )
        excess = len(self._served) - cfg.FSSPEC_MAX_SOURCES
        for served in idle[: max(excess, 0)]:
            del self._served[served.config]
            served.stop.set()


_lock = threading.Lock()
_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime, started on first use (again after a fork)."""
    global _runtime
    with _lock:
        if _runtime is None or not _runtime.alive:
            _runtime = Runtime()
        return _runtime


def _close_runtime() -> None:
    with _lock:
        current = _runtime
    if current is not None:
        current.close()


def _forget_runtime_in_child() -> None:
    """After a fork the child has no loop thread: it starts its own on first use."""
    global _runtime, _lock
    _runtime = None
    _lock = threading.Lock()


atexit.register(_close_runtime)
os.register_at_fork(after_in_child=_forget_runtime_in_child)


# --- operations, in the loop ----------------------------------------------------------------------


async def _resolve(fs: Filesystem, parts: Sequence[str], *, follow: bool = True) -> Entry:
    """The entry at `parts` below the root, following symbolic links on the way (and at the end
    with `follow`). NotFound, NotADirectory otherwise."""
    todo = list(parts)
    done: list[str] = []
    ino, entry = ROOT_INO, await fs.getattr(ROOT_INO)
    links = 0
    while todo:
        name = todo.pop(0)
        entry = await fs.lookup(ino, name.encode("utf-8", "surrogateescape"))
        if entry.link is not None and (todo or follow):
            links += 1
            if links > cfg.FSSPEC_MAX_LINKS:
                raise NotFound(f"too many symbolic links in {'/'.join(parts)}")
            todo = [*_join(done, entry.link.decode("utf-8", "surrogateescape")), *todo]
            done = []
            ino, entry = ROOT_INO, await fs.getattr(ROOT_INO)
            continue
        done.append(name)
        ino = entry.ino
    return entry


def _join(base: list[str], target: str) -> list[str]:
    out = [] if target.startswith("/") else list(base)
    for part in target.split("/"):
        if part == "..":
            if out:
                out.pop()
        elif part not in ("", "."):
            out.append(part)
    return out


def _info(name: str, entry: Entry, link_target: bytes | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": name,
        "size": 0 if entry.is_dir else entry.size,
        "type": "directory" if entry.is_dir else "file",
        "mtime": entry.mtime_ns / 1e9,
    }
    if link_target is not None:
        info["islink"] = True
        info["destination"] = link_target.decode("utf-8", "surrogateescape")
    return info


async def _entry_info(fs: Filesystem, where: FsspecPath) -> dict[str, Any]:
    entry = await _resolve(fs, where.parts)
    info = _info(where.name(where.parts), entry)
    if not entry.is_dir:
        source = await fs.source_of(entry.ino)
        if isinstance(source, BlobRange):  # a chunk of a virtual Zarr: bytes of its blob
            info["byte_range"] = [source.offset, source.offset + source.length]
            source = source.ref
        if isinstance(source, ObjectRef):
            info["s3_url"] = describe_object(fs.bucket, source)
            info["version_id"] = source.version_id
            info["etag"] = source.etag
    return info


async def _listing(
    fs: Filesystem, where: FsspecPath, parts: Sequence[str], ino: int
) -> list[tuple[list[str], dict[str, Any], int | None]]:
    """(components, info, the inode of a directory to descend into, else None) of each entry of
    the directory `ino` at `parts`."""
    handle = await fs.opendir(ino)
    out: list[tuple[list[str], dict[str, Any], int | None]] = []
    for raw, entry, _ in await fs.readdir(handle, 0):
        child = [*parts, raw.decode("utf-8", "surrogateescape")]
        if entry.link is not None:  # described as what it points to, never descended into
            try:
                target = await _resolve(fs, child)
            except (NotFound, DataError):
                continue
            out.append((child, _info(where.name(child), target, entry.link), None))
            continue
        out.append((child, _info(where.name(child), entry), entry.ino if entry.is_dir else None))
    return out


async def _ls(rt: Runtime, config: Config, where: FsspecPath) -> list[dict[str, Any]]:
    async with rt.using(config) as served:
        assert served.fs is not None
        entry = await _resolve(served.fs, where.parts)
        if not entry.is_dir:
            return [_info(where.name(where.parts), entry)]
        return [info for _, info, _ in await _listing(served.fs, where, where.parts, entry.ino)]


async def _find(
    rt: Runtime, config: Config, where: FsspecPath, maxdepth: int | None, withdirs: bool
) -> dict[str, dict[str, Any]]:
    async with rt.using(config) as served:
        fs = served.fs
        assert fs is not None
        entry = await _resolve(fs, where.parts)
        if not entry.is_dir:
            return {where.name(where.parts): _info(where.name(where.parts), entry)}
        out: dict[str, dict[str, Any]] = {}
        if withdirs and where.parts:
            out[where.name(where.parts)] = _info(where.name(where.parts), entry)
        queue = [(list(where.parts), entry.ino, 1)]
        while queue:
            parts, ino, depth = queue.pop()
            for child, info, child_ino in await _listing(fs, where, parts, ino):
                if info["type"] == "directory":
                    if withdirs:
                        out[info["name"]] = info
                    if child_ino is not None and (maxdepth is None or depth < maxdepth):
                        queue.append((child, child_ino, depth + 1))
                else:
                    out[info["name"]] = info
        return dict(sorted(out.items()))


async def _info_of(rt: Runtime, config: Config, where: FsspecPath) -> dict[str, Any]:
    async with rt.using(config) as served:
        assert served.fs is not None
        return await _entry_info(served.fs, where)


async def _open(rt: Runtime, config: Config, where: FsspecPath) -> _Handle:
    """An open file (its source held until `_release`)."""
    served = await rt.acquire(config)
    try:
        assert served.fs is not None
        entry = await _resolve(served.fs, where.parts)
        if entry.is_dir:  # (never asked of `Filesystem.open`: the kernel opens files only)
            raise IsADirectory(f"{where.name(where.parts)} is a directory")
        return _Handle(rt, served, await served.fs.open(entry.ino), entry.size)
    except BaseException:
        rt.let_go(served)
        raise


async def _release(handle: _Handle) -> None:
    try:
        assert handle.served.fs is not None
        await handle.served.fs.release(handle.file)
    finally:
        handle.runtime.let_go(handle.served)


async def _read(handle: _Handle, start: int, end: int) -> bytes:
    """Bytes [start, end) of an open file (fewer at its end), piece by piece."""
    fs = handle.served.fs
    assert fs is not None
    end = min(end, handle.size)
    pieces = []
    offset = start
    while offset < end:
        piece = await fs.read(handle.file, offset, min(cfg.FSSPEC_READ_PIECE, end - offset))
        if not piece:
            break
        pieces.append(piece)
        offset += len(piece)
    return b"".join(pieces)


def _bounds(size: int, start: int | None, end: int | None) -> tuple[int, int]:
    """fsspec's range convention (None: the start / the end; negative: from the end)."""
    first = 0 if start is None else (size + start if start < 0 else start)
    last = size if end is None else (size + end if end < 0 else end)
    return max(first, 0), min(max(last, 0), size)


async def _cat(
    rt: Runtime, config: Config, where: FsspecPath, start: int | None, end: int | None
) -> bytes:
    handle = await _open(rt, config, where)
    try:
        first, last = _bounds(handle.size, start, end)
        return await _read(handle, first, last) if first < last else b""
    finally:
        await _release(handle)


async def _cat_ranges(
    rt: Runtime, requests: list[tuple[Config, FsspecPath, int | None, int | None]]
) -> list[bytes | Exception]:
    results: list[bytes | Exception] = [b""] * len(requests)
    limiter = trio.CapacityLimiter(cfg.FSSPEC_RANGE_CONCURRENCY)

    async def one(
        i: int, config: Config, where: FsspecPath, start: int | None, end: int | None
    ) -> None:
        async with limiter:
            try:
                results[i] = await _cat(rt, config, where, start, end)
            except Exception as e:  # each range its own outcome (fsspec's on_error="return")
                results[i] = e

    async with trio.open_nursery() as nursery:
        for i, request in enumerate(requests):
            nursery.start_soon(one, i, *request)
    return results


# --- the fsspec filesystem ------------------------------------------------------------------------


class ZarrfsFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """Published DANDI data as an fsspec filesystem: `fsspec.filesystem("zarrfs", **options)`.

    Options (the command line's connection options, same names and defaults): `endpoint_url`,
    `bucket`, `region`, `manifest_root` (a URL or a list of URLs, tried in order), `api_url`,
    `cache_dir`, `memory_cache_size`, `cache_size`, `manifest_memory`, `manifest_cache_size`,
    `version_memory` (sizes: bytes, or strings such as "512M"), `signed`; and `consolidate` and
    `virtual_zarr`, as the mount's `--consolidate` and `--virtual-zarr`. Read-only: every write raises OSError(EROFS).
    """

    protocol = PROTOCOL
    root_marker = ""

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        bucket: str = cfg.DEFAULT_BUCKET,
        region: str = cfg.DEFAULT_REGION,
        manifest_root: str | Sequence[str] | None = None,
        api_url: str = cfg.DEFAULT_API_URL,
        cache_dir: str | os.PathLike[str] | None = None,
        memory_cache_size: int | str = cfg.DEFAULT_MEMORY_CACHE_SIZE,
        cache_size: int | str | None = None,
        manifest_memory: int | str = cfg.DEFAULT_MANIFEST_MEMORY,
        manifest_cache_size: int | str = cfg.DEFAULT_MANIFEST_DISK_BUDGET,
        version_memory: int | str = cfg.DEFAULT_VERSION_MEMORY,
        signed: bool | str = False,
        consolidate: bool | str = False,
        virtual_zarr: bool | str = False,
        **fsspec_options: Any,
    ) -> None:
        unknown = sorted(set(fsspec_options) - IGNORED_OPTIONS)
        if unknown:
            raise TypeError(f"unknown zarrfs storage options: {', '.join(unknown)}")
        super().__init__()
        connection = cfg.config_from_options(
            MountSource(),
            endpoint_url=endpoint_url,
            bucket=bucket,
            region=region,
            manifest_root=manifest_root,
            api_url=api_url,
            cache_dir=cache_dir,
            memory_cache_size=memory_cache_size,
            cache_size=cache_size,
            manifest_memory=manifest_memory,
            manifest_cache_size=manifest_cache_size,
            version_memory=version_memory,
            signed=flag_option("signed", signed),
        )
        #: What every source is opened with, but for the source itself (built now: a bad option
        #: fails here, with ValueError, rather than at the first read on a worker).
        self.config: Config = replace(
            connection,
            consolidate=flag_option("consolidate", consolidate),
            virtual_zarr=flag_option("virtual_zarr", virtual_zarr),
        )

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        stripped: str = super()._strip_protocol(path)
        return stripped.strip("/")

    # --- plumbing -----------------------------------------------------------------------------------

    def _where(self, path: str) -> tuple[Config, FsspecPath]:
        stripped = self._strip_protocol(path)
        try:
            where = split_path(stripped)
        except ZarrfsError as e:
            raise os_error(e, stripped) from None
        return replace(self.config, source=where.source), where

    def _call(self, path: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return runtime().call(fn, *args)
        except ZarrfsError as e:
            raise os_error(e, path) from None

    # --- reading ------------------------------------------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        config, where = self._where(path)
        infos = self._call(path, _ls, runtime(), config, where)
        return infos if detail else [info["name"] for info in infos]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        config, where = self._where(path)
        return self._call(path, _info_of, runtime(), config, where)

    def find(
        self,
        path: str,
        maxdepth: int | None = None,
        withdirs: bool = False,
        detail: bool = False,
        **kwargs: Any,
    ) -> Any:
        if maxdepth is not None and maxdepth < 1:
            raise ValueError("maxdepth must be at least 1")
        config, where = self._where(path)
        found = self._call(path, _find, runtime(), config, where, maxdepth, withdirs)
        return found if detail else list(found)

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        config, where = self._where(path)
        return self._call(path, _cat, runtime(), config, where, start, end)

    def cat_ranges(
        self,
        paths: list[str],
        starts: int | list[int | None] | None,
        ends: int | list[int | None] | None,
        max_gap: int | None = None,
        on_error: str = "return",
        **kwargs: Any,
    ) -> list[bytes | Exception]:
        count = len(paths)
        starts_list = starts if isinstance(starts, list) else [starts] * count
        ends_list = ends if isinstance(ends, list) else [ends] * count
        if len(starts_list) != count or len(ends_list) != count:
            raise ValueError("paths, starts and ends must have the same length")
        results: list[bytes | Exception] = [b""] * count
        requests, asked = [], []
        for i, (path, start, end) in enumerate(zip(paths, starts_list, ends_list, strict=True)):
            try:
                config, where = self._where(path)
            except OSError as e:  # a path no source can have: that range's error
                results[i] = e
                continue
            requests.append((config, where, start, end))
            asked.append(i)
        if requests:
            for i, result in zip(
                asked, runtime().call(_cat_ranges, runtime(), requests), strict=True
            ):
                results[i] = (
                    os_error(result, paths[i]) if isinstance(result, ZarrfsError) else result
                )
        if on_error == "raise":
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results

    def modified(self, path: str) -> datetime:
        return datetime.fromtimestamp(self.info(path)["mtime"], tz=UTC)

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | str | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> ZarrfsFile:
        if mode != "rb":
            raise OSError(errno.EROFS, f"zarrfs is read-only: cannot open in mode {mode!r}", path)
        kwargs.pop("size", None)  # the size is the published one (fsspec passes it on reopening)
        return ZarrfsFile(
            self,
            self._strip_protocol(path),
            block_size=block_size,
            cache_type=kwargs.pop("cache_type", "none"),
            cache_options=cache_options,
            **kwargs,
        )

    def open_handle(self, path: str) -> _Handle:
        """An open file of the runtime (for `ZarrfsFile`)."""
        config, where = self._where(path)
        return self._call(path, _open, runtime(), config, where)

    # --- writing: never ---------------------------------------------------------------------------

    mkdir = _refuse("mkdir")
    makedirs = _refuse("makedirs")
    rmdir = _refuse("rmdir")
    rm_file = _refuse("rm_file")
    _rm = _refuse("rm")
    rm = _refuse("rm")
    mv = _refuse("mv")
    cp_file = _refuse("cp_file")
    copy = _refuse("copy")
    put_file = _refuse("put_file")
    put = _refuse("put")
    pipe_file = _refuse("pipe_file")
    pipe = _refuse("pipe")
    touch = _refuse("touch")


class ZarrfsFile(AbstractBufferedFile):  # type: ignore[misc]
    """A file opened for reading: every range is read through the core (fsspec's own cache is
    `none` unless `cache_type` asks for one). Pickles as its path and position (fsspec reopens it)."""

    def __init__(
        self,
        fs: ZarrfsFileSystem,
        path: str,
        *,
        block_size: int | str | None,
        cache_type: str,
        cache_options: dict[str, Any] | None,
        **kwargs: Any,
    ) -> None:
        self._handle: _Handle | None = fs.open_handle(path)
        super().__init__(
            fs,
            path,
            mode="rb",
            block_size=block_size or "default",
            cache_type=cache_type,
            cache_options=cache_options,
            size=self._handle.size,
            **kwargs,
        )

    def _fetch_range(self, start: int, end: int) -> bytes:
        handle = self._handle
        if handle is None:
            raise ValueError("I/O operation on a closed file")
        if not handle.runtime.alive:  # forked since it was opened: open it again here
            handle = self._handle = self.fs.open_handle(self.path)
        try:
            return handle.runtime.call(_read, handle, start, end)
        except ZarrfsError as e:
            raise os_error(e, self.path) from None

    def close(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle is not None and handle.runtime.alive:
            if handle.runtime.on_loop_thread():  # never closed, freed by the collector there
                handle.runtime.release_soon(handle)
            else:
                with contextlib.suppress(trio.RunFinishedError, RuntimeError):  # the loop is gone
                    handle.runtime.call(_release, handle)
        super().close()
