"""S3 sources: ranged reads whose ``Content-Range`` is checked, and the origin's digest.

Reads go through s3fs's client (its retries and request options), the body taken block
by block when it is aiohttp's plain stream. Every ranged ``GetObject`` answer must name
the range asked for (``ContentRange``), or it is a transient error of that chunk, never
written. Before a file is downloaded, one ``HeadObject`` with ``ChecksumMode=ENABLED``
says which digest the origin vouches for (weightd/sources/digests.py): a CRC32, SHA-256 or
SHA-1 checksum of the whole object, or the ETag of a single-part, unencrypted (or SSE-S3)
object, which is its MD5.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from weightd.config import Config
from weightd.errors import IntegrityError
from weightd.sources.base import SOURCE_CLASSES, Buffer, FileReader, RemoteFile, Source
from weightd.sources.digests import from_s3_head
from weightd.sources.http import _check_range


class S3Source(Source):
    """A model in an S3 bucket (or an S3-compatible store)."""

    @classmethod
    def storage_options(cls, protocol: str, config: Config) -> dict[str, Any]:
        endpoint = config.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
        if endpoint:
            opts["endpoint_url"] = endpoint
        return opts

    def open_file(self, rf: RemoteFile) -> FileReader:
        fs: Any = self.fs
        if not hasattr(fs, "call_s3"):
            return super().open_file(rf)
        bucket, key, version = fs.split_path(rf.path)
        extra = {"VersionId": version} if version else {}
        try:
            head = fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED",
                              **extra)
        except Exception as e:
            raise self.error(e, rf.url) from e
        return FileReader(self, rf, from_s3_head(head))

    async def _read_range(self, path: str, start: int, end: int,
                          size: int | None) -> Sequence[Buffer]:
        """A ranged GetObject through s3fs's client (its retries, request options)."""
        fs: Any = self.fs
        if not (self.is_async and hasattr(fs, "_call_s3")):
            return await super()._read_range(path, start, end, size)
        bucket, key, version = fs.split_path(path)
        extra = {"VersionId": version} if version else {}
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key,
                                 Range=f"bytes={start}-{end - 1}", **extra)
        body = resp["Body"]
        try:
            content_range = resp.get("ContentRange")
            status = 206 if content_range else 200
            _check_range(self._url_of(path), status, content_range, resp.get("ContentLength"),
                         start, end, size)
            content: Any = getattr(getattr(body, "raw_stream", None), "content", None)
            # only the plain aiohttp body: a checksum-validating wrapper must see the bytes
            if type(body).__name__ == "AioStreamingBody" and hasattr(content, "iter_chunks"):
                return [data async for data, _ in content.iter_chunks() if data]
            try:
                return [await body.read()]
            except Exception as e:
                if type(e).__name__ != "FlexibleChecksumError":  # botocore's, not imported here
                    raise
                # botocore checked the object's checksum (a read of the whole object)
                raise IntegrityError(f"{self._url_of(path)}: the bytes downloaded do not "
                                     f"match the origin's checksum ({e}); nothing was kept, "
                                     "fetch again") from e
        finally:
            body.close()


SOURCE_CLASSES["s3"] = S3Source
