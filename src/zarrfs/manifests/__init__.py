"""Zarr manifests: the checksum format, parsing and verifying a manifest into a columnar index and
its on-disk form, manifests built from a bucket listing, a Zarr's metadata objects. Fetching and
caching them is `zarrfs.manifest_cache`. Never does FUSE.
"""
