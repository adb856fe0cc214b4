"""vLLM's model loader plugin: ``vllm serve DIR --load-format weightd``.

vLLM loads every entry point of the ``vllm.general_plugins`` group in each of its
processes (the API server, the engine core, every worker); weightd-client declares
:func:`register` there, which registers the ``weightd`` load format once per process.
Installing the client (``pip install 'weightd-client[vllm]'`` beside vLLM) is all it
takes.

::

    vllm serve "$(weightd fetch s3://bucket/models/llama)" --load-format weightd
    vllm serve /models/llama --load-format weightd \\
        --model-loader-extra-config '{"source": "s3://bucket/models/llama", "pin": "host"}'

vLLM reads the model's config and tokenizer from ``DIR`` (a local directory, as it
always does); the weights come from the node's daemon:

* every worker (each tensor-parallel rank) leases the model from the daemon and hands
  vLLM views of the daemon's resident host pages: no file is read and nothing is
  copied before vLLM's own copy into its parameters (narrowed per rank), so N ranks
  and N replicas on the node read one shared host copy. When the model is resident
  in the daemon's CUDA tier on the rank's own GPU, the views are of that GPU memory
  (CUDA IPC) and vLLM's copy is device to device. The lease ends once the weights are
  loaded; the daemon keeps the model warm for the next replica while it has room.
* which source: the ``source`` option; else the source the daemon fetched when ``DIR``
  is one of its snapshots (what ``weightd fetch`` prints); else ``DIR`` itself, which
  the daemon then caches like any local source (``allowed_sources`` applies).
* when the daemon cannot be reached (and ``fallback`` is on), vLLM's default loader
  reads ``DIR``'s files, or, when ``DIR`` holds no weights, they are read straight
  from the source; one WARNING says so.

Options (``--model-loader-extra-config``, JSON; any other key is refused):

``socket``
    the daemon's socket (default: ``$WEIGHTD_SOCKET``, then the daemon's default).
``source``
    the model's source, when ``DIR`` is not weightd's snapshot of it (e.g. a directory
    holding only config and tokenizer).
``fallback``
    ``true`` (default): load without the daemon when it is unreachable; ``false``:
    fail instead.
``pin``
    ``"host"`` or ``"disk"``: also pin the model on that tier of the node (a warm pool
    that survives daemon restarts), from :meth:`download_model` and every load.
``timeout``
    the deadline of each call to the daemon, in seconds (default 600; a cold fetch of a
    large model inside the first load may need more).

It also works where vLLM composes a loader: ``reload_weights`` (same source, or the
``weights_path`` given) and ``vllm preload --load-format weightd`` (vLLM's own
per-GPU weight cache daemon builds its model with the configured loader).

The vLLM releases it is tested against are :data:`TESTED_VLLM`; on any release outside
:data:`SUPPORTED_VLLM` the load format is still registered, and refuses with a message
naming both versions rather than failing somewhere inside vLLM.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LOAD_FORMAT",
    "PIN_TIERS",
    "SUPPORTED_VLLM",
    "TESTED_VLLM",
    "LoaderOptions",
    "register",
    "vllm_version_problem",
]

log = logging.getLogger(__name__)

#: The name of the load format: ``--load-format weightd``.
LOAD_FORMAT = "weightd"

#: The vLLM releases the end-to-end tests run on (tests/test_engines_vllm.py).
TESTED_VLLM = ("0.32.0",)

#: The release series the loader accepts (major, minor): the vLLM internals it relies
#: on (``DefaultModelLoader``'s weight steps, ``register_model_loader``) are those of
#: the tested releases, and move between minor releases.
SUPPORTED_VLLM = ((0, 32),)

#: What ``pin`` accepts.
PIN_TIERS = ("host", "disk")

_OPTION_TYPES = {"socket": "a path", "source": "a model reference",
                 "fallback": "true or false", "pin": " or ".join(map(repr, PIN_TIERS)),
                 "timeout": "a number of seconds"}

_registered = False


@dataclass(frozen=True)
class LoaderOptions:
    """The loader's options, from ``--model-loader-extra-config``.

    Attributes:
        socket: the daemon's socket (None: :func:`weightd_client.default_socket`).
        source: the model's source (None: found from the model directory).
        fallback: load without the daemon when it is unreachable.
        pin: ``"host"`` / ``"disk"``: pin the model on that tier; None: no pin.
        timeout: the deadline of each daemon call, seconds (None: the client's default).
    """

    socket: str | None = None
    source: str | None = None
    fallback: bool = True
    pin: str | None = None
    timeout: float | None = None

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> LoaderOptions:
        """Check and read the options.

        Args:
            extra: vLLM's ``model_loader_extra_config`` (a dict parsed from JSON).

        Returns:
            The options.

        Raises:
            ValueError: an unknown key, or a value of the wrong type; the message names
                the key and what it takes.

        Example:
            >>> LoaderOptions.from_extra_config({"pin": "host"}).pin
            'host'
        """
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(_OPTION_TYPES))
        if unknown:
            raise ValueError(
                f"--model-loader-extra-config for --load-format {LOAD_FORMAT}: unknown "
                f"key(s) {', '.join(map(repr, unknown))}; the keys are "
                f"{', '.join(sorted(_OPTION_TYPES))}")

        def bad(key: str) -> ValueError:
            return ValueError(
                f"--model-loader-extra-config for --load-format {LOAD_FORMAT}: {key!r} "
                f"must be {_OPTION_TYPES[key]}, got {extra[key]!r}")

        for key in ("socket", "source"):
            if key in extra and (not isinstance(extra[key], str) or not extra[key].strip()):
                raise bad(key)
        if not isinstance(extra.get("fallback", True), bool):
            raise bad("fallback")
        if "pin" in extra and extra["pin"] not in PIN_TIERS:
            raise bad("pin")
        timeout = extra.get("timeout")
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, int | float)
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise bad("timeout")
        return cls(socket=extra.get("socket"), source=extra.get("source"),
                   fallback=extra.get("fallback", True), pin=extra.get("pin"),
                   timeout=float(timeout) if timeout is not None else None)


def vllm_version_problem(version: str) -> str | None:
    """Why this loader refuses a vLLM version, or None when it supports it.

    Args:
        version: ``vllm.__version__`` (e.g. ``"0.32.0"``, ``"0.32.1+cpu"``).

    Returns:
        None for a release of a :data:`SUPPORTED_VLLM` series, else the message.

    Example:
        >>> vllm_version_problem("0.32.0") is None
        True
        >>> print(vllm_version_problem("0.40.1"))  # doctest: +ELLIPSIS
        weightd-client ... supports vLLM 0.32.x (tested: 0.32.0); this is vLLM 0.40.1...
    """
    m = re.match(r"^v?(\d+)\.(\d+)", version.strip())
    if m and (int(m.group(1)), int(m.group(2))) in SUPPORTED_VLLM:
        return None
    from weightd_client import __version__

    series = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
    return (f"weightd-client {__version__}'s --load-format {LOAD_FORMAT} supports vLLM "
            f"{series} (tested: {', '.join(TESTED_VLLM)}); this is vLLM {version}. Install a "
            f"weightd-client that supports it, or load with vLLM's default loader and "
            f'--model "$(weightd fetch SOURCE)" (docs/engines.md)')


def register() -> None:
    """Register the ``weightd`` load format with vLLM (the entry point vLLM calls).

    Idempotent: vLLM calls it in every process it starts, and a second call in the same
    process does nothing. It never raises: a problem is logged, since an exception here
    would stop vLLM even for engines that do not use weightd.
    """
    global _registered
    if _registered:
        return
    try:
        import vllm
        from vllm.model_executor.model_loader import BaseModelLoader, register_model_loader
    except Exception as e:  # noqa: BLE001 - vLLM must start whatever went wrong here
        log.error("weightd: cannot register --load-format %s with this vLLM: %s: %s",
                  LOAD_FORMAT, type(e).__name__, e)
        return
    version = str(getattr(vllm, "__version__", "unknown"))
    problem = vllm_version_problem(version)
    try:
        if problem is None:
            from weightd_client.integrations._vllm_loader import WeightdModelLoader

            register_model_loader(LOAD_FORMAT)(WeightdModelLoader)
        else:
            register_model_loader(LOAD_FORMAT)(_refusing_loader(BaseModelLoader, problem))
    except Exception as e:  # noqa: BLE001 - as above
        log.error("weightd: cannot register --load-format %s with vLLM %s (%s): %s: %s",
                  LOAD_FORMAT, version,
                  problem or f"supported series {SUPPORTED_VLLM}", type(e).__name__, e)
        return
    _registered = True


def _refusing_loader(base: type, problem: str) -> type:
    """A loader class that refuses to load, with ``problem`` as the reason: what an
    unsupported vLLM gets for ``--load-format weightd`` (it needs nothing of vLLM but
    ``BaseModelLoader``, which every release has)."""

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(problem)

    return type("WeightdUnsupportedVllm", (base,), {
        "__init__": refuse, "download_model": refuse, "load_weights": refuse,
        "__doc__": f"Refuses --load-format {LOAD_FORMAT}: {problem}"})
