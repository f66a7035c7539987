"""zarrfs: a read-only FUSE filesystem for published DANDI dandiset versions.

Every file it shows is pinned to an exact S3 object version recorded at publication: Zarr entries by
the VersionId in the Zarr's manifest, blobs by their immutable key. Nothing here performs I/O on import.
"""

from __future__ import annotations

__version__ = "0.1.0"
