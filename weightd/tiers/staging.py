"""Streaming a blob file to a destination through a small pool of reusable staging buffers.

This module owns the part of a GPU load that needs no GPU: cutting a file into chunks
(:func:`plan_chunks`), reading each chunk with ``os.preadv`` into a free staging buffer,
handing it to an asynchronous copy, and reusing a buffer only once its copy is known to
be complete (:class:`StagingPipeline`). The copy itself is behind a small interface
(:class:`StagingBackend`, :class:`CopyTarget`, :class:`CopyEvent`): the CUDA tier
implements it with pinned host memory, ``cudaMemcpyAsync`` and events
(:mod:`weightd.tiers.cuda`); ``weightd.testing.staging.HostMemoryBackend`` implements
it with bytearrays and a worker thread, so that the ordering and back-pressure are
tested on any machine.

It knows nothing of CUDA, models, leases or gRPC.

Note [staging buffer reuse]
---------------------------
A staging buffer is handed to ``copy_async`` and then belongs to the copy until the
event returned for it has completed: the copy engine reads the buffer *after*
``copy_async`` returned, at a time the host does not control. Refilling it earlier
silently corrupts the weights (a bug reported against several inference servers), so:

* the pipeline keeps the in-flight copies in a FIFO of ``(buffer, event)`` and takes a
  buffer back only by ``wait()``-ing the oldest event; a buffer is never in the free list
  and in the FIFO at the same time;
* at most ``len(pool)`` copies are ever in flight: when every buffer is busy, reading the
  next chunk waits for the oldest copy (back-pressure), so a slow device slows the
  reader instead of growing memory;
* reading chunk ``k + 1`` from the file (a syscall that releases the GIL) overlaps the
  transfer of chunk ``k`` as soon as the pool has two buffers;
* on any error (a short read, an I/O error, a failed copy) every copy still in flight is
  waited for before the error propagates, so no copy still reads a buffer when the
  caller frees the destination or the next stream refills the pool. The pipeline stays
  usable; the half-written destination is the caller's to discard.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from weightd.errors import IntegrityError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_STAGING_BUFFERS",
    "DEFAULT_STAGING_BUFFER_SIZE",
    "CopyEvent",
    "CopyTarget",
    "StagingBackend",
    "StagingBuffer",
    "StagingPipeline",
    "plan_chunks",
]

#: Default pool: 4 buffers of 64 MiB (256 MiB of pinned host memory). Unmeasured: chosen
#: so that one chunk takes a few ms over PCIe 4/5 (per-copy overhead of ~10 us is
#: negligible) and two copies can be in flight while two buffers are being read.
DEFAULT_STAGING_BUFFERS = 4
DEFAULT_STAGING_BUFFER_SIZE = 64 * 1024 * 1024


def plan_chunks(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """Cut ``size`` bytes into consecutive chunks of at most ``chunk_size`` bytes.

    Args:
        size: bytes to cover (0 gives no chunk).
        chunk_size: the largest chunk (a staging buffer's size).

    Returns:
        ``(offset, length)`` pairs in order; they tile ``[0, size)`` exactly, every
        length is ``chunk_size`` but the last, which is the remainder.

    Raises:
        ValueError: a negative size or a chunk size that is not positive.

    Example:
        >>> plan_chunks(10, 4)
        [(0, 4), (4, 4), (8, 2)]
    """
    if size < 0:
        raise ValueError(f"cannot plan a negative size: {size}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return [(off, min(chunk_size, size - off)) for off in range(0, size, chunk_size)]


@dataclass(eq=False)
class StagingBuffer:
    """One reusable host buffer of the pool.

    Attributes:
        index: its place in the pool.
        size: bytes.
        view: a writable byte view of the whole buffer (the pipeline reads into it).
        address: its host address, for backends that hand it to a copy engine (0 when
            the backend does not need one).
    """

    index: int
    size: int
    view: memoryview
    address: int = 0


class CopyEvent(Protocol):
    """Completion of one asynchronous copy (a CUDA event, a threading.Event...)."""

    def wait(self) -> None:
        """Block until the copy has completed; raise its error if it failed."""
        ...


class CopyTarget(Protocol):
    """Where one stream's bytes go: a device buffer, a bytearray..."""

    def copy_async(self, buffer: StagingBuffer, nbytes: int, dst_offset: int) -> CopyEvent:
        """Start copying ``buffer.view[:nbytes]`` to ``dst_offset``; return at once.

        The buffer must not be written until the returned event has completed.
        """
        ...


class StagingBackend(Protocol):
    """Allocates and frees the staging pool (pinned host memory for CUDA)."""

    def allocate(self, count: int, size: int) -> list[StagingBuffer]:
        """``count`` buffers of ``size`` bytes each, touched and ready to use."""
        ...

    def free(self, buffers: list[StagingBuffer]) -> None:
        """Return buffers allocated by :meth:`allocate` (none of them in use)."""
        ...


class StagingPipeline:
    """Streams files through a fixed pool of staging buffers; see Note [staging buffer reuse].

    The pool is allocated once, here, and reused by every :meth:`stream`; streams are
    serialized (one at a time per pipeline), because they share the pool.

    Args:
        backend: allocates the pool.
        buffers: how many staging buffers (2 or more overlap reading and copying).
        buffer_size: bytes per buffer, the chunk size.

    Raises:
        ValueError: fewer than one buffer or a buffer size that is not positive.

    Example:
        >>> backend = HostMemoryBackend()
        >>> with StagingPipeline(backend, buffers=2, buffer_size=4096) as pipeline:
        ...     dest = bytearray(os.path.getsize(__file__))
        ...     pipeline.stream(__file__, backend.target(dest)) == len(dest)
        True
        >>> backend.close()
    """

    def __init__(self, backend: StagingBackend, *, buffers: int = DEFAULT_STAGING_BUFFERS,
                 buffer_size: int = DEFAULT_STAGING_BUFFER_SIZE) -> None:
        if buffers < 1:
            raise ValueError(f"the staging pool needs at least one buffer, got {buffers}")
        if buffer_size <= 0:
            raise ValueError(f"staging buffers need a positive size, got {buffer_size}")
        self.backend = backend
        self.buffer_size = buffer_size
        self._lock = threading.Lock()
        self._pool = backend.allocate(buffers, buffer_size)
        if len(self._pool) != buffers or any(b.size < buffer_size for b in self._pool):
            backend.free(self._pool)
            raise ValueError(f"the backend allocated {len(self._pool)} buffer(s), "
                             f"{buffers} of {buffer_size} bytes were asked for")
        self._closed = False

    @property
    def buffers(self) -> int:
        """How many staging buffers the pool holds."""
        return len(self._pool)

    @property
    def pool_bytes(self) -> int:
        """Bytes of host memory the pool holds."""
        return sum(b.size for b in self._pool)

    def stream(self, path: str | os.PathLike[str], target: CopyTarget, *,
               size: int | None = None) -> int:
        """Copy a whole file to ``target`` (file offset ``o`` lands at ``o`` there).

        Returns once every copy has completed, so the destination holds the file.

        Args:
            path: the file (a blob of the cache: local, immutable).
            target: where the bytes go.
            size: the bytes expected (default: the file's size now).

        Returns:
            The bytes copied.

        Raises:
            IntegrityError: the file is not ``size`` bytes long.
            OSError: the file cannot be opened or read.
            ValueError: the pipeline is closed.
            Exception: whatever a copy raised (from its event's ``wait``). In every case
                no copy is in flight any more when the error propagates.
        """
        with self._lock:
            if self._closed:
                raise ValueError("this staging pipeline is closed")
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                actual = os.fstat(fd).st_size
                if size is None:
                    size = actual
                elif actual != size:
                    raise IntegrityError(f"{path}: {actual} bytes on disk, {size} expected")
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, size, os.POSIX_FADV_SEQUENTIAL)
                self._run(fd, os.fspath(path), target, size)
            finally:
                os.close(fd)
            return size

    def _run(self, fd: int, name: str, target: CopyTarget, size: int) -> None:
        free: deque[StagingBuffer] = deque(self._pool)
        in_flight: deque[tuple[StagingBuffer, CopyEvent]] = deque()
        try:
            for offset, length in plan_chunks(size, self.buffer_size):
                if not free:
                    # Back-pressure: the oldest copy must finish before its buffer is
                    # refilled (Note [staging buffer reuse]).
                    buffer, event = in_flight.popleft()
                    event.wait()
                    free.append(buffer)
                buffer = free.popleft()
                _read_into(fd, buffer.view, length, offset, name)
                in_flight.append((buffer, target.copy_async(buffer, length, offset)))
            while in_flight:
                buffer, event = in_flight.popleft()
                event.wait()
                free.append(buffer)
        except BaseException:
            # Drain: nothing may still read a buffer (or write the destination) once the
            # error reaches the caller. Later errors are secondary to the first one.
            while in_flight:
                _, event = in_flight.popleft()
                try:
                    event.wait()
                except BaseException as later:  # noqa: BLE001 - the first error wins
                    log.debug("%s: another copy failed while draining: %r", name, later)
            raise

    def close(self) -> None:
        """Free the pool (idempotent); waits for a stream in progress."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, []
        self.backend.free(pool)

    def __enter__(self) -> StagingPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_into(fd: int, view: memoryview, length: int, offset: int, name: str) -> None:
    """Read exactly ``length`` bytes at ``offset`` into ``view[:length]``."""
    done = 0
    while done < length:
        n = os.preadv(fd, [view[done:length]], offset + done)
        if n == 0:
            raise IntegrityError(f"{name}: the file ended at byte {offset + done}, "
                                 f"{offset + length} expected")
        done += n
