"""The virtual Zarr model: lookups, validation, checked serialization, kerchunk export (pure units)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from zarrfs.virtual import (
    EXTRACTOR_VERSION,
    ChunkRef,
    IndexFormatError,
    VirtualZarr,
    VirtualZarrBuilder,
)

BLOB = 10_000_000


def small_view() -> VirtualZarr:
    b = VirtualZarrBuilder(BLOB)
    b.add_file(".zgroup", b'{"zarr_format": 2}')
    b.add_file(".zattrs", b"{}")
    b.add_file("g/.zgroup", b'{"zarr_format": 2}')
    b.add_file("g/a/.zarray", b"{}")
    b.add_file("g/a/.zattrs", b"{}")
    b.add_chunks("g/a", (3, 4), [11, 0, 5], [300, 100, 200], [10, 20, 30])
    b.add_file("s/.zarray", b"{}")
    b.add_file("s/0", b"\x00\xff")
    return b.build()


def test_lookups() -> None:
    v = small_view()
    assert v.get("g/a/0.0") == ChunkRef(100, 20)
    assert v.get("g/a/1.1") == ChunkRef(200, 30)
    assert v.get("g/a/2.3") == ChunkRef(300, 10)
    assert v.get("g/a/0.1") is None  # never written
    for bad in ("g/a/3.0", "g/a/0.4", "g/a/00.0", "g/a/0", "g/a/0.0.0", "g/a/-1.0", "g/a/a.b"):
        assert v.get(bad) is None, bad
    assert v.get("s/0") == b"\x00\xff"
    assert v.get("g/.zgroup") == b'{"zarr_format": 2}'
    assert v.get("g") is None and v.get("nope") is None
    assert v.is_dir("") and v.is_dir("g") and v.is_dir("g/a") and not v.is_dir("g/a/0.0")
    assert v.listdir("") == [".zattrs", ".zgroup", "g", "s"]
    assert v.listdir("g/a") == [".zarray", ".zattrs", "0.0", "1.1", "2.3"]
    assert v.listdir("g/a/0.0") is None and v.listdir("x") is None
    assert v.chunk_count == 3


def test_round_trip_and_checksum() -> None:
    v = small_view()
    data = v.to_bytes()
    w = VirtualZarr.from_bytes(data, blob_size=BLOB)
    assert dict(w.iter_files()) == dict(v.iter_files())
    assert w.to_bytes() == data
    for i in (0, 9, len(data) // 2, len(data) - 20, len(data) - 1):
        damaged = bytearray(data)
        damaged[i] ^= 0x01
        with pytest.raises(IndexFormatError, match="checksum"):
            VirtualZarr.from_bytes(bytes(damaged), blob_size=BLOB)
    with pytest.raises(IndexFormatError, match="blob of"):
        VirtualZarr.from_bytes(data, blob_size=BLOB + 1)
    with pytest.raises(IndexFormatError):
        VirtualZarr.from_bytes(data[:-1], blob_size=BLOB)
    with pytest.raises(IndexFormatError):
        VirtualZarr.from_bytes(b"", blob_size=BLOB)


def test_refuses_out_of_range_values() -> None:
    def build(offsets: list[int], lengths: list[int], keys: list[int] | None = None) -> None:
        b = VirtualZarrBuilder(1000)
        b.add_file("a/.zarray", b"{}")
        b.add_chunks("a", (4,), keys or list(range(len(offsets))), offsets, lengths)
        b.build()

    build([0, 990], [10, 10])
    with pytest.raises(IndexFormatError, match="outside the blob"):
        build([0, 991], [10, 10])
    with pytest.raises(IndexFormatError, match="outside the blob"):
        build([-1], [10])
    with pytest.raises(IndexFormatError, match="outside the blob"):
        build([5], [0])
    with pytest.raises(IndexFormatError, match="outside the blob"):
        build([2**62], [2**62])
    with pytest.raises(IndexFormatError, match="grid"):
        build([0], [1], keys=[4])
    with pytest.raises(IndexFormatError, match="duplicate"):
        build([0, 1], [1, 1], keys=[1, 1])


@pytest.mark.parametrize(
    "path", ["/a", "a/", "a//b", "a/./b", "a/../b", "", "a\x00b", "a\nb", "x" * 5000]
)
def test_refuses_bad_paths(path: str) -> None:
    with pytest.raises(IndexFormatError):
        VirtualZarrBuilder(10).add_file(path, b"")


def test_refuses_ambiguous_trees() -> None:
    b = VirtualZarrBuilder(100)
    b.add_file("a", b"file")
    b.add_file("a/.zgroup", b"{}")
    with pytest.raises(IndexFormatError, match="both a file and a directory"):
        b.build()
    b = VirtualZarrBuilder(100)
    b.add_chunks("a", (2,), [0], [0], [1])
    with pytest.raises(IndexFormatError, match=r"no \.zarray"):
        b.build()
    b = VirtualZarrBuilder(100)
    b.add_file("a/.zarray", b"{}")
    b.add_file("a/1", b"inline chunk beside referenced ones")
    b.add_chunks("a", (2,), [0], [0], [1])
    with pytest.raises(IndexFormatError, match="also has entry"):
        b.build()


def test_refuses_other_extractor_version() -> None:
    v = small_view()
    with pytest.raises(IndexFormatError, match="extractor"):
        VirtualZarr(
            blob_size=v.blob_size,
            inline=v.inline,
            tables=v.tables,
            keys=v.keys,
            offsets=v.offsets,
            lengths=v.lengths,
            extractor_version=EXTRACTOR_VERSION + "x",
        )


def test_kerchunk_refs() -> None:
    refs = small_view().to_kerchunk("s3://bucket/blob?versionId=v1")
    assert refs["version"] == 1
    r = refs["refs"]
    assert r["g/a/1.1"] == ["s3://bucket/blob?versionId=v1", 200, 30]
    assert r[".zgroup"] == '{"zarr_format": 2}'
    assert r["s/0"] == "base64:AP8="
    json.dumps(refs)  # serializable as is


def test_many_chunks_are_compact_and_fast() -> None:
    """100k+ chunks: 24 bytes per chunk in memory and on disk; lookups in microseconds."""
    n_side = 400  # 160,000 chunks
    b = VirtualZarrBuilder(1 << 40)
    b.add_file("big/.zarray", b"{}")
    b.add_file("big/.zattrs", b"{}")
    keys = np.arange(n_side * n_side, dtype=np.int64)
    b.add_chunks("big", (n_side, n_side), keys, keys * 4096, np.full(keys.size, 4096))
    v = b.build()
    n = v.chunk_count
    column_bytes = v.keys.nbytes + v.offsets.nbytes + v.lengths.nbytes
    assert column_bytes / n == 24
    data = v.to_bytes()
    assert (len(data) - 200) / n <= 24.01
    t0 = time.perf_counter()
    for i in range(0, n_side, 7):
        for j in range(0, n_side, 13):
            assert v.get(f"big/{i}.{j}") == ChunkRef((i * n_side + j) * 4096, 4096)
    per_lookup = (time.perf_counter() - t0) / ((n_side // 7 + 1) * (n_side // 13 + 1))
    assert per_lookup < 200e-6, per_lookup
    t0 = time.perf_counter()
    w = VirtualZarr.from_bytes(data, blob_size=1 << 40)
    assert time.perf_counter() - t0 < 2.0
    assert w.get("big/399.399") == ChunkRef((n - 1) * 4096, 4096)
    names = w.listdir("big")
    assert names is not None and len(names) == n + 2


def resign(body: bytes) -> bytes:
    """`body` with a valid checksum: what a bug (not a disk error) could write."""
    import xxhash

    return body + xxhash.xxh3_128_digest(body)


def test_range_checks_behind_a_valid_checksum() -> None:
    v = small_view()
    data = v.to_bytes()[:-16]
    offsets_at = len(data) - 2 * 8 * v.chunk_count  # keys, then offsets, then lengths
    bad = bytearray(data)
    bad[offsets_at : offsets_at + 8] = (BLOB - 5).to_bytes(8, "little")
    with pytest.raises(IndexFormatError, match="outside the blob"):
        VirtualZarr.from_bytes(resign(bytes(bad)), blob_size=BLOB)
    keys_at = offsets_at - 8 * v.chunk_count
    bad = bytearray(data)
    bad[keys_at : keys_at + 8] = (12).to_bytes(8, "little")  # grid (3, 4) has 12 chunks
    with pytest.raises(IndexFormatError, match="grid"):
        VirtualZarr.from_bytes(resign(bytes(bad)), blob_size=BLOB)
    with pytest.raises(IndexFormatError):
        VirtualZarr.from_bytes(resign(data + b"\x00"), blob_size=BLOB)
    for cut in range(8, len(data), 7):
        with pytest.raises(IndexFormatError):
            VirtualZarr.from_bytes(resign(data[:cut]), blob_size=BLOB)


def test_the_package_does_not_import_h5py() -> None:
    """Only the worker process touches HDF5; the caller (the mount's daemon) never loads it."""
    import subprocess
    import sys

    code = "import sys, zarrfs.virtual; assert 'h5py' not in sys.modules, 'h5py imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
