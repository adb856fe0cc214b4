"""Residency tiers: host memory (mmap + mlock) and CUDA devices (cupy, IPC export).

A tier makes a model's shard blobs resident and reports what it holds, through one
interface (:class:`~weightd.tiers.base.Tier`, keyed by device: ``"cpu"`` or
``"cuda:<GPU UUID>"``) whose shared-blob bookkeeping is written once
(:class:`~weightd.tiers.base.BlobTier`). It knows nothing of gRPC or leases; which
model to evict is the node's decision (weightd/node.py), made with the pure bookkeeping
in ``budget``. The CUDA tier imports cupy lazily and reports why it is unavailable
instead of failing (docs/gpu.md).
"""

from weightd.tiers.base import Blob, BlobTier, ShardExport, Tier
from weightd.tiers.cuda import CudaTier
from weightd.tiers.host import HostTier, memlock_limit

__all__ = ["Blob", "BlobTier", "CudaTier", "HostTier", "ShardExport", "Tier", "memlock_limit"]
