"""Model sources: turn a model reference into files on any fsspec protocol.

Owns resolving a reference (a directory prefix, a single ``.safetensors`` file or an
HF ``*.index.json``) on ``s3://``, ``gs://``, ``hf://``, ``http(s)://``, ``file://`` or a
plain path into a list of :class:`RemoteFile` (size and identity from one stat), and
ranged reads of those files. It must not know about the cache, tiers or leases.
"""

from weightd.sources.base import (
    DEFAULT_INCLUDE,
    ChunkPlan,
    RemoteFile,
    Source,
    canonical_url,
    check_allowed,
    chunk_plan,
    is_transient,
    model_name,
    open_source,
)

__all__ = [
    "DEFAULT_INCLUDE",
    "ChunkPlan",
    "RemoteFile",
    "Source",
    "canonical_url",
    "check_allowed",
    "chunk_plan",
    "is_transient",
    "model_name",
    "open_source",
]
