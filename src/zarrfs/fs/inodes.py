"""A mount's inode space: the one numbering of everything a mount shows, reserved once, never reused.

Owns: the layout of the 63-bit inode numbers one mount hands the kernel: which ranges each volume's
namespace is placed at (`namespace.Namespace.place`), and which volume an inode belongs to. A volume is
one resolved dandiset version, or one Zarr at one checksum (`zarrs/...` of an archive mount). There is
no other numbering: namespaces and Zarr views answer in these numbers. Pure and synchronous; no I/O.

Layout (63 bits, so that tools treating inode numbers as signed see them positive):
- below 2^32, *plain* inodes: 1 is the mount's root; every synthetic directory (the archive's levels,
  and the root of each volume) gets one; a volume's top-level tree beyond its root gets a contiguous
  range, reserved the first time the volume is resolved;
- from 2^32, Zarr nodes `(slot << 32) | node`: a volume's Zarrs get a contiguous range of slots,
  reserved with its plain range.
Nothing is ever given back: an evicted volume resolves again into the same ranges (its tree must come
out the same size, which immutability guarantees, and `reserve` checks), so inode numbers the kernel
still holds keep meaning the same entry for the life of the mount.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from zarrfs.errors import DataError, NotFound
from zarrfs.fs.namespace import ROOT_INO, ZARR_SHIFT

#: First inode number of the Zarr-node space (and the end of the plain space).
PLAIN_LIMIT = 1 << ZARR_SHIFT
#: Global Zarr slots available: (slot << 32 | node) stays below 2^63.
SLOT_LIMIT = 1 << (63 - ZARR_SHIFT)


@dataclass(slots=True)
class Volume:
    """One volume's place in the inode space. Ranges are unset (-1) until first resolved."""

    id: int
    root_ino: int
    plain_base: int = 0
    n_plain: int = -1
    slot_base: int = 0
    n_slots: int = -1

    @property
    def reserved(self) -> bool:
        return self.n_plain >= 0


class InodeSpace:
    """Allocates inode numbers for one mount and maps them back to their owners."""

    def __init__(self) -> None:
        self._next_plain = ROOT_INO + 1
        self._next_slot = 1
        self._volumes: list[Volume] = []
        self._roots: dict[int, Volume] = {}
        # reserved ranges in allocation order (so already sorted): (start, volume)
        self._plain_starts: list[int] = []
        self._plain_owners: list[Volume] = []
        self._slot_starts: list[int] = []
        self._slot_owners: list[Volume] = []

    # --- allocation -------------------------------------------------------------------------------

    def new_synthetic(self) -> int:
        """A fresh plain inode number (a synthetic directory or a volume root)."""
        return self._take_plain(1)

    def new_block(self, count: int) -> int:
        """The first of `count` fresh consecutive plain inode numbers, for nodes whose number is
        derived from their name (the `zarrs/` hex levels of an archive mount)."""
        return self._take_plain(count)

    def new_volume(self, root_ino: int) -> Volume:
        """A volume whose root is `root_ino` (a synthetic inode, or 1 for the mount's root)."""
        volume = Volume(id=len(self._volumes), root_ino=root_ino)
        self._volumes.append(volume)
        self._roots[root_ino] = volume
        return volume

    def reserve(self, volume: Volume, n_plain: int, n_slots: int) -> None:
        """Give `volume` its ranges the first time it is resolved; later resolutions must have the
        same shape (DataError otherwise: the served tree would not match inodes the kernel holds)."""
        if volume.reserved:
            if (volume.n_plain, volume.n_slots) != (n_plain, n_slots):
                raise DataError(
                    f"volume {volume.id} resolved to another shape ({n_plain} entries, {n_slots} "
                    f"Zarrs) than before ({volume.n_plain}, {volume.n_slots})"
                )
            return
        if self._next_slot + n_slots > SLOT_LIMIT:
            raise DataError("inode space exhausted: too many Zarrs entered in this mount")
        volume.plain_base = self._take_plain(n_plain)
        volume.n_plain = n_plain
        volume.slot_base = self._next_slot
        volume.n_slots = n_slots
        self._next_slot += n_slots
        if n_plain:
            self._plain_starts.append(volume.plain_base)
            self._plain_owners.append(volume)
        if n_slots:
            self._slot_starts.append(volume.slot_base)
            self._slot_owners.append(volume)

    def _take_plain(self, count: int) -> int:
        start = self._next_plain
        if start + count > PLAIN_LIMIT:
            raise DataError("inode space exhausted: too many entries resolved in this mount")
        self._next_plain += count
        return start

    # --- ownership -------------------------------------------------------------------------------

    def volume_of(self, ino: int) -> Volume | None:
        """The volume an inode belongs to (its root included), or None for a synthetic inode."""
        if ino >= PLAIN_LIMIT:
            slot = ino >> ZARR_SHIFT
            i = bisect_right(self._slot_starts, slot) - 1
            if i >= 0:
                volume = self._slot_owners[i]
                if slot < volume.slot_base + volume.n_slots:
                    return volume
            raise NotFound(f"no inode {ino}")
        root = self._roots.get(ino)
        if root is not None:
            return root
        i = bisect_right(self._plain_starts, ino) - 1
        if i >= 0:
            volume = self._plain_owners[i]
            if ino < volume.plain_base + volume.n_plain:
                return volume
        return None
