"""The host tier: every shard blob mmapped by the daemon and kept resident with mlock.

Clients map the same blob files copy-on-write, so all of them share these page-cache
pages: one copy in host memory however many replicas. When the memlock limit is too low
the tier falls back to ``MADV_WILLNEED`` plus touching every page, and says so in its
status (pages may then be evicted under memory pressure).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import os
import resource
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weightd.errors import IntegrityError
from weightd.tiers.base import Blob, BlobTier, ShardExport, open_blob

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def memlock_limit() -> int:
    """The soft RLIMIT_MEMLOCK in bytes (``-1`` for unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return -1 if soft == resource.RLIM_INFINITY else soft


def _raise_memlock_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))


@dataclass
class _Mapped:
    mm: mmap.mmap | None
    address: int
    size: int
    locked: bool
    path: Path


class HostTier(BlobTier):
    """Blobs resident in host memory, shared by every model that names them (device
    ``"cpu"``); the bookkeeping is :class:`~weightd.tiers.base.BlobTier`'s.

    Args:
        lock: try to mlock (default); False only touches pages (tests, tiny hosts).
    """

    name = "host"
    DEVICE = "cpu"

    def __init__(self, *, lock: bool = True) -> None:
        super().__init__()
        self._want_lock = lock
        self.lock_problem = "" if lock else "mlock disabled by configuration"
        self._unlocked = 0  # resident blobs that could not be mlocked
        _raise_memlock_limit()

    def device_names(self) -> list[str]:
        return [self.DEVICE]

    def _check_device(self, device: str) -> None:
        if device != self.DEVICE:
            raise ValueError(f"the host tier serves device 'cpu', not {device!r}")

    def _make(self, device: str, blob: Blob) -> _Mapped:
        path = Path(blob.path)  # (what clients are told; the bytes may be in blob.pending)
        fd = open_blob(blob)
        try:
            size = os.fstat(fd).st_size
            if size != blob.size:
                raise IntegrityError(f"{path}: {size} bytes on disk, {blob.size} expected")
            if size == 0:
                return _Mapped(None, 0, 0, True, path)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        address = int(np.frombuffer(mm, dtype=np.uint8).ctypes.data)
        locked = False
        if self._want_lock:
            # faults every page in from the disk: the long part of a cold load (the GIL
            # is released while the kernel reads)
            if _libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(size)) == 0:
                locked = True
            else:
                err = ctypes.get_errno()
                self.lock_problem = (
                    f"mlock failed ({os.strerror(err)}; memlock limit {memlock_limit()} bytes): "
                    "resident pages may be evicted under memory pressure; raise "
                    "LimitMEMLOCK (systemd) or ulimit -l")
                log.warning("%s: %s", path, self.lock_problem)
        if not locked:
            mm.madvise(mmap.MADV_WILLNEED)
            _touch(mm, size)
            with self._lock:
                self._unlocked += 1
        return _Mapped(mm, address, size, locked, path)

    def _free(self, device: str, payload: _Mapped) -> None:
        if payload.mm is None:
            return
        if payload.locked:
            _libc.munlock(ctypes.c_void_p(payload.address), ctypes.c_size_t(payload.size))
        else:
            with self._lock:
                self._unlocked -= 1
        payload.mm.close()

    def _export(self, device: str, digest: str, size: int, payload: _Mapped) -> ShardExport:
        return ShardExport(digest, size, path=str(payload.path))

    @property
    def bytes_used(self) -> int:
        return self.used(self.DEVICE)

    @property
    def locked(self) -> bool:
        with self._lock:
            return self._unlocked == 0 and not self.lock_problem


def _touch(mm: mmap.mmap, size: int) -> None:
    """Fault every page in (reading one byte per page) when mlock is not available."""
    view = np.frombuffer(mm, dtype=np.uint8)
    step = mmap.PAGESIZE
    # summing a strided view reads one byte per page without copying the data
    int(view[::step].sum())
