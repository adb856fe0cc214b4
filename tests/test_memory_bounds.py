"""The daemon's own memory under hostile headers: bounded as a whole, not per file.

Two attacks from docs/security.md: many huge headers at once (each one is refused or
served, and the daemon lives on in a memory cgroup of 2 GiB), and many distinct models
with large headers one after the other (what the daemon keeps of their layouts stays
under a budget once they are released and evicted).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.daemon import DaemonProcess, client_info
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb

MiB = 1024 * 1024
GiB = 1024 * MiB
CGROUPS = Path("/sys/fs/cgroup/memory")


def _entries(n: int) -> list[bytes]:
    return [b'"%x":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}' % (i, i, i + 1)
            for i in range(1, n)]


def write_wide_shard(path: Path, rest: bytes, n: int, tag: int) -> None:
    """A valid shard of ``n`` one-byte tensors; ``tag`` makes each file different."""
    first = b'"first-%d":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}' % tag
    header = b"{" + first + (b"," + rest if rest else b"") + b"}"
    header += b" " * (-len(header) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        f.write(b"\0" * n)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def cgroup() -> Iterator[Path]:
    """A memory cgroup (v1) of 2 GiB; processes written to its cgroup.procs are moved
    back to the root cgroup afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a memory cgroup")
    if not (CGROUPS / "cgroup.procs").exists():
        pytest.skip(f"no cgroup v1 memory controller at {CGROUPS}")
    path = CGROUPS / f"weightd-test-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    try:
        (path / "memory.limit_in_bytes").write_text(str(2 * GiB))
        memsw = path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(2 * GiB))  # no swap either
        yield path
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # it exited meanwhile
                (CGROUPS / "cgroup.procs").write_text(pid)
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _oom_kills(path: Path) -> int:
    for line in (path / "memory.oom_control").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


@pytest.mark.slow  # writes eight 56 MB shards and fetches them at once
def test_eight_million_tensor_headers_at_once_in_2GiB(tmp_path, cgroup):
    n = 1_000_000
    rest = b",".join(_entries(n))
    models = tmp_path / "models"
    for tag in range(8):
        write_wide_shard(models / f"wide-{tag}" / "model.safetensors", rest, n, tag)
    del rest
    daemon = DaemonProcess(tmp_path, env={"WEIGHTD_ALLOWED_SOURCES": str(models)})
    try:
        (cgroup / "cgroup.procs").write_text(str(daemon.pid))

        def acquire(tag: int) -> str:
            stub = daemon.stub()  # a channel of its own, carrying this process's credentials
            try:
                got = stub.Acquire(pb.AcquireRequest(
                    source=str(models / f"wide-{tag}"), client=client_info()), timeout=240)
            except grpc.RpcError as e:
                return f"{e.code().name}: {e.details()}"
            stub.Release(pb.ReleaseRequest(lease_id=got.lease_id), timeout=30)
            return "OK"

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(acquire, range(8)))
        assert daemon.proc.poll() is None, f"the daemon died: {answers}\n{daemon.log()}"
        assert _oom_kills(cgroup) == 0
        for a in answers:
            assert a == "OK" or a.startswith("INVALID_ARGUMENT: "), answers
        assert daemon.status().pid == daemon.pid
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()


def test_layouts_of_released_models_do_not_pile_up(tmp_path):
    n = 100_000
    rest = b",".join(_entries(n))
    models = tmp_path / "models"
    count = 5
    for tag in range(count):
        write_wide_shard(models / f"wide-{tag}" / "model.safetensors", rest, n, tag)
    daemon = DaemonProcess(tmp_path, env={"WEIGHTD_ALLOWED_SOURCES": str(models)})
    try:
        s = daemon.stub()
        seen = []
        for tag in range(count):
            src = str(models / f"wide-{tag}")
            got = s.Acquire(pb.AcquireRequest(source=src, client=client_info()), timeout=120)
            assert len(got.tensors) == n
            del got  # the answer is big: keep none of them
            s.Release(pb.ReleaseRequest(lease_id=s.Status(pb.StatusRequest(), timeout=10)
                                        .leases[0].lease_id), timeout=10)
            s.Evict(pb.EvictRequest(source=src), timeout=10)
            seen.append(rss(daemon.pid))
        growth = seen[-1] - seen[1]  # the first model warms the daemon's heaps up
        # each layout of 100,000 tensors is ~28 MiB of objects: kept (weightd 0.1), they
        # added ~87 MiB over these three models; dropped with their model, a few MiB
        assert growth < 32 * MiB, [f"{r / MiB:.0f} MiB" for r in seen]
        assert daemon.status().pid == daemon.pid
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()


def test_the_node_keeps_no_layouts_beside_its_bounded_cache(tmp_path):
    # The layout cache (64 MiB) is the one place parsed headers live: once it lets a
    # layout go, the memory goes back. The node used to keep a second copy of every
    # resident model's layouts, outside any budget (73 MiB for two models of 120,000
    # tensors while the cache held 37). In-process, to count the Python objects.
    import gc
    import tracemalloc

    from tests.test_concurrency import write_shard
    from weightd.config import Config
    from weightd.node import Node, run_sync
    from weightd.store import Store

    n = 50_000
    models = [tmp_path / f"m{i}" for i in range(2)]
    for m in models:
        write_shard(m / "model.safetensors", n)
    store = Store.open(tmp_path / "cache", exclusive=True)
    node = Node(Config(cache_dir=tmp_path / "cache", host_mlock=False), store)
    try:
        tracemalloc.start()
        for m in models:
            run_sync(node.acquiring(str(m), device="cpu"))  # resident, unleased
        assert len(node.residency()) == 2
        digests = [f.digest for r in store.index.models() for f in r.files
                   if f.relpath.endswith(".safetensors")]
        assert all(d in node.fetcher.layouts for d in digests)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        for d in digests:
            node.fetcher.layouts.drop(d)
        gc.collect()
        freed = held - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        node.close()
        store.close()
    # a layout takes about 250 bytes a tensor besides its names (which the views share):
    # about 24 MiB for these two; nothing else may hold them
    assert freed > 2 * n * 100, f"dropping the cached layouts freed {freed / MiB:.1f} MiB"
