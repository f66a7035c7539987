"""The pipe protocol between an extraction's parent and its worker process.

Owns: frame layout, message tags and the bounds both sides check. Never does: I/O (each side reads
and writes frames with its own streams: blocking pipes in the worker, trio streams in the parent).

A frame is a 1-byte tag, an unsigned 64-bit little-endian payload length, then the payload.

worker -> parent
    `R` read request: payload `<QQ` (offset, length), 1 <= length <= MAX_READ_REQUEST
    `D` done: payload is `VirtualZarr.to_bytes()`; the worker exits after it
    `E` error: payload is UTF-8 JSON `{"kind": KIND, "message": TEXT}`, KIND one of ERROR_KINDS
parent -> worker
    `B` bytes: the answer to the last `R`, exactly `length` bytes

The worker has at most one request outstanding; the parent answers each `R` before reading the next
frame, and ends the worker on anything else (an unknown tag, a bad length, a range outside the blob).
"""

from __future__ import annotations

import struct
from typing import Final

HEADER: Final = struct.Struct("<cQ")
READ: Final = struct.Struct("<QQ")

TAG_READ: Final = b"R"
TAG_DONE: Final = b"D"
TAG_ERROR: Final = b"E"
TAG_BYTES: Final = b"B"

MAX_READ_REQUEST: Final = 8 << 20
MAX_ERROR_PAYLOAD: Final = 64 << 10

ERROR_HDF5: Final = "hdf5"  # the HDF5 library refused the file: an answer about the file
# the worker could not do its work here (started wrongly, a library missing, out of memory, a bug
# of the translation): says nothing about the file
ERROR_INTERNAL: Final = "internal"
ERROR_KINDS: Final = frozenset({ERROR_HDF5, ERROR_INTERNAL})

# Test hook: when set in the worker's environment, the worker misbehaves after its first answered
# read ("abort": os.abort(); "hang": sleeps forever; "garbage": writes an invalid frame), so tests
# can check that the parent survives each.
FAULT_ENV: Final = "ZARRFS_VIRTUAL_WORKER_FAULT"


def frame(tag: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(tag, len(payload)) + payload
