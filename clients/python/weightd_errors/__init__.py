"""The error root and the few outcomes every part of weightd reports (daemon and client).

Each class names an outcome a caller can act on; the service maps each to one gRPC
status code (weightd/service) and the client maps them back. Classes also inherit the
stdlib exception they resemble, so ``except OSError`` or ``except ValueError`` in user
code keeps working.

A package of its own, with no imports, so that the daemon's store, formats and sources
can raise these classes without importing grpc (``weightd_client`` imports it at once);
users see them as ``weightd_client.errors``.
"""

from __future__ import annotations

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
    "Unauthenticated",
    "WeightdError",
]


class WeightdError(Exception):
    """Root of every error weightd raises on purpose."""


class FormatError(WeightdError, ValueError):
    """A file is not a valid safetensors shard or index (names the file and the reason)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class SourceNotFound(WeightdError, FileNotFoundError):
    """The model reference, or a file under it, does not exist at the source."""


class SourceUnavailable(WeightdError, ConnectionError):
    """The source could not be reached or kept failing after retries."""


class IntegrityError(WeightdError, OSError):
    """Bytes on disk or from the source do not match what was recorded."""


class BudgetExceeded(WeightdError, MemoryError):
    """A tier (disk, host, GPU) has no room, even after evicting what may be evicted."""


class NotPermitted(WeightdError, PermissionError):
    """The request is outside what the configuration allows (allowed_sources, paths)."""


class Unauthenticated(NotPermitted):
    """The call carried no credentials the daemon knows: no token (a raw call that
    skipped the credential handshake), or one from before the daemon restarted."""


class GpuUnavailable(WeightdError, RuntimeError):
    """The GPU tier cannot serve: no CUDA, no cupy, or no such device."""


class CacheLocked(WeightdError, BlockingIOError):
    """Another process (usually the daemon) owns the cache for this operation."""


class LeaseNotFound(WeightdError, KeyError):
    """No such lease (unknown id, already released, or its process is gone)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DaemonUnavailable(WeightdError, ConnectionError):
    """The daemon cannot be reached on its socket."""


class ModelInUse(WeightdError, RuntimeError):
    """The model is leased on that tier and cannot be evicted now."""
