"""The domain: what a mount shows. The pure namespace and inode space, the filesystem's
operations (levels of the archive, volumes, Zarrs) and `core.open_filesystem`, which composes
everything below into one started `Filesystem` that every face uses. Never imports pyfuse3.
"""
