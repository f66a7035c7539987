"""The virtual Zarr package's exception hierarchy.

Owns: every exception type that leaves `zarrfs.virtual`. Never does: errno mapping or logging (the
code that wires this package into the mount translates these types in its one place).

Every failure of an extraction or of loading a stored index is one of these types, with a message
that names what happened; a caller's own `read` callable may still raise its own exceptions, which
pass through unchanged.
"""

from __future__ import annotations


class VirtualZarrError(Exception):
    """Base class of every error raised by `zarrfs.virtual`."""


class NotHdf5Error(VirtualZarrError):
    """The blob has no HDF5 superblock signature at offset 0 or at any userblock position."""


class IndexFormatError(VirtualZarrError):
    """A serialized `VirtualZarr` is malformed, out of range, or fails its checksum."""


class ExtractionError(VirtualZarrError):
    """The extraction failed: the HDF5 library refused the file, or the worker reported an error."""


class ExtractionUnavailable(ExtractionError):
    """The extraction could not run here (the worker could not start, its libraries could not be
    imported, it ran out of memory, the translation failed unexpectedly): says nothing about the
    blob, so it is not an answer to remember for good."""


class WorkerCrashedError(ExtractionError):
    """The worker process died (a signal or a non-zero exit) before it answered."""


class WorkerProtocolError(ExtractionError):
    """The worker sent something that is not a valid message, or asked for bytes out of range."""


class ExtractionLimitError(ExtractionError):
    """The worker asked for more bytes or requests than the caller allowed, or its answer was too big."""


class ExtractionTimeoutError(ExtractionError):
    """The extraction did not finish before its deadline; the worker was killed."""
