"""The filesystem's domain operations: lookup, getattr, readdir, open, read, statfs, as async calls.

Owns: composing the namespace (`tree`), the manifest cache, the block cache and the S3 reader into the
operations a FUSE adapter needs, and the log line naming the object whenever a read fails. Works in
domain types (`Entry`, `FileSource`) and raises typed `ZarrfsError`s; knows nothing of pyfuse3, so it is
tested by awaiting it directly. Never parses, never retries, never decides cache policy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from . import config
from .chunk_cache import BlockCache
from .errors import DataError, RemoteError
from .manifest import ManifestIndex
from .manifest_cache import ManifestCache
from .refs import ObjectRef
from .s3_reader import S3Reader
from .tree import Entry, FileSource, InlineFile, Namespace

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OpenFile:
    """An open file: where its bytes come from, and a name for log lines."""

    ino: int
    source: FileSource
    path: str


@dataclass(frozen=True, slots=True)
class FsStats:
    """What statfs reports."""

    total_bytes: int
    files: int


class Filesystem:
    """One mounted dandiset version."""

    def __init__(
        self,
        namespace: Namespace,
        manifests: ManifestCache,
        blocks: BlockCache,
        reader: S3Reader,
    ) -> None:
        self.ns = namespace
        self.manifests = manifests
        self.blocks = blocks
        self.reader = reader
        #: Where sequential readahead fetches run; set by `mount.serve` once its nursery is open.
        self.readahead_nursery: trio.Nursery | None = None
        #: A read fails with EIO rather than take longer than this (config.READ_DEADLINE).
        self.read_deadline = config.READ_DEADLINE
        self._reported: set[str] = set()

    async def _index(self, ino: int, *, inside_only: bool) -> ManifestIndex | None:
        try:
            asset = self.ns.zarr_of(ino, inside_only=inside_only)
        except DataError as e:  # an asset that cannot be served at all: say why, once
            message = str(e)
            if message not in self._reported:
                self._reported.add(message)
                log.error("%s", message)
            raise
        return None if asset is None else await self.manifests.get(asset)

    async def getattr(self, ino: int) -> Entry:
        return self.ns.getattr(ino, await self._index(ino, inside_only=True))

    async def lookup(self, parent: int, name: bytes) -> Entry:
        return self.ns.lookup(parent, name, await self._index(parent, inside_only=False))

    async def opendir(self, ino: int) -> None:
        self.ns.check_dir(ino, await self._index(ino, inside_only=False))

    async def readdir(self, ino: int, offset: int) -> Iterator[tuple[bytes, Entry, int]]:
        """Entries of directory `ino` from `offset` (a value a previous entry returned, or 0)."""
        return self.ns.readdir(ino, offset, await self._index(ino, inside_only=False))

    async def open(self, ino: int) -> OpenFile:
        index = await self._index(ino, inside_only=True)
        try:
            source = self.ns.file_source(ino, index)
        except DataError as e:
            log.error("cannot open %s: %s", self.ns.describe(ino, index), e)
            raise
        return OpenFile(ino, source, self.ns.describe(ino, index))

    async def release(self, handle: OpenFile) -> None:
        """The file was closed by every process that had it open."""
        return None

    async def read(self, handle: OpenFile, offset: int, size: int) -> bytes:
        source = handle.source
        if isinstance(source, InlineFile):
            return source.data[offset : offset + size]
        try:
            with trio.fail_after(self.read_deadline):
                return await self.blocks.read(
                    source, offset, size, self.reader.read_range, self.readahead_nursery
                )
        except (DataError, trio.TooSlowError) as exc:
            error = (
                exc
                if isinstance(exc, DataError)
                else RemoteError(f"no answer within {self.read_deadline:g} s")
            )
            log.error(
                "read of %s failed (%s, %d bytes at %d): %s",
                handle.path,
                describe_object(self.ns.bucket, source),
                size,
                offset,
                error,
            )
            if error is exc:
                raise
            raise error from None

    def statfs(self) -> FsStats:
        return FsStats(total_bytes=self.ns.total_size, files=self.ns.n_assets)


def describe_object(bucket: str, ref: ObjectRef) -> str:
    """`s3://bucket/key?versionId=...` for log lines."""
    version = f"?versionId={ref.version_id}" if ref.version_id else ""
    return f"s3://{bucket}/{ref.key}{version}"
