"""What the engine loaders ask of the daemon, without an engine
(weightd_client.integrations._weights): which source a model directory stands for, which
tier to read, the leased pairs; on a GPU (``gpu``), the CUDA tier's IPC views."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon import DaemonProcess
from weightd.testing import write_tiny_llama
from weightd_client import Client
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client.integrations import _weights
from weightd_client.integrations._weights import choose_device, leased_weights, resolve_source

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    monkeypatch.setattr(_weights, "_source_dirs", {})  # a fresh process's memory
    d = DaemonProcess(tmp_path)
    yield d
    assert d.stop() == 0, d.log()


def test_a_model_directory_stands_for_its_source(tmp_path, daemon):
    model = write_tiny_llama(tmp_path / "llama")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    with Client(daemon.socket) as client:
        # a local model the daemon has never seen: itself
        assert resolve_source(client, str(model)) == (str(model), None)
        snapshot = client.fetch(str(model))
        # the daemon's snapshot of it: the source it came from, with what the daemon knows
        source, info = resolve_source(client, snapshot)
        assert source == f"file://{model}" and info is not None and info.bytes > 0
        # a source named for a directory holds for that directory...
        assert resolve_source(client, str(config_only), "s3://b/m")[0] == "s3://b/m"
        assert resolve_source(client, str(config_only), "s3://b/m")[0] == "s3://b/m"
        # ...and not for another one given later (vLLM's reload_weights(weights_path=))
        assert resolve_source(client, snapshot, "s3://b/m")[0] == f"file://{model}"


def test_the_host_tier_unless_the_engine_is_on_a_gpu_holding_the_model():
    assert choose_device(None, None) == "cpu"
    assert choose_device(None, 0) == "cpu"  # the daemon does not have the model yet


def test_the_leased_pairs_are_the_checkpoints_tensors_and_the_lease_ends(tmp_path, daemon):
    model = write_tiny_llama(tmp_path / "llama")
    want = safetensors_torch.load_file(model / "model.safetensors")
    names = {"lm_head.weight", "model.norm.weight"}
    with Client(daemon.socket) as client:
        with leased_weights(client, str(model)) as pairs:
            got = dict(pairs)
            assert len(daemon.status().leases) == 1
        assert daemon.status().leases == []
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
        with leased_weights(client, str(model), names=names) as pairs:
            assert {n for n, _ in pairs} == names


@pytest.mark.gpu
def test_gpu_a_model_resident_on_the_engines_gpu_is_read_there(tmp_path, daemon):
    from tests.test_cuda_tier import _require_gpu

    _require_gpu()
    model = write_tiny_llama(tmp_path / "llama")
    want = safetensors_torch.load_file(model / "model.safetensors")
    with Client(daemon.socket) as client:
        source, info = resolve_source(client, client.fetch(str(model)))
        assert choose_device(info, 0) == "cpu"  # only on disk: the host tier
        client.load(source, "cuda:0", fallback=False).release()  # now resident on the GPU
        source, info = resolve_source(client, str(Path(info.snapshot_path)))
        assert choose_device(info, 0) == "cuda:0"
        with leased_weights(client, source, "cuda:0") as pairs:
            # what an engine does with them: a device-to-device copy into its parameters
            copies = {n: t.clone() for n, t in pairs}
            assert all(t.device.type == "cuda" for t in copies.values())
        assert daemon.status().leases == []
        assert all(torch.equal(copies[k].cpu(), want[k]) for k in want)


def test_a_gpu_this_process_cannot_use_is_read_from_the_host_tier_under_one_lease(
        tmp_path, daemon):
    if torch.cuda.is_available():
        pytest.skip("this process sees a GPU: nothing to fall back from")
    model = write_tiny_llama(tmp_path / "llama")
    want = safetensors_torch.load_file(model / "model.safetensors")
    with Client(daemon.socket) as client:
        with leased_weights(client, str(model), "cuda:0") as pairs:
            got = dict(pairs)
            leases = daemon.status().leases
            assert [lease.tier for lease in leases] == [pb.TIER_HOST], leases
        assert daemon.status().leases == []
    assert all(t.device.type == "cpu" for t in got.values())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
