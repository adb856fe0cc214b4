"""The disk tier: a content-addressed store of verified blobs, snapshots and an index.

Owns ``cache_dir`` (blobs, snapshots, tmp, the SQLite index), atomic writes, verify,
budgets and eviction of blobs, and fetching into it. Must not import grpc.
"""

from weightd.store.cas import GcPlan, Store, VerifyReport, hash_file
from weightd.store.fetch import Fetcher, FetchStats, Snapshot
from weightd.store.index import Index, ModelFile, ModelRecord, PinRecord

__all__ = [
    "FetchStats",
    "Fetcher",
    "GcPlan",
    "Index",
    "ModelFile",
    "ModelRecord",
    "PinRecord",
    "Snapshot",
    "Store",
    "VerifyReport",
    "hash_file",
]
