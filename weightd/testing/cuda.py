"""A stand-in CUDA driver on host memory, for testing the CUDA tier on any machine.

:class:`FakeDriver` implements :class:`~weightd.tiers.cuda.CudaDriver`: device buffers
are bytearrays, copies go through :class:`~weightd.testing.staging.HostMemoryBackend`
(a worker thread standing in for a CUDA stream, with delays and faults to inject), IPC
handles encode the pointer. The tier's contract tests (tests/test_tier_contract.py) and
its own tests (tests/test_cuda_tier.py) run on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weightd.errors import GpuUnavailable
from weightd.testing.staging import HostMemoryBackend
from weightd.tiers.cuda import DeviceInfo, DeviceOutOfMemory, format_uuid

__all__ = ["FakeDriver"]

MiB = 1024 * 1024


class FakeDriver:
    """A CudaDriver over host memory: device buffers are bytearrays, copies go through
    HostMemoryBackend, handles encode the pointer."""

    def __init__(self, *, devices: int = 2, total: int = 1 * MiB, delay: float = 0.0,
                 fault: Any = None, register: bool = True, fail_staging: bool = False,
                 granule: int = 1) -> None:
        self.granule = granule
        self._backend: HostMemoryBackend | None = None
        self._backend_args: dict[str, Any] = {"delay": delay, "fault": fault}
        self.total = total
        self.infos = [DeviceInfo(format_uuid(bytes([i + 1]) * 16), i, f"Fake GPU {i}", total)
                      for i in range(devices)]
        self.mem: dict[int, bytearray] = {}
        self.where: dict[int, int] = {}
        self.used = [0] * devices
        self.next_ptr = 0x10000
        self.register = register
        self.fail_staging = fail_staging
        self.registered_copies = 0
        self.staged_targets = 0
        self.closed = False

    @property
    def backend(self) -> HostMemoryBackend:  # made on first use: it starts a thread
        if self._backend is None:
            self._backend = HostMemoryBackend(verify=True, **self._backend_args)
        return self._backend

    def devices(self) -> list[DeviceInfo]:
        return list(self.infos)

    def malloc(self, index: int, size: int) -> int:
        if self.used[index] + size > self.total:
            raise DeviceOutOfMemory("cudaErrorMemoryAllocation: out of memory")
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + size + 256
        self.mem[ptr] = bytearray(size)
        self.where[ptr] = index
        self.used[index] += size
        return ptr

    def free(self, index: int, ptr: int) -> None:
        if self.where.pop(ptr) != index:
            raise RuntimeError(f"buffer {ptr:#x} freed on the wrong device {index}")
        self.used[index] -= len(self.mem.pop(ptr))

    def ipc_handle(self, index: int, ptr: int) -> bytes:
        return ptr.to_bytes(8, "little") + bytes(56)

    def memory_info(self, index: int) -> tuple[int, int]:
        return self.total - self.used[index], self.total

    def staging_backend(self) -> HostMemoryBackend:
        if self.fail_staging:
            raise GpuUnavailable("CUDA error: cudaErrorMemoryAllocation (cudaHostAlloc)")
        return self.backend

    def target(self, index: int, ptr: int, size: int) -> Any:
        if self.where[ptr] != index or len(self.mem[ptr]) < size:
            raise RuntimeError(f"no {size}-byte buffer {ptr:#x} on device {index}")
        self.staged_targets += 1
        return self.backend.target(self.mem[ptr])

    def can_register(self, index: int) -> bool:
        return self.register

    def copy_registered(self, index: int, path: Path, ptr: int, size: int) -> None:
        self.registered_copies += 1
        self.mem[ptr][:size] = Path(path).read_bytes()

    def close(self) -> None:
        self.closed = True
        self.backend.close()

    def contents(self, handle: bytes) -> bytes:
        return bytes(self.mem[int.from_bytes(handle[:8], "little")])
