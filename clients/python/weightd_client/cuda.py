"""CUDA tier, client side: opening the daemon's IPC handles and viewing tensors in them.

The daemon answers an Acquire on a CUDA device with, for each shard, the
``cudaIpcMemHandle_t`` of one device buffer holding the whole shard file, the device's
UUID and where file byte 0 lies in the buffer (``device_offset``). This module opens each
handle once per process with cupy (``cupy.cuda.runtime.ipcOpenMemHandle``), wraps the
buffer as a uint8 cupy array, hands it to torch through DLPack (zero copies) and views
every tensor in it with ``.view(dtype)``: cupy has no bfloat16 or float8, torch does.

cupy is needed only here (``pip install 'weightd[cuda]'`` or any ``cupy-cuda12x``), and
imported only when a CUDA answer is opened.

Note [CUDA tensors and release]
-------------------------------
Unlike host tensors (Note [lifetime of host tensors] in :mod:`.tensors`), CUDA tensors
are valid only while their model is held:

* Opened handles are cached per process by the handle's bytes (never by address: the
  same allocation opened twice would fail, or alias), with a count of the models
  (:class:`~weightd_client.LoadedModel`) using each. Opening a handle that is already
  open returns the very same uint8 tensor.
* Releasing a model closes its handles (``cudaIpcCloseMemHandle``) when no other model
  in this process still uses them, *before* the lease ends: the daemon may free the
  buffer as soon as no lease holds it. The device is synchronized first, so no kernel
  still reads a buffer being unmapped.
* After the release, the model's tensors (and every view of them) point at unmapped
  memory: using them is an illegal memory access. Keep the model until the weights are
  no longer needed, or ``.clone()`` what must outlive it.
* The daemon filled every buffer and waited for the copies before answering: what a
  client opens is complete, and the daemon never writes it again.
* A tensor whose offset in the buffer is not a multiple of its element size (files from
  old writers) cannot be viewed in place (CUDA kernels need aligned pointers): it is
  copied on the device once, and the copy is logged at DEBUG.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client.errors import FormatError, GpuUnavailable
from weightd_client.tensors import checked_tensors, require_torch

if TYPE_CHECKING:
    import torch

__all__ = [
    "CUPY_INSTALL_HINT",
    "build_cuda_tensors",
    "close_shard",
    "cuda_uuid",
    "open_shard",
    "opened_handles",
    "release_shards",
    "shard_handles",
]

log = logging.getLogger(__name__)

CUPY_INSTALL_HINT = "pip install cupy-cuda12x (or 'weightd[cuda]')"

#: Size of a cudaIpcMemHandle_t.
IPC_HANDLE_BYTES = 64


@dataclass
class _Opened:
    ptr: int
    size: int
    device_index: int
    tensor: Any  # torch.Tensor (uint8, 1-D, on cuda:device_index)
    refs: int


_lock = threading.Lock()
_opened: dict[bytes, _Opened] = {}


def _require_cupy() -> ModuleType:
    try:
        import cupy
    except ImportError as e:
        raise GpuUnavailable(f"opening weights on a CUDA device needs cupy: {CUPY_INSTALL_HINT}"
                             ) from e
    return cupy


def cuda_uuid(index: int) -> str:
    """The UUID of this process's CUDA device ``index``, as the daemon names devices.

    Args:
        index: a device index in this process (after ``CUDA_VISIBLE_DEVICES``).

    Returns:
        ``"GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"``.
    """
    torch = require_torch()
    props = torch.cuda.get_device_properties(index)
    if hasattr(props, "uuid"):
        uuid = str(props.uuid)
    else:
        # torch before 2.4 has no uuid here; cupy's runtime has it, as bytes cut at the
        # first zero byte (a C string): only a whole 16 bytes can be trusted.
        raw = bytes(_require_cupy().cuda.runtime.getDeviceProperties(index).get("uuid", b""))
        if len(raw) != 16:
            raise GpuUnavailable(f"cuda:{index}: cannot read the GPU's UUID with torch "
                                 f"{torch.__version__} (torch 2.4 or newer can)")
        h = raw.hex()
        uuid = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return uuid if uuid.startswith(("GPU-", "MIG-")) else "GPU-" + uuid


def _ipc_open(handle: bytes, size: int, device_index: int) -> tuple[int, torch.Tensor]:
    """Open an IPC handle on a device: its pointer and a uint8 tensor over ``size`` bytes."""
    cupy = _require_cupy()
    torch = require_torch()
    # torch's guard, not cupy.cuda.Device: cupy's __exit__ sets the previous device again
    # unconditionally, which creates a context (hundreds of MiB) on a GPU this process
    # may never use
    with torch.cuda.device(device_index):
        try:
            ptr = int(cupy.cuda.runtime.ipcOpenMemHandle(handle))
        except cupy.cuda.runtime.CUDARuntimeError as e:
            raise GpuUnavailable(
                f"cannot open the daemon's CUDA IPC handle on cuda:{device_index}: {e}. The "
                "daemon and this process must see the same GPU and share an IPC namespace "
                "(containers: --ipc=host or a shared pod IPC namespace)") from e
        try:
            mem = cupy.cuda.UnownedMemory(ptr, size, handle, device_index)
            array = cupy.ndarray((size,), dtype=cupy.uint8,
                                 memptr=cupy.cuda.MemoryPointer(mem, 0))
            tensor = torch.from_dlpack(array)
        except BaseException:
            cupy.cuda.runtime.ipcCloseMemHandle(ptr)
            raise
    return ptr, tensor


def _ipc_close(ptr: int, device_index: int) -> None:
    """Close an opened handle, after every kernel of this process on the device is done."""
    cupy = _require_cupy()
    torch = require_torch()
    torch.cuda.synchronize(device_index)
    with torch.cuda.device(device_index):
        cupy.cuda.runtime.ipcCloseMemHandle(ptr)


def open_shard(handle: bytes, size: int, device_index: int) -> torch.Tensor:
    """The device buffer behind an IPC handle, as a uint8 tensor; opened once per process.

    Each call takes one reference, given back by :func:`close_shard`.

    Args:
        handle: the ``cudaIpcMemHandle_t`` bytes the daemon sent.
        size: bytes of the buffer to view.
        device_index: this process's index of the device the daemon named.

    Returns:
        A 1-D uint8 tensor of ``size`` bytes on ``cuda:device_index``; the same tensor
        for every call with the same handle while it is open.

    Raises:
        GpuUnavailable: cupy is missing, the handle cannot be opened (different IPC
            namespace, another GPU), or it is already open on another device.
        FormatError: the handle is not a CUDA IPC handle, or ``size`` is larger than
            the size it was opened with.
    """
    if len(handle) != IPC_HANDLE_BYTES:
        raise FormatError("<cuda>", f"an IPC handle has {IPC_HANDLE_BYTES} bytes, "
                                    f"got {len(handle)}")
    if size <= 0:
        raise FormatError("<cuda>", f"cannot open a {size}-byte device buffer")
    with _lock:
        opened = _opened.get(handle)
        if opened is None:
            ptr, tensor = _ipc_open(handle, size, device_index)
            opened = _opened[handle] = _Opened(ptr, size, device_index, tensor, 0)
        elif opened.device_index != device_index:
            raise GpuUnavailable(f"this IPC handle is open on cuda:{opened.device_index}, "
                                 f"not cuda:{device_index}")
        elif opened.size < size:
            raise FormatError("<cuda>", f"this IPC handle was opened for {opened.size} bytes, "
                                        f"{size} asked now")
        opened.refs += 1
        return opened.tensor  # type: ignore[no-any-return]


def close_shard(handle: bytes) -> None:
    """Give back one reference taken by :func:`open_shard`; close the handle at the last.

    See Note [CUDA tensors and release]: once closed, tensors over the buffer are invalid.

    Raises:
        KeyError: the handle is not open in this process.
    """
    with _lock:
        opened = _opened.get(handle)
        if opened is None:
            raise KeyError("this CUDA IPC handle is not open in this process")
        opened.refs -= 1
        if opened.refs > 0:
            return
        del _opened[handle]
    _ipc_close(opened.ptr, opened.device_index)


def opened_handles() -> dict[bytes, int]:
    """The handles open in this process and how many references each has."""
    with _lock:
        return {h: o.refs for h, o in _opened.items()}


def shard_handles(response: pb.AcquireResponse) -> list[bytes]:
    """The distinct IPC handles of a CUDA answer, in shard order."""
    out: list[bytes] = []
    for shard in response.shards:
        if shard.ipc_handle and shard.ipc_handle not in out:
            out.append(bytes(shard.ipc_handle))
    return out


def release_shards(handles: list[bytes]) -> None:
    """:func:`close_shard` each handle (what :func:`build_cuda_tensors` opened), even if
    one fails; the first error is raised after the others were closed."""
    first: BaseException | None = None
    for handle in handles:
        try:
            close_shard(handle)
        except Exception as e:  # noqa: BLE001 - close the rest, then report
            log.warning("closing a CUDA IPC handle failed: %s", e)
            first = first or e
    if first is not None:
        raise first


def build_cuda_tensors(response: pb.AcquireResponse,
                       device_index: int) -> dict[str, torch.Tensor]:
    """Views of the daemon's device buffers: zero copies (see Note [CUDA tensors and release]).

    Opens every distinct handle of the answer once (one reference each: give them back
    with ``release_shards(shard_handles(response))`` when the model is released).

    Args:
        response: an answer on the CUDA tier: every shard has an ``ipc_handle``, the
            ``device_uuid`` of this process's device ``device_index`` and a
            ``device_offset``; every tensor an absolute byte ``offset`` in its shard file.
        device_index: this process's index of the device the client asked for.

    Returns:
        Tensor name → tensor on ``cuda:device_index``, in the order of
        ``response.tensors``.

    Raises:
        GpuUnavailable: cupy is missing, the answer is for another device, or a handle
            cannot be opened.
        FormatError: the answer is inconsistent (unknown shard or dtype, a length that
            does not match the shape, bytes outside the shard, a name twice).
        ImportError: torch is not installed.
    """
    th = require_torch()
    where = response.model or "<acquire>"
    extents: dict[bytes, int] = {}  # handle -> bytes to open: the furthest shard end
    local_uuid: str | None = None
    for shard in response.shards:
        name = shard.relpath or where
        if len(shard.ipc_handle) != IPC_HANDLE_BYTES:
            raise FormatError(name, "the daemon sent no CUDA IPC handle for this shard")
        if shard.device_offset < 0 or shard.size <= 0:
            raise FormatError(name, f"bad device range: offset {shard.device_offset}, "
                                    f"{shard.size} bytes")
        if shard.device_uuid:
            local_uuid = local_uuid or _local_uuid(device_index)
            if shard.device_uuid != local_uuid:
                raise GpuUnavailable(
                    f"{name}: the daemon answered for {shard.device_uuid}, but "
                    f"cuda:{device_index} of this process is {local_uuid}")
        handle = bytes(shard.ipc_handle)
        extents[handle] = max(extents.get(handle, 0), shard.device_offset + shard.size)
    buffers: dict[bytes, torch.Tensor] = {}
    try:
        for handle, extent in extents.items():
            buffers[handle] = open_shard(handle, extent, device_index)
        shard_bytes = [buffers[bytes(s.ipc_handle)][s.device_offset:s.device_offset + s.size]
                       for s in response.shards]
        return _view_tensors(th, response, shard_bytes)
    except BaseException:
        release_shards(list(buffers))
        raise


def _local_uuid(device_index: int) -> str:
    return cuda_uuid(device_index)


def _view_tensors(th: ModuleType, response: pb.AcquireResponse,
                  shard_bytes: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    names = [shard.relpath or response.model or "<shard>" for shard in response.shards]
    sizes = [raw.numel() for raw in shard_bytes]
    for t, dtype, shape, numel in checked_tensors(response, sizes, names, unit="shard"):
        shard, raw, path = response.shards[t.shard], shard_bytes[t.shard], names[t.shard]
        itemsize = dtype.itemsize
        nbytes = numel * itemsize
        if numel == 0:
            out[t.name] = th.empty(shape, dtype=dtype, device=raw.device)
            continue
        piece = raw[t.offset:t.offset + nbytes]
        if (shard.device_offset + t.offset) % itemsize:
            # Deliberate copy: a misaligned tensor cannot be viewed as its dtype (torch
            # refuses, and CUDA kernels need aligned pointers); one copy on the device.
            log.debug("%s: tensor %r at offset %d is not aligned to %d bytes: copied on %s",
                      path, t.name, t.offset, itemsize, raw.device)
            piece = piece.clone()
        out[t.name] = piece.view(dtype).view(shape)
    return out
