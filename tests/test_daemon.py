"""The daemon as a real process on a temporary unix socket; clients as separate processes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.daemon import ClientError, ClientProcess, DaemonProcess
from tests.smaps import smaps_for
from weightd.store import hash_file
from weightd.testing import write_synthetic_model
from weightd.testing.procfs import smaps_rollup
from weightd.tiers import CudaTier
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb

MiB = 1024 * 1024


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path)
    yield d
    code = d.stop()
    assert code == 0, d.log()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    write_synthetic_model(tmp_path / "model", total_bytes=24 * MiB, tensors=40, shards=2)
    return tmp_path / "model"


@pytest.fixture
def clients(daemon: DaemonProcess) -> Iterator[list[ClientProcess]]:
    made: list[ClientProcess] = []
    yield made
    for c in made:
        c.close()


def new_client(daemon: DaemonProcess, clients: list[ClientProcess]) -> ClientProcess:
    c = ClientProcess(daemon.socket)
    clients.append(c)
    return c


def test_socket_is_0660_and_health_serves(daemon):
    mode = stat.S_IMODE(daemon.socket.stat().st_mode)
    assert mode == 0o660
    assert stat.S_ISSOCK(daemon.socket.stat().st_mode)


def test_sigterm_drains_and_exits_cleanly(tmp_path):
    d = DaemonProcess(tmp_path)
    assert d.stop(signal.SIGTERM) == 0
    assert not d.socket.exists()
    assert "stopped" in d.log()


def test_second_daemon_on_the_same_cache_refuses(daemon, tmp_path):
    other = subprocess.run([sys.executable, "-m", "weightd.cli", "serve"], capture_output=True,
                           text=True, timeout=60,
                           env={**daemon.env, "WEIGHTD_SOCKET": str(tmp_path / "other.sock")})
    assert other.returncode != 0
    assert "in use" in other.stderr


def test_two_processes_share_physical_pages(daemon, model, clients):
    a, b = new_client(daemon, clients), new_client(daemon, clients)
    ra = a.call("load", source=str(model))
    rb = b.call("load", source=str(model))
    assert ra["tensors"] == rb["tensors"] == 40 and ra["checksum"] == rb["checksum"]
    blob = os.path.realpath(Path(ra["snapshot_path"]) / "model-00001-of-00002.safetensors")
    size_kb = os.path.getsize(blob) // 1024
    sa, sb = a.call("smaps", path=blob), b.call("smaps", path=blob)
    for s in (sa, sb):
        assert s["Rss"] >= 0.95 * size_kb       # every page is mapped in ...
        assert s["Private_Clean"] + s["Private_Dirty"] < 0.05 * size_kb  # ... none privately
        assert s["Pss"] <= 0.55 * size_kb        # shared with the daemon and the other client
    # the daemon keeps the pages resident and locked
    held = smaps_for(daemon.proc.pid, blob)
    assert held["Rss"] >= 0.95 * size_kb
    assert held["Locked"] >= 0.95 * held["Pss"]  # smaps counts Locked proportionally, like Pss
    # one copy in memory: the three processes' PSS of the file add up to its size
    assert sa["Pss"] + sb["Pss"] + held["Pss"] <= 1.05 * size_kb


def test_a_write_in_one_client_is_not_seen_by_another(daemon, model, clients):
    a, b = new_client(daemon, clients), new_client(daemon, clients)
    src = str(model)
    a.call("load", source=src)
    b.call("load", source=src)
    before = b.call("read", source=src, name="layers.3.weight")["bytes"]
    a.call("write", source=src, name="layers.3.weight", value=7)
    assert a.call("read", source=src, name="layers.3.weight")["bytes"] == [7] * 16
    assert b.call("read", source=src, name="layers.3.weight")["bytes"] == before
    # the file in the cache is untouched
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        blob = Path(os.path.realpath(daemon.cache_dir / "snapshots" / [
            n for n in os.listdir(daemon.cache_dir / "snapshots") if n != ".revs"][-1] / shard))
        assert hash_file(blob) == blob.name


def test_killed_client_loses_its_lease_within_2s(daemon, model, clients):
    a = new_client(daemon, clients)
    b = new_client(daemon, clients)
    a.call("load", source=str(model))
    b.call("load", source=str(model))
    assert {lease.pid for lease in daemon.status().leases} == {a.pid, b.pid}
    os.kill(a.pid, signal.SIGKILL)
    a.proc.wait(5)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if {lease.pid for lease in daemon.status().leases} == {b.pid}:
            break
        time.sleep(0.05)
    assert {lease.pid for lease in daemon.status().leases} == {b.pid}
    b.call("release", source=str(model))
    assert list(daemon.status().leases) == []


def test_release_list_status(daemon, model, clients):
    a = new_client(daemon, clients)
    a.call("load", source=str(model))
    stub = daemon.stub()
    listed = stub.List(pb.ListRequest(), timeout=10).models
    assert len(listed) == 1
    m = listed[0]
    assert m.files == 4 and m.bytes > 24 * MiB
    assert [(r.tier, r.leases) for r in m.resident] == [(pb.TIER_HOST, 1)]
    status = daemon.status()
    host = next(t for t in status.tiers if t.tier == pb.TIER_HOST)
    assert host.bytes_used >= 24 * MiB and host.available
    cuda = next(t for t in status.tiers if t.tier == pb.TIER_CUDA)
    assert cuda.available == CudaTier().probe()[0]
    assert cuda.available or cuda.reason
    a.call("release", source=str(model))
    assert list(daemon.status().leases) == []
    with pytest.raises(grpc.RpcError) as e:
        stub.Release(pb.ReleaseRequest(lease_id="nope"), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("weightd-error", "LeaseNotFound") in tuple(e.value.trailing_metadata())
    # evict by hand, then a new load makes it resident again
    freed = stub.Evict(pb.EvictRequest(source=str(model)), timeout=10).bytes_freed
    assert freed >= 24 * MiB
    assert next(t for t in daemon.status().tiers if t.tier == pb.TIER_HOST).bytes_used == 0


def test_evicting_a_leased_model_is_refused(daemon, model, clients):
    a = new_client(daemon, clients)
    a.call("load", source=str(model))
    with pytest.raises(grpc.RpcError) as e:
        daemon.stub().Evict(pb.EvictRequest(source=str(model)), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_32_concurrent_loads_fetch_each_file_once(daemon, http_server, http_root, clients):
    write_synthetic_model(http_root / "cold", total_bytes=16 * MiB, tensors=32, shards=4)
    url = f"{http_server.url}/cold"
    stub = daemon.stub()
    results: list[object] = []

    def acquire() -> None:
        try:
            results.append(stub.Acquire(pb.AcquireRequest(
                source=url, device="cpu",
                client=pb.ClientInfo(name="test")),
                timeout=120))
        except grpc.RpcError as e:
            results.append(e)

    # 8 client processes and 24 raw calls from threads, all at once
    procs = [new_client(daemon, clients) for _ in range(8)]
    threads = [threading.Thread(target=acquire) for _ in range(24)]
    answers: list[object] = []
    pthreads = [threading.Thread(target=lambda c=c: answers.append(c.call("load", source=url)))
                for c in procs]
    for t in threads + pthreads:
        t.start()
    for t in threads + pthreads:
        t.join(180)
    assert all(isinstance(r, pb.AcquireResponse) for r in results), results
    assert len(results) == 24 and len(answers) == 8
    assert len({a["checksum"] for a in answers}) == 1  # type: ignore[index]
    files = [p for p in (http_root / "cold").iterdir()]
    for f in files:
        assert http_server.log.bytes_served(f"/cold/{f.name}") == f.stat().st_size, f.name
    assert sum(r.fetched for r in results) <= 1  # type: ignore[attr-defined]


def test_a_fetch_leaves_no_buffers_in_the_daemon(daemon, tmp_path):
    # The daemon's own memory counts against every replica it serves: the chunk buffers
    # of a fetch must go back to the system, not stay in its heap.
    write_synthetic_model(tmp_path / "big", total_bytes=256 * MiB, tensors=16, shards=2)
    before = smaps_rollup(daemon.pid)["Pss_Anon"]
    list(daemon.stub().Fetch(pb.FetchRequest(source=str(tmp_path / "big")), timeout=120))
    after = smaps_rollup(daemon.pid)["Pss_Anon"]
    assert (after - before) * 1024 < 32 * MiB, f"anonymous memory grew {before} -> {after} kB"


def test_missing_source_is_not_found(daemon, clients, tmp_path):
    a = new_client(daemon, clients)
    with pytest.raises(ClientError) as e:
        a.call("load", source=str(tmp_path / "missing"), fallback=False)
    assert e.value.kind == "SourceNotFound"
    assert str(tmp_path / "missing") in str(e.value)


def test_malformed_shard_is_invalid_argument_and_daemon_keeps_serving(daemon, clients, tmp_path,
                                                                     model):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(grpc.RpcError) as e:
        daemon.stub().Acquire(pb.AcquireRequest(
            source=str(bad), client=pb.ClientInfo(pid=os.getpid())), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model.safetensors" in e.value.details()
    a = new_client(daemon, clients)
    with pytest.raises(ClientError) as ce:
        a.call("load", source=str(bad))
    assert ce.value.kind == "FormatError"
    assert a.call("load", source=str(model))["tensors"] == 40
    host = next(t for t in daemon.status().tiers if t.tier == pb.TIER_HOST)
    assert host.bytes_used < 25 * MiB  # nothing of the bad model is resident


@pytest.mark.parametrize("request_kw,code", [
    ({"source": ""}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"source": "x" * 5000}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"source": "/m", "device": "cuda:0"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"source": "/m", "device": "cuda:GPU-00000000-0000-0000-0000-000000000000"},
     grpc.StatusCode.FAILED_PRECONDITION),
    ({"source": "gopher://x/y"}, grpc.StatusCode.NOT_FOUND),
])
def test_bad_requests_get_clear_codes(daemon, request_kw, code):
    with pytest.raises(grpc.RpcError) as e:
        daemon.stub().Acquire(pb.AcquireRequest(client=pb.ClientInfo(pid=os.getpid()),
                                                **request_kw), timeout=30)
    assert e.value.code() == code, e.value.details()
    assert e.value.details()
    assert daemon.status().pid == daemon.proc.pid  # still serving


def test_daemon_gone_client_falls_back_to_the_source(tmp_path, model):
    d = DaemonProcess(tmp_path)
    d.stop()
    c = ClientProcess(d.socket)
    try:
        out = c.call("load", source=str(model))
        assert out["lease_id"] is None and out["tensors"] == 40
        with pytest.raises(ClientError) as e:
            c.call("load", source=str(model), fallback=False)
        assert e.value.kind == "DaemonUnavailable"
    finally:
        c.close()
    assert "unreachable" in c.proc.stderr.read()  # type: ignore[union-attr]


def test_fetch_streams_progress_and_returns_the_snapshot(daemon, http_server, http_root):
    write_synthetic_model(http_root / "f", total_bytes=8 * MiB, tensors=8, shards=2)
    msgs = list(daemon.stub().Fetch(pb.FetchRequest(source=f"{http_server.url}/f"), timeout=60))
    assert msgs[-1].done and Path(msgs[-1].snapshot_path).is_dir()
    assert msgs[-1].bytes_fetched > 8 * MiB
    again = list(daemon.stub().Fetch(pb.FetchRequest(source=f"{http_server.url}/f"), timeout=60))
    assert again[-1].hits == again[-1].files and again[-1].bytes_fetched == 0


def test_a_refetched_model_is_served_in_its_new_revision_once_no_lease_holds_the_old(
        daemon, tmp_path):
    src = tmp_path / "changing"
    write_synthetic_model(src, total_bytes=2 * MiB, tensors=4, seed=1)
    stub = daemon.stub()
    me = pb.ClientInfo(name="test")  # the daemon leases in this process's name anyway

    def acquire() -> pb.AcquireResponse:
        return stub.Acquire(pb.AcquireRequest(source=str(src), client=me), timeout=60)

    first = acquire()
    old = [s.digest for s in first.shards]
    write_synthetic_model(src, total_bytes=2 * MiB, tensors=4, seed=2)  # the source changes
    list(stub.Fetch(pb.FetchRequest(source=str(src)), timeout=60))
    # A lease still holds the resident revision: that one is served, whole and resident.
    held = acquire()
    assert [s.digest for s in held.shards] == old and not held.loaded
    for r in (first, held):
        stub.Release(pb.ReleaseRequest(lease_id=r.lease_id), timeout=30)
    # No lease on it any more: the next Acquire loads the revision just fetched.
    fresh = acquire()
    assert fresh.loaded
    assert [s.digest for s in fresh.shards] != old
    assert [hash_file(Path(s.path)) for s in fresh.shards] == [s.digest for s in fresh.shards]
    stub.Release(pb.ReleaseRequest(lease_id=fresh.lease_id), timeout=30)


@pytest.mark.parametrize(("tier", "device"), [
    (pb.TIER_HOST, "cuda:GPU-00000000-0000-0000-0000-000000000000"),
    (pb.TIER_DISK, "cuda:GPU-00000000-0000-0000-0000-000000000000"),
    (pb.TIER_CUDA, "cpu"),
])
def test_a_pin_whose_device_is_not_its_tiers_is_refused(daemon, model, tier, device):
    with pytest.raises(grpc.RpcError) as e:
        daemon.stub().Pin(pb.PinRequest(source=str(model), tier=tier, device=device),
                          timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert not daemon.status().pins  # nothing recorded, nothing warming
