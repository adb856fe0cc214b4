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
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    digest: str
    path: Path
    size: int
    mm: mmap.mmap | None
    address: int
    locked: bool
    users: set[str]


class HostTier:
    """Blobs resident in host memory, shared by every model that names them.

    Args:
        lock: try to mlock (default); False only touches pages (tests, tiny hosts).
    """

    name = "host"

    def __init__(self, *, lock: bool = True) -> None:
        self._lock = threading.RLock()
        self._blobs: dict[str, _Mapped] = {}
        self._models: dict[str, list[str]] = {}
        self._want_lock = lock
        self.lock_problem = "" if lock else "mlock disabled by configuration"
        _raise_memlock_limit()

    def _map(self, digest: str, path: Path) -> _Mapped:
        size = path.stat().st_size
        if size == 0:
            return _Mapped(digest, path, 0, None, 0, True, set())
        fd = os.open(path, os.O_RDONLY)
        try:
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        address = int(np.frombuffer(mm, dtype=np.uint8).ctypes.data)
        locked = False
        if self._want_lock:
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
        return _Mapped(digest, path, size, mm, address, locked, set())

    def load(self, key: str, blobs: Sequence[tuple[str, Path]]) -> int:
        """Make the blobs of model ``key`` resident; return the bytes newly made resident.

        Idempotent: blobs already resident (for this or another model) are shared.
        """
        added = 0
        with self._lock:
            if key in self._models:
                return 0
            digests: list[str] = []
            try:
                for digest, path in blobs:
                    m = self._blobs.get(digest)
                    if m is None:
                        m = self._map(digest, path)
                        self._blobs[digest] = m
                        added += m.size
                    m.users.add(key)
                    digests.append(digest)
            except BaseException:
                self._drop(key, digests)
                raise
            self._models[key] = digests
        return added

    def _drop(self, key: str, digests: Sequence[str]) -> int:
        freed = 0
        for digest in digests:
            m = self._blobs.get(digest)
            if m is None:
                continue
            m.users.discard(key)
            if not m.users:
                del self._blobs[digest]
                if m.mm is not None:
                    if m.locked:
                        _libc.munlock(ctypes.c_void_p(m.address), ctypes.c_size_t(m.size))
                    m.mm.close()
                freed += m.size
        return freed

    def unload(self, key: str) -> int:
        """Let model ``key``'s pages go; return the bytes no other model still holds."""
        with self._lock:
            digests = self._models.pop(key, None)
            return self._drop(key, digests) if digests else 0

    def resident(self, key: str) -> bool:
        with self._lock:
            return key in self._models

    def model_bytes(self, key: str) -> int:
        with self._lock:
            return sum(self._blobs[d].size for d in self._models.get(key, ()))

    def freeable_bytes(self, key: str) -> int:
        """Bytes that unloading model ``key`` would free (blobs only it uses)."""
        with self._lock:
            return sum(m.size for m in (self._blobs[d] for d in self._models.get(key, ()))
                       if m.users == {key})

    def missing_bytes(self, blobs: Sequence[tuple[str, int]]) -> int:
        """Bytes :meth:`load` would newly make resident for ``(digest, size)`` blobs (the
        budget's ``need``): a blob already resident, or named twice, adds nothing more."""
        with self._lock:
            return sum({d: size for d, size in blobs if d not in self._blobs}.values())

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return sum(m.size for m in self._blobs.values())

    @property
    def locked(self) -> bool:
        with self._lock:
            return all(m.locked for m in self._blobs.values()) and not self.lock_problem

    def close(self) -> None:
        with self._lock:
            for key in list(self._models):
                self.unload(key)


def _touch(mm: mmap.mmap, size: int) -> None:
    """Fault every page in (reading one byte per page) when mlock is not available."""
    view = np.frombuffer(mm, dtype=np.uint8)
    step = mmap.PAGESIZE
    # summing a strided view reads one byte per page without copying the data
    int(view[::step].sum())
