"""Residency tiers: host memory (mmap + mlock) and CUDA devices (cupy, IPC export).

A tier makes a model's shard blobs resident and reports what it holds. It knows nothing
of gRPC or leases; which model to evict is the node's decision (weightd/node.py), made
with the pure bookkeeping in ``budget``. The CUDA tier imports cupy lazily and reports
why it is unavailable instead of failing (docs/gpu.md).
"""

from weightd.tiers.cuda import CudaTier
from weightd.tiers.host import HostTier, memlock_limit

__all__ = ["CudaTier", "HostTier", "memlock_limit"]
