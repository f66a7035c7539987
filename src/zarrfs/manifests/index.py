"""The columnar index of one Zarr manifest: `ManifestIndex`, in memory and on disk.

Owns: the layout of the index and its Arrow IPC file (written atomically, an xxh3-128 checksum over
its columns and their structure checked on every load; small indexes read into memory, big ones
memory-mapped with no descriptor kept), and the queries a filesystem needs (lookup, children, stat,
path, the pinned object version of a file). Parsing a manifest document into an index is `parse`'s;
fetching and caching is `zarrfs.manifest_cache`'s.

Layout of the index. Every entry of the Zarr (file or directory) is a *node*; node 0 is the Zarr root.
The children of each directory occupy one contiguous run of node ids, sorted bytewise by UTF-8 name
(equal to code point order, which is the order `zarr_checksum` sorts in), so a lookup is a binary
search in that run and `readdir` is a slice of it. Per node there is one row in a handful of numpy
columns (names and VersionIds as offsets + one byte buffer, ETags as 16 raw MD5 bytes plus a part count,
sizes and mtimes as int64): no Python object per entry. Node ids are canonical (`parse` numbers them
breadth-first, names in byte order), so every copy of one manifest, and every reload, gives the same
ids. Immutable, so safe to read from any thread.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from zarrfs import config
from zarrfs.base.refs import ObjectRef
from zarrfs.errors import ManifestError
from zarrfs.io.cache_dir import create_private_file

if TYPE_CHECKING:  # pyarrow is imported by `write` and `load` only: serving from memory needs numpy
    import pyarrow as pa

#: Bump when the on-disk index layout changes; older files are then rebuilt from the JSON.
#: 2: canonical (breadth-first) node order and a content checksum.
INDEX_FORMAT_VERSION = 2
KIND_FILE = 0
KIND_DIR = 1


@dataclass(frozen=True, slots=True)
class EntryStat:
    """What `stat` shows for one node."""

    is_dir: bool
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class EntryObject:
    """Where the bytes of one file node live: `zarr/<zarr_id>/<path>` at `version_id`."""

    path: str
    version_id: str
    size: int
    etag: str


class ManifestIndex:
    """An immutable, columnar index of one Zarr manifest. Thread-safe for reads; never mutated."""

    ROOT = 0

    def __init__(
        self,
        *,
        zarr_id: str,
        checksum: str,
        columns: dict[str, np.ndarray[Any, Any]],
        odd_etags: dict[int, str],
        n_files: int,
        keepalive: object = None,
        mapped: Path | None = None,
    ) -> None:
        self.zarr_id = zarr_id
        self.checksum = checksum
        self.n_files = n_files
        self._c = columns
        self._name_off = columns["name_off"]
        self._name_data = columns["name_data"]
        self._vid_off = columns["vid_off"]
        self._vid_data = columns["vid_data"]
        self._etag = columns["etag"]
        self._etag_parts = columns["etag_parts"]
        self._size = columns["size"]
        self._mtime = columns["mtime"]
        self._kind = columns["kind"]
        self._child_start = columns["child_start"]
        self._child_count = columns["child_count"]
        self._parent = columns["parent"]
        self._odd_etags = odd_etags
        self._keepalive = keepalive  # the table whose buffers back the columns, if any
        #: The file whose memory map backs the columns (None: they are in memory). Whoever keeps
        #: such an index loaded renews its lease (the file's mtime), so no process sharing the
        #: cache dir deletes it meanwhile (`manifest_cache`).
        self.mapped = mapped
        self.n_nodes = len(self._kind)

    # --- queries ----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes held by the columns (the weight of this index in the manifest LRU)."""
        return sum(int(c.nbytes) for c in self._c.values()) + 200 * len(self._odd_etags)

    def is_dir(self, node: int) -> bool:
        return bool(self._kind[node] == KIND_DIR)

    def name(self, node: int) -> bytes:
        return bytes(self._name_data[self._name_off[node] : self._name_off[node + 1]])

    def parent(self, node: int) -> int:
        return int(self._parent[node])

    def child_range(self, node: int) -> range:
        """Node ids of the children of directory `node`, in bytewise name order."""
        start = int(self._child_start[node])
        return range(start, start + int(self._child_count[node]))

    def children(
        self, node: int, start: int = 0, count: int = 256
    ) -> list[tuple[int, bytes, bool, int, int]]:
        """Up to `count` children of directory `node` from position `start`, in name order, as
        (node id, name, is_dir, size, mtime_ns): one bulk conversion per call, for readdir."""
        first = int(self._child_start[node])
        end = first + int(self._child_count[node])
        lo = min(first + start, end)
        hi = min(lo + count, end)
        if lo == hi:
            return []
        offsets = self._name_off[lo : hi + 1].tolist()
        base = offsets[0]
        blob = self._name_data[base : offsets[-1]].tobytes()
        names = [blob[a - base : b - base] for a, b in pairwise(offsets)]
        kinds = (self._kind[lo:hi] == KIND_DIR).tolist()
        sizes = self._size[lo:hi].tolist()
        mtimes = self._mtime[lo:hi].tolist()
        return list(zip(range(lo, hi), names, kinds, sizes, mtimes, strict=True))

    def lookup(self, node: int, name: bytes) -> int | None:
        """The child of directory `node` called `name`, or None. Binary search over its child run."""
        if self._kind[node] != KIND_DIR:
            return None
        lo = int(self._child_start[node])
        hi = lo + int(self._child_count[node])
        off = self._name_off
        data = self._name_data
        while lo < hi:
            mid = (lo + hi) // 2
            candidate = data[off[mid] : off[mid + 1]].tobytes()
            if candidate < name:
                lo = mid + 1
            elif candidate > name:
                hi = mid
            else:
                return mid
        return None

    def resolve(self, path: str) -> int | None:
        """Node id of a `/`-separated path relative to the Zarr root ('' is the root)."""
        node = self.ROOT
        for part in path.split("/") if path else ():
            found = self.lookup(node, part.encode("utf-8"))
            if found is None:
                return None
            node = found
        return node

    def stat(self, node: int) -> EntryStat:
        return EntryStat(
            is_dir=bool(self._kind[node] == KIND_DIR),
            size=int(self._size[node]),
            mtime_ns=int(self._mtime[node]),
        )

    def path(self, node: int) -> str:
        """Path of `node` relative to the Zarr root."""
        parts: list[bytes] = []
        while node != self.ROOT:
            parts.append(self.name(node))
            node = int(self._parent[node])
        return b"/".join(reversed(parts)).decode("utf-8")

    def etag(self, node: int) -> str:
        parts = int(self._etag_parts[node])
        if parts == 65535:
            return self._odd_etags[node]
        hexdigest = self._etag[node].tobytes().hex()
        return f"{hexdigest}-{parts}" if parts else hexdigest

    def version_id(self, node: int) -> str:
        return bytes(self._vid_data[self._vid_off[node] : self._vid_off[node + 1]]).decode("utf-8")

    def entry_object(self, node: int) -> EntryObject:
        """Where the bytes of file `node` live."""
        return EntryObject(
            path=self.path(node),
            version_id=self.version_id(node),
            size=int(self._size[node]),
            etag=self.etag(node),
        )

    def object_ref(self, node: int) -> ObjectRef:
        """The pinned object version holding file `node`: `zarr/<zarr_id>/<path>` at its VersionId."""
        obj = self.entry_object(node)
        return ObjectRef(
            key=f"zarr/{self.zarr_id}/{obj.path}",
            version_id=obj.version_id,
            size=obj.size,
            etag=obj.etag,
        )

    def iter_files(self) -> Iterator[EntryObject]:
        """Every file, depth-first in name order (tests and tools; not used on hot paths)."""
        stack = [self.ROOT]
        while stack:
            node = stack.pop()
            for child in reversed(self.child_range(node)):
                if self._kind[child] == KIND_DIR:
                    stack.append(child)
            for child in self.child_range(node):
                if self._kind[child] == KIND_FILE:
                    yield self.entry_object(child)

    def recompute_checksum(self) -> str:
        """Recompute the Zarr checksum from the index with `zarr_checksum` (slow; for checks)."""
        from zarr_checksum.checksum import ZarrChecksum, ZarrChecksumManifest, ZarrDirectoryDigest

        def digest(node: int) -> ZarrDirectoryDigest:
            files, dirs = [], []
            for child in self.child_range(node):
                name = self.name(child).decode("utf-8")
                if self._kind[child] == KIND_DIR:
                    d = digest(child)
                    dirs.append(ZarrChecksum(digest=d.digest, name=name, size=d.size))
                else:
                    size = int(self._size[child])
                    files.append(ZarrChecksum(digest=self.etag(child), name=name, size=size))
            return ZarrChecksumManifest(directories=dirs, files=files).generate_digest()

        return digest(self.ROOT).digest

    # --- persistence --------------------------------------------------------------------------

    def _checksum(self) -> str:
        """xxh3-128 over every column's bytes and the odd ETags (what `write` stores, `load` checks)."""
        h = xxhash.xxh3_128()
        for name in _COLUMN_ORDER:
            column = self._c[name]
            h.update(name.encode())
            h.update(len(column).to_bytes(8, "little"))
            h.update(np.ascontiguousarray(column).data)
        h.update(json.dumps(sorted(self._odd_etags.items())).encode())
        return h.hexdigest()

    def write(self, path: Path) -> int:
        """Write the index as an Arrow IPC file, atomically (temp file 0600, rename); its size in
        bytes. The directory must exist. Not fsynced (that cost 0.2 s per index here): a file torn
        by a crash fails the content checksum on load and is rebuilt, like a torn disk cache
        block."""
        import pyarrow as pa
        import pyarrow.ipc as ipc

        n = self.n_nodes

        def binary(off: np.ndarray[Any, Any], data: np.ndarray[Any, Any]) -> pa.Array:
            return pa.Array.from_buffers(
                pa.large_binary(), n, [None, pa.py_buffer(off), pa.py_buffer(data)]
            )

        def prim(values: np.ndarray[Any, Any]) -> pa.Array:
            # from the buffer, not `pa.array`: that imports pandas when it is installed (0.3 s)
            data = np.ascontiguousarray(values)
            return pa.Array.from_buffers(
                pa.from_numpy_dtype(data.dtype), n, [None, pa.py_buffer(data)]
            )

        columns = {
            "name": binary(self._name_off, self._name_data),
            "version_id": binary(self._vid_off, self._vid_data),
            "etag": pa.Array.from_buffers(
                pa.binary(16), n, [None, pa.py_buffer(self._etag.reshape(-1))]
            ),
            "etag_parts": prim(self._etag_parts),
            "size": prim(self._size),
            "mtime_ns": prim(self._mtime),
            "kind": prim(self._kind),
            "child_start": prim(self._child_start),
            "child_count": prim(self._child_count),
            "parent": prim(self._parent),
        }
        table = pa.Table.from_arrays(list(columns.values()), names=list(columns))
        meta = {
            "zarrfs_format": str(INDEX_FORMAT_VERSION),
            "zarr_id": self.zarr_id,
            "checksum": self.checksum,
            "n_nodes": str(n),
            "n_files": str(self.n_files),
            "odd_etags": json.dumps({str(k): v for k, v in self._odd_etags.items()}),
            "content_xxh3_128": self._checksum(),
        }
        table = table.replace_schema_metadata(meta)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique across containers
        try:
            os.close(create_private_file(tmp))
            with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=max(n, 1))
            size = tmp.stat().st_size
            os.replace(tmp, path)
            return size
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(
        cls, path: Path, *, zarr_id: str, checksum: str, map_min: int | None = None
    ) -> ManifestIndex:
        """Load an index written by `write`, checking its header, its content checksum and the
        structure of its columns. Raises ManifestError if it is not exactly the expected index.

        Holds no file descriptor afterwards: an index smaller than `map_min` bytes is read into
        memory (nothing of it stays mapped, so another process may delete the file at once); a
        bigger one (`map_min`: `config.INDEX_MAP_MIN` by default) is memory-mapped and its descriptor
        closed at once (the mapping keeps the pages
        reachable, and the columns keep the mapping). So the number of loaded indexes never counts
        against the descriptor limit (`config.FD_BUDGET`)."""
        import pyarrow as pa
        import pyarrow.ipc as ipc

        if map_min is None:
            map_min = config.INDEX_MAP_MIN
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < map_min:
                    data = f.read()
            if size < map_min:
                table = ipc.open_file(pa.py_buffer(data)).read_all()
                return cls._from_table(table, None, path, zarr_id=zarr_id, checksum=checksum)
            source = pa.memory_map(str(path), "r")
            try:
                table = ipc.open_file(source).read_all()
            finally:
                source.close()  # the descriptor; the mapping lives on with the table's buffers
            return cls._from_table(table, True, path, zarr_id=zarr_id, checksum=checksum)
        except ManifestError:
            raise
        except (OSError, pa.ArrowException, ValueError, TypeError, KeyError, IndexError) as e:
            raise ManifestError(f"unreadable index {path}: {type(e).__name__}: {e}") from e

    @classmethod
    def _from_table(
        cls, table: pa.Table, mapped: object, path: Path, *, zarr_id: str, checksum: str
    ) -> ManifestIndex:
        import pyarrow as pa

        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        expected = {
            "zarrfs_format": str(INDEX_FORMAT_VERSION),
            "zarr_id": zarr_id,
            "checksum": checksum,
        }
        for key, value in expected.items():
            if meta.get(key) != value:
                raise ManifestError(f"index {path}: {key} is {meta.get(key)!r}, expected {value!r}")
        n = table.num_rows
        if str(n) != meta.get("n_nodes") or n < 1:
            raise ManifestError(f"index {path}: row count {n} does not match its header")
        if any(table.column(name).num_chunks != 1 for name in table.column_names):
            raise ManifestError(f"index {path}: columns are not single chunks")

        def prim(name: str, dtype: str) -> np.ndarray[Any, Any]:
            # from the buffer, not `to_numpy`: that imports pandas when it is installed (0.3 s)
            chunk = table.column(name).chunk(0)
            wanted = np.dtype(dtype)
            if chunk.type != pa.from_numpy_dtype(wanted) or chunk.null_count or chunk.offset:
                raise ManifestError(f"index {path}: column {name} has the wrong type")
            return np.frombuffer(chunk.buffers()[1], dtype=wanted, count=n)

        def binary(name: str) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
            chunk = table.column(name).chunk(0)
            if chunk.type != pa.large_binary() or chunk.offset != 0:
                raise ManifestError(f"index {path}: column {name} has the wrong type")
            _, off, data = chunk.buffers()
            offsets = np.frombuffer(off, dtype=np.int64, count=n + 1)
            values = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, "u1")
            return offsets, values

        name_off, name_data = binary("name")
        vid_off, vid_data = binary("version_id")
        etag_chunk = table.column("etag").chunk(0)
        if etag_chunk.type != pa.binary(16) or etag_chunk.offset != 0:
            raise ManifestError(f"index {path}: column etag has the wrong type")
        etag = np.frombuffer(etag_chunk.buffers()[1], dtype=np.uint8, count=16 * n).reshape(n, 16)
        columns = {
            "name_off": name_off,
            "name_data": name_data,
            "vid_off": vid_off,
            "vid_data": vid_data,
            "etag": etag,
            "etag_parts": prim("etag_parts", "uint16"),
            "size": prim("size", "int64"),
            "mtime": prim("mtime_ns", "int64"),
            "kind": prim("kind", "uint8"),
            "child_start": prim("child_start", "uint64"),
            "child_count": prim("child_count", "uint64"),
            "parent": prim("parent", "uint64"),
        }
        odd = {int(k): str(v) for k, v in json.loads(meta.get("odd_etags", "{}")).items()}
        index = cls(
            zarr_id=zarr_id,
            checksum=checksum,
            columns=columns,
            odd_etags=odd,
            n_files=int(meta["n_files"]),
            keepalive=table,
            mapped=path if mapped else None,
        )
        if index._checksum() != meta.get("content_xxh3_128"):
            raise ManifestError(f"index {path}: content checksum mismatch (corrupt file)")
        if (why := index._structure_problem()) is not None:
            raise ManifestError(f"index {path}: {why}")
        return index

    def _structure_problem(self) -> str | None:
        """Why the columns cannot be a well-formed tree (every access would stay in bounds), or
        None. Cheap (vectorized); run on every load besides the checksum."""
        n = self.n_nodes
        for off, data, what in (
            (self._name_off, self._name_data, "name"),
            (self._vid_off, self._vid_data, "versionId"),
        ):
            if off[0] != 0 or off[-1] > len(data) or bool(np.any(np.diff(off) < 0)):
                return f"{what} offsets are not monotonic within their data"
        kind = self._kind
        if bool(np.any(kind > KIND_DIR)) or kind[0] != KIND_DIR:
            return "bad node kinds"
        dirs = kind == KIND_DIR
        starts, counts = self._child_start[dirs], self._child_count[dirs]
        if bool(np.any((counts > 0) & (starts < 1))) or bool(np.any(starts + counts > n)):
            return "a child run points outside the index"
        if int(counts.sum()) != n - 1 or bool(np.any(self._child_count[~dirs] != 0)):
            return "child runs do not partition the nodes"
        if bool(np.any(self._parent >= n)) or bool(np.any(self._size < 0)):
            return "bad parents or sizes"
        odd_rows = set(np.flatnonzero(self._etag_parts == 65535).tolist())
        if odd_rows != set(self._odd_etags) or any(kind[r] != KIND_FILE for r in odd_rows):
            return "bad ETags"
        return None


_COLUMN_ORDER = (
    "name_off",
    "name_data",
    "vid_off",
    "vid_data",
    "etag",
    "etag_parts",
    "size",
    "mtime",
    "kind",
    "child_start",
    "child_count",
    "parent",
)
