"""Bytes from S3, HTTP and the local disk: the HTTP client and URL dispatch, retries, the request
scheduler, the in-memory block cache, prefetch, the disk tier and its files, the cache dir and the
gate every cache-dir operation goes through. The S3 client itself is `zarrfs.s3_reader`. Knows
nothing of manifests, dandisets or FUSE.
"""
