"""The B-tree nodes an extraction fetches ahead: every address listed from a real HDF5 file's
version 1 B-tree nodes is another node (or a symbol table node), never raw data; random bytes and
nodes cut short give nothing wrong."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from zarrfs.virtual.hints import metadata_children


def write_indexed(path: Path) -> None:
    """A chunk index of 10,000 chunks (a B-tree of several levels) and a group of 300 groups."""
    with h5py.File(path, "w") as f:
        d = f.create_dataset("x", shape=(100_000, 16), chunks=(10, 16), dtype="<i2")
        for i in range(0, 100_000, 20_000):
            d[i : i + 20_000] = np.random.default_rng(i).integers(0, 100, (20_000, 16))
        g = f.create_group("g")
        for i in range(300):
            g.create_group(f"sub{i}")
        f.create_dataset("cube", data=np.zeros((40, 40, 40)), chunks=(4, 4, 4))  # rank 3


def test_listed_addresses_are_metadata_nodes(tmp_path: Path) -> None:
    path = tmp_path / "indexed.h5"
    write_indexed(path)
    data = path.read_bytes()
    listed: set[int] = set()
    position = data.find(b"TREE")
    while position >= 0:
        listed.update(metadata_children(data[position : position + 16384], len(data)))
        position = data.find(b"TREE", position + 4)
    assert len(listed) > 100  # the chunk indexes' inner nodes, the group's symbol tables
    for address in listed:
        assert data[address : address + 4] in (b"TREE", b"SNOD"), address
    chunks = set()
    with h5py.File(path) as f:
        for name in ("x", "cube"):
            f[name].id.chunk_iter(lambda info: chunks.add(info.byte_offset))
    assert not listed & chunks  # raw data is never fetched ahead


def test_noise_and_cut_nodes_give_nothing_wrong(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        noise = bytearray(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        at = int(rng.integers(0, 4000))
        noise[at : at + 4] = b"TREE"
        for address in metadata_children(bytes(noise), 1 << 30):
            assert 0 < address < 1 << 30
    path = tmp_path / "indexed.h5"
    write_indexed(path)
    data = path.read_bytes()
    position = data.find(b"TREE")
    whole = metadata_children(data[position : position + 16384], len(data))
    for cut in (30, 100, 500):
        part = metadata_children(data[position : position + cut], len(data))
        assert part == whole[: len(part)]  # the children it holds whole, no more
    assert metadata_children(os.urandom(64), 10) == []
