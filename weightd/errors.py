"""weightd's errors. The classes live in the client package (``weightd_client.errors``)
so that the daemon raises and the client re-raises the very same classes; see there."""

from weightd_client.errors import (
    BudgetExceeded,
    CacheLocked,
    DaemonUnavailable,
    FormatError,
    GpuUnavailable,
    IntegrityError,
    LeaseNotFound,
    ModelInUse,
    NotPermitted,
    SourceNotFound,
    SourceUnavailable,
    WeightdError,
)

__all__ = [
    "BudgetExceeded",
    "CacheLocked",
    "DaemonUnavailable",
    "FormatError",
    "GpuUnavailable",
    "IntegrityError",
    "LeaseNotFound",
    "ModelInUse",
    "NotPermitted",
    "SourceNotFound",
    "SourceUnavailable",
    "WeightdError",
]
