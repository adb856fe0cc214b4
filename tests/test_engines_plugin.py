"""The vLLM plugin's parts that need no engine: its options, the versions it accepts,
and what it does where vLLM is missing or of another series (the engine itself is in
tests/test_engines_vllm.py)."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from tests.test_boundaries import _imported_after
from weightd_client.integrations import vllm as plugin
from weightd_client.integrations.vllm import LoaderOptions, vllm_version_problem


def test_the_integrations_import_no_engine():
    for module in ("weightd_client.integrations.vllm", "weightd_client.integrations.transformers"):
        assert _imported_after(module, {"vllm", "transformers", "torch"}) == [], module


def test_options_are_read_with_their_defaults():
    assert LoaderOptions.from_extra_config({}) == LoaderOptions()
    got = LoaderOptions.from_extra_config({"socket": "/run/weightd/weightd.sock",
                                           "source": "s3://b/m", "fallback": False,
                                           "pin": "disk", "timeout": 3600})
    assert got == LoaderOptions("/run/weightd/weightd.sock", "s3://b/m", False, "disk", 3600.0)


@pytest.mark.parametrize(("extra", "message"), [
    ({"sokcet": "/x", "mode": 1}, "unknown key(s) 'mode', 'sokcet'; the keys are fallback, "
                                  "pin, socket, source, timeout"),
    ({"fallback": "no"}, "'fallback' must be true or false, got 'no'"),
    ({"pin": "cuda"}, "'pin' must be 'host' or 'disk', got 'cuda'"),
    ({"timeout": 0}, "'timeout' must be a number of seconds, got 0"),
    ({"timeout": True}, "'timeout' must be a number of seconds"),
    ({"source": " "}, "'source' must be a model reference"),
    ({"socket": 3}, "'socket' must be a path, got 3"),
])
def test_a_bad_option_is_refused_by_name(extra, message):
    with pytest.raises(ValueError, match="--model-loader-extra-config for --load-format "
                                         "weightd") as e:
        LoaderOptions.from_extra_config(extra)
    assert message in str(e.value)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.3", "0.32.1+cpu", "v0.32.0rc1"])
def test_the_tested_series_is_accepted(version):
    assert vllm_version_problem(version) is None


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "unknown"])
def test_another_series_gets_the_versions_named(version):
    problem = vllm_version_problem(version)
    assert problem is not None
    assert f"this is vLLM {version}" in problem and "0.32.x (tested: 0.32.0)" in problem


def _fake_vllm(monkeypatch: pytest.MonkeyPatch, version: str) -> dict[str, type]:
    """A stand-in for a vLLM release the tests cannot install: its version and the two
    names the plugin uses to register."""
    registry: dict[str, type] = {}

    class BaseModelLoader:
        def __init__(self, load_config: object) -> None:
            self.load_config = load_config

    def register_model_loader(name: str):  # noqa: ANN202
        def wrap(cls: type) -> type:
            registry[name] = cls
            return cls
        return wrap

    root = types.ModuleType("vllm")
    root.__version__ = version  # type: ignore[attr-defined]
    loader = types.ModuleType("vllm.model_executor.model_loader")
    loader.BaseModelLoader = BaseModelLoader  # type: ignore[attr-defined]
    loader.register_model_loader = register_model_loader  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", root)
    monkeypatch.setitem(sys.modules, "vllm.model_executor",
                        types.ModuleType("vllm.model_executor"))
    monkeypatch.setitem(sys.modules, "vllm.model_executor.model_loader", loader)
    monkeypatch.setattr(plugin, "_registered", False)
    return registry


def test_on_another_vllm_series_the_load_format_refuses_with_the_versions(monkeypatch):
    registry = _fake_vllm(monkeypatch, "0.40.1")
    plugin.register()
    plugin.register()  # idempotent
    assert list(registry) == ["weightd"]
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x \(tested: 0\.32\.0\); "
                                           r"this is vLLM 0\.40\.1"):
        registry["weightd"]({"load_format": "weightd"})


def test_without_vllm_registering_logs_and_never_raises(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    monkeypatch.setattr(plugin, "_registered", False)
    with caplog.at_level(logging.ERROR, logger=plugin.__name__):
        plugin.register()
    assert "cannot register --load-format weightd" in caplog.text
    assert plugin._registered is False
