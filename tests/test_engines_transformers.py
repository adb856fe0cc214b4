"""transformers and sentence-transformers on weights from weightd
(weightd_client.integrations.transformers): the shipped all-MiniLM-L6-v2 built in one
call, bitwise equal to transformers' own loading, its parameters the daemon's pages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess

HERE = Path(__file__).resolve().parent
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.test_real_model import MODEL_DIR, run_worker  # noqa: E402
from weightd_client.integrations.transformers import (  # noqa: E402
    architecture_class,
    build_model,
)


@pytest.mark.slow
def test_minilm_from_the_helper_is_transformers_own_model_on_the_daemons_pages(tmp_path):
    daemon = DaemonProcess(tmp_path)
    try:
        got = run_worker("weightd", str(MODEL_DIR), env={"WEIGHTD_SOCKET": str(daemon.socket)})
    finally:
        assert daemon.stop() == 0, daemon.log()
    want = run_worker("direct", str(MODEL_DIR), env={})
    # bit for bit what AutoModel.from_pretrained(dir) computes, in the checkpoint's dtype
    assert got["hex"] == want["hex"]
    assert got["dtype"] == "torch.float32"
    assert got["lease"]
    # every parameter is one of the lease's tensors, and lies in a mapping of a blob
    # the daemon keeps resident: nothing was copied
    blobs = str(daemon.cache_dir / "blobs") + os.sep
    assert got["shared_params"] == got["params"] == len(got["files"]) > 100
    assert all(f.startswith(blobs) for f in got["files"]), set(got["files"])
    # sentence-transformers on the snapshot directory: the same embeddings as on the
    # package's directory, its parameters mapping the cache's blobs too
    assert got["st_hex"] == want["st_hex"]
    assert all(f.startswith(blobs) for f in got["st_files"]), set(got["st_files"])


class ToyConfig(transformers.PretrainedConfig):
    model_type = "weightd-toy"

    def __init__(self, hidden: int = 8, positions: int = 16, **kwargs: object) -> None:
        self.hidden = hidden
        self.positions = positions
        super().__init__(**kwargs)


class ToyModel(transformers.PreTrainedModel):
    """A model from outside transformers (remote code): a buffer computed in its
    constructor, which its ``_init_weights`` does not know about."""

    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.proj = torch.nn.Linear(config.hidden, config.hidden)
        self.register_buffer("scale", torch.linspace(1.0, 2.0, config.positions),
                             persistent=False)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass


def test_buffers_missing_from_the_checkpoint_are_the_constructors_values():
    weights = {"proj.weight": torch.randn(8, 8), "proj.bias": torch.randn(8)}
    model = build_model(weights, config=ToyConfig(), model_class=ToyModel)
    assert torch.equal(model.scale, torch.linspace(1.0, 2.0, 16))
    assert model.proj.weight.data_ptr() == weights["proj.weight"].data_ptr()  # no copy


def test_the_class_comes_from_config_architectures_or_a_clear_refusal():
    assert architecture_class(transformers.BertConfig(architectures=["BertModel"])) is \
        transformers.BertModel
    with pytest.raises(ValueError, match="NoSuchModel.*model_class="):
        architecture_class(transformers.BertConfig(architectures=["NoSuchModel"]))
    with pytest.raises(ValueError, match="config= .*no local snapshot"):
        build_model({"w": torch.zeros(1)})


def test_the_readme_snippet_runs_on_the_shipped_minilm(tmp_path):
    readme = (HERE.parent / "README.md").read_text()
    block = next(b for b in readme.split("```python\n")[1:] if "from_weightd" in b)
    code = block.split("```", 1)[0]
    expected = code.split("print(", 1)[1].split("# ", 1)[1].splitlines()[0].strip()
    daemon = DaemonProcess(tmp_path)
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                "WEIGHTD_SOCKET": str(daemon.socket)})
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == expected
    assert "Acquire " in daemon.log()  # through the daemon, not the fallback
