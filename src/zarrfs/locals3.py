"""An embedded local S3 (moto server) shaped like the public DANDI bucket.

Owns: starting and stopping a `moto.server.ThreadedMotoServer` on 127.0.0.1 with a free port, and
creating a versioned bucket that anonymous clients may read (as the real archive allows). Used by
`zarrfs demo`, the test suite and the benchmarks; never by a real mount.
"""

from __future__ import annotations

import json
import logging
from types import TracebackType
from typing import Any

#: Actions anonymous readers need. moto derives the checked action from the HTTP method, so HEAD
#: requests need `s3:HeadObject` as well.
PUBLIC_READ_ACTIONS = [
    "s3:GetObject",
    "s3:GetObjectVersion",
    "s3:HeadObject",
    "s3:ListBucket",
    "s3:ListBucketVersions",
]

#: Credentials used by the writer client; moto accepts any.
WRITER_KEY = "zarrfs-local"


class LocalS3:
    """A running moto server holding one public-read, versioned bucket.

    Use as a context manager: `with LocalS3() as s3: s3.client.put_object(...)`. `endpoint_url` is what
    zarrfs gets as `--endpoint-url`; `client` is a signed boto3 client for writing.
    """

    def __init__(self, bucket: str = "dandiarchive") -> None:
        self.bucket = bucket
        self._server: Any = None
        self.endpoint_url = ""
        self.client: Any = None

    def start(self) -> LocalS3:
        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=WRITER_KEY,
            aws_secret_access_key=WRITER_KEY,
            region_name="us-east-1",
        )
        self.client.create_bucket(Bucket=self.bucket)
        self.client.put_bucket_versioning(
            Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"}
        )
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": PUBLIC_READ_ACTIONS,
                    "Resource": [f"arn:aws:s3:::{self.bucket}", f"arn:aws:s3:::{self.bucket}/*"],
                }
            ],
        }
        self.client.put_bucket_policy(Bucket=self.bucket, Policy=json.dumps(policy))
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
