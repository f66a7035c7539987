"""Virtual Zarr views of HDF5 (NWB) blobs: Zarr format 2 stores whose chunks are byte ranges of the blob.

Owns: the public face of the package: the `VirtualZarr` model and its serialization, the
out-of-process extraction (`extract`, `extract_local`) and the typed errors. Never does: S3, caching,
FUSE or CLI wiring (callers plug in their own `read`), and importing h5py in the calling process
(only the worker, `python -m zarrfs.virtual.worker`, touches HDF5).
"""

from __future__ import annotations

from zarrfs.virtual.errors import (
    ExtractionError,
    ExtractionLimitError,
    ExtractionTimeoutError,
    ExtractionUnavailable,
    IndexFormatError,
    NotHdf5Error,
    VirtualZarrError,
    WorkerCrashedError,
    WorkerProtocolError,
)
from zarrfs.virtual.extract import Budget, default_budget, extract, extract_local, find_superblock
from zarrfs.virtual.model import (
    EXTRACTOR_VERSION,
    ChunkRef,
    ChunkTable,
    VirtualZarr,
    VirtualZarrBuilder,
)

__all__ = [
    "EXTRACTOR_VERSION",
    "Budget",
    "ChunkRef",
    "ChunkTable",
    "ExtractionError",
    "ExtractionLimitError",
    "ExtractionTimeoutError",
    "ExtractionUnavailable",
    "IndexFormatError",
    "NotHdf5Error",
    "VirtualZarr",
    "VirtualZarrBuilder",
    "VirtualZarrError",
    "WorkerCrashedError",
    "WorkerProtocolError",
    "default_budget",
    "extract",
    "extract_local",
    "find_superblock",
]
