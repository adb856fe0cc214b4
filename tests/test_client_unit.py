"""weightd_client without the daemon: tensors built from hand-made Acquire answers,
the fallback to loading straight from the source, error mapping, and the wire protocol
against a fake servicer on a unix socket in tmp_path."""

from __future__ import annotations

import json
import logging
import mmap
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from weightd.formats import read_layout
from weightd_client import Client, LoadedModel
from weightd_client import client as client_mod
from weightd_client import tensors as tensors_mod
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc
from weightd_client.client import default_socket, device_to_wire, error_from_rpc
from weightd_client.errors import (
    BudgetExceeded,
    DaemonUnavailable,
    FormatError,
    GpuUnavailable,
    IntegrityError,
    LeaseNotFound,
    ModelInUse,
    NotPermitted,
    SourceNotFound,
    SourceUnavailable,
    Unauthenticated,
    WeightdError,
)
from weightd_client.tensors import build_host_tensors, build_tensors

# helpers --------------------------------------------------------------------------------


def all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 5, generator=g)
    return {
        "bf16": torch.randn(4, 8, generator=g).to(torch.bfloat16),
        "f16": f.to(torch.float16),
        "f32": f,
        "f64": f.double(),
        "i8": torch.randint(-128, 127, (7,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
        "i16": torch.randint(-30000, 30000, (5,), generator=g, dtype=torch.int16),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
        "i32": torch.randint(-2**31, 2**31 - 1, (2, 2), generator=g, dtype=torch.int32),
        "u32": torch.tensor([0, 2**32 - 1], dtype=torch.uint32),
        "i64": torch.tensor([-2**63, 2**63 - 1, 42], dtype=torch.int64),
        "u64": torch.tensor([0, 2**64 - 1], dtype=torch.uint64),
        "bool": torch.tensor([True, False, True]),
        "f8_e4m3": f.to(torch.float8_e4m3fn),
        "f8_e5m2": f.to(torch.float8_e5m2),
        "f8_e8m0": torch.tensor([0.5, 1.0, 4.0]).to(torch.float8_e8m0fnu),
        "c64": torch.randn(4, dtype=torch.complex64, generator=g),
        "empty": torch.empty(0, 4),
        "empty_bf16": torch.empty(2, 0, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.25),
        "scalar_i64": torch.tensor(-7, dtype=torch.int64),
    }


def response_for(*paths: Path, model: str = "test-model", tier: int = pb.TIER_HOST,
                 lease_id: str = "") -> pb.AcquireResponse:
    """An AcquireResponse as the daemon builds it for the host tier."""
    resp = pb.AcquireResponse(lease_id=lease_id, model=model, tier=tier, device="cpu",
                              snapshot_path=str(paths[0].parent))
    for i, p in enumerate(paths):
        layout = read_layout(p)
        resp.shards.append(pb.Shard(relpath=p.name, digest=f"d{i}", size=layout.file_size,
                                    path=str(p)))
        resp.metadata.update(layout.metadata)
        for t in layout.tensors:
            resp.tensors.append(pb.TensorLayout(name=t.name, dtype=t.dtype, shape=t.shape,
                                                shard=i, offset=t.offset, length=t.nbytes))
    return resp


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def assert_same(got: Any, want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        assert raw_bytes(g) == raw_bytes(w), name


@pytest.fixture
def mappings(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, mmap.mmap]]:
    """Records every mapping the tensor builder makes."""
    made: list[tuple[str, mmap.mmap]] = []
    real = tensors_mod.map_shard

    def recording(path: str, pending: str = "") -> mmap.mmap:
        mm = real(path, pending)
        made.append((path, mm))
        return mm

    monkeypatch.setattr(tensors_mod, "map_shard", recording)
    return made


def mapping_range(mm: mmap.mmap) -> tuple[int, int]:
    base = int(np.frombuffer(mm, np.uint8).ctypes.data)
    return base, base + len(mm)


# tensors --------------------------------------------------------------------------------


def test_tensors_equal_safetensors_for_every_dtype(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(all_dtypes(), str(path), metadata={"format": "pt"})
    got = build_host_tensors(response_for(path))
    assert_same(got, load_file(str(path)))
    assert got["scalar"].shape == () and got["scalar"].item() == 3.25
    assert got["empty"].shape == (0, 4)


def test_tensors_are_views_of_one_private_mapping(
        tmp_path: Path, mappings: list[tuple[str, mmap.mmap]]) -> None:
    path = tmp_path / "model.safetensors"
    save_file(all_dtypes(), str(path))
    resp = response_for(path)
    got = build_host_tensors(resp)
    assert len(mappings) == 1
    base, end = mapping_range(mappings[0][1])
    for layout in resp.tensors:
        t = got[layout.name]
        if t.numel() == 0:
            continue
        assert base <= t.data_ptr() < end, layout.name
        assert t.data_ptr() - base == layout.offset, layout.name


def test_a_file_named_by_two_shards_is_mapped_once(
        tmp_path: Path, mappings: list[tuple[str, mmap.mmap]]) -> None:
    a = tmp_path / "a.safetensors"
    save_file({"x": torch.arange(4.0)}, str(a))
    resp = response_for(a)
    resp.shards.append(resp.shards[0])  # same blob (dedup) under another relpath
    resp.tensors.append(pb.TensorLayout(name="y", dtype="F32", shape=[4], shard=1,
                                        offset=resp.tensors[0].offset, length=16))
    got = build_host_tensors(resp)
    assert len(mappings) == 1
    assert got["x"].data_ptr() == got["y"].data_ptr()


def test_writes_are_private_copy_on_write(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(1024, dtype=torch.float32)}, str(path))
    before = path.read_bytes()
    got = build_host_tensors(response_for(path))
    got["w"].mul_(-1).add_(7)
    assert got["w"][3].item() == 4.0
    assert path.read_bytes() == before
    again = build_host_tensors(response_for(path))
    assert torch.equal(again["w"], torch.arange(1024, dtype=torch.float32))


def test_tensors_outlive_the_response_and_builder(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    want = {"w": torch.randn(64, 64)}
    save_file(want, str(path))
    w = build_host_tensors(response_for(path))["w"]
    import gc

    gc.collect()
    path.unlink()  # like gc unlinking a blob: the mapping stays valid
    assert torch.equal(w, want["w"])


def test_unaligned_offsets_still_give_zero_copy_views(
        tmp_path: Path, mappings: list[tuple[str, mmap.mmap]]) -> None:
    # A file from an old writer: one byte, then float32 and bfloat16 data at odd offsets.
    f32 = np.arange(6, dtype="<f4") / 3
    bf16 = torch.tensor([1.5, -2.0, 3.0], dtype=torch.bfloat16)
    data = b"\x07" + f32.tobytes() + raw_bytes(bf16)
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [1, 25]},
              "c": {"dtype": "BF16", "shape": [3], "data_offsets": [25, 31]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "old.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    resp = response_for(path)
    assert resp.tensors[1].offset % 4 == 1
    got = build_host_tensors(resp)
    np.testing.assert_array_equal(got["b"].numpy(), f32.reshape(2, 3))
    assert torch.equal(got["c"], bf16)
    assert (got["b"] * 2).sum().item() == pytest.approx(float(f32.sum() * 2))
    base, end = mapping_range(mappings[0][1])
    assert got["b"].data_ptr() - base == resp.tensors[1].offset


def test_several_shards(tmp_path: Path) -> None:
    a, b = tmp_path / "m-1.safetensors", tmp_path / "m-2.safetensors"
    save_file({"x": torch.randn(3)}, str(a), metadata={"k": "1"})
    save_file({"y": torch.randn(2, 2).to(torch.bfloat16)}, str(b), metadata={"j": "2"})
    got = build_tensors(response_for(a, b))
    assert_same(got, {**load_file(str(a)), **load_file(str(b))})


@pytest.mark.parametrize("mutate, match", [
    (lambda r: setattr(r.tensors[0], "dtype", "F4"), "dtype F4 has no torch equivalent"),
    (lambda r: setattr(r.tensors[0], "dtype", "NOPE"), "dtype NOPE has no torch equivalent"),
    (lambda r: setattr(r.tensors[0], "length", 3), "expected"),
    (lambda r: setattr(r.tensors[0], "offset", 10**9), "outside the file"),
    (lambda r: setattr(r.tensors[0], "shard", 5), "names shard 5"),
    (lambda r: r.shards[0].ClearField("path"), "no host file"),
    (lambda r: r.tensors.append(r.tensors[0]), "appears twice"),
])
def test_inconsistent_answers_are_format_errors(
        tmp_path: Path, mutate: Callable[[pb.AcquireResponse], None], match: str) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"x": torch.arange(8.0)}, str(path))
    resp = response_for(path)
    mutate(resp)
    with pytest.raises(FormatError, match=match):
        build_host_tensors(resp)


def test_a_cuda_answer_needs_a_cuda_device_here(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"x": torch.arange(8.0)}, str(path))
    with pytest.raises(GpuUnavailable, match="needs a CUDA device"):
        build_tensors(response_for(path, tier=pb.TIER_CUDA))


def test_missing_torch_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'weightd-client\[torch\]'"):
        tensors_mod.require_torch()


def test_import_needs_neither_torch_nor_the_daemon() -> None:
    code = ("import sys, weightd_client; "
            "bad = [m for m in ('torch', 'weightd', 's3fs', 'sqlite3', 'fsspec') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# sockets, devices, the process ------------------------------------------------------------


def test_default_socket_matches_the_daemon(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    from weightd.config import _default_socket

    assert default_socket() == str(tmp_path / "run" / "weightd.sock") == str(_default_socket())
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket() == f"/tmp/weightd-{os.getuid()}/weightd.sock"
    assert default_socket() == str(_default_socket())
    monkeypatch.setenv("WEIGHTD_SOCKET", "/run/weightd/weightd.sock")
    assert default_socket() == "/run/weightd/weightd.sock"
    assert Client().socket == "/run/weightd/weightd.sock"


def test_process_start_time_is_proc_stat_field_22() -> None:
    import psutil

    ticks = client_mod._process_start_time()
    hz = os.sysconf("SC_CLK_TCK")
    assert ticks > 0
    assert abs(psutil.boot_time() + ticks / hz - psutil.Process().create_time()) < 2


def test_device_to_wire() -> None:
    assert device_to_wire("cpu") == "cpu"
    assert device_to_wire(torch.device("cpu")) == "cpu"
    assert device_to_wire("cuda:GPU-0a1b2c3d-aaaa-bbbb-cccc-000000000000") == \
        "cuda:GPU-0a1b2c3d-aaaa-bbbb-cccc-000000000000"
    with pytest.raises(ValueError, match="not 'mps'"):
        device_to_wire("mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_without_cuda_is_gpu_unavailable(tmp_path: Path) -> None:
    for device in ("cuda", "cuda:0", torch.device("cuda", 1)):
        with pytest.raises(GpuUnavailable, match="CUDA is not available"):
            device_to_wire(device)
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    for fallback in (True, "host"):
        with pytest.raises(GpuUnavailable):
            Client(tmp_path / "none.sock").load(path, "cuda", fallback=fallback)


def test_cuda_devices_travel_by_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    class Props:
        def __init__(self, uuid: str) -> None:
            self.uuid = uuid

    uuids = ["11111111-2222-3333-4444-555555555555", "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props(uuids[i]))
    assert device_to_wire("cuda:0") == "cuda:GPU-11111111-2222-3333-4444-555555555555"
    assert device_to_wire("cuda") == "cuda:" + uuids[1]
    assert device_to_wire(torch.device("cuda", 1)) == "cuda:" + uuids[1]
    assert client_mod._local_device("cuda:" + uuids[1], "x") == torch.device("cuda", 1)
    mig = "cuda:MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"  # as nvidia-smi -L names it
    assert client_mod._local_device(mig, "x") == torch.device("cuda", 1)
    with pytest.raises(GpuUnavailable, match="no such device"):
        device_to_wire("cuda:2")


def test_cuda_uuid_without_torch_uuid_reads_cupy_and_refuses_a_cut_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # torch before 2.4 has no .uuid on device properties; cupy's runtime gives the 16
    # bytes, cut at the first zero byte (a C string), which must not be taken for a UUID.
    import types

    class Props:  # no uuid attribute
        pass

    raw = {0: bytes(range(1, 17)), 1: bytes([7] * 5)}
    runtime = types.SimpleNamespace(getDeviceProperties=lambda i: {"uuid": raw[i]})
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    assert device_to_wire("cuda:0") == "cuda:GPU-01020304-0506-0708-090a-0b0c0d0e0f10"
    with pytest.raises(GpuUnavailable, match="torch 2.4"):
        device_to_wire("cuda:1")


# error mapping --------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str,
                 metadata: tuple[tuple[str, str | bytes], ...] = ()) -> None:
        self._code, self._details, self._metadata = code, details, metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata


C = grpc.StatusCode


@pytest.mark.parametrize("code, name, want", [
    (C.INVALID_ARGUMENT, "FormatError", FormatError),
    (C.NOT_FOUND, "SourceNotFound", SourceNotFound),
    (C.UNAVAILABLE, "SourceUnavailable", SourceUnavailable),
    (C.DATA_LOSS, "IntegrityError", IntegrityError),
    (C.RESOURCE_EXHAUSTED, "BudgetExceeded", BudgetExceeded),
    (C.PERMISSION_DENIED, "NotPermitted", NotPermitted),
    (C.FAILED_PRECONDITION, "GpuUnavailable", GpuUnavailable),
    (C.FAILED_PRECONDITION, "LeaseNotFound", LeaseNotFound),
    (C.FAILED_PRECONDITION, "ModelInUse", ModelInUse),
    (C.INTERNAL, "WeightdError", WeightdError),
    # no metadata: the code decides
    (C.INVALID_ARGUMENT, None, FormatError),
    (C.NOT_FOUND, None, SourceNotFound),
    (C.UNAVAILABLE, None, DaemonUnavailable),
    (C.DATA_LOSS, None, IntegrityError),
    (C.RESOURCE_EXHAUSTED, None, BudgetExceeded),
    (C.PERMISSION_DENIED, None, NotPermitted),
    (C.FAILED_PRECONDITION, None, GpuUnavailable),
    (C.INTERNAL, None, WeightdError),
    # a class this client does not know: the code decides, and the daemon did answer
    (C.UNAVAILABLE, "SomethingNew", SourceUnavailable),
    (C.NOT_FOUND, "NotAnError", SourceNotFound),
])
def test_error_mapping(code: grpc.StatusCode, name: str | None,
                       want: type[WeightdError]) -> None:
    md = (("weightd-error", name),) if name else ()
    err = error_from_rpc(FakeRpcError(code, "s3://b/m: it went wrong", md), socket="/x.sock")
    assert type(err) is want
    assert "it went wrong" in str(err)


def test_error_mapping_details() -> None:
    e = error_from_rpc(FakeRpcError(C.INVALID_ARGUMENT, "/c/blob: bad header",
                                    (("weightd-error", "FormatError"),)))
    assert isinstance(e, FormatError) and (e.path, e.reason) == ("/c/blob", "bad header")
    assert str(e) == "/c/blob: bad header"
    e = error_from_rpc(FakeRpcError(C.FAILED_PRECONDITION, "no lease 'x'"),
                       precondition=LeaseNotFound)
    assert isinstance(e, LeaseNotFound) and str(e) == "no lease 'x'"
    e = error_from_rpc(FakeRpcError(C.UNAVAILABLE, "connect failed"), socket="/r/w.sock")
    assert isinstance(e, DaemonUnavailable) and "/r/w.sock" in str(e)
    e = error_from_rpc(FakeRpcError(C.NOT_FOUND, "gone", (("weightd-error", b"SourceNotFound"),)))
    assert isinstance(e, SourceNotFound) and isinstance(e, FileNotFoundError)


# fallback: no daemon ------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    save_file({"a": torch.randn(4, 4), "b": torch.arange(3)}, str(d / "model-1.safetensors"),
              metadata={"format": "pt"})
    save_file({"c": torch.randn(2).to(torch.bfloat16)}, str(d / "sub" / "model-2.safetensors"))
    (d / "config.json").write_text("{}")
    return d


def want_of(*paths: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in paths:
        out.update(load_file(str(p)))
    return out


def test_fallback_loads_a_directory_with_a_warning(
        tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    sock = tmp_path / "none.sock"
    with caplog.at_level(logging.WARNING, logger="weightd_client.client"):
        m = Client(sock).load(model_dir)
    assert any("weightd daemon unreachable at " + str(sock) in r.getMessage()
               and str(model_dir) in r.getMessage() for r in caplog.records)
    assert_same(m, want_of(model_dir / "model-1.safetensors",
                           model_dir / "sub" / "model-2.safetensors"))
    assert m.lease_id is None and m.snapshot_path == str(model_dir)
    assert m.metadata == {"format": "pt"} and m.device == torch.device("cpu")
    m.release()
    m.release()
    assert len(m) == 0


def test_fallback_loads_a_file_an_index_and_a_file_url(tmp_path: Path, model_dir: Path) -> None:
    client = Client(tmp_path / "none.sock")
    one = model_dir / "model-1.safetensors"
    assert_same(client.load(one), want_of(one))
    assert_same(client.load("file://" + str(one)), want_of(one))
    index = model_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"a": "model-1.safetensors",
                                                                "b": "model-1.safetensors"}}))
    with client.load(index) as m:  # only the shards the index names
        assert_same(m, want_of(one))
        assert m.snapshot_path == str(model_dir)


def test_fallback_applies_include_and_exclude(tmp_path: Path, model_dir: Path) -> None:
    client = Client(tmp_path / "none.sock")
    assert sorted(client.load(model_dir, exclude=["sub/*"])) == ["a", "b"]
    assert sorted(client.load(model_dir, include=["model-2*"])) == ["c"]
    with pytest.raises(SourceNotFound, match="no .safetensors"):
        client.load(model_dir, include=["nothing*"])


def test_fallback_reports_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFound):
        Client(tmp_path / "none.sock").load(tmp_path / "nope")


def test_fallback_reads_remote_sources_through_fsspec(tmp_path: Path, model_dir: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in sorted(model_dir.rglob("*")):
        if p.is_file():
            fs.pipe_file("/remote-model/" + p.relative_to(model_dir).as_posix(), p.read_bytes())
    try:
        m = Client(tmp_path / "none.sock").load("memory://remote-model")
        assert_same(m, want_of(model_dir / "model-1.safetensors",
                               model_dir / "sub" / "model-2.safetensors"))
        assert m.metadata == {"format": "pt"}
        with pytest.raises(SourceNotFound):
            Client(tmp_path / "none.sock").load("memory://nowhere/model.safetensors")
    finally:
        fs.rm("/remote-model", recursive=True)


def test_fallback_false_raises_quickly_naming_the_socket(tmp_path: Path, model_dir: Path) -> None:
    sock = tmp_path / "none.sock"
    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailable, match=str(sock)):
        Client(sock).load(model_dir, fallback=False)
    assert time.monotonic() - t0 < 3


def test_a_dead_socket_is_daemon_unavailable_quickly(tmp_path: Path, model_dir: Path) -> None:
    # A socket file nobody accepts on (a daemon that died without cleaning up).
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    try:
        client = Client(path, timeout=30)
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable, match=str(path)):
            client.load(model_dir, fallback=False)
        with pytest.raises(DaemonUnavailable):
            client.status()
        assert time.monotonic() - t0 < 5
        assert sorted(client.load(model_dir)) == ["a", "b", "c"]  # and the fallback works
    finally:
        s.close()


def test_bad_arguments(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ValueError, match="fallback"):
        Client(tmp_path / "none.sock").load(model_dir, fallback="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        Client(tmp_path / "none.sock", timeout=0)


# the wire: a fake daemon ------------------------------------------------------------------


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, name: str, msg: str) -> None:
    context.set_trailing_metadata((("weightd-error", name),))
    context.abort(code, msg)


class FakeDaemon(pb_grpc.WeightdServicer):  # type: ignore[misc]
    """Answers from a hand-made AcquireResponse; records what it was asked."""

    def __init__(self) -> None:
        self.response: pb.AcquireResponse | None = None
        self.acquires: list[pb.AcquireRequest] = []
        self.releases: list[str] = []
        self.progress: list[pb.FetchProgress] = []
        self.error: tuple[grpc.StatusCode, str, str] | None = None
        self.handshakes: list[int] = []
        self.revoked: set[str] = set()
        self.tokens: list[str | None] = []

    def Acquire(self, request: pb.AcquireRequest,  # noqa: N802
                context: grpc.ServicerContext) -> pb.AcquireResponse:
        self.acquires.append(request)
        token = dict(context.invocation_metadata()).get("weightd-token")
        self.tokens.append(token)
        if token in self.revoked:  # as a restarted daemon knows no token of the old one
            abort(context, C.UNAUTHENTICATED, "Unauthenticated", "unknown token")
        if self.error:
            abort(context, *self.error)
        if request.device != "cpu":
            abort(context, C.FAILED_PRECONDITION, "GpuUnavailable",
                  f"{request.device}: no GPU support in this build")
        assert self.response is not None
        resp = pb.AcquireResponse()
        resp.CopyFrom(self.response)
        resp.lease_id = f"lease-{len(self.acquires)}"
        return resp

    def Release(self, request: pb.ReleaseRequest,  # noqa: N802
                context: grpc.ServicerContext) -> pb.ReleaseResponse:
        if request.lease_id in self.releases or not request.lease_id.startswith("lease-"):
            abort(context, C.FAILED_PRECONDITION, "LeaseNotFound",
                  f"no lease {request.lease_id!r}")
        self.releases.append(request.lease_id)
        return pb.ReleaseResponse()

    def Fetch(self, request: pb.FetchRequest,  # noqa: N802
              context: grpc.ServicerContext) -> Iterator[pb.FetchProgress]:
        yield from self.progress
        if self.error:
            abort(context, *self.error)

    def List(self, request: pb.ListRequest,  # noqa: N802
             context: grpc.ServicerContext) -> pb.ListResponse:
        return pb.ListResponse(models=[pb.ModelInfo(model="m", bytes=5)])

    def Status(self, request: pb.StatusRequest,  # noqa: N802
               context: grpc.ServicerContext) -> pb.StatusResponse:
        return pb.StatusResponse(version="fake", pid=os.getpid())

    def Evict(self, request: pb.EvictRequest,  # noqa: N802
              context: grpc.ServicerContext) -> pb.EvictResponse:
        if request.source == "leased":
            abort(context, C.FAILED_PRECONDITION, "ModelInUse", "leased: leased by 1 process")
        return pb.EvictResponse(bytes_freed=1000 + int(request.tier))


def _credential_socket(path: Path, handshakes: list[int]) -> socket.socket:
    """The fake daemon's credential socket: one token for every process that asks."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path) + ".cred")
    listener.listen()

    def answer() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                handshakes.append(1)
                token = FAKE_TOKEN if len(handshakes) == 1 else f"{FAKE_TOKEN}-{len(handshakes)}"
                conn.sendall(json.dumps({"token": token}).encode() + b"\n")

    threading.Thread(target=answer, daemon=True).start()
    return listener


FAKE_TOKEN = "fake-token"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[FakeDaemon, Path]]:
    servicer = FakeDaemon()
    path = tmp_path / "d.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_WeightdServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    creds = _credential_socket(path, servicer.handshakes)
    try:
        yield servicer, path
    finally:
        creds.close()
        server.stop(0)


def test_load_through_the_daemon(tmp_path: Path, daemon: tuple[FakeDaemon, Path],
                                 mappings: list[tuple[str, mmap.mmap]]) -> None:
    servicer, sock = daemon
    path = tmp_path / "blob"
    want = all_dtypes()
    save_file(want, str(path), metadata={"format": "pt"})
    servicer.response = response_for(path, model="file--m")
    with Client(sock, name="replica 3") as client:
        m = client.load(os.path.relpath(path))
        assert isinstance(m, LoadedModel)
        assert_same(m, load_file(str(path)))
        assert (m.lease_id, m.model, m.metadata) == ("lease-1", "file--m", {"format": "pt"})
        # the credential handshake happened once, and the call carried its token
        assert servicer.handshakes == [1] and servicer.tokens == [FAKE_TOKEN]
        assert m.snapshot_path == str(tmp_path)
        base, end = mapping_range(mappings[0][1])
        assert base <= m["bf16"].data_ptr() < end
        req = servicer.acquires[0]
        assert req.source == str(path) and req.device == "cpu"  # made absolute
        assert req.client.pid == os.getpid() and req.client.name == "replica 3"
        assert req.client.start_time == client_mod._process_start_time()
        with m:
            pass
        assert servicer.releases == ["lease-1"] and m.lease_id is None and len(m) == 0
        m.release()  # idempotent
        assert servicer.releases == ["lease-1"]
        client.load(path)  # held until the client closes
    assert servicer.releases == ["lease-1", "lease-2"]


def test_an_unknown_token_is_replaced_by_a_new_handshake_once(
        tmp_path: Path, daemon: tuple[FakeDaemon, Path],
        mappings: list[tuple[str, mmap.mmap]]) -> None:
    servicer, sock = daemon
    path = tmp_path / "blob"
    save_file(all_dtypes(), str(path))
    servicer.response = response_for(path)
    with Client(sock) as client:
        client.load(str(path)).release()
        servicer.revoked.add(FAKE_TOKEN)  # the daemon restarted: it knows no old token
        client.load(str(path)).release()
        assert servicer.tokens == [FAKE_TOKEN, FAKE_TOKEN, f"{FAKE_TOKEN}-2"]
        servicer.revoked.add(f"{FAKE_TOKEN}-2")
        servicer.revoked.add(f"{FAKE_TOKEN}-3")
        with pytest.raises(Unauthenticated):  # one more handshake, then the error
            client.load(str(path), fallback=False)
    assert len(servicer.handshakes) == 3


def test_daemon_errors_arrive_as_their_class(tmp_path: Path,
                                             daemon: tuple[FakeDaemon, Path]) -> None:
    servicer, sock = daemon
    client = Client(sock)
    servicer.error = (C.RESOURCE_EXHAUSTED, "BudgetExceeded", "m: needs 5 GiB, 1 GiB free")
    with pytest.raises(BudgetExceeded, match="needs 5 GiB"):
        client.load("s3://b/m")
    servicer.error = (C.UNAVAILABLE, "SourceUnavailable", "s3://b/m: connection reset")
    with pytest.raises(SourceUnavailable, match="connection reset"):
        client.load("s3://b/m")  # the daemon answered: no fallback
    with pytest.raises(LeaseNotFound, match="no lease 'nope'"):
        client.release("nope")
    with pytest.raises(ModelInUse):
        client.evict("leased")
    client.close()


def test_gpu_unavailable_is_raised_or_answered_on_the_host(
        tmp_path: Path, daemon: tuple[FakeDaemon, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    servicer, sock = daemon
    path = tmp_path / "blob"
    save_file({"w": torch.randn(4, 4)}, str(path))
    servicer.response = response_for(path)
    # Pretend this process has a GPU: "meta" stands in for the CUDA device.
    monkeypatch.setattr(client_mod, "device_to_wire",
                        lambda d: "cpu" if str(d) == "cpu" else "cuda:GPU-fake")
    monkeypatch.setattr(client_mod, "_local_device",
                        lambda d, w: torch.device("cpu" if w == "cpu" else "meta"))
    client = Client(sock)
    with pytest.raises(GpuUnavailable, match="cuda:GPU-fake"):
        client.load(path, "cuda", fallback=True)
    m = client.load(path, "cuda", fallback="host")
    assert [r.device for r in servicer.acquires] == ["cuda:GPU-fake", "cuda:GPU-fake", "cpu"]
    assert m["w"].device.type == "meta" and m.device.type == "meta"
    assert m.lease_id is None and servicer.releases == ["lease-3"]  # host lease ended
    client.close()


def test_fetch_reports_progress(daemon: tuple[FakeDaemon, Path]) -> None:
    servicer, sock = daemon

    class Progress:
        def __init__(self) -> None:
            self.size: list[int] = []
            self.value = 0

        def set_size(self, size: int) -> None:
            self.size.append(size)

        def relative_update(self, inc: int = 1) -> None:
            self.value += inc

    servicer.progress = [pb.FetchProgress(bytes_done=0, bytes_total=0),
                         pb.FetchProgress(bytes_done=10, bytes_total=100),
                         pb.FetchProgress(bytes_done=60, bytes_total=100),
                         pb.FetchProgress(bytes_done=100, bytes_total=100, done=True,
                                          model="m", snapshot_path="/c/snapshots/m")]
    cb = Progress()
    with Client(sock) as client:
        assert client.fetch("s3://b/m", callback=cb) == "/c/snapshots/m"
        assert cb.size == [100] and cb.value == 100
        servicer.progress = servicer.progress[:2]
        with pytest.raises(SourceUnavailable, match="before it was done"):
            client.fetch("s3://b/m")
        servicer.error = (C.NOT_FOUND, "SourceNotFound", "s3://b/m: not found at the source")
        with pytest.raises(SourceNotFound, match="not found at the source"):
            client.fetch("s3://b/m")


def test_list_status_evict(daemon: tuple[FakeDaemon, Path]) -> None:
    _, sock = daemon
    with Client(sock) as client:
        assert [m.model for m in client.list()] == ["m"]
        assert client.status().version == "fake"
        assert client.evict("m") == 1000
        assert client.evict("m", "host") == 1000 + pb.TIER_HOST
        assert client.evict("m", pb.TIER_CUDA) == 1000 + pb.TIER_CUDA
        with pytest.raises(ValueError, match="unknown tier"):
            client.evict("m", "gpu")
    with pytest.raises(ValueError, match="closed"):
        client.status()


def test_module_level_load_uses_the_default_socket(
        tmp_path: Path, daemon: tuple[FakeDaemon, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import weightd_client

    servicer, sock = daemon
    path = tmp_path / "blob"
    save_file({"w": torch.ones(2)}, str(path))
    servicer.response = response_for(path)
    monkeypatch.setenv("WEIGHTD_SOCKET", str(sock))
    with weightd_client.load(path) as m:
        assert torch.equal(m["w"], torch.ones(2)) and m.lease_id == "lease-1"
    assert servicer.releases == ["lease-1"]


def test_doctests_of_the_public_api() -> None:
    import doctest

    import weightd_client

    for module in (weightd_client, client_mod, tensors_mod):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
