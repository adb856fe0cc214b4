"""weightd: a per-node daemon that makes model replicas start fast.

It keeps model weights (safetensors shards) in a local content-addressed cache,
keeps hot models resident in host (and GPU) memory, and hands them to model-server
processes without copying. See docs/architecture.md.
"""

from weightd.errors import (
    BudgetExceeded,
    FormatError,
    GpuUnavailable,
    IntegrityError,
    NotPermitted,
    SourceNotFound,
    SourceUnavailable,
    WeightdError,
)

__version__ = "0.1.0"

__all__ = [
    "BudgetExceeded",
    "FormatError",
    "GpuUnavailable",
    "IntegrityError",
    "NotPermitted",
    "SourceNotFound",
    "SourceUnavailable",
    "WeightdError",
    "__version__",
]
