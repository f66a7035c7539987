"""The extraction worker: `python -m zarrfs.virtual.worker --size N`, run by `extract`.

Owns: the worker process's side of the pipe protocol, `PipeFile` (the file object h5py reads, which
asks the parent for aligned blocks and keeps a small LRU of them), and running `translate` on it.
Never does: networking or file I/O of its own; it sees the blob only through its parent, one
bounded request at a time.

The protocol streams are duplicates of the process's original stdin and stdout; file descriptors 0
and 1 are then pointed at /dev/null and stderr, so that nothing a library prints can corrupt a frame.
Single-threaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections import OrderedDict
from typing import BinaryIO, Final

from zarrfs.virtual import protocol

DEFAULT_BLOCK_SIZE: Final = 4 << 10
DEFAULT_CACHE_BLOCKS: Final = 1024
MAX_BLOCKS_PER_REQUEST: Final = 64


class ParentGone(OSError):
    """The parent closed the pipe or answered with something other than the bytes asked for."""


class Channel:
    """Blocking frames over the worker's protocol pipes."""

    def __init__(self, rx: BinaryIO, tx: BinaryIO) -> None:
        self._rx = rx
        self._tx = tx
        self.requests = 0
        self.bytes_requested = 0
        self._fault = os.environ.get(protocol.FAULT_ENV, "")

    def send(self, tag: bytes, payload: bytes = b"") -> None:
        self._tx.write(protocol.frame(tag, payload))
        self._tx.flush()

    def _read_exactly(self, n: int) -> bytes:
        chunks: list[bytes] = []
        while n:
            data = self._rx.read(n)
            if not data:
                raise ParentGone("the parent closed the pipe")
            chunks.append(data)
            n -= len(data)
        return b"".join(chunks)

    def read(self, offset: int, length: int) -> bytes:
        self.send(protocol.TAG_READ, protocol.READ.pack(offset, length))
        tag, n = protocol.HEADER.unpack(self._read_exactly(protocol.HEADER.size))
        if tag != protocol.TAG_BYTES or n != length:
            raise ParentGone(f"unexpected answer {tag!r} of {n} bytes to a read of {length}")
        data = self._read_exactly(n)
        self.requests += 1
        self.bytes_requested += length
        if self._fault:
            self._misbehave()
        return data

    def _misbehave(self) -> None:
        if self._fault == "abort":
            os.abort()
        elif self._fault == "hang":
            while True:
                time.sleep(3600)
        elif self._fault == "garbage":
            self._tx.write(b"Z" * 64)
            self._tx.flush()
            while True:
                time.sleep(3600)


class PipeFile(io.RawIOBase):
    """A read-only, seekable file of `size` bytes whose bytes come from the parent.

    Reads are served from aligned blocks of `block_size` bytes; missing blocks are asked for in one
    request per run of consecutive missing blocks (at most MAX_BLOCKS_PER_REQUEST), and the last
    `cache_blocks` blocks are kept, so HDF5's many small metadata reads rarely cross the pipe.
    """

    def __init__(self, channel: Channel, size: int, block_size: int, cache_blocks: int) -> None:
        super().__init__()
        self._channel = channel
        self._size = size
        self._block = block_size
        self._capacity = max(1, cache_blocks)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise OSError(f"seek to negative position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        start = self._pos
        end = min(self._size, start + len(out))
        if end <= start:
            return 0
        first, last = start // self._block, (end - 1) // self._block
        self._fetch(first, last)
        written = 0
        for index in range(first, last + 1):
            block = self._cache[index]
            self._cache.move_to_end(index)
            lo = max(start, index * self._block) - index * self._block
            hi = min(end, (index + 1) * self._block) - index * self._block
            out[written : written + hi - lo] = block[lo:hi]
            written += hi - lo
        self._pos = end
        return written

    def _fetch(self, first: int, last: int) -> None:
        index = first
        while index <= last:
            if index in self._cache:
                self._cache.move_to_end(index)
                index += 1
                continue
            run_end = index
            while (
                run_end + 1 <= last
                and run_end + 1 not in self._cache
                and run_end + 1 - index < MAX_BLOCKS_PER_REQUEST
            ):
                run_end += 1
            offset = index * self._block
            length = min(self._size, (run_end + 1) * self._block) - offset
            data = self._channel.read(offset, length)
            for i in range(index, run_end + 1):
                lo = i * self._block - offset
                self._cache[i] = data[lo : lo + self._block]
                self._cache.move_to_end(i)
            # Never evict what this read still needs: its blocks are the most recent ones.
            while len(self._cache) > max(self._capacity, last - first + 1):
                self._cache.popitem(last=False)
            index = run_end + 1


def _report(channel: Channel, kind: str, message: str) -> None:
    payload = json.dumps({"kind": kind, "message": message[:4000]}).encode("utf-8")
    channel.send(protocol.TAG_ERROR, payload)


def _limit_memory(max_memory: int) -> None:
    if max_memory <= 0:
        return
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = max_memory if hard == resource.RLIM_INFINITY else min(max_memory, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zarrfs.virtual.worker")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--cache-blocks", type=int, default=DEFAULT_CACHE_BLOCKS)
    parser.add_argument("--max-memory", type=int, default=0)
    args = parser.parse_args(argv)

    rx = os.fdopen(os.dup(0), "rb", buffering=0)
    tx = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    channel = Channel(rx, tx)
    if (
        args.size < 0
        or not 512 <= args.block_size * MAX_BLOCKS_PER_REQUEST <= protocol.MAX_READ_REQUEST
    ):
        _report(channel, protocol.ERROR_INTERNAL, "bad worker arguments")
        return 2
    _limit_memory(args.max_memory)
    try:
        import h5py

        from zarrfs.virtual.translate import translate
    except Exception as e:  # h5py, numcodecs or numpy missing or broken: nothing about the file
        _report(channel, protocol.ERROR_INTERNAL, f"cannot import the HDF5 libraries: {e!r}")
        return 0
    try:
        fileobj = PipeFile(channel, args.size, args.block_size, args.cache_blocks)
        try:
            h5file = h5py.File(fileobj, "r")
        except ParentGone:
            raise
        except OSError as e:
            # The parent found the signature: what HDF5 refuses now is a damaged or truncated file.
            _report(channel, protocol.ERROR_HDF5, f"HDF5 cannot open the file: {e}")
            return 0
        with h5file:
            result = translate(h5file, args.size).to_bytes()
    except ParentGone:
        return 3
    except MemoryError:
        _report(channel, protocol.ERROR_INTERNAL, "out of memory while reading the HDF5 metadata")
        return 0
    except OSError as e:  # HDF5's own errors (h5py raises them as OSError): the file is damaged
        _report(channel, protocol.ERROR_HDF5, f"{type(e).__name__}: {e}")
        return 0
    except Exception as e:  # anything else is the translation's, not the file's
        _report(channel, protocol.ERROR_INTERNAL, f"{type(e).__name__}: {e}")
        return 0
    channel.send(protocol.TAG_DONE, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
