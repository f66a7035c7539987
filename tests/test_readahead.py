"""Readahead across an array's chunk files: which file is "the next chunk" in a Zarr (v2 nested and
flat keys, v3's `c/` keys, sparse arrays) and in a virtual view; that a reader opening chunks in
order gets the next ones fetched ahead, and random access starts nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from test_manifest import leaf, parse_leaves
from zarrfs import config
from zarrfs.archive.assets import AssetRecord
from zarrfs.base.refs import ObjectRef
from zarrfs.fs.namespace import ZARR_SHIFT, ZarrPlace
from zarrfs.fs.readahead import ChunkReadahead
from zarrfs.fs.virtual_zarrs import VirtualView
from zarrfs.fs.zarrs import ZarrView
from zarrfs.io.prefetch import PrefetchBudget
from zarrfs.io.stack import ReadStack
from zarrfs.virtual import VirtualZarrBuilder

PLACE = ZarrPlace(
    AssetRecord("a", "x.zarr", 1, 1, zarr_id="z", zarr_checksum="c"), 5, 2 << ZARR_SHIFT, "x.zarr"
)


def zarr_view(paths: list[str]) -> ZarrView:
    index, _ = parse_leaves([leaf(p) for p in paths])
    return ZarrView(index)


def walk_chunks(view: Any, first: str) -> list[str]:
    """Every chunk from `first` on, following `next_chunk`."""
    node = view.index.resolve(first)
    array, coords = view.chunk_of(node)
    out = [first]
    while (following := view.next_chunk(array, coords)) is not None:
        coords, node = following
        out.append(view.index.path(node))
    return out


def test_nested_v2_keys_follow_row_major_order_across_directories() -> None:
    files = ["0/.zarray", "0/.zattrs", ".zgroup"]
    files += [f"0/{i}/{j}" for i in range(3) for j in range(12)]  # 10, 11 sort before 2 bytewise
    view = zarr_view(files)
    assert walk_chunks(view, "0/0/0") == [f"0/{i}/{j}" for i in range(3) for j in range(12)]
    assert view.chunk_of(view.index.resolve("0/.zarray")) is None  # metadata is no chunk
    assert view.chunk_of(view.index.resolve(".zgroup")) is None


def test_flat_v2_keys_and_v3_c_keys() -> None:
    flat = zarr_view(["a/.zarray", *(f"a/{i}.{j}" for i in range(2) for j in range(3))])
    assert walk_chunks(flat, "a/0.1") == ["a/0.1", "a/0.2", "a/1.0", "a/1.1", "a/1.2"]
    v3 = zarr_view(
        ["zarr.json", "b/zarr.json", *(f"b/c/{i}/{j}" for i in range(2) for j in range(2))]
    )
    assert walk_chunks(v3, "b/c/0/0") == ["b/c/0/0", "b/c/0/1", "b/c/1/0", "b/c/1/1"]


def test_keys_that_are_not_chunks() -> None:
    view = zarr_view(["a/.zarray", "a/01", "a/x", "a/1", "b/7", "a/2.x"])
    for path in ("a/01", "a/x", "b/7", "a/2.x"):  # leading zero, a name, no array, not a number
        assert view.chunk_of(view.index.resolve(path)) is None, path
    array, coords = view.chunk_of(view.index.resolve("a/1"))  # type: ignore[misc]
    assert coords == (1,) and view.next_chunk(array, coords) is None


def test_a_missing_chunk_ends_the_row_not_the_array() -> None:
    """A never-written chunk has no file (a sparse array): the next row still follows."""
    view = zarr_view(["a/.zarray", "a/0.0", "a/0.1", "a/0.3", "a/1.0"])
    assert walk_chunks(view, "a/0.0") == ["a/0.0", "a/0.1", "a/1.0"]


def test_virtual_view_chunks_follow_their_rows() -> None:
    builder = VirtualZarrBuilder(blob_size=100_000)
    builder.add_file(".zgroup", b"{}")
    for name in ("a", "b"):
        builder.add_file(f"{name}/.zarray", b"{}")
        builder.add_chunks(
            name,
            (2, 3),
            np.arange(6, dtype=np.int64),
            np.arange(6, dtype=np.int64) * 100 + (0 if name == "a" else 1000),
            np.full(6, 50, np.int64),
        )
    view = VirtualView.of(builder.build(), ObjectRef("blobs/x", None, 100_000, "e"), 1)
    first = view.n_named  # row 0: a/0.0
    array, coords = view.chunk_of(first)  # type: ignore[misc]
    rows = [coords[0]]
    while (following := view.next_chunk(array, coords)) is not None:
        coords, _ = following
        rows.append(coords[0])
    assert rows == [0, 1, 2, 3, 4, 5]  # a's rows only: b's are another array
    assert view.chunk_of(0) is None


@dataclass
class FakeBlocks:
    """What readahead asks of the block cache: whole chunks, counted."""

    reads: list[tuple[str, int, int]] = field(default_factory=list)

    async def read(self, ref: ObjectRef, offset: int, size: int, priority: Any = None) -> bytes:
        self.reads.append((ref.key, offset, size))
        await trio.sleep(0.01)
        return b"x" * size


@dataclass
class FakeStack:
    blocks: FakeBlocks = field(default_factory=FakeBlocks)
    prefetch_budget: PrefetchBudget = field(default_factory=lambda: PrefetchBudget(1 << 30))
    fetch_ahead = ReadStack.fetch_ahead  # the real one, over the fake blocks and budget


def opened(view: ZarrView, readahead: ChunkReadahead, path: str) -> None:
    readahead.opened(PLACE, view, view.index.resolve(path))


@pytest.mark.trio
async def test_a_reader_in_order_gets_chunks_fetched_ahead() -> None:
    view = zarr_view(["0/.zarray", *(f"0/{i}/{j}" for i in range(8) for j in range(8))])
    stack = FakeStack()
    readahead = ChunkReadahead(stack)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        readahead.nursery = nursery
        opened(view, readahead, "0/0/0")
        opened(view, readahead, "0/0/2")  # out of order, as a reader's threads are
        assert stack.blocks.reads == []  # not yet: one hit
        opened(view, readahead, "0/0/1")
        opened(view, readahead, "0/0/3")
        await trio.testing.wait_all_tasks_blocked()
        fetched = [key for key, _, _ in stack.blocks.reads]
        following = [f"0/0/{j}" for j in range(4, 4 + config.READAHEAD_FIRST_FILES)]
        assert sorted(fetched) == sorted(
            view.index.object_ref(view.index.resolve(p)).key for p in following
        )
        for i in range(8):  # the reader goes on in order: the window grows, never past the end
            for j in range(8):
                opened(view, readahead, f"0/{i}/{j}")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    keys = [key for key, _, _ in stack.blocks.reads]
    assert len(keys) == len(set(keys))  # nothing fetched twice
    assert len(keys) >= 8 * 8 - 8  # nearly every chunk was ahead of the reader
    assert stack.prefetch_budget.used == 0


@pytest.mark.trio
async def test_random_chunks_start_nothing() -> None:
    """50 random chunks of a 32 x 32 array (compare.py's `chunks`): no window."""
    view = zarr_view(["0/.zarray", *(f"0/{i}/{j}" for i in range(32) for j in range(32))])
    stack = FakeStack()
    readahead = ChunkReadahead(stack)  # type: ignore[arg-type]
    rng = np.random.default_rng(1)
    async with trio.open_nursery() as nursery:
        readahead.nursery = nursery
        for _ in range(50):
            i, j = (int(x) for x in rng.integers(0, 32, size=2))
            opened(view, readahead, f"0/{i}/{j}")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert stack.blocks.reads == []


def test_readahead_without_a_nursery_does_nothing() -> None:
    view = zarr_view(["0/.zarray", "0/0", "0/1", "0/2"])
    stack = FakeStack()
    readahead = ChunkReadahead(stack)  # type: ignore[arg-type]
    for path in ("0/0", "0/1", "0/2"):
        opened(view, readahead, path)
    assert stack.blocks.reads == [] and readahead.stats["files"] == 0


@pytest.mark.trio
async def test_through_the_filesystem_chunks_opened_in_order_are_fetched_ahead(
    sample: Any, tmp_path: Any
) -> None:
    """The sample's Zarr format 3 array (`c/i/j` keys): opening its chunks in order fetches the
    rest ahead; every byte read is still the published one, from the block cache."""
    from test_filesystem import make_fs
    from zarrfs.demo.sample import ARRAY_PATH, V1

    files = sample.versions[V1].files
    chunks = sorted(
        (p for p in files if p.startswith(f"{ARRAY_PATH}/c/")),
        key=lambda p: tuple(int(x) for x in p.rsplit("/c/", 1)[1].split("/")),
    )
    assert len(chunks) >= 5
    async for fs in make_fs(sample, V1, tmp_path):
        requests_before = None
        for i, path in enumerate(chunks):
            handle = await fs.open(await fs.walk(path))
            assert await fs.read(handle, 0, 1 << 20) == files[path]
            await fs.release(handle)
            if i == 2:  # the third in order: the rest is fetched ahead
                await trio.sleep(0.5)
                requests_before = fs.reader.stats["requests"]
        stats = (dict(fs.readahead.stats), fs.reader.stats["requests"], requests_before)
    assert stats[0]["files"] >= len(chunks) - 3, stats
    assert stats[1] == stats[2], stats  # the rest came from memory
