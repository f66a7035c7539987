"""The DANDI archive: SOURCE strings, asset records, resolving a version, the archive's lists
(the catalog), the layout of an archive mount's levels, DANDI's digests. Never does FUSE.
"""
