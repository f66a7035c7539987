"""The faces of zarrfs on the one core: the mount's lifecycle (with `zarrfs.fuse_ops`, the FUSE
adapter), the fsspec filesystem, the command line and its verbs, the runtime state a mount
publishes, statistics, systemd. Only `mount` (and `zarrfs.fuse_ops`) import pyfuse3.
"""
