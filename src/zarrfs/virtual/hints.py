"""Where the HDF5 library will read next, guessed from what it just read: the children of version 1
B-tree nodes, so that an extraction's reads can be fetched ahead, many at once, instead of one round
trip at a time (HDF5 walks a chunk index depth first, one node per read).

Owns: recognising a version 1 B-tree node (signature `TREE`) in bytes read at a known offset, and
listing the addresses of its children that are metadata: the child nodes of a node above level 0
(chunk indexes and group indexes), and the symbol table nodes (`SNOD`) below a group index's level-0
node. A chunk index's level-0 children are raw data chunks: never listed. Pure: no I/O, no h5py.

A guess, bounded and harmless: the size of a chunk index's keys depends on the dataset's rank, which
the node does not record, so each rank is tried and kept only when every child address lies inside
the file and the keys' chunk offsets are in order; a node that fits no rank gives nothing. A wrong
guess costs a few small reads of the blob, never a wrong value: what is read ahead only lands in the
cache that HDF5's own reads go through. Files whose addresses or lengths are not 8 bytes (HDF5's
default) give nothing either.
"""

from __future__ import annotations

from typing import Final

SIGNATURE: Final = b"TREE"
HEADER: Final = 24  # signature, type, level, entries used, left and right sibling addresses
ADDRESS: Final = 8  # HDF5's default size of offsets (and of lengths)
MAX_ENTRIES: Final = 65_535
MAX_RANK: Final = 32
#: Addresses listed from one read at most.
MAX_HINTS: Final = 4096
UNDEFINED: Final = (1 << 64) - 1


def metadata_children(data: bytes, file_size: int) -> list[int]:
    """Addresses of metadata the HDF5 library is about to read, from the B-tree nodes in `data`
    (bytes of a file of `file_size` bytes); [] when there are none or they are not plausible."""
    out: list[int] = []
    view = memoryview(data)
    position = data.find(SIGNATURE)
    while position >= 0 and len(out) < MAX_HINTS:
        out.extend(_children(view[position:], file_size))
        position = data.find(SIGNATURE, position + len(SIGNATURE))
    return out[:MAX_HINTS]


def _children(node: memoryview, file_size: int) -> list[int]:
    if len(node) < HEADER:
        return []
    node_type, level = node[4], node[5]
    used = int.from_bytes(node[6:8], "little")
    if node_type not in (0, 1) or not 0 < used <= MAX_ENTRIES:
        return []
    if node_type == 1 and level == 0:
        return []  # the children are chunks of raw data
    for sibling in (node[8:16], node[16:24]):
        address = int.from_bytes(sibling, "little")
        if address != UNDEFINED and address >= file_size:
            return []
    key_sizes = (
        [ADDRESS]
        if node_type == 0
        else [8 + ADDRESS * (rank + 1) for rank in range(1, MAX_RANK + 1)]
    )
    for key_size in key_sizes:
        children = _parse(node, used, key_size, node_type, file_size)
        if children is not None:
            return children
    return []


def _parse(
    node: memoryview, used: int, key_size: int, node_type: int, file_size: int
) -> list[int] | None:
    """The child addresses if `node` reads plausibly with keys of `key_size` bytes, else None. A
    node cut short by the end of `data` gives the children it holds whole."""
    children: list[int] = []
    previous: tuple[int, ...] | None = None
    for i in range(used):
        key = HEADER + i * (key_size + ADDRESS)
        child = key + key_size
        if child + ADDRESS > len(node):
            break
        if node_type == 1:
            if int.from_bytes(node[key : key + 4], "little") == 0:
                return None  # a stored chunk has a size
            offsets = tuple(
                int.from_bytes(node[p : p + 8], "little") for p in range(key + 8, key + key_size, 8)
            )
            if offsets[-1] != 0 or (previous is not None and offsets < previous):
                return None  # the last "dimension" is the element size's, always 0; keys sorted
            previous = offsets
        address = int.from_bytes(node[child : child + ADDRESS], "little")
        if not 0 < address < file_size:
            return None
        children.append(address)
    return children or None
