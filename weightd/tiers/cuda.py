"""The GPU tier: shard blobs resident in device memory, shared with clients by CUDA IPC.

Each shard blob becomes one device allocation (``cudaMalloc``, never a caching pool:
an IPC handle covers a whole allocation), filled from the cache through the pinned
staging pool of :mod:`weightd.tiers.staging` (one pool per device, so loads on
different GPUs run at once), or, with ``register_host``, straight from the registered
mmapped file. Blobs shared by several models on one device are allocated once and
counted by digest, by the same bookkeeping as the host tier's
(:class:`~weightd.tiers.base.BlobTier`); a blob costs whole 2 MiB granules
(:data:`IPC_GRANULE`), and the budget counts that. Clients open the exported handles
(``weightd_client.cuda``).

The CUDA calls live in one small class, :class:`CupyDriver` (cupy, the optional extra
``weightd[cuda]``, imported on first use); everything around them (bookkeeping,
refcounts, errors) goes through the :class:`CudaDriver` protocol and is tested on the
CPU with a fake driver. Devices are named by UUID (``GPU-xxxxxxxx-…``, as
``nvidia-smi -L`` prints them), never by index: ``CUDA_VISIBLE_DEVICES`` differs between
the daemon and each client. Which model to evict is the node's decision.

Note [CUDA IPC lifetime]
------------------------
The contract between the daemon (exporter) and its clients (importers), in one place:

* The daemon allocates one buffer per shard blob and device, fills it, waits until every
  copy into it has completed, and only then exports its ``cudaIpcMemHandle_t`` (of the
  allocation's base pointer). An importer therefore never sees a half-written buffer,
  and the daemon never writes a buffer again once it is exported.
* A client opens each handle once per process (CUDA maps a given allocation once per
  process; opening it again fails or returns the same address), keeps the opened
  handles in a cache keyed by the handle's bytes, and closes a handle when the last
  model using it in that process is released, before telling the daemon.
* The daemon frees a buffer (``cudaFree``) only when no lease holds any model using it.
  A lease ends by Release (the client closed its handles first) or when the client
  process died (its CUDA context, and so its mapping, died with it). Freeing a buffer
  that an importer still has open is undefined behaviour in CUDA: never do it.
* The exporter must outlive the importers' use: when the daemon exits, its context
  and every buffer go with it, and tensors that running clients built from them
  become invalid. Restarting the daemon under running GPU replicas is not supported.
* Both processes must see the GPU and share an IPC namespace (containers: ``--ipc=host``
  or a shared pod IPC namespace, and the same device); a client in another namespace
  fails to open the handle and says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from weightd.config import format_size
from weightd.errors import BudgetExceeded, FormatError, GpuUnavailable, IntegrityError
from weightd.tiers.base import Blob, BlobTier, ShardExport, open_blob
from weightd.tiers.staging import (
    DEFAULT_STAGING_BUFFER_SIZE,
    DEFAULT_STAGING_BUFFERS,
    CopyEvent,
    CopyTarget,
    StagingBackend,
    StagingBuffer,
    StagingPipeline,
)

log = logging.getLogger(__name__)

__all__ = [
    "INSTALL_HINT",
    "CudaDriver",
    "CudaTier",
    "CupyDriver",
    "DeviceInfo",
    "DeviceOutOfMemory",
    "device_uuid",
    "format_uuid",
]

INSTALL_HINT = "pip install 'weightd[cuda]'"

# From cuda_runtime_api.h / driver_types.h (cupy exports only some of them by name).
_HOST_ALLOC_PORTABLE = 0x01
_HOST_REGISTER_PORTABLE = 0x01
_HOST_REGISTER_READ_ONLY = 0x08
_MEMCPY_HOST_TO_DEVICE = 1
_STREAM_NON_BLOCKING = 0x01
_EVENT_BLOCKING_SYNC = 0x01
_EVENT_DISABLE_TIMING = 0x02
_ERROR_MEMORY_ALLOCATION = 2
#: Device allocations are whole multiples of this. cudaMalloc may place small blocks side
#: by side in one 2 MiB page, and an IPC handle opens its whole page: rounding up keeps
#: one blob's importers out of another's bytes (the CUDA guide's advice for IPC).
IPC_GRANULE = 2 * 1024 * 1024
_ERROR_INSUFFICIENT_DRIVER = 35
_ERROR_NO_DEVICE = 100
_ATTR_HOST_REGISTER_READ_ONLY = 113  # cudaDevAttrHostRegisterReadOnlySupported
_UUID_PREFIXES = ("GPU-", "MIG-")


def format_uuid(raw: bytes) -> str:
    """A device UUID as ``nvidia-smi -L`` prints it.

    The same string as ``"GPU-" + str(torch.cuda.get_device_properties(i).uuid)``.

    Args:
        raw: the 16 bytes of ``cudaDeviceProp.uuid`` / ``cuDeviceGetUuid``.

    Returns:
        ``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx``, lower-case hex.

    Raises:
        ValueError: ``raw`` is not 16 bytes.

    Example:
        >>> format_uuid(bytes(range(16)))
        'GPU-00010203-0405-0607-0809-0a0b0c0d0e0f'
    """
    if len(raw) != 16:
        raise ValueError(f"a CUDA device UUID has 16 bytes, got {len(raw)}")
    h = bytes(raw).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def device_uuid(device: str) -> str:
    """The UUID in a wire device name (``"cuda:GPU-…"``, as AcquireRequest.device has it).

    Args:
        device: ``"cuda:GPU-…"`` or ``"cuda:MIG-…"``.

    Returns:
        ``"GPU-…"``, as :func:`format_uuid` names every device. ``nvidia-smi -L`` prints
        a MIG instance as ``MIG-`` and the same hex that ``cuDeviceGetUuid_v2`` gives
        (what the daemon lists), so a ``MIG-`` name is the same device.

    Raises:
        FormatError: not a CUDA device named by UUID (an index means nothing to the
            daemon: CUDA_VISIBLE_DEVICES differs between processes).

    Example:
        >>> device_uuid("cuda:GPU-00010203-0405-0607-0809-0a0b0c0d0e0f")
        'GPU-00010203-0405-0607-0809-0a0b0c0d0e0f'
        >>> device_uuid("cuda:MIG-00010203-0405-0607-0809-0a0b0c0d0e0f")
        'GPU-00010203-0405-0607-0809-0a0b0c0d0e0f'
    """
    kind, _, rest = device.partition(":")
    if kind != "cuda" or not rest.startswith(_UUID_PREFIXES) or len(rest) > 64:
        raise FormatError("request", f"device {device[:80]!r} is not 'cuda:<GPU UUID>' (clients "
                                     "send CUDA devices by UUID, never by index)")
    return "GPU-" + rest[4:]


@dataclass(frozen=True)
class DeviceInfo:
    """A CUDA device as the daemon sees it: ``index`` is the daemon's own ordinal."""

    uuid: str
    index: int
    name: str
    total_bytes: int


class DeviceOutOfMemory(MemoryError):
    """A driver's ``malloc`` found no room on the device (cudaErrorMemoryAllocation)."""


class CudaDriver(Protocol):
    """The CUDA calls :class:`CudaTier` makes; :class:`CupyDriver` makes them with cupy.

    Every method raises :class:`~weightd.errors.GpuUnavailable` on a CUDA error, and
    ``malloc`` raises :class:`DeviceOutOfMemory` when the device is full. ``granule``:
    allocations are whole multiples of it (what a blob really costs on the device).
    """

    granule: int

    def devices(self) -> list[DeviceInfo]: ...

    def malloc(self, index: int, size: int) -> int: ...

    def free(self, index: int, ptr: int) -> None: ...

    def ipc_handle(self, index: int, ptr: int) -> bytes: ...

    def memory_info(self, index: int) -> tuple[int, int]: ...

    def staging_backend(self) -> StagingBackend: ...

    def target(self, index: int, ptr: int, size: int) -> CopyTarget: ...

    def can_register(self, index: int) -> bool: ...

    def copy_registered(self, index: int, path: Path, ptr: int, size: int) -> None: ...

    def close(self) -> None: ...


# the tier -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _DeviceBlob:
    index: int
    uuid: str
    ptr: int
    handle: bytes


class CudaTier(BlobTier):
    """Shard blobs resident on CUDA devices (``"cuda:<GPU UUID>"``), exported by IPC handle.

    Nothing CUDA happens in the constructor: :meth:`start` (or the first call that needs
    CUDA) imports cupy, lists the devices and allocates the pinned staging pool. Without
    cupy, a driver or devices, the tier is unavailable and every call that needs a
    device raises :class:`~weightd.errors.GpuUnavailable` with the reason. The shared-blob
    bookkeeping is :class:`~weightd.tiers.base.BlobTier`'s; each device has its own
    staging pipeline, so loads on different GPUs run at once (loads on one GPU take
    turns on its pipeline).

    Args:
        staging_buffers: pinned staging buffers in each device's pool.
        staging_buffer_size: bytes per staging buffer (the chunk size of a load).
        register_host: copy from the mmapped blob registered with ``cudaHostRegister``
            (read-only) instead of staging; devices that cannot register read-only
            memory use the staging pool anyway.
        driver: the CUDA calls (default: :class:`CupyDriver`, created on first use).

    Example:
        >>> tier = CudaTier()
        >>> available, reason = tier.probe()                          # doctest: +SKIP
        >>> tier.start()                                              # doctest: +SKIP
        >>> device = "cuda:" + tier.devices()[0].uuid                 # doctest: +SKIP
        >>> tier.load("model", device, [Blob(digest, path, size)])    # doctest: +SKIP
        >>> [s.ipc_handle for s in tier.export("model", device)]      # doctest: +SKIP
    """

    name = "cuda"

    def __init__(self, *, staging_buffers: int = DEFAULT_STAGING_BUFFERS,
                 staging_buffer_size: int = DEFAULT_STAGING_BUFFER_SIZE,
                 register_host: bool = False, driver: CudaDriver | None = None) -> None:
        if staging_buffers < 1:
            raise ValueError(f"staging_buffers must be at least 1, got {staging_buffers}")
        if staging_buffer_size <= 0:
            raise ValueError(f"staging_buffer_size must be positive, got {staging_buffer_size}")
        super().__init__()
        self.staging_buffers = staging_buffers
        self.staging_buffer_size = staging_buffer_size
        self.register_host = register_host
        self._driver = driver
        self._probed: tuple[bool, str] | None = None
        self._devices: list[DeviceInfo] = []
        self._granule = 1
        self._probe_lock = threading.RLock()
        self._pipelines: dict[int, StagingPipeline] = {}  # one per device index

    # availability -----------------------------------------------------------------------

    def probe(self) -> tuple[bool, str]:
        """Whether the tier can serve, and why not (or which devices it has).

        The answer is computed once: devices do not come and go under a running daemon.

        Returns:
            ``(True, "2 device(s): …")`` or ``(False, reason)``; the reason names what
            is missing (cupy and how to install it, the driver, devices) or broken.
        """
        with self._probe_lock:
            if self._probed is None:
                self._probed = self._probe()
            return self._probed

    def _probe(self) -> tuple[bool, str]:
        try:
            driver = self._require_driver()
            devices = driver.devices()
        except GpuUnavailable as e:
            return False, str(e)
        except Exception as e:  # noqa: BLE001 - cupy can fail in many ways without CUDA
            return False, f"CUDA is not usable: {type(e).__name__}: {e}"
        if not devices:
            return False, ("no CUDA device is visible to the daemon (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!s})")
        self._devices = devices
        self._granule = max(1, int(getattr(driver, "granule", 1)))
        return True, f"{len(devices)} device(s): " + ", ".join(
            f"{d.index}={d.uuid} ({d.name}, {format_size(d.total_bytes)})" for d in devices)

    @property
    def staging_pool_bytes(self) -> int:
        """Pinned host memory held by the staging pools (0 until one is allocated)."""
        with self._probe_lock:
            return sum(p.pool_bytes for p in self._pipelines.values())

    @property
    def available(self) -> bool:
        return self.probe()[0]

    @property
    def reason(self) -> str:
        """Why the tier is unavailable ("" when it is available)."""
        ok, why = self.probe()
        return "" if ok else why

    def start(self) -> tuple[bool, str]:
        """Probe and allocate the first device's pinned staging pool, once, at daemon
        start (the other devices' pools are allocated by their first load).

        Returns:
            :meth:`probe`'s answer, which turns unavailable if the pool cannot be
            allocated (the reason says so).
        """
        ok, _ = self.probe()
        if ok and not self.register_host:
            try:
                self._staging(self._devices[0].index)
            except GpuUnavailable as e:
                with self._probe_lock:
                    self._probed = (False, f"pinned staging pool: {e}")
        return self.probe()

    def _require_driver(self) -> CudaDriver:
        if self._driver is None:
            self._driver = CupyDriver()
        return self._driver

    def _check(self) -> CudaDriver:
        ok, why = self.probe()
        if not ok:
            raise GpuUnavailable(f"the CUDA tier is not available: {why}")
        return self._require_driver()

    def _staging(self, index: int) -> StagingPipeline:
        with self._probe_lock:
            pipeline = self._pipelines.get(index)
            if pipeline is None:
                t0 = time.perf_counter()
                pipeline = self._pipelines[index] = StagingPipeline(
                    self._require_driver().staging_backend(), buffers=self.staging_buffers,
                    buffer_size=self.staging_buffer_size)
                log.info("pinned staging pool for device %d: %d x %s in %.2f s", index,
                         self.staging_buffers, format_size(self.staging_buffer_size),
                         time.perf_counter() - t0)
            return pipeline

    # devices ------------------------------------------------------------------------------

    def devices(self) -> list[DeviceInfo]:
        """The devices the daemon sees (empty when the tier is unavailable)."""
        self.probe()
        return list(self._devices)

    def device_names(self) -> list[str]:
        return ["cuda:" + d.uuid for d in self.devices()]

    def label(self, device: str) -> str:
        return device_uuid(device)

    def resolve(self, uuid: str) -> int:
        """The daemon's index of the device with this UUID.

        Raises:
            GpuUnavailable: the tier is unavailable, or the daemon sees no such device.
        """
        self._check()
        for d in self._devices:
            if d.uuid == uuid:
                return d.index
        seen = ", ".join(d.uuid for d in self._devices)
        raise GpuUnavailable(
            f"{uuid}: no such device among the {len(self._devices)} the daemon sees ({seen}); "
            "the daemon must see every GPU its clients use (check its CUDA_VISIBLE_DEVICES)")

    def total_bytes(self, uuid: str) -> int:
        """The device's memory in bytes (for :func:`~weightd.tiers.budget.parse_gpu_budget`)."""
        index = self.resolve(uuid)
        return next(d.total_bytes for d in self._devices if d.index == index)

    def memory_info(self, uuid: str) -> tuple[int, int]:
        """``(free, total)`` bytes on the device now, all processes included."""
        return self._check().memory_info(self.resolve(uuid))

    # residency (BlobTier's hooks) -------------------------------------------------------------

    def _check_device(self, device: str) -> None:
        self.resolve(device_uuid(device))

    def _charge(self, device: str, size: int) -> int:
        # never 0 bytes (cudaMalloc(0) gives no pointer to export), whole granules
        return -(-max(size, 1) // self._granule) * self._granule

    def _make(self, device: str, blob: Blob) -> _DeviceBlob:
        """Allocate one device buffer for a blob, fill it, export it.

        Raises:
            GpuUnavailable: no such device, or a CUDA error.
            BudgetExceeded: the device itself has no room (other processes use it); the
                message says how many bytes were needed and how many are free.
            IntegrityError: the blob's size on disk is not the recorded one.
            OSError: the blob cannot be read.
        """
        uuid = device_uuid(device)
        index = self.resolve(uuid)
        self._require_driver()
        path = Path(blob.path)
        opened = None
        if blob.pending is not None:
            # not durable yet: read the inode its temporary file or its blob names now,
            # whatever a rename does meanwhile
            opened = open_blob(blob)
            path = Path(f"/proc/self/fd/{opened}")
        try:
            return self._make_from(device, index, uuid, blob, path)
        finally:
            if opened is not None:
                os.close(opened)

    def _make_from(self, device: str, index: int, uuid: str, blob: Blob,
                   path: Path) -> _DeviceBlob:
        driver = self._require_driver()
        size = blob.size
        try:
            ptr = driver.malloc(index, self._charge(device, size))
        except DeviceOutOfMemory as e:
            free, total = driver.memory_info(index)
            raise BudgetExceeded(
                f"cuda tier {uuid}: need {size} bytes ({format_size(size)}) for blob "
                f"{blob.digest[:16]}, {free} bytes free on the device ({format_size(free)} of "
                f"{format_size(total)}; other processes hold the rest)") from e
        try:
            t0 = time.perf_counter()
            if self.register_host and driver.can_register(index):
                how = "registered"
                driver.copy_registered(index, path, ptr, size)
            else:
                how = "staged"
                self._staging(index).stream(path, driver.target(index, ptr, size), size=size)
            handle = driver.ipc_handle(index, ptr)
        except BaseException:
            # the pipeline (or the registered copy) has waited for every copy: safe to free
            driver.free(index, ptr)
            raise
        seconds = time.perf_counter() - t0
        log.debug("%s: %s on %s (%s) in %.3f s, %.2f GB/s", blob.digest[:16], format_size(size),
                  uuid, how, seconds, size / max(seconds, 1e-9) / 1e9)
        return _DeviceBlob(index, uuid, ptr, handle)

    def _free(self, device: str, payload: _DeviceBlob) -> None:
        # Only when no lease holds a model using it (Note [CUDA IPC lifetime]).
        self._require_driver().free(payload.index, payload.ptr)

    def _export(self, device: str, digest: str, size: int, payload: _DeviceBlob) -> ShardExport:
        return ShardExport(digest, size, ipc_handle=payload.handle, device_uuid=payload.uuid)

    def bytes_used(self, uuid: str) -> int:
        """Bytes allocated (and reserved) on the device by resident blobs: whole granules."""
        return self.used("cuda:" + uuid)

    def close(self) -> None:
        """Free every buffer, the staging pools and the driver's streams.

        Call it when no client uses the buffers any more (daemon shutdown).
        """
        super().close()
        with self._probe_lock:
            pipelines, self._pipelines = list(self._pipelines.values()), {}
        for pipeline in pipelines:
            pipeline.close()
        if self._driver is not None and self._probed is not None and self._probed[0]:
            self._driver.close()


# cupy ---------------------------------------------------------------------------------


def _import_cupy() -> ModuleType:
    try:
        import cupy
    except ImportError as e:
        raise GpuUnavailable(f"cupy is not installed ({e}): {INSTALL_HINT}") from e
    return cupy


@contextlib.contextmanager
def _cuda_errors(runtime: Any) -> Iterator[None]:
    """Turn cupy's CUDARuntimeError into DeviceOutOfMemory or GpuUnavailable."""
    try:
        yield
    except runtime.CUDARuntimeError as e:
        status = getattr(e, "status", None)
        if status == _ERROR_MEMORY_ALLOCATION:
            raise DeviceOutOfMemory(str(e)) from e
        if status == _ERROR_NO_DEVICE:
            raise GpuUnavailable(f"no CUDA device ({e}); is CUDA_VISIBLE_DEVICES empty, or "
                                 "the driver not loaded?") from e
        if status == _ERROR_INSUFFICIENT_DRIVER:
            raise GpuUnavailable(f"no NVIDIA driver, or one older than cupy's CUDA needs ({e})"
                                 ) from e
        raise GpuUnavailable(f"CUDA error: {e}") from e


def _libcuda_uuid(ordinal: int) -> bytes | None:
    """The device's UUID from the driver API, or None if libcuda cannot say."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev = ctypes.c_int()
    buf = ctypes.create_string_buffer(16)
    get = getattr(lib, "cuDeviceGetUuid_v2", None) or getattr(lib, "cuDeviceGetUuid", None)
    if get is None or lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(dev), ordinal) != 0:
        return None
    if get(buf, dev) != 0:
        return None
    return buf.raw[:16]


def _uuid_bytes(from_cupy: bytes, from_driver: bytes | None) -> bytes | None:
    """The 16 UUID bytes, from the driver API if it answered, else from cupy.

    cupy converts ``cudaDeviceProp.uuid`` (a ``char[16]``) like a C string: the bytes
    stop at the first zero byte, or run on into the next field. Only 16 or more bytes
    from cupy can be trusted (the first 16 then are the UUID).
    """
    if from_driver is not None and len(from_driver) == 16:
        return from_driver
    if len(from_cupy) >= 16:
        return from_cupy[:16]
    return None


class CupyDriver:
    """:class:`CudaDriver` with cupy's CUDA runtime bindings (``cupy.cuda.runtime``).

    One non-blocking stream per device (created on first use); events are created per
    copy (``cudaEventBlockingSync``: waiting sleeps instead of spinning). Staging
    buffers are portable pinned memory, usable with every device.

    Raises:
        GpuUnavailable: cupy is not installed.
    """

    granule = IPC_GRANULE

    def __init__(self) -> None:
        self.cupy = _import_cupy()
        self.rt = self.cupy.cuda.runtime
        self._streams: dict[int, int] = {}
        self._register_ok: dict[int, bool] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def on(self, index: int) -> Iterator[None]:
        """Device ``index`` current in this thread; CUDA errors translated."""
        with _cuda_errors(self.rt), self.cupy.cuda.Device(index):
            yield

    def devices(self) -> list[DeviceInfo]:
        rt = self.rt
        out = []
        with _cuda_errors(rt):
            for i in range(rt.getDeviceCount()):
                props = rt.getDeviceProperties(i)
                raw = _uuid_bytes(bytes(props.get("uuid", b"")), _libcuda_uuid(i))
                if raw is None:
                    raise GpuUnavailable(f"cannot read the UUID of CUDA device {i}")
                name = props.get("name", b"")
                out.append(DeviceInfo(format_uuid(raw), i,
                                      name.decode(errors="replace") if isinstance(name, bytes)
                                      else str(name), int(props["totalGlobalMem"])))
        return out

    def malloc(self, index: int, size: int) -> int:
        with self.on(index):
            return int(self.rt.malloc(-(-size // IPC_GRANULE) * IPC_GRANULE))

    def free(self, index: int, ptr: int) -> None:
        with self.on(index):
            self.rt.free(ptr)

    def ipc_handle(self, index: int, ptr: int) -> bytes:
        with self.on(index):
            return bytes(self.rt.ipcGetMemHandle(ptr))

    def memory_info(self, index: int) -> tuple[int, int]:
        with self.on(index):
            free, total = self.rt.memGetInfo()
        return int(free), int(total)

    def stream(self, index: int) -> int:
        with self._lock:
            stream = self._streams.get(index)
            if stream is None:
                with self.on(index):
                    stream = self._streams[index] = int(
                        self.rt.streamCreateWithFlags(_STREAM_NON_BLOCKING))
            return stream

    def staging_backend(self) -> StagingBackend:
        return _PinnedBackend(self)

    def target(self, index: int, ptr: int, size: int) -> CopyTarget:
        return _DeviceTarget(self, index, ptr, size)

    def can_register(self, index: int) -> bool:
        with self._lock:
            ok = self._register_ok.get(index)
            if ok is None:
                try:
                    with self.on(index):
                        ok = self.rt.deviceGetAttribute(_ATTR_HOST_REGISTER_READ_ONLY,
                                                        index) == 1
                except GpuUnavailable:
                    ok = False
                if not ok:
                    log.info("device %d cannot register read-only host memory: loads to it "
                             "use the staging pool", index)
                self._register_ok[index] = ok
            return ok

    def copy_registered(self, index: int, path: Path, ptr: int, size: int) -> None:
        """Copy a blob to the device from its own mapping, registered read-only."""
        if size == 0:
            return
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise IntegrityError(f"{path}: {actual} bytes on disk, {size} expected")
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        host = np.frombuffer(mm, dtype=np.uint8)
        try:
            address = int(host.ctypes.data)
            stream = self.stream(index)
            with self.on(index):
                # Pins (faults in) every page of the mapping: per process, undone below.
                self.rt.hostRegister(address, size,
                                     _HOST_REGISTER_PORTABLE | _HOST_REGISTER_READ_ONLY)
                try:
                    self.rt.memcpyAsync(ptr, address, size, _MEMCPY_HOST_TO_DEVICE, stream)
                    self.rt.streamSynchronize(stream)
                finally:
                    self.rt.hostUnregister(address)
        finally:
            del host
            mm.close()

    def close(self) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
        for index, stream in streams.items():
            with contextlib.suppress(GpuUnavailable), self.on(index):
                self.rt.streamDestroy(stream)


class _PinnedBackend:
    """The staging pool in portable pinned host memory (``cudaHostAlloc``)."""

    def __init__(self, driver: CupyDriver) -> None:
        self.driver = driver

    def allocate(self, count: int, size: int) -> list[StagingBuffer]:
        rt = self.driver.rt
        out: list[StagingBuffer] = []
        try:
            for i in range(count):
                with self.driver.on(0):
                    address = int(rt.hostAlloc(size, _HOST_ALLOC_PORTABLE))
                # Pre-touch: cudaHostAlloc pins the pages, writing them once makes sure
                # the first load pays no fault.
                ctypes.memset(address, 0, size)
                raw = (ctypes.c_char * size).from_address(address)
                out.append(StagingBuffer(i, size, memoryview(raw).cast("B"), address))
        except BaseException:
            self.free(out)
            raise
        return out

    def free(self, buffers: list[StagingBuffer]) -> None:
        for b in buffers:
            b.view.release()
            with contextlib.suppress(GpuUnavailable), self.driver.on(0):
                self.driver.rt.freeHost(b.address)


class _CudaEvent:
    """One recorded CUDA event; destroyed by the first :meth:`wait`."""

    def __init__(self, driver: CupyDriver, index: int, event: int) -> None:
        self.driver = driver
        self.index = index
        self.event = event

    def wait(self) -> None:
        event, self.event = self.event, 0
        if not event:
            return
        with self.driver.on(self.index):
            try:
                self.driver.rt.eventSynchronize(event)
            finally:
                self.driver.rt.eventDestroy(event)


class _DeviceTarget:
    """A device buffer filled by ``cudaMemcpyAsync`` from pinned staging buffers."""

    def __init__(self, driver: CupyDriver, index: int, ptr: int, size: int) -> None:
        self.driver = driver
        self.index = index
        self.ptr = ptr
        self.size = size
        self.stream = driver.stream(index)

    def copy_async(self, buffer: StagingBuffer, nbytes: int, dst_offset: int) -> CopyEvent:
        if not 0 < nbytes <= buffer.size or dst_offset < 0 or dst_offset + nbytes > self.size:
            raise ValueError(f"copy of {nbytes} bytes to offset {dst_offset} does not fit a "
                             f"{self.size}-byte device buffer")
        rt = self.driver.rt
        with self.driver.on(self.index):
            rt.memcpyAsync(self.ptr + dst_offset, buffer.address, nbytes,
                           _MEMCPY_HOST_TO_DEVICE, self.stream)
            try:
                event = int(rt.eventCreateWithFlags(_EVENT_DISABLE_TIMING | _EVENT_BLOCKING_SYNC))
                try:
                    rt.eventRecord(event, self.stream)
                except BaseException:
                    rt.eventDestroy(event)
                    raise
            except BaseException:
                # No event tracks the copy just queued: wait for it here, so the buffer is
                # free when the error reaches the pipeline.
                with contextlib.suppress(Exception):
                    rt.streamSynchronize(self.stream)
                raise
        return _CudaEvent(self.driver, self.index, event)
