"""`zarrfs.demo`: what `zarrfs demo`, the test suite and the benchmarks need besides the filesystem.

Owns: an embedded local S3 (`locals3`, moto), the sample dandiset written into it (`sample`), a fake
DANDI REST API (`fake_api`) and the demo itself (`run`). Needs the `demo` extra (`pip install
'zarrfs[demo]'`: moto, boto3, zarr, h5py, pynwb); nothing in the filesystem imports this package, and
importing it imports none of those.
"""

from __future__ import annotations

#: Modules the demo needs beyond zarrfs's own dependencies, as (import name, distribution name).
REQUIREMENTS = (
    ("moto", "moto[server]"),
    ("boto3", "boto3"),
    ("zarr", "zarr"),
    ("h5py", "h5py"),
    ("pynwb", "pynwb"),
)


def missing_requirements() -> list[str]:
    """Distributions of the `demo` extra that cannot be imported here (empty when all are there)."""
    from importlib.util import find_spec

    return [dist for module, dist in REQUIREMENTS if find_spec(module) is None]
