"""Digests of a file as its origin states them, checked while the file is downloaded.

weightd's own digest (xxh3-128) says that the bytes on disk are the bytes that were
downloaded; it cannot say that they are the origin's bytes. Where the origin gives a
digest of the whole file, the fetch computes it too (on a thread of its own, beside the
writer) and a mismatch is :class:`~weightd.errors.IntegrityError`. The ones checked:

============================  ==========================================================
origin                        digest
============================  ==========================================================
S3 (``HeadObject`` with       ``x-amz-checksum-crc32``, ``-sha256`` or ``-sha1`` of the
``ChecksumMode=ENABLED``)     whole object (a multipart object's only when S3 says
                              ``FULL_OBJECT``: else it is a checksum of the parts'
                              checksums); else the ``ETag`` when it is
                              the MD5 of a single-part object: 32 hex digits, no ``-``,
                              and not encrypted with SSE-KMS or SSE-C (their ETags are
                              not MD5s)
Hugging Face (``hf://``)      the LFS ``sha256`` the hub lists for each LFS file, the
                              git blob id (SHA-1 of ``blob <size>\\0`` and the bytes) of
                              each file kept in git
HTTP(S), GCS, local files     none (an HTTP ``ETag`` is opaque; local files are read
                              from their own descriptor)
============================  ==========================================================

When an S3 object has several, the cheapest is checked: CRC32 (0.7 s/GiB with zlib on
the test machine), then SHA-256 (1.3 s/GiB), SHA-1, MD5 (1.6 s/GiB); xxh3 costs 0.07.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from weightd.errors import IntegrityError

__all__ = ["OriginDigest", "from_hf_info", "from_s3_head", "parse_origin_digest"]

_HEX = {"md5": 32, "sha1": 40, "sha256": 64, "crc32": 8, "git-sha1": 40}


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


class _Crc32:
    """zlib's CRC-32 with hashlib's interface (S3's CRC32 is the same polynomial)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


class _GitBlobSha1:
    """git's id of a file (a blob): SHA-1 of ``b"blob <size>\\0"`` and the bytes."""

    def __init__(self, size: int) -> None:
        self.sha = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        self.sha.update(data)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


@dataclass(frozen=True)
class OriginDigest:
    """A whole file's digest as the origin states it.

    Attributes:
        algorithm: ``crc32``, ``md5``, ``sha1`` or ``sha256``.
        expected: lower-case hex.
        source: where it came from, for the message (``S3 ChecksumCRC32``...).
    """

    algorithm: str
    expected: str
    source: str
    #: the file's size, for ``git-sha1`` (git hashes it in front of the bytes)
    size: int = 0

    def __post_init__(self) -> None:
        if len(self.expected) != _HEX.get(self.algorithm, -1) or not re.fullmatch(
                r"[0-9a-f]+", self.expected):
            raise ValueError(f"not a {self.algorithm} digest: {self.expected!r}")

    def hasher(self) -> Hasher:
        if self.algorithm == "crc32":
            return _Crc32()
        if self.algorithm == "git-sha1":
            return _GitBlobSha1(self.size)
        return hashlib.new(self.algorithm, usedforsecurity=False)

    def check(self, actual: str, url: str) -> None:
        """Raise :class:`IntegrityError` when ``actual`` (hex) is not :attr:`expected`."""
        if actual != self.expected:
            raise IntegrityError(f"{url}: the bytes downloaded have {self.algorithm} {actual}, "
                                 f"but the origin's {self.source} says {self.expected}: "
                                 "the source served other bytes than its own (nothing was "
                                 "kept; fetch again)")

    def text(self) -> str:
        """``algorithm:hex`` (the form :attr:`RemoteFile.origin_digest` holds)."""
        return f"{self.algorithm}:{self.expected}"


def parse_origin_digest(text: str, url: str, size: int = 0) -> OriginDigest | None:
    """The digest in ``algorithm:hex`` form (of a file of ``size`` bytes), or None for an
    empty string."""
    if not text:
        return None
    algorithm, _, expected = text.partition(":")
    return OriginDigest(algorithm, expected, f"listing of {url}", size)


def _b64_hex(value: str) -> str | None:
    try:
        return base64.b64decode(value, validate=True).hex()
    except (binascii.Error, ValueError):
        return None


#: S3 checksum fields of HeadObject, cheapest first.
_S3_CHECKSUMS = (("ChecksumCRC32", "crc32"), ("ChecksumSHA256", "sha256"),
                 ("ChecksumSHA1", "sha1"))


def from_s3_head(head: Mapping[str, Any]) -> OriginDigest | None:
    """The digest to check from a ``HeadObject`` answer (``ChecksumMode=ENABLED``).

    Example
    -------
    >>> from_s3_head({"ETag": '"9e107d9d372bb6826bd81d3542a419d6"'}).algorithm
    'md5'
    >>> from_s3_head({"ETag": '"9e107d9d372bb6826bd81d3542a419d6-3"'}) is None
    True
    """
    etag = str(head.get("ETag", "")).strip('"').lower()
    multipart = "-" in etag
    # a multipart object's checksum is of its parts' checksums unless S3 says otherwise
    # (moto says nothing, and gives no "-N" suffix either)
    if head.get("ChecksumType", "COMPOSITE" if multipart else "FULL_OBJECT") == "FULL_OBJECT":
        for key, algorithm in _S3_CHECKSUMS:
            value = head.get(key)
            if isinstance(value, str) and "-" not in value:
                hexed = _b64_hex(value)
                if hexed is not None and len(hexed) == _HEX[algorithm]:
                    return OriginDigest(algorithm, hexed, f"S3 {key}")
    encrypted = (head.get("ServerSideEncryption") not in (None, "AES256")
                 or head.get("SSECustomerAlgorithm"))
    if re.fullmatch(r"[0-9a-f]{32}", etag) and not encrypted:
        return OriginDigest("md5", etag, "S3 ETag (the MD5 of a single-part object)")
    return None


def from_hf_info(info: Mapping[str, Any]) -> OriginDigest | None:
    """The digest of a Hugging Face file from an entry of the hub's tree listing: the
    LFS sha256 of an LFS file (``lfs.oid``; ``lfs.sha256`` in ``HfFileSystem``'s info),
    else the git blob id (``oid``) of a file kept in git itself.

    Example
    -------
    >>> from_hf_info({"size": 2, "oid": "9e26dfeeb6e641a33dae4961196235bdb965b21b"}).algorithm
    'git-sha1'
    """
    lfs = info.get("lfs")
    if isinstance(lfs, Mapping):
        sha = str(lfs.get("oid") or lfs.get("sha256") or "").lower()
        if re.fullmatch(r"[0-9a-f]{64}", sha):
            return OriginDigest("sha256", sha, "Hugging Face LFS sha256")
        return None
    oid = str(info.get("oid", "")).lower()
    size = info.get("size")
    if re.fullmatch(r"[0-9a-f]{40}", oid) and isinstance(size, int):
        return OriginDigest("git-sha1", oid, "Hugging Face git blob id", size)
    return None
