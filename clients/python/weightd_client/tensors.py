"""Turning an Acquire answer into torch tensors that are views of the daemon's pages.

This module owns the tensor side of the client: the safetensors → torch dtype table,
mapping the shard files the daemon keeps resident, and viewing each tensor in place.
It talks to no daemon (the client does) and imports torch only when tensors are built,
so ``import weightd_client`` works without torch.

Note [lifetime of host tensors]
-------------------------------
For the host tier the daemon answers with, for each shard, the path of its blob file
(which the daemon keeps mapped and resident) and, for each tensor, its absolute byte
offset in that file. The client maps each file once per acquire with ``MAP_PRIVATE``
and ``PROT_READ | PROT_WRITE``:

* Reading a page maps the very page-cache page the daemon keeps resident: N replicas
  of a model cost one copy of host memory, and attaching is a few syscalls however
  large the model is (pages are faulted in lazily, on first touch; ``MAP_POPULATE``
  is deliberately not used: on a writable private mapping it would copy every page).
* Writing a tensor (``model.half_()``, an in-place fused op...) copies only the
  touched pages into this process (copy-on-write); the blob file and the other
  processes never see the write. The mapping is writable so that torch builds
  ordinary, writable tensors and warns about nothing.
* Each tensor is ``torch.frombuffer(mapping, ...)``: its storage holds a reference to
  the ``mmap`` object, so the mapping lives as long as any tensor (or view of one)
  does and is unmapped when the last one is freed. torch holds a reference, not a
  buffer export, so ``mmap.close()`` would succeed and leave the tensors dangling:
  nothing here ever closes a mapping; dropping the references is the only way out.
* Releasing the lease tells the daemon this process no longer needs the model to be
  resident, so it may evict it. Tensors still alive stay valid: blob files are
  immutable and only ever deleted by the cache's gc, and unlinking a file (or the
  daemon unmapping it) does not invalidate an existing mapping; at worst their pages
  are read from disk again. The lease is about residency, not about validity.
* A private writable mapping is charged to the commit limit for its whole size; with
  ``vm.overcommit_memory=2`` a very large model may need a larger ``CommitLimit``.

Note [CUDA tier]
----------------
An answer on the CUDA tier (``Tier.TIER_CUDA``: per shard an IPC handle, device UUID
and offset) is built by :mod:`weightd_client.cuda` behind :func:`build_tensors`: one
cache of opened handles keyed by handle, uint8 buffers through DLPack viewed as each
dtype. Unlike host tensors, CUDA tensors are invalid after release (see Note [CUDA
tensors and release] there).
"""

from __future__ import annotations

import logging
import math
import mmap
import os
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client.errors import FormatError, GpuUnavailable

if TYPE_CHECKING:
    import torch

__all__ = [
    "TORCH_INSTALL_HINT",
    "build_host_tensors",
    "build_tensors",
    "checked_tensors",
    "host_tensor",
    "map_shard",
    "open_shard",
    "require_torch",
    "torch_dtype",
]

log = logging.getLogger(__name__)

TORCH_INSTALL_HINT = "pip install 'weightd-client[torch]'"

#: safetensors dtype → name of the torch dtype (an attribute of the ``torch`` module).
#: F8_E8M0 needs a torch that has ``float8_e8m0fnu`` (2.7+); F4, F6_* and the FNUZ
#: float8 variants have no torch equivalent and are refused.
SAFETENSORS_TO_TORCH: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
}


def require_torch() -> ModuleType:
    """Import torch, or explain how to install it.

    Returns:
        The ``torch`` module.

    Raises:
        ImportError: torch is not installed; the message says which extra brings it.
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"weightd_client needs torch to build tensors: {TORCH_INSTALL_HINT}") from e
    return torch


def torch_dtype(dtype: str, *, path: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype string.

    Args:
        dtype: a safetensors dtype, e.g. ``"BF16"``.
        path: the shard the tensor lives in (named in the error).

    Returns:
        The torch dtype, e.g. ``torch.bfloat16``.

    Raises:
        FormatError: the dtype has no torch equivalent (in this torch).
        ImportError: torch is not installed.
    """
    torch = require_torch()
    name = SAFETENSORS_TO_TORCH.get(dtype)
    result = getattr(torch, name, None) if name else None
    if result is None:
        raise FormatError(path, f"dtype {dtype} has no torch equivalent"
                                f"{' in torch ' + torch.__version__ if name else ''}")
    return result  # type: ignore[no-any-return]


def open_shard(path: str, pending: str = "") -> int:
    """Open a shard file the daemon named, read-only: ``path``; while the blob is not
    durable yet, ``pending`` (its temporary file, the same inode) when ``path`` is not
    there yet, then ``path`` once more (the rename may happen between two tries).

    Raises:
        OSError: none of them can be opened (FileNotFoundError: none exists).
    """
    for name in [path, pending] if pending else []:
        try:
            return os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def map_shard(path: str, pending: str = "") -> mmap.mmap:
    """Map a shard file privately (copy-on-write), see Note [lifetime of host tensors].

    Args:
        path: the blob file the daemon named.
        pending: while the blob is not durable yet, the temporary file its bytes are in
            (the same inode, renamed to ``path`` at any moment): tried when ``path`` is
            not there yet, then ``path`` once more.

    Returns:
        A ``MAP_PRIVATE`` mapping of the whole file, readable and writable.

    Raises:
        OSError: the file cannot be opened or mapped.
        FormatError: the file is empty.
    """
    fd = open_shard(path, pending)
    try:
        if os.fstat(fd).st_size == 0:
            raise FormatError(path, "the shard file is empty")
        return mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # the mapping keeps its own reference to the file


def build_tensors(response: pb.AcquireResponse, *,
                  device_index: int | None = None) -> dict[str, torch.Tensor]:
    """Build the tensors of an Acquire answer on the tier it names.

    Args:
        response: the daemon's answer.
        device_index: this process's CUDA device index, for an answer on the CUDA tier.

    Returns:
        Tensor name → tensor, in the order of ``response.tensors``.

    Raises:
        GpuUnavailable: a CUDA answer without a CUDA device here (or without cupy).
        FormatError: the answer is inconsistent (dtype, sizes, offsets out of range).
        OSError: a shard file cannot be opened or mapped.
        ImportError: torch is not installed.
    """
    if response.tier == pb.TIER_CUDA:
        if device_index is None:
            raise GpuUnavailable(f"{response.model}: a CUDA answer needs a CUDA device here")
        from weightd_client.cuda import build_cuda_tensors

        return build_cuda_tensors(response, device_index)
    return build_host_tensors(response)


def build_host_tensors(response: pb.AcquireResponse) -> dict[str, torch.Tensor]:
    """Views of the shard files the daemon keeps resident: zero copies.

    Each file is mapped once (shards with the same path share the mapping) and each
    tensor is a view of its bytes; see Note [lifetime of host tensors].

    Args:
        response: an answer on the host (or disk) tier: every shard has a ``path`` and
            every tensor an absolute byte ``offset`` in its shard's file.

    Returns:
        Tensor name → tensor, in the order of ``response.tensors``.

    Raises:
        FormatError: the answer is inconsistent (unknown shard or dtype, a length that
            does not match the shape, bytes outside the file, a name twice).
        OSError: a shard file cannot be opened or mapped.
        ImportError: torch is not installed.
    """
    th = require_torch()
    mappings: dict[str, mmap.mmap] = {}
    shard_maps: list[mmap.mmap] = []
    for shard in response.shards:
        if not shard.path:
            raise FormatError(shard.relpath or "<shard>",
                              "the daemon named no host file for this shard")
        mm = mappings.get(shard.path)
        if mm is None:
            mm = mappings[shard.path] = map_shard(shard.path, shard.pending_path)
        shard_maps.append(mm)

    out: dict[str, torch.Tensor] = {}
    names = [shard.path for shard in response.shards]
    for t, dtype, shape, numel in checked_tensors(response, [len(m) for m in shard_maps], names,
                                                   unit="file"):
        out[t.name] = host_tensor(th, shard_maps[t.shard], dtype, shape, numel, t.offset)
    return out


def host_tensor(th: ModuleType, mm: mmap.mmap, dtype: torch.dtype, shape: tuple[int, ...],
                numel: int, offset: int) -> torch.Tensor:
    """A view of ``numel`` elements at ``offset`` of a shard's mapping: no copy."""
    if numel == 0:
        # torch.frombuffer refuses count=0; an empty tensor has no bytes to share.
        return th.empty(shape, dtype=dtype)
    # An offset that is not a multiple of the element size (files from old writers)
    # still gives a valid CPU tensor over an unaligned pointer: no copy either.
    return th.frombuffer(mm, dtype=dtype, count=numel, offset=offset).view(shape)


def checked_tensors(
    response: pb.AcquireResponse, sizes: list[int], names: list[str], *, unit: str,
) -> Iterator[tuple[pb.TensorLayout, torch.dtype, tuple[int, ...], int]]:
    """Each tensor of an Acquire answer with its dtype, shape and element count, once it
    is known to fit: the checks the host and the CUDA builders share.

    Args:
        response: the daemon's answer.
        sizes: the bytes of each shard as this process sees it (file or device range).
        names: what to call each shard in an error.
        unit: what a shard is here, in an error ("file", "shard").

    Raises:
        FormatError: an unknown shard or dtype, a negative dimension, a length that does
            not match the shape, bytes outside the shard, a name twice.
    """
    seen: set[str] = set()
    # One lookup per dtype, not per tensor: an answer has hundreds of tensors and a few
    # dtypes, and this loop is on the path of every warm load.
    dtypes: dict[str, tuple[torch.dtype, int]] = {}
    nshards = len(sizes)
    for t in response.tensors:
        shard = t.shard
        if not 0 <= shard < nshards:
            raise FormatError(response.model or "<acquire>",
                              f"tensor {t.name!r} names shard {shard}, the answer has "
                              f"{nshards}")
        path = names[shard]
        name = t.name
        if name in seen:
            raise FormatError(path, f"tensor {name!r} appears twice in the model")
        seen.add(name)
        got = dtypes.get(t.dtype)
        if got is None:
            dtype = torch_dtype(t.dtype, path=path)
            got = dtypes[t.dtype] = (dtype, dtype.itemsize)
        dtype, itemsize = got
        shape = tuple(t.shape)
        if shape and min(shape) < 0:
            raise FormatError(path, f"tensor {name!r} has a negative dimension {shape}")
        numel = math.prod(shape)
        nbytes = numel * itemsize
        if t.length != nbytes:
            raise FormatError(path, f"tensor {name!r}: {t.length} bytes for shape {shape} "
                                    f"of {t.dtype} (expected {nbytes})")
        offset = t.offset
        if offset < 0 or offset + nbytes > sizes[shard]:
            raise FormatError(path, f"tensor {name!r}: bytes {offset}..{offset + nbytes} "
                                    f"lie outside the {unit} ({sizes[shard]} bytes)")
        yield t, dtype, shape, numel
