"""Model sources: turn a model reference into files, and read them.

Owns resolving a reference (a directory prefix, a single ``.safetensors`` file or an
HF ``*.index.json``) on ``s3://``, ``gs://``, ``hf://``, ``http(s)://``, ``file://`` or a
plain path into a list of :class:`RemoteFile` (size and identity from one stat), and
reading those files: each opened once for its download (:meth:`Source.open_file`), every
redirect and link checked before it is followed, every range answer checked, the
origin's own digest checked where it gives one. One class per protocol that needs more
than fsspec gives (``local``, ``http``, ``s3``, ``hf``), chosen by :func:`source_class`;
HTTP and ``hf://`` bytes come through weightd's own range reader (``wire``), the hub's
API is spoken by ``hf`` itself. It must not know about the cache, tiers or leases.
"""

from weightd.sources import hf, http, local, s3  # noqa: F401  (they register their classes)
from weightd.sources.base import (
    DEFAULT_INCLUDE,
    Buffer,
    ChunkPlan,
    FileReader,
    FirstShard,
    RemoteFile,
    Source,
    canonical_url,
    check_allowed,
    check_not_cache,
    check_relpaths,
    chunk_plan,
    is_transient,
    model_name,
    open_source,
    source_class,
)
from weightd.sources.digests import OriginDigest

__all__ = [
    "Buffer",
    "DEFAULT_INCLUDE",
    "ChunkPlan",
    "FileReader",
    "FirstShard",
    "OriginDigest",
    "RemoteFile",
    "Source",
    "canonical_url",
    "check_allowed",
    "check_not_cache",
    "check_relpaths",
    "chunk_plan",
    "is_transient",
    "model_name",
    "open_source",
    "source_class",
]
