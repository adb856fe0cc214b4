"""The GPU tier: chunk planning, the staging pipeline, budgets, UUIDs, CudaTier's
bookkeeping and the client's IPC side, on the CPU; then the same on a real GPU (``gpu``).

The CPU tests drive the staging pipeline through :class:`HostMemoryBackend` (a worker
thread standing in for a CUDA stream) and CudaTier through a fake driver built on it,
and the client's CUDA module with its two CUDA calls replaced by CPU tensors. The
``gpu`` tests skip cleanly without cupy and a CUDA device; they are complete and meant
to run on a GPU machine: direct CudaTier + client subprocesses first, then the daemon
end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightd.config import ConfigError
from weightd.errors import BudgetExceeded, FormatError, GpuUnavailable, IntegrityError
from weightd.formats import read_layout
from weightd.store import hash_file
from weightd.testing.cuda import FakeDriver
from weightd.testing.staging import HostMemoryBackend, random_delay
from weightd.tiers import staging as staging_mod
from weightd.tiers.budget import parse_gpu_budget, plan_eviction
from weightd.tiers.cuda import (
    CudaTier,
    DeviceInfo,
    DeviceOutOfMemory,
    _uuid_bytes,
    device_uuid,
    format_uuid,
)
from weightd.tiers.staging import StagingPipeline, plan_chunks
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def write_blob(path: Path, size: int, seed: int = 0) -> bytes:
    data = np.random.default_rng(seed).bytes(size)
    path.write_bytes(data)
    return data


@pytest.fixture
def backend() -> Iterator[HostMemoryBackend]:
    b = HostMemoryBackend(verify=True)
    yield b
    b.close()


# plan_chunks ------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "chunk", "expected"), [
    (0, 4, []),
    (1, 4, [(0, 1)]),
    (8, 4, [(0, 4), (4, 4)]),
    (10, 4, [(0, 4), (4, 4), (8, 2)]),
    (3, 10, [(0, 3)]),
    (4, 4, [(0, 4)]),
])
def test_plan_chunks_edges(size, chunk, expected):
    assert plan_chunks(size, chunk) == expected


@pytest.mark.parametrize(("size", "chunk"), [(-1, 4), (4, 0), (4, -2)])
def test_plan_chunks_refuses_nonsense(size, chunk):
    with pytest.raises(ValueError):
        plan_chunks(size, chunk)


@given(size=st.integers(0, 200_000), chunk=st.integers(100, 10**6))
def test_plan_chunks_tiles_exactly(size, chunk):
    plan = plan_chunks(size, chunk)
    assert sum(n for _, n in plan) == size
    pos = 0
    for i, (off, n) in enumerate(plan):
        assert off == pos and 0 < n <= chunk
        assert n == chunk or i == len(plan) - 1
        pos += n


# the staging pipeline ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 10 * 4096 + 17])
def test_stream_delivers_every_byte_in_place(tmp_path, backend, size):
    data = write_blob(tmp_path / "blob", size)
    dest = bytearray(size)
    with StagingPipeline(backend, buffers=3, buffer_size=4096) as pipeline:
        assert pipeline.stream(tmp_path / "blob", backend.target(dest)) == size
    assert bytes(dest) == data
    assert backend.order == [off for off, _ in plan_chunks(size, 4096)]  # in order
    assert backend.violations == 0 and backend.pending == 0
    assert backend.allocated == 0  # close() gave the pool back


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(0, 60_000), chunk=st.integers(64, 8192), buffers=st.integers(1, 5),
       seed=st.integers(0, 2**32 - 1))
def test_stream_random_sizes(tmp_path, size, chunk, buffers, seed):
    path = tmp_path / f"blob-{seed}-{size}"
    data = write_blob(path, size, seed)
    b = HostMemoryBackend(verify=True, delay=random_delay(0.0002, seed=seed))
    try:
        dest = bytearray(size)
        with StagingPipeline(b, buffers=buffers, buffer_size=chunk) as pipeline:
            pipeline.stream(path, b.target(dest))
        assert bytes(dest) == data
        assert b.violations == 0
        assert b.max_pending <= buffers
    finally:
        b.close()
        path.unlink()


def test_back_pressure_never_more_copies_in_flight_than_buffers(tmp_path):
    size = 40 * 1024 + 5
    data = write_blob(tmp_path / "blob", size)
    b = HostMemoryBackend(verify=True, delay=0.002)  # a slow device
    try:
        dest = bytearray(size)
        with StagingPipeline(b, buffers=3, buffer_size=1024) as pipeline:
            pipeline.stream(tmp_path / "blob", b.target(dest))
        assert bytes(dest) == data
        # bounded by the pool, and the pool is used: reading overlaps the copies
        assert b.max_pending == 3
        assert b.submitted == 41 and b.violations == 0
    finally:
        b.close()


def test_slow_random_copies_never_see_a_refilled_buffer(tmp_path):
    size = 200 * 1024 + 333
    data = write_blob(tmp_path / "blob", size, seed=7)
    b = HostMemoryBackend(verify=True, delay=random_delay(0.003, seed=1))
    try:
        dest = bytearray(size)
        with StagingPipeline(b, buffers=2, buffer_size=4096) as pipeline:
            pipeline.stream(tmp_path / "blob", b.target(dest))
        assert b.violations == 0
        assert hashlib.sha256(dest).digest() == hashlib.sha256(data).digest()
    finally:
        b.close()


def test_the_reuse_detector_detects_an_early_refill():
    # The check the tests above rely on: refilling a buffer before its copy ran is seen.
    b = HostMemoryBackend(verify=True, delay=0.05)
    try:
        buf = b.allocate(1, 16)[0]
        buf.view[:] = b"a" * 16
        dest = bytearray(16)
        event = b.target(dest).copy_async(buf, 16, 0)
        buf.view[:] = b"b" * 16  # what the pipeline must never do
        event.wait()
        assert b.violations == 1
    finally:
        b.close()


def test_a_failed_copy_propagates_and_leaves_nothing_in_flight(tmp_path):
    size = 64 * 1024
    data = write_blob(tmp_path / "blob", size)

    def fault(dst_offset: int, nbytes: int) -> None:
        if dst_offset == 5 * 4096 and not fired.is_set():
            fired.set()
            raise RuntimeError("DMA error")

    fired = threading.Event()
    b = HostMemoryBackend(verify=True, delay=random_delay(0.001, seed=3), fault=fault)
    try:
        with StagingPipeline(b, buffers=3, buffer_size=4096) as pipeline:
            with pytest.raises(RuntimeError, match="DMA error"):
                pipeline.stream(tmp_path / "blob", b.target(bytearray(size)))
            assert b.pending == 0  # every copy in flight was waited for
            # the pool is whole and usable again
            dest = bytearray(size)
            pipeline.stream(tmp_path / "blob", b.target(dest))
            assert bytes(dest) == data
        assert b.violations == 0 and b.allocated == 0
    finally:
        b.close()


def test_a_failed_read_propagates_and_leaves_nothing_in_flight(tmp_path, monkeypatch, backend):
    size = 64 * 1024
    data = write_blob(tmp_path / "blob", size)
    real = os.preadv
    calls = {"n": 0}

    def flaky(fd: int, buffers: Any, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(5, "Input/output error")
        return real(fd, buffers, offset)

    with StagingPipeline(backend, buffers=2, buffer_size=4096) as pipeline:
        monkeypatch.setattr(staging_mod.os, "preadv", flaky)
        with pytest.raises(OSError, match="Input/output"):
            pipeline.stream(tmp_path / "blob", backend.target(bytearray(size)))
        assert backend.pending == 0
        monkeypatch.setattr(staging_mod.os, "preadv", real)
        dest = bytearray(size)
        pipeline.stream(tmp_path / "blob", backend.target(dest))
        assert bytes(dest) == data


def test_a_file_that_ends_early_is_an_integrity_error(tmp_path, monkeypatch, backend):
    write_blob(tmp_path / "blob", 10_000)
    with StagingPipeline(backend, buffers=2, buffer_size=4096) as pipeline:
        with pytest.raises(IntegrityError, match="10000 bytes on disk, 12000 expected"):
            pipeline.stream(tmp_path / "blob", backend.target(bytearray(12_000)), size=12_000)
        # a file truncated while it is read (preadv returns 0 early)
        real = os.preadv
        monkeypatch.setattr(staging_mod.os, "preadv",
                            lambda fd, bufs, off: 0 if off >= 8192 else real(fd, bufs, off))
        with pytest.raises(IntegrityError, match="ended at byte 8192"):
            pipeline.stream(tmp_path / "blob", backend.target(bytearray(10_000)))
        assert backend.pending == 0


def test_a_missing_file_raises_and_the_pipeline_stays_usable(tmp_path, backend):
    with StagingPipeline(backend, buffers=2, buffer_size=4096) as pipeline:
        with pytest.raises(FileNotFoundError):
            pipeline.stream(tmp_path / "nope", backend.target(bytearray(1)))
        data = write_blob(tmp_path / "blob", 5000)
        dest = bytearray(5000)
        pipeline.stream(tmp_path / "blob", backend.target(dest))
        assert bytes(dest) == data


def test_pipeline_arguments_and_close(tmp_path, backend):
    with pytest.raises(ValueError):
        StagingPipeline(backend, buffers=0, buffer_size=4096)
    with pytest.raises(ValueError):
        StagingPipeline(backend, buffers=1, buffer_size=0)
    pipeline = StagingPipeline(backend, buffers=2, buffer_size=1024)
    assert pipeline.buffers == 2 and pipeline.pool_bytes == 2048 and backend.allocated == 2
    pipeline.close()
    pipeline.close()  # idempotent
    assert backend.allocated == 0
    write_blob(tmp_path / "blob", 10)
    with pytest.raises(ValueError, match="closed"):
        pipeline.stream(tmp_path / "blob", backend.target(bytearray(10)))


def test_host_target_refuses_copies_that_do_not_fit(backend):
    buf = backend.allocate(1, 8)[0]
    target = backend.target(bytearray(10))
    for nbytes, offset in [(0, 0), (9, 0), (8, 3), (4, -1)]:
        with pytest.raises(ValueError):
            target.copy_async(buf, nbytes, offset)
    with pytest.raises(ValueError):
        backend.target(memoryview(b"read-only"))


def test_concurrent_streams_share_the_pool_one_at_a_time(tmp_path):
    b = HostMemoryBackend(verify=True, delay=random_delay(0.0005, seed=2))
    try:
        blobs = [write_blob(tmp_path / f"b{i}", 30_000 + i, seed=i) for i in range(6)]
        dests = [bytearray(len(d)) for d in blobs]
        with StagingPipeline(b, buffers=2, buffer_size=2048) as pipeline:
            threads = [threading.Thread(target=pipeline.stream,
                                        args=(tmp_path / f"b{i}", b.target(dests[i])))
                       for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert [bytes(d) for d in dests] == blobs
        assert b.violations == 0 and b.max_pending <= 2
    finally:
        b.close()


# UUIDs ----------------------------------------------------------------------------------


def test_format_uuid_matches_nvidia_smi_and_torch():
    raw = bytes.fromhex("5dbc9a3e1f2b4c5d8e9fa0b1c2d3e4f5")
    # nvidia-smi -L: "GPU 0: NVIDIA H100 (UUID: GPU-5dbc9a3e-1f2b-4c5d-8e9f-a0b1c2d3e4f5)";
    # torch: str(get_device_properties(0).uuid) == "5dbc9a3e-1f2b-4c5d-8e9f-a0b1c2d3e4f5"
    import uuid

    assert format_uuid(raw) == "GPU-5dbc9a3e-1f2b-4c5d-8e9f-a0b1c2d3e4f5"
    assert format_uuid(raw) == "GPU-" + str(uuid.UUID(bytes=raw))
    assert format_uuid(bytes(16)) == "GPU-00000000-0000-0000-0000-000000000000"
    for bad in (b"", bytes(15), bytes(17)):
        with pytest.raises(ValueError):
            format_uuid(bad)


def test_uuid_bytes_distrusts_a_truncated_cupy_answer():
    full = bytes(range(1, 17))
    assert _uuid_bytes(full, None) == full
    assert _uuid_bytes(full + b"luid", None) == full  # ran on into the next field
    assert _uuid_bytes(b"\x01\x02", None) is None     # stopped at a zero byte
    assert _uuid_bytes(b"\x01\x02", bytes(16)) == bytes(16)  # the driver API wins


def test_device_uuid_from_the_wire():
    uuid = "GPU-5dbc9a3e-1f2b-4c5d-8e9f-a0b1c2d3e4f5"
    assert device_uuid("cuda:" + uuid) == uuid
    # nvidia-smi prints a MIG instance as MIG- + the hex the daemon lists as GPU-
    assert device_uuid("cuda:MIG-5dbc9a3e-1f2b-4c5d-8e9f-a0b1c2d3e4f5") == \
        "GPU-5dbc9a3e-1f2b-4c5d-8e9f-a0b1c2d3e4f5"
    for bad in ("cuda", "cuda:0", "cuda:", "cpu", "cuda:gpu-5dbc", "rocm:GPU-1",
                "cuda:GPU-" + "0" * 100):
        with pytest.raises(FormatError):
            device_uuid(bad)


# budgets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "total", "expected"), [
    ("40GiB", 80 * GiB, 40 * GiB),
    ("90%", 80 * GiB, 72 * GiB),
    (" 50 % ", 1000, 500),
    ("100%", 1000, 1000),
    ("0.5%", 1000, 5),
    (12345, 10**6, 12345),
    ("1TiB", 80 * GiB, 80 * GiB),  # never more than the device
    ("0", 1000, 0),
    ("42949672960", 80 * GiB, 40 * GiB),  # as weightd.config keeps a size: bytes, as text
    (None, 1000, 900),  # the default: 90%
])
def test_parse_gpu_budget(value, total, expected):
    assert parse_gpu_budget(value, total) == expected


@pytest.mark.parametrize("value", ["0%", "-5%", "101%", "abc%", "%", "lots", "-1", True])
def test_parse_gpu_budget_refuses(value):
    with pytest.raises(ConfigError):
        parse_gpu_budget(value, 1000)


def test_eviction_not_needed_when_it_fits():
    assert plan_eviction(10, 90, 100, [(1.0, "a", 50, False)]) == []


def test_eviction_is_lru_and_minimal():
    candidates = [(3.0, "c", 30, False), (1.0, "a", 10, False), (2.0, "b", 20, False),
                  (0.5, "old-but-leased", 100, True)]
    # 95 used + 20 needed in 100: 15 must go -> a (10) then b (20), not c
    assert plan_eviction(20, 95, 100, candidates) == ["a", "b"]
    assert plan_eviction(15, 95, 100, candidates) == ["a"]
    assert plan_eviction(60, 95, 100, candidates) == ["a", "b", "c"]


def test_eviction_never_chooses_a_leased_model_and_says_need_and_free():
    candidates = [(1.0, "leased", 500, True), (2.0, "small", 10, False)]
    with pytest.raises(BudgetExceeded) as e:
        plan_eviction(200, 900, 1000, candidates, what="cuda tier GPU-1")
    msg = str(e.value)
    assert "cuda tier GPU-1" in msg and "need 200 bytes" in msg and "100 bytes free" in msg
    assert "500 bytes are leased" in msg and "would free 10 bytes" in msg
    assert isinstance(e.value, MemoryError)  # the stdlib type it resembles


def test_eviction_of_a_model_larger_than_the_budget():
    with pytest.raises(BudgetExceeded, match=r"need 2000 bytes .*, 1000 bytes free"):
        plan_eviction(2000, 0, 1000, [])


def test_eviction_ties_are_broken_by_key_and_inputs_checked():
    assert plan_eviction(5, 100, 100, [(1.0, "b", 5, False), (1.0, "a", 5, False)]) == ["a"]
    with pytest.raises(ValueError):
        plan_eviction(-1, 0, 10, [])
    with pytest.raises(ValueError):
        plan_eviction(5, 100, 100, [(1.0, "a", -5, False)])


@given(need=st.integers(0, 500), budget=st.integers(0, 1000),
       models=st.lists(st.tuples(st.floats(0, 100), st.integers(0, 300), st.booleans()),
                       max_size=8))
def test_eviction_plan_properties(need, budget, models):
    candidates = [(t, f"m{i}", size, leased) for i, (t, size, leased) in enumerate(models)]
    used = sum(size for _, _, size, _ in candidates)
    by_key = {c[1]: c for c in candidates}
    try:
        plan = plan_eviction(need, used, budget, candidates)
    except BudgetExceeded as e:
        assert f"need {need} bytes" in str(e)
        unleased = sum(c[2] for c in candidates if not c[3])
        assert used - unleased + need > budget
        return
    freed = sum(by_key[k][2] for k in plan)
    assert used - freed + need <= budget
    assert not any(by_key[k][3] for k in plan)
    lru = [c[1] for c in sorted((c for c in candidates if not c[3]), key=lambda c: (c[0], c[1]))]
    assert plan == lru[:len(plan)]  # a prefix of the LRU order...
    if plan:  # ...and the shortest one
        assert used - (freed - by_key[plan[-1]][2]) + need > budget


# CudaTier on a fake driver ------------------------------------------------------------------


def dev(uuid: str) -> str:
    """The node's (and the tier's) name of a device."""
    return "cuda:" + uuid


def blobs_for(tmp_path: Path, sizes: list[int], seed: int = 0) -> list[tuple[str, Path, int]]:
    out = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"blob-{seed}-{i}"
        write_blob(path, size, seed * 100 + i)
        out.append((hash_file(path), path, size))
    return out


@pytest.fixture
def fake() -> Iterator[FakeDriver]:
    d = FakeDriver()
    yield d
    if d._backend is not None:
        d._backend.close()


def tier_on(driver: FakeDriver, **kw: Any) -> CudaTier:
    tier = CudaTier(staging_buffers=2, staging_buffer_size=4096, driver=driver, **kw)
    assert tier.start() == (True, tier.probe()[1])
    return tier


def test_probe_without_cupy_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    tier = CudaTier()
    available, reason = tier.probe()
    assert not available
    assert "cupy" in reason and "pip install 'weightd[cuda]'" in reason
    assert tier.start() == (False, reason)
    assert tier.devices() == [] and tier.reason == reason
    with pytest.raises(GpuUnavailable, match="cupy"):
        tier.resolve("GPU-00000000-0000-0000-0000-000000000000")
    with pytest.raises(GpuUnavailable, match="cupy"):
        tier.load("m", "cuda:GPU-x", [])
    tier.close()


def test_probe_without_devices_and_with_a_broken_driver():
    class NoDevices(FakeDriver):
        def devices(self) -> list[DeviceInfo]:
            return []

    class Broken(FakeDriver):
        def devices(self) -> list[DeviceInfo]:
            raise RuntimeError("libcuda.so.1: cannot open shared object file")

    ok, reason = CudaTier(driver=NoDevices()).probe()
    assert not ok and "no CUDA device" in reason
    ok, reason = CudaTier(driver=Broken()).probe()
    assert not ok and "libcuda.so.1" in reason


def test_a_staging_pool_that_cannot_be_pinned_makes_the_tier_unavailable():
    tier = CudaTier(driver=FakeDriver(fail_staging=True), staging_buffers=2,
                    staging_buffer_size=4096)
    ok, reason = tier.start()
    assert not ok and "pinned staging pool" in reason and "cudaHostAlloc" in reason
    with pytest.raises(GpuUnavailable, match="pinned staging pool"):
        tier.resolve(format_uuid(bytes([1]) * 16))


def test_devices_and_resolve_by_uuid(fake):
    tier = tier_on(fake)
    devices = tier.devices()
    assert [d.index for d in devices] == [0, 1]
    assert tier.resolve(devices[1].uuid) == 1
    assert tier.total_bytes(devices[0].uuid) == MiB
    with pytest.raises(GpuUnavailable, match="no such device") as e:
        tier.resolve("GPU-ffffffff-ffff-ffff-ffff-ffffffffffff")
    assert devices[0].uuid in str(e.value)  # says which ones it sees
    assert tier.staging_pool_bytes == 2 * 4096


def test_load_streams_every_blob_into_its_own_allocation(tmp_path, fake):
    tier = tier_on(fake)
    uuid = tier.devices()[0].uuid
    blobs = blobs_for(tmp_path, [10_000, 4096, 1])
    assert tier.load("m", dev(uuid), blobs) == 14_097
    assert tier.resident("m", dev(uuid)) and not tier.resident("m", dev(tier.devices()[1].uuid))
    exports = tier.export("m", dev(uuid))
    assert [(e.digest, e.size, e.device_uuid) for e in exports] == \
        [(d, s, uuid) for d, _, s in blobs]
    assert len({e.ipc_handle for e in exports}) == 3
    for e, (_, path, _) in zip(exports, blobs, strict=True):
        assert fake.contents(e.ipc_handle) == path.read_bytes()
    assert tier.bytes_used(uuid) == 14_097 == tier.model_bytes("m", dev(uuid))
    assert tier.memory_info(uuid) == (MiB - 14_097, MiB)
    assert tier.load("m", dev(uuid), blobs) == 0  # idempotent
    assert fake.backend.violations == 0 and fake.registered_copies == 0


def test_blobs_shared_by_models_are_allocated_once_per_device(tmp_path, fake):
    tier = tier_on(fake)
    gpu0, gpu1 = (d.uuid for d in tier.devices())
    shared, only_a, only_b = blobs_for(tmp_path, [5000, 3000, 2000])
    assert tier.missing_bytes(dev(gpu0), [shared, only_a]) == 8000
    assert tier.load("a", dev(gpu0), [shared, only_a]) == 8000
    assert tier.missing_bytes(dev(gpu0), [shared, only_b, only_b]) == 2000
    assert tier.missing_bytes(dev(gpu1), [shared]) == 5000
    assert tier.load("b", dev(gpu0), [shared, only_b, only_b]) == 2000  # a duplicate counts once
    assert tier.bytes_used(gpu0) == 10_000 and len(fake.mem) == 3
    assert tier.export("a", dev(gpu0))[0].ipc_handle == tier.export("b", dev(gpu0))[0].ipc_handle
    assert tier.freeable_bytes("a", dev(gpu0)) == 3000 and tier.model_bytes("b", dev(gpu0)) == 7000
    # the same blob on another device is another allocation
    assert tier.load("a", dev(gpu1), [shared, only_a]) == 8000
    assert sorted(tier.models()) == [("a", dev(gpu0)), ("a", dev(gpu1)), ("b", dev(gpu0))]
    assert tier.models(dev(gpu1)) == [("a", dev(gpu1))]
    assert tier.unload("a", dev(gpu0)) == 3000  # the shared blob stays for b
    assert tier.bytes_used(gpu0) == 7000
    assert fake.contents(tier.export("b", dev(gpu0))[0].ipc_handle) == shared[1].read_bytes()
    assert tier.unload("b", dev(gpu0)) == 7000
    assert tier.unload("b", dev(gpu0)) == 0  # idempotent
    assert tier.bytes_used(gpu0) == 0 and fake.used == [0, 8000]
    with pytest.raises(KeyError):
        tier.export("b", dev(gpu0))
    tier.close()
    assert fake.used == [0, 0] and fake.mem == {} and fake.closed
    assert fake.backend.allocated == 0


def test_device_out_of_memory_is_budget_exceeded_with_need_and_free(tmp_path):
    fake = FakeDriver(total=10_000)
    tier = tier_on(fake)
    uuid = tier.devices()[0].uuid
    blobs = blobs_for(tmp_path, [6000, 5000])
    with pytest.raises(BudgetExceeded) as e:
        tier.load("m", dev(uuid), blobs)
    msg = str(e.value)
    assert "need 5000 bytes" in msg and "4000 bytes free" in msg and uuid in msg
    # nothing half-loaded: the first blob's allocation was given back
    assert fake.mem == {} and tier.bytes_used(uuid) == 0 and not tier.resident("m", dev(uuid))
    fake.backend.close()


def test_a_failed_copy_frees_the_allocations_of_that_load(tmp_path):
    blobs = blobs_for(tmp_path, [3000, 20_000])

    def fault(dst_offset: int, nbytes: int) -> None:
        if dst_offset == 8192:
            raise GpuUnavailable("CUDA error: cudaErrorIllegalAddress")

    fake = FakeDriver(fault=fault, delay=0.0005)
    tier = tier_on(fake)
    gpu0 = tier.devices()[0].uuid
    tier.load("other", dev(gpu0), blobs[:1])
    with pytest.raises(GpuUnavailable, match="IllegalAddress"):
        tier.load("m", dev(gpu0), blobs)
    assert fake.backend.pending == 0
    assert not tier.resident("m", dev(gpu0))
    assert tier.bytes_used(gpu0) == 3000 and len(fake.mem) == 1  # other's blob stays
    assert tier.export("other", dev(gpu0))[0].size == 3000
    fake.backend.close()


def test_a_blob_whose_size_changed_is_refused(tmp_path, fake):
    tier = tier_on(fake)
    uuid = tier.devices()[0].uuid
    digest, path, size = blobs_for(tmp_path, [5000])[0]
    with pytest.raises(IntegrityError):
        tier.load("m", dev(uuid), [(digest, path, size + 1)])
    assert fake.mem == {}


def test_register_host_copies_from_the_registered_mapping(tmp_path, fake):
    tier = tier_on(fake, register_host=True)
    assert tier.staging_pool_bytes == 0  # not allocated: the registered path needs none
    uuid = tier.devices()[0].uuid
    blobs = blobs_for(tmp_path, [7000, 100])
    tier.load("m", dev(uuid), blobs)
    assert fake.registered_copies == 2 and fake.staged_targets == 0
    for e, (_, path, _) in zip(tier.export("m", dev(uuid)), blobs, strict=True):
        assert fake.contents(e.ipc_handle) == path.read_bytes()
    # a device that cannot register read-only memory falls back to staging
    fake.register = False
    tier.load("n", dev(tier.devices()[1].uuid), blobs)
    assert fake.registered_copies == 2 and fake.staged_targets == 2
    assert tier.staging_pool_bytes == 2 * 4096


def test_tier_arguments_are_checked():
    with pytest.raises(ValueError):
        CudaTier(staging_buffers=0)
    with pytest.raises(ValueError):
        CudaTier(staging_buffer_size=0)


# CupyDriver against a fake cupy runtime (host memory through ctypes) ------------------------


class FakeRuntime:
    """The slice of ``cupy.cuda.runtime`` CupyDriver uses, on host memory: catches wrong
    names, argument orders, device contexts and leaks in the thin CUDA layer."""

    class CUDARuntimeError(RuntimeError):
        def __init__(self, status: int) -> None:
            super().__init__(f"cudaError {status}")
            self.status = status

    def __init__(self, *, devices: int = 2, total: int = 8 * MiB,
                 register_read_only: bool = True) -> None:
        import ctypes

        self.ctypes = ctypes
        self.n = devices
        self.total = total
        self.register_read_only = register_read_only
        self.current = 0
        self.device_mem: dict[int, tuple[Any, int]] = {}  # ptr -> (buffer, device)
        self.host_mem: dict[int, Any] = {}
        self.registered: dict[int, int] = {}
        self.streams: dict[int, int] = {}  # stream -> device
        self.events: dict[int, int] = {}   # event -> device
        self.recorded: set[int] = set()
        self.next_id = 1
        self.copies: list[tuple[int, int]] = []  # (device, bytes)

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def getDeviceCount(self) -> int:  # noqa: N802 - cupy's names
        return self.n

    def getDeviceProperties(self, i: int) -> dict[str, Any]:  # noqa: N802
        # like cupy: the uuid runs on into the next field when it has no zero byte
        return {"name": b"Fake H100", "totalGlobalMem": self.total,
                "uuid": bytes([0x10 + i]) * 16 + b"luid"}

    def getDevice(self) -> int:  # noqa: N802
        return self.current

    def setDevice(self, i: int) -> None:  # noqa: N802
        assert 0 <= i < self.n
        self.current = i

    def _used(self, device: int) -> int:
        return sum(len(b) for b, d in self.device_mem.values() if d == device)

    def malloc(self, size: int) -> int:
        if self._used(self.current) + size > self.total:
            raise self.CUDARuntimeError(2)
        buf = self.ctypes.create_string_buffer(size)
        ptr = self.ctypes.addressof(buf)
        self.device_mem[ptr] = (buf, self.current)
        return ptr

    def free(self, ptr: int) -> None:
        buf, device = self.device_mem.pop(ptr)
        assert device == self.current, "cudaFree on the wrong device"

    def hostAlloc(self, size: int, flags: int) -> int:  # noqa: N802
        assert flags == 1  # portable
        buf = self.ctypes.create_string_buffer(size)
        self.host_mem[self.ctypes.addressof(buf)] = buf
        return self.ctypes.addressof(buf)

    def freeHost(self, ptr: int) -> None:  # noqa: N802
        del self.host_mem[ptr]

    def hostRegister(self, ptr: int, size: int, flags: int) -> None:  # noqa: N802
        assert flags & 0x08, "a read-only mapping must be registered read-only"
        self.registered[ptr] = size

    def hostUnregister(self, ptr: int) -> None:  # noqa: N802
        del self.registered[ptr]

    def memcpyAsync(self, dst: int, src: int, size: int, kind: int,  # noqa: N802
                    stream: int) -> None:
        assert kind == 1 and self.streams[stream] == self.current
        buf, device = next((b, d) for p, (b, d) in self.device_mem.items()
                           if p <= dst and dst + size <= p + len(b))
        assert device == self.current
        assert src in self.host_mem or any(p <= src < p + n for p, n in self.registered.items())
        self.ctypes.memmove(dst, src, size)
        self.copies.append((device, size))

    def streamCreateWithFlags(self, flags: int) -> int:  # noqa: N802
        s = self._id()
        self.streams[s] = self.current
        return s

    def streamDestroy(self, stream: int) -> None:  # noqa: N802
        assert self.streams.pop(stream) == self.current

    def streamSynchronize(self, stream: int) -> None:  # noqa: N802
        assert stream in self.streams

    def eventCreateWithFlags(self, flags: int) -> int:  # noqa: N802
        assert flags == 3  # disable timing | blocking sync
        e = self._id()
        self.events[e] = self.current
        return e

    def eventRecord(self, event: int, stream: int) -> None:  # noqa: N802
        assert self.events[event] == self.streams[stream] == self.current
        self.recorded.add(event)

    def eventQuery(self, event: int) -> int:  # noqa: N802
        return 0 if event in self.recorded else 600

    def eventSynchronize(self, event: int) -> None:  # noqa: N802
        assert event in self.recorded

    def eventDestroy(self, event: int) -> None:  # noqa: N802
        del self.events[event]
        self.recorded.discard(event)

    def ipcGetMemHandle(self, ptr: int) -> bytes:  # noqa: N802
        assert ptr in self.device_mem, "an IPC handle needs the allocation's base pointer"
        return ptr.to_bytes(8, "little") + bytes(56)

    def memGetInfo(self) -> tuple[int, int]:  # noqa: N802
        return self.total - self._used(self.current), self.total

    def deviceGetAttribute(self, attr: int, device: int) -> int:  # noqa: N802
        assert attr == 113
        return int(self.register_read_only)


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRuntime]:
    import types

    from weightd.tiers import cuda as cuda_mod

    rt = FakeRuntime()

    class Device:
        def __init__(self, i: int) -> None:
            self.id = i

        def __enter__(self) -> Device:
            self.prev = rt.getDevice()
            rt.setDevice(self.id)
            return self

        def __exit__(self, *exc: object) -> None:
            rt.setDevice(self.prev)

    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=rt, Device=Device)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(cuda_mod, "_libcuda_uuid", lambda ordinal: None)
    yield rt


@pytest.mark.parametrize("register_host", [False, True])
def test_cupy_driver_loads_exports_and_frees(tmp_path, fake_cupy, register_host):
    import ctypes

    tier = CudaTier(staging_buffers=2, staging_buffer_size=4096, register_host=register_host)
    ok, reason = tier.start()
    assert ok, reason
    gpu0, gpu1 = (d.uuid for d in tier.devices())
    assert gpu1 == "GPU-11111111-1111-1111-1111-111111111111"
    assert "Fake H100" in reason
    assert len(fake_cupy.host_mem) == (0 if register_host else 2)  # the pinned pool
    blobs = blobs_for(tmp_path, [10_000, 1, 8192])
    # each blob takes whole 2 MiB granules on the device: the budget counts those
    assert tier.load("m", dev(gpu1), blobs) == 3 * 2 * MiB
    assert tier.bytes_used(gpu1) == 3 * 2 * MiB
    for e, (_, path, _) in zip(tier.export("m", dev(gpu1)), blobs, strict=True):
        ptr = int.from_bytes(e.ipc_handle[:8], "little")
        buf, device = fake_cupy.device_mem[ptr]
        assert device == 1  # allocated on the asked device
        # whole 2 MiB granules: an IPC handle opens its whole page, never a neighbour's
        assert len(buf) == 2 * MiB
        assert ctypes.string_at(ptr, e.size) == path.read_bytes()
    assert {d for d, _ in fake_cupy.copies} == {1}
    assert len(fake_cupy.copies) == (3 if register_host else 3 + 1 + 2)
    assert tier.memory_info(gpu1) == (8 * MiB - 3 * 2 * MiB, 8 * MiB)
    assert fake_cupy.events == {} and fake_cupy.registered == {}  # nothing left behind
    # the device is full: BudgetExceeded, with what was needed and what is free
    with pytest.raises(BudgetExceeded, match=r"need 9000000 bytes .*8388608 bytes free"):
        tier.load("big", dev(gpu0), blobs_for(tmp_path, [9_000_000], seed=1))
    assert tier.unload("m", dev(gpu1)) == 3 * 2 * MiB
    assert fake_cupy.device_mem == {}
    tier.close()
    assert fake_cupy.host_mem == {} and fake_cupy.streams == {}


def test_a_gpu_named_mig_or_gpu_is_one_device_to_the_node(tmp_path, fake_cupy):
    # nvidia-smi -L names a MIG instance MIG-<hex>; the daemon lists it as GPU-<hex>.
    # Either spelling must reach the same residency, leases and budget.
    from weightd.config import Config
    from weightd.node import Node
    from weightd.store import Store

    model = tmp_path / "model.safetensors"
    save_model(model)
    store = Store.open(tmp_path / "cache", exclusive=True)
    node = Node(Config(cache_dir=tmp_path / "cache", staging_buffers=2,
                       staging_buffer_size=MiB), store)
    node.start()
    try:
        uuid = node.cuda.devices()[1].uuid
        me = node.credentials.local()
        first = node.acquire(str(model), device="cuda:MIG-" + uuid[4:], caller=me)
        again = node.acquire(str(model), device="cuda:" + uuid, caller=me)
        assert first.loaded and not again.loaded  # one copy on the device, not two
        assert first.lease.device == again.lease.device == "cuda:" + uuid
        assert [r.device for r in node.residency()] == ["cuda:" + uuid]
        assert node.leases.count(first.model, "cuda:" + uuid) == 2
    finally:
        node.close()
        store.close()


def test_cupy_driver_falls_back_to_staging_without_read_only_registration(tmp_path, fake_cupy):
    fake_cupy.register_read_only = False
    tier = CudaTier(staging_buffers=2, staging_buffer_size=4096, register_host=True)
    assert tier.start()[0]
    uuid = tier.devices()[0].uuid
    tier.load("m", dev(uuid), blobs_for(tmp_path, [10_000]))
    assert fake_cupy.registered == {} and len(fake_cupy.copies) == 3  # staged in 3 chunks
    assert len(fake_cupy.host_mem) == 2
    tier.close()
    assert fake_cupy.host_mem == {} and fake_cupy.device_mem == {}


def test_cupy_driver_translates_cuda_errors(fake_cupy, tmp_path):
    from weightd.tiers.cuda import CupyDriver

    def no_device() -> int:
        raise FakeRuntime.CUDARuntimeError(100)

    fake_cupy.getDeviceCount = no_device  # type: ignore[method-assign]
    ok, reason = CudaTier().probe()
    assert not ok and "no CUDA device" in reason
    fake_cupy.getDeviceCount = lambda: 1  # type: ignore[method-assign]

    def broken(*args: Any) -> None:
        raise FakeRuntime.CUDARuntimeError(700)

    driver = CupyDriver()
    fake_cupy.memGetInfo = broken  # type: ignore[method-assign]
    with pytest.raises(GpuUnavailable, match="CUDA error: cudaError 700"):
        driver.memory_info(0)
    with pytest.raises(DeviceOutOfMemory):
        driver.malloc(0, 10**12)


# the client's CUDA module, with its CUDA calls replaced by CPU tensors ---------------------


@pytest.fixture
def ipc(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Replaces ipcOpenMemHandle/ipcCloseMemHandle: a handle names a file's bytes."""
    torch = pytest.importorskip("torch")
    from weightd_client import cuda as wc

    state: dict[str, Any] = {"files": {}, "opened": [], "closed": [], "uuid": "GPU-local"}

    def fake_open(handle: bytes, size: int, device_index: int) -> tuple[int, Any]:
        data = bytearray(state["files"][handle])
        state["opened"].append(handle)
        return len(state["opened"]), torch.frombuffer(data, dtype=torch.uint8)[:size]

    def fake_close(ptr: int, device_index: int) -> None:
        state["closed"].append(ptr)

    monkeypatch.setattr(wc, "_ipc_open", fake_open)
    monkeypatch.setattr(wc, "_ipc_close", fake_close)
    monkeypatch.setattr(wc, "_local_uuid", lambda index: state["uuid"])
    yield state
    assert wc.opened_handles() == {}, "a test left IPC handles open"


def handle(n: int) -> bytes:
    return bytes([n]) * 64


def save_model(path: Path) -> dict[str, Any]:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(7, 33, generator=g).to(torch.bfloat16),
        "f16": torch.randn(5, generator=g).to(torch.float16),
        "f32": torch.randn(3, 4, generator=g),
        "i64": torch.arange(6, dtype=torch.int64).view(2, 3),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(16, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5, dtype=torch.float32),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
    }
    save_file(tensors, str(path))
    return tensors


def cuda_response(path: Path, h: bytes, uuid: str = "GPU-local", *,
                  device_offset: int = 0) -> pb.AcquireResponse:
    layout = read_layout(path)
    return pb.AcquireResponse(
        lease_id="l1", model="m", tier=pb.TIER_CUDA, device="cuda:" + uuid,
        shards=[pb.Shard(relpath=path.name, digest="d", size=layout.file_size, ipc_handle=h,
                         device_uuid=uuid, device_offset=device_offset)],
        tensors=[pb.TensorLayout(name=t.name, dtype=t.dtype, shape=t.shape, shard=0,
                                 offset=t.offset, length=t.nbytes) for t in layout.tensors])


def test_open_shard_is_cached_by_handle_and_closed_at_the_last_reference(ipc):
    from weightd_client import cuda as wc

    ipc["files"][handle(1)] = b"x" * 100
    a = wc.open_shard(handle(1), 100, 0)
    b = wc.open_shard(handle(1), 100, 0)
    assert a is b and ipc["opened"] == [handle(1)]  # opened once per process
    assert wc.opened_handles() == {handle(1): 2}
    with pytest.raises(GpuUnavailable, match="open on cuda:0"):
        wc.open_shard(handle(1), 100, 1)
    with pytest.raises(FormatError):
        wc.open_shard(handle(1), 200, 0)  # larger than what was opened
    wc.close_shard(handle(1))
    assert ipc["closed"] == []
    wc.close_shard(handle(1))
    assert ipc["closed"] == [1] and wc.opened_handles() == {}
    with pytest.raises(KeyError):
        wc.close_shard(handle(1))
    with pytest.raises(FormatError):
        wc.open_shard(b"short", 10, 0)
    with pytest.raises(FormatError):
        wc.open_shard(handle(2), 0, 0)


def test_build_cuda_tensors_views_every_dtype_bitwise(tmp_path, ipc):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from weightd_client import cuda as wc

    path = tmp_path / "model.safetensors"
    save_model(path)
    ipc["files"][handle(1)] = path.read_bytes()
    response = cuda_response(path, handle(1))
    out = wc.build_cuda_tensors(response, 0)
    ref = load_file(str(path))
    assert list(out) == [t.name for t in response.tensors]
    assert ipc["opened"] == [handle(1)] and wc.opened_handles() == {handle(1): 1}
    for name, t in out.items():
        assert t.dtype == ref[name].dtype and t.shape == ref[name].shape, name
        if t.numel():
            assert torch.equal(t.reshape(-1).view(torch.uint8),
                               ref[name].reshape(-1).view(torch.uint8)), name
    # views, not copies: every tensor with bytes lies in the one opened buffer
    base = out["bf16"].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in out.values() if t.numel())
    # a second model of the same handle shares it; each release gives one reference back
    again = wc.build_cuda_tensors(response, 0)
    assert wc.opened_handles() == {handle(1): 2}
    assert again["f32"].data_ptr() == out["f32"].data_ptr()
    wc.release_shards(wc.shard_handles(response))
    wc.release_shards(wc.shard_handles(response))
    assert ipc["closed"] == [1]


def test_a_misaligned_tensor_is_copied_once_and_logged(tmp_path, ipc, caplog):
    torch = pytest.importorskip("torch")
    from weightd_client import cuda as wc

    path = tmp_path / "model.safetensors"
    tensors = save_model(path)
    data = path.read_bytes()
    # the shard lies 1 byte into the buffer: every tensor wider than a byte is misaligned
    ipc["files"][handle(3)] = b"\0" + data
    response = cuda_response(path, handle(3), device_offset=1)
    with caplog.at_level("DEBUG", logger="weightd_client.cuda"):
        out = wc.build_cuda_tensors(response, 0)
    assert torch.equal(out["f32"], tensors["f32"]) and torch.equal(out["i64"], tensors["i64"])
    assert torch.equal(out["bf16"].view(torch.int16), tensors["bf16"].view(torch.int16))
    base = out["bool"].untyped_storage().data_ptr()
    assert out["f8"].untyped_storage().data_ptr() == base  # 1-byte dtypes: still views
    assert out["f32"].untyped_storage().data_ptr() != base  # copied
    assert "not aligned" in caplog.text and "'f32'" in caplog.text
    wc.release_shards(wc.shard_handles(response))


def test_an_answer_for_another_device_is_refused_before_opening(tmp_path, ipc):
    from weightd_client import cuda as wc

    path = tmp_path / "model.safetensors"
    save_model(path)
    ipc["files"][handle(1)] = path.read_bytes()
    with pytest.raises(GpuUnavailable, match="GPU-other"):
        wc.build_cuda_tensors(cuda_response(path, handle(1), "GPU-other"), 0)
    assert ipc["opened"] == []


@pytest.mark.parametrize("breakage", ["length", "shard", "dtype", "bounds", "twice", "handle",
                                      "range"])
def test_an_inconsistent_answer_is_a_format_error_and_closes_what_it_opened(tmp_path, ipc,
                                                                            breakage):
    from weightd_client import cuda as wc

    path = tmp_path / "model.safetensors"
    save_model(path)
    ipc["files"][handle(1)] = path.read_bytes()
    response = cuda_response(path, handle(1))
    t = response.tensors[0]
    if breakage == "length":
        t.length += 2
    elif breakage == "shard":
        t.shard = 3
    elif breakage == "dtype":
        t.dtype = "F4"
    elif breakage == "bounds":
        t.offset = response.shards[0].size - 2
    elif breakage == "twice":
        response.tensors[1].name = t.name
    elif breakage == "handle":
        response.shards[0].ipc_handle = b"\1" * 10
    elif breakage == "range":
        response.shards[0].device_offset = -1
    with pytest.raises(FormatError):
        wc.build_cuda_tensors(response, 0)
    assert wc.opened_handles() == {}
    assert len(ipc["closed"]) == len(ipc["opened"])


def test_without_cupy_the_client_says_how_to_get_it(monkeypatch):
    pytest.importorskip("torch")
    from weightd_client import cuda as wc

    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(GpuUnavailable, match="cupy"):
        wc.open_shard(handle(9), 10, 0)
    assert wc.opened_handles() == {}


# the daemon without a GPU tier ---------------------------------------------------------------


def test_daemon_without_cuda_says_why_and_refuses_cuda_acquires(tmp_path):
    if CudaTier().probe()[0]:
        pytest.skip("this machine has a usable GPU tier")
    import grpc

    from tests.daemon import DaemonProcess
    from weightd.testing import write_synthetic_model

    write_synthetic_model(tmp_path / "model", total_bytes=1 * MiB, tensors=4)
    daemon = DaemonProcess(tmp_path)
    try:
        cuda = next(t for t in daemon.status().tiers if t.tier == pb.TIER_CUDA)
        assert not cuda.available and cuda.reason
        with pytest.raises(grpc.RpcError) as e:
            daemon.stub().Acquire(pb.AcquireRequest(
                source=str(tmp_path / "model"),
                device="cuda:GPU-00000000-0000-0000-0000-000000000000",
                client=pb.ClientInfo(pid=os.getpid())), timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ("weightd-error", "GpuUnavailable") in tuple(e.value.trailing_metadata())
    finally:
        assert daemon.stop() == 0, daemon.log()


# on a GPU --------------------------------------------------------------------------------------


def _require_gpu() -> Any:
    cupy = pytest.importorskip("cupy")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - any failure means: no usable CUDA here
        pytest.skip(f"CUDA is not usable: {e}")
    if count < 1:
        pytest.skip("no CUDA device")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    return cupy


@pytest.fixture
def gpu_tier() -> Iterator[CudaTier]:
    _require_gpu()
    tier = CudaTier(staging_buffers=3, staging_buffer_size=1 * MiB)
    ok, reason = tier.start()
    assert ok, reason
    yield tier
    tier.close()


#: A client process: opens handles with weightd_client.cuda, one JSON command a line.
CHILD = r"""
import hashlib, json, sys, time
import torch
from weightd_client import cuda as wc
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb

def index_of(uuid):
    for i in range(torch.cuda.device_count()):
        if wc.cuda_uuid(i) == uuid:
            return i
    raise LookupError(f"this process sees no {uuid}")

for line in sys.stdin:
    req = json.loads(line)
    try:
        if req["cmd"] == "open":
            i = index_of(req["uuid"])
            shards = []
            for h, size in req["shards"]:
                t = wc.open_shard(bytes.fromhex(h), size, i)
                again = wc.open_shard(bytes.fromhex(h), size, i)
                wc.close_shard(bytes.fromhex(h))
                shards.append({"sha256": hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest(),
                               "same": again is t, "device": str(t.device),
                               "dtype": str(t.dtype), "numel": t.numel()})
            out = {"shards": shards}
        elif req["cmd"] == "compare":
            from safetensors.torch import load_file
            i = index_of(req["uuid"])
            response = pb.AcquireResponse.FromString(bytes.fromhex(req["response"]))
            mine = wc.build_cuda_tensors(response, i)
            ref = load_file(req["path"], device=f"cuda:{i}")
            diffs = []
            for name, r in ref.items():
                m = mine[name]
                same = (m.dtype == r.dtype and m.shape == r.shape and m.device == r.device
                        and (m.numel() == 0 or torch.equal(m.reshape(-1).view(torch.uint8),
                                                           r.reshape(-1).view(torch.uint8))))
                if not same:
                    diffs.append(name)
            wc.release_shards(wc.shard_handles(response))
            out = {"tensors": len(mine), "diffs": diffs, "open": len(wc.opened_handles())}
        elif req["cmd"] == "close":
            for h in req["handles"]:
                wc.close_shard(bytes.fromhex(h))
            out = {"open": len(wc.opened_handles())}
        else:
            out = {"error": "unknown command"}
    except Exception as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
"""


class Child:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def call(self, timeout: float = 120, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"child {self.proc.pid} did not answer in {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"child {self.proc.pid} died:\n{err}")
        out = json.loads(line)
        assert "error" not in out, out["error"]
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for c in made:
        c.close()


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.gpu
@pytest.mark.parametrize("register_host", [False, True])
def test_gpu_two_clients_read_identical_bytes_from_one_buffer(tmp_path, children, register_host):
    _require_gpu()
    tier = CudaTier(staging_buffers=3, staging_buffer_size=1 * MiB, register_host=register_host)
    assert tier.start()[0]
    try:
        uuid = tier.devices()[0].uuid
        blobs = blobs_for(tmp_path, [5 * MiB + 12_345, 4096])
        tier.load("m", dev(uuid), blobs)
        exports = tier.export("m", dev(uuid))
        shards = [[e.ipc_handle.hex(), e.size] for e in exports]
        expected = [hashlib.sha256(p.read_bytes()).hexdigest() for _, p, _ in blobs]
        for _ in range(2):
            children.append(Child())
        answers = [c.call(cmd="open", uuid=uuid, shards=shards) for c in children]
        for answer in answers:
            assert [s["sha256"] for s in answer["shards"]] == expected
            assert all(s["same"] and s["dtype"] == "torch.uint8" for s in answer["shards"])
        for c in children:
            assert c.call(cmd="close", handles=[h for h, _ in shards]) == {"open": 0}
    finally:
        tier.close()


@pytest.mark.gpu
def test_gpu_bf16_round_trips_bitwise_against_safetensors_cuda_load(tmp_path, gpu_tier,
                                                                    children):
    path = tmp_path / "model.safetensors"
    save_model(path)
    uuid = gpu_tier.devices()[0].uuid
    digest = hash_file(path)
    gpu_tier.load("m", dev(uuid), [(digest, path, path.stat().st_size)])
    (export,) = gpu_tier.export("m", dev(uuid))
    response = cuda_response(path, export.ipc_handle, uuid)
    children.append(Child())
    answer = children[0].call(cmd="compare", uuid=uuid, path=str(path),
                              response=response.SerializeToString().hex())
    assert answer == {"tensors": 8, "diffs": [], "open": 0}


@pytest.mark.gpu
def test_gpu_release_then_evict_returns_the_device_memory(tmp_path, gpu_tier, children):
    uuid = gpu_tier.devices()[0].uuid
    size = 256 * MiB
    blobs = blobs_for(tmp_path, [size])
    gpu_tier.load("m", dev(uuid), blobs)
    children.append(Child())
    (export,) = gpu_tier.export("m", dev(uuid))
    children[0].call(cmd="open", uuid=uuid, shards=[[export.ipc_handle.hex(), size]])
    # memory info is device-wide: read it once the child's own CUDA context exists
    loaded_free, _ = gpu_tier.memory_info(uuid)
    assert children[0].call(cmd="close", handles=[export.ipc_handle.hex()]) == {"open": 0}
    assert gpu_tier.unload("m", dev(uuid)) == size
    assert gpu_tier.bytes_used(uuid) == 0
    free, _ = gpu_tier.memory_info(uuid)
    assert free - loaded_free >= size - 4 * MiB  # cudaMalloc rounds to 2 MiB pages


@pytest.mark.gpu
def test_gpu_a_client_killed_with_sigkill_loses_its_lease_and_the_memory_is_reclaimed(
        tmp_path, gpu_tier, children):
    from weightd.leases import LeaseTable

    uuid = gpu_tier.devices()[0].uuid
    size = 128 * MiB
    gpu_tier.load("m", dev(uuid), blobs_for(tmp_path, [size]))
    ended = threading.Event()
    leases = LeaseTable(on_end=lambda lease, why: ended.set(), reap_interval=0.1)
    leases.start()
    try:
        children.append(Child())
        child = children[0]
        (export,) = gpu_tier.export("m", dev(uuid))
        child.call(cmd="open", uuid=uuid, shards=[[export.ipc_handle.hex(), size]])
        holder = leases.credentials.register(child.proc.pid, os.getuid(), os.getgid())
        leases.add("m", "cuda", "cuda:" + uuid, holder, "child")
        loaded_free, _ = gpu_tier.memory_info(uuid)
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait(10)
        assert ended.wait(5), "the reaper did not end the dead client's lease"
        assert not leases.held("m")
        assert gpu_tier.unload("m", dev(uuid)) == size
        _wait_for(lambda: gpu_tier.memory_info(uuid)[0] - loaded_free >= size - 4 * MiB, 10,
                  "the device memory to come back")
    finally:
        leases.stop()


# on a GPU, through the daemon (exercises the node/servicer integration) ------------------------


@pytest.mark.gpu
def test_gpu_daemon_end_to_end_acquire_release_evict_and_sigkill(tmp_path):
    _require_gpu()
    from tests.daemon import ClientProcess, DaemonProcess
    from weightd.testing import write_synthetic_model
    from weightd_client import Client

    write_synthetic_model(tmp_path / "model", total_bytes=64 * MiB, tensors=20, shards=2)
    src = str(tmp_path / "model")
    daemon = DaemonProcess(tmp_path, env={"WEIGHTD_STAGING_BUFFER_SIZE": "4MiB"})
    clients: list[ClientProcess] = []
    try:
        cuda = [t for t in daemon.status().tiers if t.tier == pb.TIER_CUDA]
        assert cuda and all(t.available for t in cuda), cuda
        for _ in range(3):
            clients.append(ClientProcess(daemon.socket))
        a, b, on_host = clients
        host = on_host.call("load", source=src, device="cpu")
        got_a = a.call("load", source=src, device="cuda", fallback=False)
        got_b = b.call("load", source=src, device="cuda", fallback=False)
        assert got_a["checksum"] == got_b["checksum"] == host["checksum"]
        assert a.call("read", source=src, name="layers.3.weight") == \
            b.call("read", source=src, name="layers.3.weight") == \
            on_host.call("read", source=src, name="layers.3.weight")
        cuda_leases = [lease for lease in daemon.status().leases if lease.tier == pb.TIER_CUDA]
        assert {lease.pid for lease in cuda_leases} == {a.pid, b.pid}
        with Client(daemon.socket) as client:
            # b dies without releasing: its lease ends, and a still holds the model
            os.kill(b.pid, signal.SIGKILL)
            b.proc.wait(10)
            _wait_for(lambda: {lease.pid for lease in daemon.status().leases
                               if lease.tier == pb.TIER_CUDA} == {a.pid}, 5,
                      "the killed client's lease to end")
            a.call("release", source=src)
            freed = client.evict(src, tier="cuda")
            assert freed >= 60 * MiB
            cuda_used = sum(t.bytes_used for t in daemon.status().tiers
                            if t.tier == pb.TIER_CUDA)
            assert cuda_used == 0
    finally:
        for c in clients:
            c.close()
        assert daemon.stop() == 0, daemon.log()
