"""Residency tiers: host memory (mmap + mlock) now, CUDA later, behind one small interface.

A tier makes a model's shard blobs resident and reports what it holds. It knows nothing
of gRPC or leases; which model to evict is the node's decision (weightd/node.py).
"""

from weightd.tiers.host import HostTier, memlock_limit

__all__ = ["HostTier", "memlock_limit"]
