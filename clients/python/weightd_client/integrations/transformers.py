"""A transformers model from a weightd load, in one call.

:func:`from_weightd` leases a model from the node's daemon and builds it: the class
named by ``config.architectures`` (the model's own ``config.json``, from the snapshot),
in the checkpoint's dtype, its parameters the very tensors the daemon serves (views of
its resident pages on the host: nothing is copied), the buffers a checkpoint does not
hold (``position_ids``, rotary ``inv_freq``...) computed as the model's constructor
computes them. :func:`build_model` does the same from a load already made.

Example
-------
>>> from weightd_client.integrations.transformers import from_weightd
>>> model = from_weightd("s3://bucket/models/all-MiniLM-L6-v2")      # doctest: +SKIP
>>> model.weightd_weights.snapshot_path     # tokenizer files live there  # doctest: +SKIP

sentence-transformers takes a directory, and the snapshot is one: its parameters then
map the cached files (the same page-cache pages as the daemon's), without a lease:

>>> import weightd_client
>>> from sentence_transformers import SentenceTransformer
>>> st = SentenceTransformer(weightd_client.fetch("s3://bucket/models/minilm"))  # doctest: +SKIP

transformers (and torch) come from the model server's environment; this module imports
them when it is used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from weightd_client.client import Fallback, LoadedModel, load

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["architecture_class", "build_model", "from_weightd"]


def architecture_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers class that ``config.architectures`` names.

    Args:
        config: the model's config (``AutoConfig.from_pretrained(snapshot_path)``).

    Returns:
        The class, e.g. ``transformers.BertModel`` for all-MiniLM-L6-v2.

    Raises:
        ValueError: the config names no architecture, or one transformers does not
            have (pass ``model_class=`` to :func:`build_model` then).
    """
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    if not names:
        raise ValueError(f"the {config.model_type!r} config names no architectures: pass "
                         "model_class= (e.g. transformers.AutoModel's class for it)")
    cls = getattr(transformers, names[0], None)
    if not isinstance(cls, type):
        raise ValueError(f"config.architectures names {names[0]!r}, which transformers "
                         f"{transformers.__version__} does not have: pass model_class=")
    return cls


def _weights_dtype(weights: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The floating dtype holding most of the bytes (the checkpoint's dtype)."""
    counts: dict[torch.dtype, int] = {}
    for t in weights.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel() * t.element_size()
    return max(counts, key=lambda d: counts[d]) if counts else None


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside have their parameters on the meta device (no memory, no
    initialisation) and their buffers real, computed by their constructors (what
    accelerate's ``init_empty_weights(include_buffers=False)`` does). The patch of
    ``Module.register_parameter`` is process-wide while the block runs."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        p = module._parameters[name]
        if p is not None:
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def _rebuild_buffers(model: PreTrainedModel, config: PretrainedConfig) -> None:
    """Set every buffer that is not in a checkpoint (non-persistent: ``position_ids``,
    rotary ``inv_freq``, masks...) to the value the model's constructor gives it.

    ``from_pretrained`` builds on the meta device and leaves those buffers to each
    model's ``_init_weights``; a model whose ``_init_weights`` does not know a buffer
    (remote code, older models) is left with uninitialised memory. One more
    construction, with parameters on meta, costs no weight memory and computes every
    buffer as the model's code does, whatever the model.
    """
    import torch

    previous = torch.get_default_dtype()
    if model.dtype.is_floating_point:
        torch.set_default_dtype(model.dtype)  # as from_pretrained constructs
    try:
        with _parameters_on_meta():
            fresh = type(model)(config)
    finally:
        torch.set_default_dtype(previous)
    for prefix, module in fresh.named_modules():
        target = model.get_submodule(prefix)
        for name in module._non_persistent_buffers_set:
            value = module._buffers.get(name)
            current = target._buffers.get(name)
            if value is None or current is None:
                continue
            target._buffers[name] = value.to(device=current.device, dtype=current.dtype)


def build_model(
    weights: Mapping[str, torch.Tensor],
    *,
    config: PretrainedConfig | str | os.PathLike[str] | None = None,
    model_class: type[PreTrainedModel] | None = None,
    dtype: torch.dtype | None = None,
    **from_pretrained: Any,
) -> PreTrainedModel:
    """Build a transformers model whose parameters are ``weights`` themselves.

    Args:
        weights: a :class:`~weightd_client.LoadedModel` (its snapshot has the config), or
            any mapping of checkpoint names to tensors (then ``config`` is needed).
        config: the model's config, or the directory holding its ``config.json``
            (default: the load's snapshot directory).
        model_class: the class to build (default: the one ``config.architectures``
            names, :func:`architecture_class`).
        dtype: the model's dtype (default: the checkpoint's, so that nothing is
            converted; another dtype converts, and so copies, each tensor).
        **from_pretrained: passed on to ``model_class.from_pretrained``.

    Returns:
        The model, in eval mode; for a :class:`~weightd_client.LoadedModel`, the load
        is kept as ``model.weightd_weights`` (its lease lasts while the client is open).

    Raises:
        ValueError: no config, an unknown architecture, or tensors left unloaded.
        ImportError: transformers is not installed.
    """
    from transformers import AutoConfig

    if config is None:
        snapshot = getattr(weights, "snapshot_path", None)
        if not snapshot or not os.path.isdir(snapshot):
            raise ValueError("build_model needs config= (a PretrainedConfig or the "
                             "directory of the model's config.json): the weights name no "
                             "local snapshot directory")
        config = snapshot
    cfg: PretrainedConfig = (AutoConfig.from_pretrained(os.fspath(config))
                             if isinstance(config, str | os.PathLike) else config)
    cls = model_class or architecture_class(cfg)
    if dtype is None:
        dtype = _weights_dtype(weights)
    model = cls.from_pretrained(None, config=cfg, state_dict=dict(weights), dtype=dtype,
                                **from_pretrained)
    _rebuild_buffers(model, model.config)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{cls.__name__}: the checkpoint has no values for {left[:5]}"
                         f"{' ...' if len(left) > 5 else ''}")
    if isinstance(weights, LoadedModel):
        # a plain attribute (nn.Module's __setattr__ is typed for tensors and modules)
        object.__setattr__(model, "weightd_weights", weights)
    return model.eval()


def from_weightd(
    source: str | os.PathLike[str],
    *,
    fallback: Fallback = True,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    config: PretrainedConfig | str | os.PathLike[str] | None = None,
    model_class: type[PreTrainedModel] | None = None,
    dtype: torch.dtype | None = None,
    **from_pretrained: Any,
) -> PreTrainedModel:
    """Load a model through the node's daemon and build it with transformers, on the CPU
    (for a GPU: ``build_model(client.load(source, "cuda"))``, not tested here).

    Args:
        source: the model reference (URL or local path), as for
            :func:`weightd_client.load`.
        fallback: as for :func:`weightd_client.load` (True: straight from the source,
            with a warning, when the daemon is unreachable).
        include: globs of files to take from a directory source.
        exclude: globs of files to leave out.
        config, model_class, dtype, from_pretrained: as for :func:`build_model`.

    Returns:
        The model; ``model.weightd_weights`` is the load (``.snapshot_path`` has the
        tokenizer; ``.release()`` ends the lease).

    Raises:
        WeightdError: as :func:`weightd_client.load` raises.
        ValueError: as :func:`build_model` raises.
    """
    weights = load(source, "cpu", fallback=fallback, include=include, exclude=exclude)
    try:
        return build_model(weights, config=config, model_class=model_class, dtype=dtype,
                           **from_pretrained)
    except BaseException:
        weights.release()
        raise
