"""Building a blob's `VirtualZarr` in a worker process, answering its reads (the parent's side).

Owns: the HDF5 signature check, starting and always reaping the worker (`zarrfs.virtual.worker`),
answering its read requests with the caller's `read`, the deadline and the byte and request budgets,
and turning every way the worker can fail into this package's typed errors. Never does: HDF5 (it
never imports h5py), S3 or caching (the caller's `read` does both), or persisting results.

Runs on trio. Everything the worker says is checked before it is used: a request outside the blob,
over a budget, or any malformed frame ends the worker. On timeout, cancellation or any error the
worker is killed and reaped before the call returns; no process outlives the call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from zarrfs.virtual import protocol
from zarrfs.virtual.errors import (
    ExtractionError,
    ExtractionLimitError,
    ExtractionTimeoutError,
    ExtractionUnavailable,
    IndexFormatError,
    NotHdf5Error,
    WorkerCrashedError,
    WorkerProtocolError,
)
from zarrfs.virtual.model import INT64_MAX, VirtualZarr

ReadFn = Callable[[int, int], Awaitable[bytes]]

HDF5_SIGNATURE: Final = b"\x89HDF\r\n\x1a\n"
STDERR_TAIL: Final = 8 << 10
DEFAULT_MAX_RESULT_BYTES: Final = 1 << 30
# The worker needs no thread pools; each would reserve address space under its memory limit.
WORKER_ENV: Final = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
}


@dataclass(frozen=True, slots=True)
class Budget:
    """What one extraction may cost.

    `max_bytes` and `max_requests` bound what the worker may ask for (default: `default_budget`),
    `max_result_bytes` the serialized view it returns, `max_memory` the worker's address space (0:
    unlimited), and `block_size`/`cache_blocks` shape its reads (aligned blocks, small LRU).
    """

    max_bytes: int
    max_requests: int
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    max_memory: int = 4 << 30
    block_size: int = 4 << 10
    cache_blocks: int = 1024


def default_budget(size: int) -> Budget:
    """A quarter of the blob, but at least 64 MiB, in at most one request per 1 KiB of that.

    A safety net against a worker that reads data, not a target: metadata is typically well under
    1% of an NWB file, about 5% for a file of 100,000 uncompressible 2 KB chunks (4 KiB blocks).
    """
    max_bytes = max(64 << 20, size // 4)
    return Budget(max_bytes=max_bytes, max_requests=max(4096, max_bytes // 1024))


async def find_superblock(read: ReadFn, size: int) -> int:
    """The offset of the HDF5 signature: 0 or a userblock size (512, 1024, 2048, ...).

    Raises NotHdf5Error when there is none.
    """
    offset = 0
    while offset + len(HDF5_SIGNATURE) <= size:
        data = await read(offset, len(HDF5_SIGNATURE))
        if data == HDF5_SIGNATURE:
            return offset
        offset = 512 if offset == 0 else offset * 2
    raise NotHdf5Error(
        f"no HDF5 signature at offset 0 or at any userblock offset of this {size}-byte blob"
    )


async def extract(
    read: ReadFn,
    size: int,
    *,
    deadline: float,
    python: str = sys.executable,
    budget: Budget | None = None,
) -> VirtualZarr:
    """The virtual Zarr view of the HDF5 blob of `size` bytes that `read(offset, length)` reads.

    `deadline` is on trio's clock (`trio.current_time()`): by then the view is built or the worker
    is killed and ExtractionTimeoutError raised. `read` must return exactly `length` bytes; it is
    called with ranges inside the blob only, one at a time; its own exceptions pass through (after
    the worker is killed). Raises NotHdf5Error, ExtractionError (HDF5 refused the file),
    WorkerCrashedError, WorkerProtocolError, ExtractionLimitError, ExtractionTimeoutError.
    """
    if not 0 <= size <= INT64_MAX:
        raise ExtractionError(f"blob size out of range: {size}")
    budget = budget or default_budget(size)
    with trio.move_on_at(deadline) as scope:
        await find_superblock(read, size)
        return await _run_worker(read, size, python, budget)
    assert scope.cancelled_caught
    raise ExtractionTimeoutError(
        "building the virtual Zarr view did not finish before its deadline"
    )


def extract_local(
    path: str | os.PathLike[str],
    *,
    timeout: float = 300.0,
    python: str = sys.executable,
    budget: Budget | None = None,
) -> VirtualZarr:
    """`extract` for a local file, synchronously (for tests and exports); same errors."""
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size

        async def read(offset: int, length: int) -> bytes:
            return _pread_exactly(fd, offset, length)

        async def run() -> VirtualZarr:
            deadline = trio.current_time() + timeout
            return await extract(read, size, deadline=deadline, python=python, budget=budget)

        return trio.run(run)


def _pread_exactly(fd: int, offset: int, length: int) -> bytes:
    parts: list[bytes] = []
    while length:
        data = os.pread(fd, length, offset)
        if not data:
            raise ExtractionError(f"file ended at {offset} before the {length} bytes asked for")
        parts.append(data)
        offset += len(data)
        length -= len(data)
    return b"".join(parts)


class _Frames:
    """Frames from the worker's stdout (a trio ReceiveStream), with a reusable buffer."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def exactly(self, n: int) -> bytes | None:
        """`n` bytes, or None at end of stream."""
        while len(self._buf) < n:
            data = await self._stream.receive_some(max(65536, min(n - len(self._buf), 1 << 24)))
            if not data:
                return None
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


async def _drain(stream: trio.abc.ReceiveStream, tail: bytearray) -> None:
    while data := await stream.receive_some(65536):
        tail += data
        if len(tail) > STDERR_TAIL:
            del tail[: len(tail) - STDERR_TAIL]


def _stderr_text(tail: bytearray) -> str:
    text = tail.decode("utf-8", "replace").strip()
    return f"; its stderr ended: {text[-1000:]}" if text else ""


async def _run_worker(read: ReadFn, size: int, python: str, budget: Budget) -> VirtualZarr:
    command = [
        python,
        "-m",
        "zarrfs.virtual.worker",
        f"--size={size}",
        f"--block-size={budget.block_size}",
        f"--cache-blocks={budget.cache_blocks}",
        f"--max-memory={budget.max_memory}",
    ]
    try:
        process = await trio.lowlevel.open_process(
            command,
            env={**os.environ, **WORKER_ENV},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as e:
        raise ExtractionUnavailable(f"cannot start the extraction worker {python!r}: {e}") from e
    tail = bytearray()
    try:
        view: VirtualZarr | None = None
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            assert process.stderr is not None
            nursery.start_soon(_drain, process.stderr, tail)
            try:
                view = await _converse(process, read, size, budget)
            except (_WorkerGone, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception as e:  # raised below, outside the nursery, so it is not wrapped
                failure = e
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if view is not None:
            return view
        # The worker went away mid-conversation: say how.
        with trio.move_on_after(5):
            await process.wait()
        code = process.returncode
        if code is None:
            raise WorkerProtocolError("the worker closed its pipes but did not exit")
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            raise WorkerCrashedError(
                f"the extraction worker was killed by {name}{_stderr_text(tail)}"
            )
        raise WorkerCrashedError(
            f"the extraction worker exited with status {code} before answering{_stderr_text(tail)}"
        )
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    await stream.aclose()


class _WorkerGone(Exception):
    """The worker's stdout ended."""


async def _converse(process: trio.Process, read: ReadFn, size: int, budget: Budget) -> VirtualZarr:
    assert process.stdout is not None and process.stdin is not None
    frames = _Frames(process.stdout)
    requests = 0
    requested = 0
    while True:
        header = await frames.exactly(protocol.HEADER.size)
        if header is None:
            raise _WorkerGone
        tag, length = protocol.HEADER.unpack(header)
        if tag == protocol.TAG_READ:
            if length != protocol.READ.size:
                raise WorkerProtocolError(f"read request of {length} bytes")
            body = await frames.exactly(length)
            if body is None:
                raise _WorkerGone
            offset, count = protocol.READ.unpack(body)
            if not 1 <= count <= protocol.MAX_READ_REQUEST or offset > size - count:
                raise WorkerProtocolError(
                    f"the worker asked for bytes [{offset}, {offset + count}) of a {size}-byte blob"
                )
            requests += 1
            requested += count
            if requests > budget.max_requests or requested > budget.max_bytes:
                raise ExtractionLimitError(
                    f"the worker asked for more than {budget.max_requests} reads or "
                    f"{budget.max_bytes} bytes ({requests} reads, {requested} bytes so far)"
                )
            data = await read(offset, count)
            if len(data) != count:
                raise ExtractionError(f"read({offset}, {count}) returned {len(data)} bytes")
            await process.stdin.send_all(protocol.frame(protocol.TAG_BYTES, data))
        elif tag == protocol.TAG_DONE:
            if length > budget.max_result_bytes:
                raise ExtractionLimitError(
                    f"the view is {length} bytes, more than {budget.max_result_bytes}"
                )
            body = await frames.exactly(length)
            if body is None:
                raise _WorkerGone
            try:
                return await trio.to_thread.run_sync(_load, body, size)
            except IndexFormatError as e:
                raise WorkerProtocolError(f"the worker's view is malformed: {e}") from e
        elif tag == protocol.TAG_ERROR:
            if length > protocol.MAX_ERROR_PAYLOAD:
                raise WorkerProtocolError(f"error message of {length} bytes")
            body = await frames.exactly(length)
            if body is None:
                raise _WorkerGone
            raise _worker_error(body)
        else:
            raise WorkerProtocolError(f"unknown frame {tag!r} from the worker")


def _load(body: bytes, size: int) -> VirtualZarr:
    return VirtualZarr.from_bytes(body, blob_size=size)


def _worker_error(body: bytes) -> ExtractionError:
    try:
        message = json.loads(body.decode("utf-8"))
        kind, text = message["kind"], message["message"]
        if kind not in protocol.ERROR_KINDS or not isinstance(text, str):
            raise ValueError(kind)
    except (ValueError, KeyError, TypeError) as e:
        return WorkerProtocolError(f"malformed error report from the worker: {e}")
    if kind == protocol.ERROR_INTERNAL:
        return ExtractionUnavailable(f"extraction could not run: {text}")
    return ExtractionError(f"extraction failed: {text}")
