"""A Zarr's metadata objects, found in its manifest index, and the consolidated metadata built from
them.

Owns: which entries of a Zarr are metadata (`.zarray`, `.zattrs`, `.zgroup`, `.zmetadata`,
`zarr.json`), found by walking the index's directories without descending into chunk directories (a
Zarr format 2 array's subdirectories, a format 3 array's `c/`), within a bounded number of directories;
and the document a consolidated `.zmetadata` (Zarr format 2, `zarr_consolidated_format` 1) holds,
built from their bytes. Pure: no I/O (the filesystem fetches the bytes, concurrently, when a Zarr is
first entered).
"""

from __future__ import annotations

import json
from collections import deque
from typing import TYPE_CHECKING, Any

from zarrfs import config

if TYPE_CHECKING:
    from zarrfs.manifests.index import ManifestIndex

#: The names of Zarr metadata objects (format 2 and 3): the one list zarrfs has of them.
METADATA_NAMES = (".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json")
_METADATA_NAMES = frozenset(name.encode() for name in METADATA_NAMES)
#: Format 2 metadata that a consolidated `.zmetadata` gathers.
CONSOLIDATED_NAMES = (".zarray", ".zattrs", ".zgroup")


def metadata_nodes(index: ManifestIndex) -> list[int]:
    """Nodes of the metadata objects of `index`, breadth-first from the root."""
    found: list[int] = []
    queue = deque([index.ROOT])
    walked = 0
    while (
        queue
        and walked < config.METADATA_MAX_DIRECTORIES
        and len(found) < config.METADATA_MAX_OBJECTS
    ):
        node = queue.popleft()
        walked += 1
        children = index.children(node, 0, 1 << 30)
        names = {name for _, name, _, _, _ in children}
        array = b".zarray" in names or (b"zarr.json" in names and b"c" in names)
        for child, name, is_dir, size, _ in children:
            if is_dir:
                if not array:
                    queue.append(child)
            elif name in _METADATA_NAMES and size <= config.METADATA_MAX_OBJECT_BYTES:
                found.append(child)
    return found


def needs_consolidation(index: ManifestIndex) -> bool:
    """A Zarr format 2 hierarchy (a `.zgroup` at its root) without a `.zmetadata` of its own."""
    root = index.ROOT
    return index.lookup(root, b".zgroup") is not None and index.lookup(root, b".zmetadata") is None


def consolidated(objects: dict[str, bytes]) -> bytes:
    """A `.zmetadata` document from the format 2 metadata objects by path (`0/.zarray`, ...);
    documents that are not JSON objects are left out (zarr-python would refuse them anyway)."""
    metadata: dict[str, Any] = {}
    for path in sorted(objects):
        if path.rsplit("/", 1)[-1] not in CONSOLIDATED_NAMES:
            continue
        try:
            document = json.loads(objects[path])
        except ValueError:
            continue
        if isinstance(document, dict):
            metadata[path] = document
    doc = {"metadata": metadata, "zarr_consolidated_format": 1}
    return json.dumps(doc, indent=4, sort_keys=True, ensure_ascii=True).encode()
