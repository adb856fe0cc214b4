"""Tensors as they land (issue 16): ``Client.stream`` yields ``(name, tensor)`` in the
order their bytes are written, while the rest of the model is still on the wire; the
daemon's AcquireStream reports each shard's layout once its header has landed, then the
bytes written, then the lease's answer once every digest is checked. A bad byte ends the
stream with IntegrityError and caches nothing; replicas streaming together share one
download; the stream's lease is the caller's."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.daemon import ClientProcess, DaemonProcess, raw_stub, wait_for
from weightd.formats import read_layout
from weightd.store import hash_file
from weightd.testing import write_synthetic_model
from weightd_client import Client
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc
from weightd_client.errors import IntegrityError

torch = pytest.importorskip("torch")

MiB = 1024 * 1024


def source_tensors(model: Path) -> dict[str, tuple[str, int, bytes]]:
    """name -> (shard file, end offset, raw bytes) of every tensor of the source."""
    out = {}
    for shard in sorted(model.glob("*.safetensors")):
        data = shard.read_bytes()
        for t in read_layout(shard).tensors:
            out[t.name] = (shard.name, t.offset + t.nbytes, data[t.offset:t.offset + t.nbytes])
    return out


def shard_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.glob("*.safetensors"))


def shard_bytes_served(server: object, model: Path) -> int:
    return sum(server.log.bytes_served(p.name)  # type: ignore[attr-defined]
               for p in model.glob("*.safetensors"))


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def model(http_root: Path) -> Path:
    d = http_root / "m"
    write_synthetic_model(d, total_bytes=4 * MiB, tensors=32, shards=2)
    return d


def test_a_stream_yields_each_tensor_once_its_bytes_land(tmp_path, http_server, model):
    http_server.set_rate(2e6)  # 4 MiB in about two seconds: the wire is the bottleneck
    url = f"{http_server.url}/m"
    want = source_tensors(model)
    small_chunks = {"WEIGHTD_CHUNK_SIZE": "256KiB", "WEIGHTD_CONCURRENCY": "2"}
    with DaemonProcess(tmp_path, env=small_chunks) as d, Client(d.socket) as client:
        t0 = time.monotonic()
        got: list[tuple[str, float, bytes]] = []
        served_at_first = -1
        with client.stream(url) as weights:
            for name, tensor in weights:
                if not got:
                    served_at_first = shard_bytes_served(http_server, model)
                got.append((name, time.monotonic() - t0, raw(tensor)))
            assert weights.lease_id and len(d.status().leases) == 1
            assert weights.fetched and weights.loaded  # this stream started the fetch
            assert Path(weights.snapshot_path, "config.json").is_file()
        assert d.status().leases == []  # released when the block ends
    assert sorted(n for n, _, _ in got) == sorted(want)  # each tensor once
    assert {n: b for n, _, b in got} == {n: w[2] for n, w in want.items()}
    for shard in {w[0] for w in want.values()}:  # in the order their bytes complete
        ends = [want[n][1] for n, _, _ in got if want[n][0] == shard]
        assert ends == sorted(ends)
    # the first tensor came while the source was still sending (not a timing bound: what
    # the source had served by then, against the whole)
    first, last = got[0][1], got[-1][1]
    assert served_at_first < shard_bytes(model), (
        f"first tensor at {first:.2f}s, the last at {last:.2f}s, after the source had sent "
        f"{served_at_first} of {shard_bytes(model)} bytes")
    assert shard_bytes_served(http_server, model) == shard_bytes(model)


def test_the_first_shard_streams_while_another_files_head_is_unanswered(
        tmp_path, http_server, model):
    """An index page names files only: the listing asks each one's size (a ``HEAD``).
    The first shard's bytes are read as soon as its own answer is in, not after the
    slowest of them: a replica gets its first tensor while the origin still holds the
    last shard's ``HEAD``; the model is then whole and read once."""
    last = sorted(model.glob("*.safetensors"))[-1].name
    held, answer = threading.Event(), threading.Event()

    def slow_head(method: str, path: str) -> None:
        if method == "HEAD" and path.endswith(last):
            held.set()
            answer.wait(30)  # then answered as usual
        return None

    http_server.set_fault(slow_head)
    url = f"{http_server.url}/m"
    want = source_tensors(model)
    timer = threading.Timer(20, answer.set)  # the listing ends, whatever happens
    timer.start()
    try:
        with (DaemonProcess(tmp_path) as d, Client(d.socket) as client,
              client.stream(url) as weights):
            it = iter(weights)
            first = next(it)
            answered_before_first = answer.is_set()
            answer.set()
            got = dict([first, *it])
    finally:
        timer.cancel()
        answer.set()
    assert held.is_set()
    assert not answered_before_first, "the first tensor waited for another file's HEAD"
    assert {n: raw(t) for n, t in got.items()} == {n: w[2] for n, w in want.items()}
    assert shard_bytes_served(http_server, model) == shard_bytes(model)  # 1.00x the model


def test_the_first_tensor_crosses_the_link_before_any_other_byte_of_the_model(
        tmp_path, http_root, http_server):
    """A streaming replica wants the model's first tensor first. The daemon reads the
    first shard's header alone, then the first tensor's bytes with every read of the
    model's window, before any other byte: the first tensor arrives once its own bytes
    have crossed the link. (The window's first chunk read as 8 ranges of 1 MiB, each
    with an eighth of the link, gave a 512 KiB first tensor only once a whole MiB of the
    shard had come.)"""
    d = http_root / "first"
    write_synthetic_model(d, total_bytes=8 * MiB, tensors=16, shards=2)  # 512 KiB each
    # the link is the bottleneck: what it sends between the first tensor's write and
    # this test's look at the origin's count (a gRPC message, a process) is 4 KB a ms
    http_server.set_rate(4e6)
    want = source_tensors(d)
    with (DaemonProcess(tmp_path) as daemon, Client(daemon.socket) as client,
          client.stream(f"{http_server.url}/first") as weights):
        it = iter(weights)
        name, tensor = next(it)
        served = shard_bytes_served(http_server, d)
        got = dict([(name, tensor), *it])
    first_end = want[name][1]
    assert first_end < MiB
    assert served < first_end + 128 * 1024, (
        f"the first tensor ({name}, bytes 0-{first_end} of its shard with its header) came "
        f"after the source had sent {served} bytes of the model's shards")
    assert {n: raw(t) for n, t in got.items()} == {n: w[2] for n, w in want.items()}
    assert shard_bytes_served(http_server, d) == shard_bytes(d)  # 1.00x the model


def test_a_resident_model_streams_everything_at_once(tmp_path, http_server, model):
    url = f"{http_server.url}/m"
    want = source_tensors(model)
    with DaemonProcess(tmp_path) as d, Client(d.socket) as client:
        client.load(url, fallback=False).release()  # resident now
        stub = raw_stub(d.socket)
        events = list(stub.AcquireStream(pb.AcquireRequest(source=url), timeout=30))
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds == ["start", "end"], kinds
        assert events[0].start.lease_id == events[1].end.lease_id
        assert not events[1].end.fetched and not events[1].end.loaded
        stub.Release(pb.ReleaseRequest(lease_id=events[1].end.lease_id), timeout=10)
        with client.stream(url) as weights:
            assert {n: raw(t) for n, t in weights} == {n: w[2] for n, w in want.items()}


def test_replicas_streaming_together_share_one_download(tmp_path, http_server, model):
    http_server.set_rate(8e6)
    url = f"{http_server.url}/m"
    with DaemonProcess(tmp_path) as d:
        replicas = [ClientProcess(d.socket) for _ in range(4)]
        try:
            for r in replicas:
                r.call("ping")
            for r in replicas:  # all four ask before the first shard has landed
                r.send("stream", source=url, reference=str(model))
            outs = [r.receive(60) for r in replicas]
        finally:
            for r in replicas:
                r.close()
    for out in outs:
        assert out["mismatches"] == [] and out["tensors"] == 32, out
        assert out["lease_id"]
    assert shard_bytes_served(http_server, model) == shard_bytes(model)  # 1.00x the model


def test_a_bad_byte_ends_the_stream_with_integrity_error_and_caches_nothing(
        tmp_path, s3, monkeypatch):
    """One byte of the second shard is flipped on its way out of S3; its ETag (the MD5
    of the object) does not match: the first tensors come, then IntegrityError, and
    neither a blob nor a model is left in the cache."""
    model = tmp_path / "src"
    write_synthetic_model(model, total_bytes=4 * MiB, tensors=16, shards=2)
    url = s3.upload_dir(model, "bucket", "bad")
    second = sorted(model.glob("*.safetensors"))[1]
    chunk = 256 * 1024
    chunks = -(-second.stat().st_size // chunk)
    gets = {"n": 0}

    def flip_one_byte(method: str, path: str):  # type: ignore[no-untyped-def]
        if method != "GET" or not path.endswith(second.name):
            return None
        gets["n"] += 1
        if gets["n"] != chunks:  # only the last chunk's answer, its first byte
            return None
        done = {"first": True}

        def change(data: bytes) -> bytes:
            if done["first"]:
                done["first"] = False
                return bytes([data[0] ^ 0xFF]) + data[1:]
            return data
        return change

    s3.set_body(flip_one_byte)
    env = {"WEIGHTD_S3_ENDPOINT_URL": s3.endpoint_url, "WEIGHTD_CHUNK_SIZE": "256KiB",
           "WEIGHTD_CONCURRENCY": "1", "WEIGHTD_MAX_PARALLEL_FILES": "1"}
    with DaemonProcess(tmp_path / "d", env=env) as d, Client(d.socket) as client:
        names: list[str] = []
        with pytest.raises(IntegrityError), client.stream(url) as weights:
            for name, _ in weights:
                names.append(name)
        assert gets["n"] >= chunks
        assert names, "no tensor came before the end"
        assert d.status().leases == []
        assert list(d.stub().List(pb.ListRequest(), timeout=10).models) == []
        shard_digests = {hash_file(p) for p in model.glob("*.safetensors")}
        on_disk = {p.name for p in (d.cache_dir / "blobs").glob("*/*")}
        assert not shard_digests & on_disk
        assert not os.listdir(d.cache_dir / "tmp")
        s3.set_body(None)  # the daemon still serves, and the next stream is whole
        with client.stream(url) as weights:
            assert len(list(weights)) == 16


def test_a_stream_lease_is_the_callers_and_ends_with_its_process(tmp_path, http_server, model):
    url = f"{http_server.url}/m"
    with DaemonProcess(tmp_path) as d:
        replica = ClientProcess(d.socket)
        try:
            out = replica.call("stream", source=url, reference=str(model), hold=True)
            assert out["mismatches"] == [] and out["lease_id"]
            leases = d.status().leases  # the replica's, by the kernel's word
            assert [(lease.pid, lease.lease_id) for lease in leases] == [(replica.pid, "")]
        finally:
            replica.close()  # SIGKILL
        wait_for(lambda: not d.status().leases, timeout=3, what="the lease reaped")


def test_a_stream_needs_the_callers_credentials(tmp_path, model):
    with DaemonProcess(tmp_path) as d, grpc.insecure_channel(f"unix://{d.socket}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.WeightdStub(ch).AcquireStream(pb.AcquireRequest(source=str(model)),
                                                       timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.gpu
def test_gpu_a_stream_to_a_gpu_yields_the_whole_model_on_the_device_at_the_end(
        tmp_path, http_server, model):
    from tests.test_cuda_tier import _require_gpu

    _require_gpu()
    url = f"{http_server.url}/m"
    want = source_tensors(model)
    with DaemonProcess(tmp_path) as d, Client(d.socket) as client:
        with client.stream(url, "cuda:0") as weights:
            got = {n: raw(t.cpu()) for n, t in weights if t.device.type == "cuda"}
            assert [lease.tier for lease in d.status().leases] == [pb.TIER_CUDA]
        assert d.status().leases == []
    assert got == {n: w[2] for n, w in want.items()}
