"""The verbs that read the archive without mounting it: `ls`, `info`, `verify`, `stats`, `cache`,
`virtual-zarr`.

Owns: what each verb does and prints, on the same core as the mount (`core.open_filesystem`); for a
path under a live zarrfs mount, the mount's own configuration (`runtime`), so that `info` and `verify`
see exactly what it serves; progress bars for long work (`tqdm` on a terminal, plain lines every
`config.PROGRESS_INTERVAL` seconds otherwise). Never parses arguments or maps errors to exit codes (`cli`
does), never touches FUSE: `verify` reads files through the mount as any program would.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import shutil
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from zarrfs import config as cfg
from zarrfs.archive.digests import EtagHasher
from zarrfs.base.refs import ObjectRef
from zarrfs.config import Config
from zarrfs.errors import DataError, NotFound, SourceError, UserError, ZarrfsError
from zarrfs.faces import runtime
from zarrfs.fs.core import open_filesystem
from zarrfs.fs.filesystem import Filesystem, OpenFile
from zarrfs.fs.namespace import ROOT_INO, Entry
from zarrfs.io.cache_dir import CacheLayout
from zarrfs.manifests.metadata import METADATA_NAMES

log = logging.getLogger(__name__)


class Progress:
    """Files and bytes done of a total: a tqdm bar on a terminal, else a line now and then."""

    def __init__(self, what: str, total_bytes: int, total_files: int) -> None:
        self.what = what
        self.total_bytes = total_bytes
        self.total_files = total_files
        self.files = 0
        self.bytes = 0
        self.started = self.reported = time.monotonic()
        self._bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_bytes, unit="B", unit_scale=True, desc=what, file=sys.stderr
            )

    def add(self, files: int, nbytes: int) -> None:
        self.files += files
        self.bytes += nbytes
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.files}/{self.total_files} files", refresh=False)
            self._bar.update(nbytes)
            return
        now = time.monotonic()
        if now - self.reported >= cfg.PROGRESS_INTERVAL:
            self.reported = now
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.bytes / elapsed
        left = (self.total_bytes - self.bytes) / rate if rate else float("inf")
        eta = f"{left:.0f} s" if left != float("inf") else "?"
        return (
            f"{self.what}: {self.files}/{self.total_files} files, "
            f"{self.bytes / 2**20:.1f}/{self.total_bytes / 2**20:.1f} MiB, "
            f"{rate / 2**20:.1f} MiB/s, ETA {eta}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            print(self.line(), file=sys.stderr, flush=True)


# --- walking what the core serves ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Item:
    """One entry below a directory of the core: its path (relative) and entry."""

    path: str
    entry: Entry


async def walk(
    fs: Filesystem,
    ino: int,
    prefix: str = "",
    on_error: Callable[[str, ZarrfsError], None] | None = None,
) -> AsyncIterator[Item]:
    """Every entry below directory `ino`, depth-first in name order (links are not followed).

    A directory that cannot be listed raises, or with `on_error` is passed to it (its path relative
    to `ino`, with a trailing `/`, empty for `ino` itself) and skipped."""
    try:
        handle = await fs.opendir(ino)
        listing = list(await fs.readdir(handle, 0))
    except ZarrfsError as e:
        if on_error is None:
            raise
        on_error(prefix, e)
        return
    children = [(name.decode("utf-8", "replace"), e) for name, e, _ in listing]
    for name, entry in children:
        path = f"{prefix}{name}"
        yield Item(path, entry)
        if entry.is_dir:
            async for item in walk(fs, entry.ino, path + "/", on_error):
                yield item


async def read_whole(fs: Filesystem, handle: OpenFile, size: int) -> int:
    done = 0
    while done < size:
        chunk = await fs.read(handle, done, min(cfg.VERB_READ_CHUNK, size - done))
        if not chunk:
            break
        done += len(chunk)
    return done


# --- ls ---------------------------------------------------------------------------------------


async def list_entries(config: Config, long: bool) -> list[str]:
    """`name<TAB>size` per entry of SOURCE[/PATH] (directories end in `/`, a size only when
    known), with `long` also `<TAB>VersionId<TAB>ETag` for files; a link as `name -> target`."""
    source = config.source
    try:
        async with open_filesystem(config) as fs:
            return await _format_listing(fs, None, long)
    except SourceError:  # PATH names a file: list that one entry
        if not source.path:
            raise
        parent, _, name = source.path.rpartition("/")
    async with open_filesystem(replace(config, source=replace(source, path=parent))) as fs:
        return await _format_listing(fs, name.encode(), long)


async def _format_listing(fs: Filesystem, only: bytes | None, long: bool) -> list[str]:
    if only is not None:
        entries = [(only, await fs.lookup(ROOT_INO, only))]
    else:
        handle = await fs.opendir(ROOT_INO)
        entries = [(name, entry) for name, entry, _ in await fs.readdir(handle, 0)]
    lines = []
    for raw, entry in entries:
        name = raw.decode("utf-8", "replace")
        if entry.link is not None:
            lines.append(f"{name} -> {entry.link.decode('utf-8', 'replace')}")
        elif entry.is_dir:
            lines.append(f"{name}/\t{entry.size or '-'}")
        elif long:
            source = await fs.source_of(entry.ino)
            version, etag = (
                (source.version_id or "-", source.etag or "-")
                if isinstance(source, ObjectRef)
                else ("-", "-")
            )
            lines.append(f"{name}\t{entry.size}\t{version}\t{etag}")
        else:
            lines.append(f"{name}\t{entry.size}")
    return lines


# --- virtual-zarr ---------------------------------------------------------------------------


async def virtual_zarr_refs(config: Config) -> tuple[dict[str, Any], str]:
    """`zarrfs virtual-zarr SOURCE/PATH`: the virtual Zarr view of the HDF5 file at PATH (what
    `--virtual-zarr` shows as PATH.zarr) as kerchunk references (format 1) whose chunks point at
    the blob's HTTPS URL pinned by its S3 VersionId (asked of S3 now, and checked against the
    published size and ETag), and a one-line summary."""
    source = config.source
    if not source.path:
        raise UserError(f"name an HDF5 file of {source}: SOURCE/PATH.nwb")
    parent, _, name = source.path.rpartition("/")
    served = replace(config, source=replace(source, path=parent), virtual_zarr=True)
    async with open_filesystem(served) as fs:
        entry = await fs.lookup(ROOT_INO, name.encode())
        if entry.is_dir:
            raise UserError(f"{source.path} is a directory: name an HDF5 file")
        blob = await fs.source_of(entry.ino)
        if not isinstance(blob, ObjectRef):
            raise UserError(f"{source.path} is not a file of the bucket")
        assert fs.virtual is not None
        model = await fs.virtual.cache.get(blob, source.path)
        version_id = await fs.reader.head(blob)
        url = fs.reader.https_url(blob.key, version_id)
    pinned = "" if version_id is not None else " (the bucket keeps no versions: not pinned)"
    summary = (
        f"{source.path}: {model.chunk_count} chunks, {len(model.inline)} inline files, "
        f"referencing {url}{pinned}"
    )
    return model.to_kerchunk(url), summary


# --- info -------------------------------------------------------------------------------------


async def info_source(config: Config) -> list[str]:
    """What SOURCE is: for a version, its assets, size, Zarrs and which manifests are cached."""
    async with open_filesystem(config) as fs:
        namespace = fs.version_namespace()
        if namespace is None:
            handle = await fs.opendir(ROOT_INO)
            names = [n.decode() for n, _, _ in await fs.readdir(handle, 0)]
            return [f"source: {config.source}", f"entries: {len(names)}", *names[:50]]
        resolved = namespace.resolved
        zarrs = namespace.zarr_assets()
        cached = [
            a for a in zarrs
            if a.zarr_id and a.zarr_checksum
            and fs.manifests.stored_path(a.zarr_id, a.zarr_checksum).exists()
        ]  # fmt: skip
        lines = [
            f"version: {resolved.source}",
            f"assets: {namespace.n_assets}",
            f"total size: {namespace.total_size} bytes ({namespace.total_size / 2**30:.2f} GiB)",
            f"zarrs: {len(zarrs)}",
            f"manifests cached locally: {len(cached)} of {len(zarrs)} (in {config.cache_dir})",
        ]
        lines += [f"  cached: {a.path} ({a.zarr_checksum})" for a in cached]
        lines += [f"  not cached: {a.path} ({a.zarr_checksum})" for a in zarrs if a not in cached]
        return lines


def mount_config(path: Path) -> tuple[Config, str]:
    """The configuration of the live zarrfs mount `path` is in, and `path` relative to it."""
    found = runtime.zarrfs_mount_of(path)
    if found is None:
        raise UserError(f"{path} is not inside a zarrfs mount")
    mountpoint, relative = found
    try:
        state = runtime.read_state(mountpoint)
    except runtime.UnsafeRuntimeDir as e:
        raise UserError(
            f"the state of the zarrfs mount at {mountpoint} is unavailable: {e}"
        ) from None
    if state is None:
        raise UserError(
            f"no state for the zarrfs mount at {mountpoint} in {runtime.runtime_dir()} "
            "(mounted by another user, by a zarrfs too old to write it, or it could not publish "
            "it: see its log)"
        )
    return runtime.config_from_state(state), relative


async def info_path(path: Path) -> list[str]:
    """What a path under a live mount is a copy of (as `--xattr` would show it)."""
    config, relative = mount_config(path)
    async with open_filesystem(config) as fs:
        ino = await fs.walk(relative)
        entry = await fs.getattr(ino)
        kind = "directory" if entry.is_dir else "link" if entry.link else "file"
        lines = [f"path: {path}", f"mount: {config.mountpoint} ({config.source})", f"type: {kind}"]
        if not entry.is_dir:
            lines.append(f"size: {entry.size}")
        lines += [f"{k}: {v}" for k, v in (await fs.provenance(ino)).items()]
        return lines


# --- verify -----------------------------------------------------------------------------------


@dataclass
class Verdict:
    ok: bool
    lines: list[str]


@dataclass
class _Tally:
    """What `verify` found, file by file; every problem also has a line naming it."""

    verified: int = 0
    mismatched: int = 0
    unreadable: int = 0
    unexpected: int = 0
    lines: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"summary: {self.verified} files verified, {self.mismatched} mismatched, "
            f"{self.unreadable} unreadable, {self.unexpected} unexpected"
        )


def describe_os_error(e: OSError) -> str:
    """`Input/output error (EIO)`: the strerror and the errno's name."""
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    return f"{e.strerror or e} ({name})"


async def verify(path: Path) -> Verdict:
    """Read every file at or below `path` through the mount and check the bytes against what was
    published: a Zarr's checksum recomputed with `zarr_checksum` from the files' own ETags (MD5s),
    a blob's `dandi:dandi-etag`, a Zarr file's ETag.

    Goes on past whatever it cannot read (a file the mount answers with an error, a directory
    that cannot be listed, a path that vanished): each is named on a line of its own with the
    reason, as is each file that differs or that the mount shows but was not published; the
    lines end with a summary. `ok` only when every file was read and matched."""
    from zarr_checksum.tree import ZarrChecksumTree

    config, relative = mount_config(path)
    tally = _Tally()
    async with open_filesystem(config) as fs:
        try:
            ino = await fs.walk(relative)
            entry = await fs.getattr(ino)
            prov = await fs.provenance(ino)
        except NotFound:
            tally.unexpected += 1
            tally.lines += [f"UNEXPECTED {path}: not in the published version", tally.summary()]
            return Verdict(False, [*tally.lines, f"FAILED (1 problems): {path}"])
        except DataError as e:
            tally.unreadable += 1
            tally.lines += [f"UNREADABLE {path}: {e}", tally.summary()]
            return Verdict(False, [*tally.lines, f"FAILED (1 problems): {path}"])
        files: list[tuple[Item, dict[str, str]]] = []
        unlisted: set[str] = set()
        unverifiable = 0

        def cannot_list(prefix: str, e: ZarrfsError) -> None:
            unlisted.add(prefix.rstrip("/"))
            tally.unreadable += 1
            where = path / prefix if prefix else path
            tally.lines.append(f"UNREADABLE {where}{os.sep}: cannot list: {e}")

        if not entry.is_dir:
            files.append((Item(Path(relative).name, entry), prov))
        else:
            async for item in walk(fs, ino, on_error=cannot_list):
                if item.entry.is_dir or item.entry.link is not None:
                    continue
                try:
                    attrs = await fs.provenance(item.entry.ino)
                except ZarrfsError as e:
                    tally.unreadable += 1
                    tally.lines.append(f"UNREADABLE {path / item.path}: {e}")
                    continue
                if "etag" in attrs:
                    files.append((item, attrs))
                elif item.path.rsplit("/", 1)[-1] != "dandiset.yaml":
                    unverifiable += 1
        total = sum(item.entry.size for item, _ in files)
        progress = Progress(f"verify {path}", total, len(files))
        recomputed, published = ZarrChecksumTree(), ZarrChecksumTree()
        base = path if entry.is_dir else path.parent
        unread_in_zarr = 0
        for item, attrs in files:
            expected = attrs["etag"]
            local = base / item.path if entry.is_dir else path
            try:
                got = await trio.to_thread.run_sync(_etag_of_file, local, item.entry.size, expected)
            except OSError as e:
                got = None
                tally.unreadable += 1
                tally.lines.append(f"UNREADABLE {local}: {describe_os_error(e)}")
            progress.add(1, item.entry.size)
            if got is None:
                unread_in_zarr += "version_id" in attrs
            elif got != expected:
                tally.mismatched += 1
                tally.lines.append(f"MISMATCH {local}: read {got}, published {expected}")
            else:
                tally.verified += 1
            if "version_id" in attrs and got is not None:  # inside a Zarr: part of its checksum
                recomputed.add_leaf(Path(item.path), item.entry.size, got)
                published.add_leaf(Path(item.path), item.entry.size, expected)
        progress.close()
        extra = _files_the_mount_shows_beyond(
            base if entry.is_dir else None, files, config, unlisted, tally
        )
        for name in extra:
            tally.unexpected += 1
            tally.lines.append(f"UNEXPECTED {base / name}: not in the published version")
        problems = tally.mismatched + tally.unreadable + tally.unexpected
        if entry.is_dir and files and all("version_id" in a for _, a in files):
            if unread_in_zarr or unlisted:
                tally.lines.append("zarr checksum: not recomputed (not every file could be read)")
            else:
                checksum = recomputed.process().digest
                expected_sum = prov.get("zarr_checksum") or published.process().digest
                if checksum != expected_sum:
                    problems += 1
                    tally.lines.append(
                        f"MISMATCH Zarr checksum of {path}: {checksum}, published {expected_sum}"
                    )
                else:
                    tally.lines.append(
                        f"zarr checksum: {checksum} (recomputed from the bytes read; matches)"
                    )
        if unverifiable:
            tally.lines.append(f"{unverifiable} files have no published digest to compare with")
        tally.lines.append(tally.summary())
        verdict = "verified" if problems == 0 else f"FAILED ({problems} problems)"
        tally.lines.append(f"{verdict}: {path}: {len(files)} files, {total} bytes")
        return Verdict(problems == 0, tally.lines)


def _etag_of_file(path: Path, size: int, published: str) -> str:
    hasher = EtagHasher(size)
    with open(path, "rb") as f:
        while chunk := f.read(cfg.VERB_READ_CHUNK):
            hasher.update(chunk)
    return hasher.etag(multipart="-" in published)


def _files_the_mount_shows_beyond(
    directory: Path | None,
    files: list[tuple[Item, dict[str, str]]],
    config: Config,
    unlisted: set[str],
    tally: _Tally,
) -> list[str]:
    """Files under `directory` (as the mount lists them) that are not published files
    (`.zmetadata` that `--consolidate` adds is expected and left out). Directories the core could
    not list (`unlisted`, relative) are not entered; one the mount cannot list is counted
    unreadable in `tally` (unless the core could not list it either: already counted)."""
    if directory is None:
        return []
    known = {item.path for item, _ in files}
    extra = []

    def cannot_list(e: OSError) -> None:
        rel = Path(e.filename or directory).relative_to(directory).as_posix()
        if (rel if rel != "." else "") in unlisted:
            return
        tally.unreadable += 1
        tally.lines.append(f"UNREADABLE {e.filename}{os.sep}: cannot list: {describe_os_error(e)}")

    for root, dirs, names in os.walk(directory, onerror=cannot_list):
        here = Path(root).relative_to(directory)
        dirs[:] = [d for d in dirs if (here / d).as_posix() not in unlisted]
        for name in names:
            rel = (here / name).as_posix()
            if rel in known or (config.consolidate and name == ".zmetadata"):
                continue
            if name == "dandiset.yaml" or _is_link(Path(root) / name):
                continue
            extra.append(rel)
    return extra


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


# --- stats ------------------------------------------------------------------------------------


def stats_lines(mountpoint: Path) -> list[str]:
    found = runtime.zarrfs_mount_of(mountpoint)
    if found is None or found[1]:
        raise UserError(f"{mountpoint} is not a zarrfs mountpoint")
    try:
        snap = runtime.read_stats(found[0])
    except runtime.UnsafeRuntimeDir as e:
        raise UserError(
            f"the statistics of the zarrfs mount at {found[0]} are unavailable: {e}"
        ) from None
    if snap is None:
        raise UserError(f"no statistics for {found[0]} in {runtime.runtime_dir()} yet")
    return list(_flatten("", {k: v for k, v in snap.items() if k not in ("pid",)}))


def _flatten(prefix: str, value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _flatten(f"{prefix}.{key}" if prefix else str(key), child)
    elif isinstance(value, float):
        yield f"{prefix}: {value:.6g}"
    else:
        yield f"{prefix}: {value}"


# --- cache ------------------------------------------------------------------------------------


def cache_info(cache_dir: Path) -> list[str]:
    layout = CacheLayout(cache_dir)
    lines = [f"cache dir: {cache_dir}"]
    for name, directory in (
        ("manifest indexes", layout.manifests),
        ("manifests built from listings", layout.built_manifests),
        ("resolved versions", layout.versions),
        ("disk blocks", layout.blocks),
        ("virtual Zarr views", layout.virtual),
        ("logs", layout.logs),
        ("temporary files", layout.tmp),
    ):
        count, size = _usage(directory)
        lines.append(f"{name}: {count} files, {size} bytes ({size / 2**20:.1f} MiB)")
    return lines


def _usage(directory: Path) -> tuple[int, int]:
    count = size = 0
    for root, _dirs, names in os.walk(directory):
        for name in names:
            try:
                size += os.lstat(os.path.join(root, name)).st_size
                count += 1
            except OSError:
                continue
    return count, size


def cache_clear(config: Config | None, cache_dir: Path) -> list[str]:
    """Remove cached data (not logs): everything, or (with a config) what SOURCE's manifests and
    resolved version left (its blocks are evicted with everything else's, least recently used)."""
    layout = CacheLayout(cache_dir)
    if config is None:
        removed = []
        for directory in (layout.manifests, layout.built_manifests, layout.versions,
                          layout.blocks, layout.virtual, layout.tmp, layout.locks):  # fmt: skip
            if directory.exists():
                count, size = _usage(directory)
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(f"removed {directory} ({count} files, {size} bytes)")
        return removed or [f"nothing cached in {cache_dir}"]
    return trio.run(_clear_source, config)


async def _clear_source(config: Config) -> list[str]:
    lines = []
    async with open_filesystem(config) as fs:
        namespace = fs.version_namespace()
        if namespace is None:
            raise UserError("cache clear SOURCE takes a version (000123@VERSION)")
        for asset in namespace.zarr_assets():
            if not (asset.zarr_id and asset.zarr_checksum):
                continue
            for path in (
                fs.manifests.index_path(asset.zarr_id, asset.zarr_checksum),
                fs.manifests.document_path(asset.zarr_id, asset.zarr_checksum),
                fs.manifests.built_path(asset.zarr_id, asset.zarr_checksum),
            ):
                if path.exists():
                    path.unlink()
                    lines.append(f"removed {path}")
        stored = fs.catalog.stored_path(namespace.resolved.source)
        if stored is not None and stored.exists():
            stored.unlink()
            lines.append(f"removed {stored}")
    return lines or [f"nothing of {config.source} cached in {config.cache_dir}"]


def _matches(path: str, patterns: list[str]) -> bool:
    if not patterns:
        return True
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        if pattern == "metadata" and name in METADATA_NAMES:
            return True
        pattern = pattern.strip("/")
        if fnmatch.fnmatchcase(path, pattern) or path == pattern or path.startswith(pattern + "/"):
            return True
        if fnmatch.fnmatchcase(path, pattern + "/*"):
            return True
    return False


async def cache_warm(config: Config, patterns: list[str], data: bool) -> list[str]:
    """Fetch and index the manifests of SOURCE's Zarrs (those matching `patterns`, if any), and
    with `data` the bytes of every matching file into the disk block cache."""
    async with open_filesystem(config) as fs:
        files: list[Item] = []
        zarrs = 0
        async for item in walk(fs, ROOT_INO):
            if item.entry.is_dir or item.entry.link is not None:
                continue
            if _matches(item.path, patterns):
                files.append(item)
        namespace = fs.version_namespace()
        if namespace is not None:
            zarrs = len(namespace.zarr_assets())
        lines = [f"indexed the manifests of {zarrs} Zarrs of {config.source}"]
        if not data:
            return lines
        disk = fs.stack.disk
        if disk is None:
            raise UserError("--data needs the disk block cache (--cache-size is 0)")
        progress = Progress(f"warm {config.source}", sum(i.entry.size for i in files), len(files))
        limiter = trio.CapacityLimiter(cfg.WARM_CONCURRENCY)

        async def one(item: Item) -> None:
            async with limiter:
                handle = await fs.open(item.entry.ino)
                try:
                    done = await read_whole(fs, handle, item.entry.size)
                finally:
                    await fs.release(handle)
                progress.add(1, done)

        async with trio.open_nursery() as nursery:
            for item in files:
                nursery.start_soon(one, item)
        progress.close()
        await disk.flush()  # the disk writes run in the background: let them finish
        lines.append(
            f"read {progress.files} files, {progress.bytes} bytes into {disk.disk.cache_dir}"
        )
        return lines
