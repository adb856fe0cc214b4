"""Load: many clients of one cold model at once, and many cycles without leaks.

The clients are light processes (tests/load_worker.py: gRPC and mmap, no torch) so that
64 of them fit on a small machine; the daemon is the real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess
from weightd.store import hash_file
from weightd.testing import write_synthetic_model
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc

MiB = 1024 * 1024
WORKER = Path(__file__).resolve().parent / "load_worker.py"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path)
    yield d
    assert d.stop() == 0, d.log()


def test_64_client_processes_load_one_cold_model_fetched_once(daemon, http_server, http_root,
                                                              tmp_path):
    model = http_root / "cold"
    write_synthetic_model(model, total_bytes=16 * MiB, tensors=64, shards=4)
    url = f"{http_server.url}/cold"
    ready, go = tmp_path / "ready", tmp_path / "go"
    ready.mkdir()
    n = 64
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(daemon.socket), url,
                               "--ready", str(ready), "--go", str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    try:
        deadline = time.monotonic() + 120
        while len(os.listdir(ready)) < n and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs
                                                          if p.poll() is not None][:1]
            time.sleep(0.05)
        assert len(os.listdir(ready)) == n, "the workers did not all start"
        go.touch()  # all at once
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed[:3]
    assert [p.returncode for p in procs] == [0] * n
    # one fetch, one load into host memory, the same bytes for everyone
    assert sum(r["fetched"] for r in results) == 1
    assert sum(r["loaded"] for r in results) == 1
    shards = sorted(model.glob("*.safetensors"))
    assert all(r["digests"] == sorted(hash_file(p) for p in shards) for r in results)
    assert len({r["checksum"] for r in results}) == 1
    # each file was read from the source exactly once
    for f in sorted(model.iterdir()):
        assert http_server.log.bytes_served(f"/cold/{f.name}") == f.stat().st_size, f.name
    st = daemon.status()
    assert list(st.leases) == []


def _proc_counts(pid: int) -> tuple[int, int, int]:
    """Open fds, mapping lines and VmRSS (bytes) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for _ in f)
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return fds, maps, rss


def test_1000_acquire_release_cycles_leak_nothing(daemon, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic_model(a, total_bytes=MiB, tensors=8, seed=1)
    write_synthetic_model(b, total_bytes=MiB, tensors=8, shards=2, seed=2)
    client = pb.ClientInfo(name="cycles")
    pid = daemon.proc.pid

    def cycle(i: int, stub: pb_grpc.WeightdStub) -> None:
        source = str(a if i % 2 else b)
        resp = stub.Acquire(pb.AcquireRequest(source=source, client=client), timeout=30)
        assert len(resp.tensors) == 8
        stub.Release(pb.ReleaseRequest(lease_id=resp.lease_id), timeout=30)
        if i % 4 == 0:  # unmap and map again a quarter of the time
            stub.Evict(pb.EvictRequest(source=source), timeout=30)

    def settle() -> tuple[int, int, int]:
        time.sleep(0.6)  # the lease reaper's interval, and the server's idle threads
        return _proc_counts(pid)

    stub = daemon.stub()
    for i in range(40):  # warm up: caches, the thread pool, the first mappings
        cycle(i, stub)
    fds0, maps0, rss0 = settle()
    t0 = time.monotonic()
    for i in range(1000):
        cycle(i, stub)
    took = time.monotonic() - t0
    fds1, maps1, rss1 = settle()
    st = stub.Status(pb.StatusRequest(), timeout=10)
    assert list(st.leases) == []
    assert abs(fds1 - fds0) <= 2, (fds0, fds1)
    assert abs(maps1 - maps0) <= 2, (maps0, maps1)
    assert rss1 - rss0 <= 16 * MiB, (rss0 / MiB, rss1 / MiB)
    print(f"\n1000 cycles in {took:.1f}s; daemon fds {fds0}->{fds1}, maps {maps0}->{maps1}, "
          f"RSS {rss0 / MiB:.1f}->{rss1 / MiB:.1f} MiB")
