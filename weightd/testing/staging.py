"""A host-memory implementation of the staging pipeline's copy interface
(:mod:`weightd.tiers.staging`): bytearrays and a worker thread, with delays and faults
to inject, so that the pipeline's ordering and back-pressure are tested on any machine;
also a reference for new backends."""

from __future__ import annotations

import logging
import queue
import random
import threading
import zlib
from collections.abc import Callable

from weightd.tiers.staging import CopyEvent, StagingBuffer

log = logging.getLogger(__name__)

__all__ = ["HostMemoryBackend", "HostTarget", "random_delay"]



class _HostEvent:
    """A copy done by :class:`HostMemoryBackend`'s worker thread."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        self._done.set()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error


class HostTarget:
    """A bytearray (or writable memoryview) that :class:`HostMemoryBackend` copies into."""

    def __init__(self, backend: HostMemoryBackend, dest: bytearray | memoryview) -> None:
        self.backend = backend
        self.dest = memoryview(dest).cast("B")
        if self.dest.readonly:
            raise ValueError("the destination must be writable")

    def copy_async(self, buffer: StagingBuffer, nbytes: int, dst_offset: int) -> CopyEvent:
        if not 0 < nbytes <= buffer.size or dst_offset < 0 \
                or dst_offset + nbytes > len(self.dest):
            raise ValueError(f"copy of {nbytes} bytes to offset {dst_offset} does not fit a "
                             f"{len(self.dest)}-byte destination from a {buffer.size}-byte "
                             "buffer")
        return self.backend._submit(buffer, nbytes, self.dest, dst_offset)


class HostMemoryBackend:
    """Staging buffers in plain host memory, copies done in order by one worker thread.

    The CPU stand-in for pinned memory and a CUDA stream: :meth:`HostTarget.copy_async`
    returns at once and the worker copies later, optionally after a delay, so tests can
    check that the pipeline never refills a buffer before its copy completed.

    Args:
        delay: seconds to sleep before each copy (a number, or a callable giving one per
            copy, e.g. ``lambda: random.uniform(0, 0.002)``).
        fault: called as ``fault(dst_offset, nbytes)`` before each copy; what it raises
            becomes that copy's error (raised by its event's ``wait``).
        verify: checksum each buffer when a copy is submitted and again when it runs;
            a difference (the buffer was refilled too early) is counted in
            :attr:`violations`.

    Attributes:
        pending: copies submitted and not yet completed.
        max_pending: the most copies ever pending at once.
        submitted: how many copies were submitted.
        violations: copies whose buffer changed between submission and copy.
        order: ``dst_offset`` of every copy, in the order the worker ran them.
    """

    def __init__(self, *, delay: float | Callable[[], float] = 0.0,
                 fault: Callable[[int, int], None] | None = None, verify: bool = False) -> None:
        self._delay = delay
        self._fault = fault
        self._verify = verify
        self._jobs: queue.Queue[tuple[StagingBuffer, int, memoryview, int, int, _HostEvent]
                                | None] = queue.Queue()
        self._stats = threading.Lock()
        self.pending = 0
        self.max_pending = 0
        self.submitted = 0
        self.violations = 0
        self.order: list[int] = []
        self._allocated: set[int] = set()
        self._worker = threading.Thread(target=self._work, name="weightd-host-copy",
                                        daemon=True)
        self._worker.start()

    def allocate(self, count: int, size: int) -> list[StagingBuffer]:
        out = []
        for i in range(count):
            raw = bytearray(size)  # bytearray zero-fills: every page is touched
            out.append(StagingBuffer(i, size, memoryview(raw)))
            self._allocated.add(id(out[-1]))
        return out

    def free(self, buffers: list[StagingBuffer]) -> None:
        for b in buffers:
            self._allocated.discard(id(b))
            b.view.release()

    @property
    def allocated(self) -> int:
        """Buffers allocated and not yet freed."""
        return len(self._allocated)

    def target(self, dest: bytearray | memoryview) -> HostTarget:
        """A destination for :meth:`StagingPipeline.stream`."""
        return HostTarget(self, dest)

    def _submit(self, buffer: StagingBuffer, nbytes: int, dest: memoryview,
                dst_offset: int) -> _HostEvent:
        event = _HostEvent()
        crc = zlib.crc32(buffer.view[:nbytes]) if self._verify else 0
        with self._stats:
            self.pending += 1
            self.submitted += 1
            self.max_pending = max(self.max_pending, self.pending)
        self._jobs.put((buffer, nbytes, dest, dst_offset, crc, event))
        return event

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            buffer, nbytes, dest, dst_offset, crc, event = job
            error: BaseException | None = None
            try:
                delay = self._delay() if callable(self._delay) else self._delay
                if delay > 0:
                    threading.Event().wait(delay)
                if self._fault is not None:
                    self._fault(dst_offset, nbytes)
                if self._verify and zlib.crc32(buffer.view[:nbytes]) != crc:
                    with self._stats:
                        self.violations += 1
                # This copy is the point of the backend: it stands in for the DMA.
                dest[dst_offset:dst_offset + nbytes] = buffer.view[:nbytes]
            except BaseException as e:  # handed to whoever waits on the event
                error = e
            with self._stats:
                self.pending -= 1
                self.order.append(dst_offset)
            event._finish(error)

    def close(self) -> None:
        """Stop the worker thread (after the copies already submitted)."""
        if self._worker.is_alive():
            self._jobs.put(None)
            self._worker.join()


def random_delay(max_seconds: float, *, seed: int | None = None) -> Callable[[], float]:
    """A ``delay`` for :class:`HostMemoryBackend`: uniform in ``[0, max_seconds]``."""
    rng = random.Random(seed)
    return lambda: rng.uniform(0.0, max_seconds)
