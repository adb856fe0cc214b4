"""What an engine's loader asks of the daemon, without the engine: which source a model
directory stands for, which tier to read from, and the leased ``(name, tensor)`` pairs,
streamed as they land.

The vLLM loader (:mod:`._vllm_loader`) is built on these; they import no engine, so they
are tested on their own (tests/test_engines_weights.py, and on a GPU the CUDA tier).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

from weightd_client.client import TIER_NAMES, Client, device_to_wire
from weightd_client.errors import GpuUnavailable

if TYPE_CHECKING:
    import torch

    from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
    from weightd_client.streaming import StreamedModel

__all__ = ["choose_device", "leased_weights", "resolve_source"]

log = logging.getLogger(__name__)

#: Per process: the model directory each explicit source was first given with, so that
#: a later load of another directory (vLLM's ``reload_weights(weights_path=...)``) is
#: that directory's weights, not the first source again.
_source_dirs: dict[str, str] = {}
_source_dirs_lock = threading.Lock()


def _same_source(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def resolve_source(client: Client, model_dir: str, source: str | None = None,
                   ) -> tuple[str, pb.ModelInfo | None]:
    """The source a model directory stands for, and what the daemon knows of it.

    Args:
        client: the daemon's client.
        model_dir: the directory the engine was given (config, tokenizer, maybe weights).
        source: the source named explicitly for ``model_dir`` (an option), if any.

    Returns:
        ``(source, info)``: ``source`` when it was given with this directory; else the
        source of the daemon's snapshot that ``model_dir`` is (what ``weightd fetch``
        printed); else ``model_dir`` itself (a local model, which the daemon caches).
        ``info`` is the daemon's ``ModelInfo`` of that source (None if it has none yet).

    Raises:
        DaemonUnavailable: the daemon is unreachable.
    """
    models = client.list()
    here = os.path.realpath(model_dir)
    if source is not None:
        with _source_dirs_lock:
            given_with = _source_dirs.setdefault(source, here)
        if given_with == here:
            return source, next((m for m in models if _same_source(m.source, source)), None)
    for m in models:
        if m.snapshot_path and os.path.realpath(m.snapshot_path) == here:
            return str(m.source), m
    for m in models:
        if _same_source(m.source, "file://" + here):
            return model_dir, m
    return model_dir, None


def choose_device(info: pb.ModelInfo | None, cuda_index: int | None) -> str:
    """Where to read the weights: the engine's GPU when the daemon holds the model in its
    CUDA tier on that very GPU (CUDA IPC views, a device-to-device copy), else the host
    tier. A model only on the host is never loaded onto a GPU for this: the daemon's
    copy there would cost the engine's GPU memory.

    Args:
        info: the daemon's ``ModelInfo`` (None: it does not have the model yet).
        cuda_index: the engine's CUDA device index in this process (None: not on CUDA).

    Returns:
        ``"cuda:<index>"`` or ``"cpu"``.
    """
    if info is None or cuda_index is None:
        return "cpu"
    wire = device_to_wire(f"cuda:{cuda_index}")
    if any(TIER_NAMES.get(r.tier) == "cuda" and r.device == wire for r in info.resident):
        return f"cuda:{cuda_index}"
    return "cpu"


@contextmanager
def leased_weights(client: Client, source: str, device: str = "cpu", *,
                   names: Collection[str] | None = None,
                   ) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
    """The model's ``(name, tensor)`` pairs as they land, then while a lease holds them.

    The pairs come from :meth:`Client.stream`: while the daemon downloads the model,
    each tensor as soon as its bytes are written (the engine copies one while the next
    is on the wire); a model the daemon has is yielded at once. The tensors are views
    of the daemon's memory (host pages, or CUDA IPC buffers); consume and copy them
    inside the block: the lease ends when it exits, and CUDA views are invalid after
    that (host views stay readable, but may be evicted from RAM). A digest that does
    not match at the end raises IntegrityError from the iterator: the engine's load
    fails (see Note [streamed tensors are verified at the end] in
    :mod:`weightd_client.streaming`).

    Args:
        client: the daemon's client.
        source: the model reference.
        device: ``"cpu"`` or ``"cuda:<index>"`` (:func:`choose_device`); a CUDA device
            the daemon cannot serve falls back to the host tier (logged).
        names: only these tensors (None: all).

    Yields:
        An iterator of ``(name, tensor)``, in the order their bytes land.

    Raises:
        DaemonUnavailable, SourceNotFound, ...: as :meth:`Client.stream` raises (the
        daemon's errors while iterating).
    """
    wanted: Callable[[str], bool] = (lambda _: True) if names is None else names.__contains__
    # On release the client synchronizes the device before it closes the IPC handles,
    # so copies the engine queued out of the daemon's buffers finish first.
    try:
        weights = client.stream(source, device)
    except GpuUnavailable as e:  # this process sees no such GPU
        if device == "cpu":
            raise
        log.info("weightd cannot serve %s on %s (%s): reading the host tier", source, device, e)
        weights, device = client.stream(source, "cpu"), "cpu"
    with ExitStack() as leases:  # the stream's lease, and the host tier's if it falls back
        leases.enter_context(weights)
        log.info("%s from the weightd daemon, streamed to %s", source, device)
        yield _host_if_no_gpu(client, source, device, weights, wanted, leases)


def _host_if_no_gpu(client: Client, source: str, device: str, weights: StreamedModel,
                    wanted: Callable[[str], bool], leases: ExitStack,
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """The wanted pairs; a CUDA device the daemon cannot serve is read from the host tier
    instead (before any pair: the daemon answers a GPU whole, at the end), under a lease
    that ends with ``leases``."""
    try:
        for name, tensor in weights:
            if wanted(name):
                yield name, tensor
    except GpuUnavailable as e:
        if device == "cpu":
            raise
        log.info("weightd cannot serve %s on %s (%s): reading the host tier", source, device, e)
        host = leases.enter_context(client.stream(source, "cpu"))
        yield from ((n, t) for n, t in host if wanted(n))
