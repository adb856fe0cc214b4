"""The ``weightd`` model loader class for vLLM (imports vLLM; see
:mod:`weightd_client.integrations.vllm` for what it does and its options).

It is vLLM's :class:`DefaultModelLoader` with another source of weights: vLLM's own steps
(model creation, the expert-parallel and encoder-only filters, ``model.load_weights``
and its check that every parameter was loaded, post-processing) run unchanged, and
:meth:`WeightdModelLoader.get_all_weights` yields the daemon's tensors instead of
reading files. That method is also what ``reload_weights`` calls.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.weight_utils import filter_safetensors_files_by_weight_name
from vllm.platforms import current_platform

from weightd_client.client import Client, default_socket
from weightd_client.errors import DaemonUnavailable
from weightd_client.integrations._weights import choose_device, leased_weights, resolve_source
from weightd_client.integrations.vllm import LOAD_FORMAT, LoaderOptions

__all__ = ["WeightdModelLoader"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Plan:
    """What one load asks of the daemon."""

    source: str
    #: "cpu", or this rank's GPU when the daemon holds the model there
    device: str
    #: the tensors vLLM's default loader would read from the model directory (None: all
    #: of the model's tensors)
    names: frozenset[str] | None


class WeightdModelLoader(DefaultModelLoader):
    """``--load-format weightd``: vLLM's default loader, with weights from the daemon.

    Args:
        load_config: vLLM's load config; its ``model_loader_extra_config`` holds the
            options (:class:`~weightd_client.integrations.vllm.LoaderOptions`).

    Raises:
        ValueError: an unknown option or a bad value (named in the message).
    """

    def __init__(self, load_config: LoadConfig) -> None:
        self.options = LoaderOptions.from_extra_config(load_config.model_loader_extra_config)
        self.weightd_load_config = load_config
        # The inherited steps (and the fallback, which is vLLM's default loader reading
        # the model directory) see vLLM's default load format and none of our options,
        # which DefaultModelLoader would refuse.
        super().__init__(dataclasses.replace(load_config, load_format="auto",
                                             model_loader_extra_config={}))

    # vLLM's API ----------------------------------------------------------------------

    def download_model(self, model_config: ModelConfig) -> None:
        """Fetch the model into the node's cache through the daemon (and pin it when
        ``pin`` is set); without a daemon, what vLLM's default loader does."""
        try:
            with self._client() as client:
                source, _ = resolve_source(client, model_config.model, self.options.source)
                path = client.fetch(source)
                self._pin(client, source)
        except DaemonUnavailable as e:
            if not self.options.fallback:
                raise
            log.warning("weightd daemon unreachable (%s): vLLM's default loader prepares %s",
                        e, model_config.model)
            super().download_model(model_config)
            return
        log.info("weightd: %s is in the node's cache at %s", source, path)

    def get_all_weights(self, model_config: ModelConfig,
                        model: nn.Module) -> Generator[tuple[str, torch.Tensor], None, None]:
        """The model's ``(name, tensor)`` pairs, views of the daemon's memory.

        The lease is held while vLLM consumes the pairs and released when the generator
        ends (or is closed): vLLM copies each tensor into its own parameters.
        """
        self.counter_before_loading_weights = time.perf_counter()
        started = False
        try:
            with self._client() as client:
                plan = self._plan(client, model_config, model)
                self._pin(client, plan.source)
                with leased_weights(client, plan.source, plan.device,
                                    names=plan.names) as weights:
                    for pair in weights:
                        started = True
                        yield pair
        except DaemonUnavailable as e:
            # unreachable before the first tensor (at List, Pin or Acquire): without it
            if started or not self.options.fallback:
                raise
            yield from self._fallback_weights(model_config, model, e)
            return
        yield from self._secondary_weights(model)

    # the daemon ----------------------------------------------------------------------

    def _client(self) -> Client:
        kwargs: dict[str, Any] = {"name": f"vllm pid {os.getpid()}"}
        if self.options.timeout is not None:
            kwargs["timeout"] = self.options.timeout
        return Client(self.options.socket, **kwargs)

    def _pin(self, client: Client, source: str) -> None:
        if self.options.pin:
            model = client.pin(source, tier=self.options.pin)
            log.info("weightd: %s pinned on the %s tier (%s)", source, self.options.pin, model)

    def _plan(self, client: Client, model_config: ModelConfig, model: nn.Module) -> _Plan:
        source, info = resolve_source(client, model_config.model, self.options.source)
        files, every = self._weight_files(model_config, model)
        names = frozenset(_tensor_names(files)) if files and set(files) != every else None
        return _Plan(source=source, device=choose_device(info, self._cuda_index()),
                     names=names)

    def _cuda_index(self) -> int | None:
        """This rank's CUDA device when vLLM loads onto CUDA, else None."""
        if not current_platform.is_cuda_alike() or not torch.cuda.is_available():
            return None
        target = self.weightd_load_config.device  # None: the platform's device
        device = torch.device(target) if target is not None else None
        if device is not None and device.type != "cuda":
            return None
        if device is not None and device.index is not None:
            return device.index
        return torch.cuda.current_device()  # vLLM set it to this rank's GPU

    def _weight_files(self, model_config: ModelConfig,
                      model: nn.Module) -> tuple[list[str], set[str]]:
        """The shards vLLM's default loader would read from the model directory (none when
        it holds no weights), and every ``.safetensors`` file under it."""
        model_dir = model_config.model
        if not os.path.isdir(model_dir):
            return [], set()
        try:
            _, files, use_safetensors, _ = self._prepare_weights(
                model_dir, None, model_config.revision,
                getattr(model, "fall_back_to_pt_during_load", True),
                getattr(model, "allow_patterns_overrides", None))
        except RuntimeError:  # "Cannot find any model weights": the source has them
            return [], set()
        if not use_safetensors:
            raise ValueError(
                f"--load-format {LOAD_FORMAT}: weightd serves safetensors shards, and vLLM "
                f"would load {model_dir} from {', '.join(sorted(map(os.path.basename, files)))}"
                "; use vLLM's default loader for this model")
        is_unused = getattr(model, "is_unused_checkpoint_weight", None)
        if is_unused is not None:
            files = filter_safetensors_files_by_weight_name(files, is_unused)
        every = {str(p) for p in Path(model_dir).rglob("*.safetensors")}
        return [str(f) for f in files], every

    def _secondary_weights(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Other checkpoints a model loads besides its own (vLLM's ``secondary_weights``),
        read by vLLM's default steps as without weightd."""
        for source in cast(Iterable[DefaultModelLoader.Source],
                           getattr(model, "secondary_weights", ())):
            yield from self._get_weights_iterator(source)

    def _fallback_weights(self, model_config: ModelConfig, model: nn.Module,
                          error: DaemonUnavailable) -> Iterator[tuple[str, torch.Tensor]]:
        """Without the daemon: vLLM's default loader on the model directory, or the
        source read straight (weightd_client's fallback) when the directory holds no
        weights."""
        files, _ = self._weight_files(model_config, model)
        if files:
            log.warning("weightd daemon unreachable (%s): vLLM's default loader reads %s",
                        error, model_config.model)
            yield from super().get_all_weights(model_config, model)
            return
        source = self.options.source or model_config.model
        log.warning("weightd daemon unreachable (%s): loading %s straight from the source",
                    error, source)
        from weightd_client._direct import load_direct

        got = load_direct(source, socket=self.options.socket or default_socket())
        yield from got.tensors.items()
        yield from self._secondary_weights(model)


def _tensor_names(files: Iterable[str]) -> set[str]:
    """The tensor names in safetensors files (their headers only)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        with safe_open(f, framework="pt") as st:
            names.update(st.keys())  # noqa: SIM118 (safe_open is not a Mapping)
    return names
