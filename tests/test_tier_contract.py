"""One contract for every residency tier (weightd.tiers.base.Tier), run against the host
tier and the CUDA tier (on the stand-in driver of weightd.testing.cuda): what a load
adds, what an unload frees, blobs shared between models counted once, the two halves
(reserve / fill, detach / free) the node uses, failures that leave nothing, and budgets
that count what a blob really costs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from weightd.errors import IntegrityError
from weightd.store import hash_file
from weightd.testing.cuda import FakeDriver
from weightd.tiers import Blob, CudaTier, HostTier, ShardExport
from weightd.tiers.base import BlobTier

KiB = 1024
MiB = 1024 * KiB


@dataclass
class Case:
    tier: BlobTier
    device: str
    read: Callable[[ShardExport], bytes]  # the bytes a client would see
    close: Callable[[], None]


def _host() -> Case:
    tier = HostTier(lock=False)
    return Case(tier, "cpu", lambda e: Path(e.path).read_bytes(), tier.close)


def _cuda(**driver: Any) -> Case:
    fake = FakeDriver(total=64 * MiB, **driver)
    tier = CudaTier(staging_buffers=2, staging_buffer_size=4096, driver=fake)
    assert tier.start()[0]
    device = "cuda:" + tier.devices()[0].uuid

    def read(e: ShardExport) -> bytes:
        return fake.contents(e.ipc_handle)[:e.size]

    def close() -> None:
        tier.close()
        fake.backend.close()

    return Case(tier, device, read, close)


@pytest.fixture(params=["host", "cuda"])
def case(request: pytest.FixtureRequest) -> Iterator[Case]:
    c = _host() if request.param == "host" else _cuda()
    yield c
    c.close()


def blobs(tmp_path: Path, sizes: list[int], seed: int = 0) -> list[Blob]:
    out = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"blob-{seed}-{i}"
        path.write_bytes(np.random.default_rng(seed * 100 + i).bytes(size))
        out.append(Blob(hash_file(path), path, size))
    return out


def test_a_load_makes_every_blob_resident_as_it_is_on_disk(tmp_path, case):
    t, dev = case.tier, case.device
    bs = blobs(tmp_path, [10_000, 4096, 1])
    assert t.missing_bytes(dev, bs) == 14_097
    assert t.load("m", dev, bs) == 14_097
    assert t.resident("m", dev) and t.used(dev) == 14_097 == t.model_bytes("m", dev)
    exports = t.export("m", dev)
    assert [(e.digest, e.size) for e in exports] == [(b.digest, b.size) for b in bs]
    for e, b in zip(exports, bs, strict=True):
        assert case.read(e) == b.path.read_bytes()
    assert t.load("m", dev, bs) == 0  # idempotent
    assert t.missing_bytes(dev, bs) == 0
    assert t.unload("m", dev) == 14_097 and t.used(dev) == 0
    assert t.unload("m", dev) == 0  # idempotent
    with pytest.raises(KeyError):
        t.export("m", dev)


def test_blobs_shared_by_models_are_counted_once(tmp_path, case):
    t, dev = case.tier, case.device
    shared, only_a, only_b = blobs(tmp_path, [5000, 3000, 2000])
    assert t.missing_bytes(dev, [shared, only_a]) == 8000
    assert t.load("a", dev, [shared, only_a]) == 8000
    # b needs only its own blob, named twice or not
    assert t.missing_bytes(dev, [shared, only_b, only_b]) == 2000
    assert t.load("b", dev, [shared, only_b, only_b]) == 2000
    assert t.used(dev) == 10_000
    assert t.export("a", dev)[0] == t.export("b", dev)[0]  # the same resident copy
    # unloading a frees only what b does not also use: a plan must not count 8000
    assert t.freeable_bytes("a", dev) == 3000 and t.model_bytes("a", dev) == 8000
    assert t.unload("a", dev) == 3000
    assert case.read(t.export("b", dev)[0]) == shared.path.read_bytes()
    assert t.freeable_bytes("b", dev) == 7000
    # a model being loaded that also uses the shared blob keeps it: not freeable for it
    assert t.freeable_bytes("b", dev, keep={shared.digest}) == 2000
    assert t.unload("b", dev) == 7000 and t.used(dev) == 0


def test_a_reservation_counts_before_any_io_and_a_cancel_gives_it_back(tmp_path, case):
    t, dev = case.tier, case.device
    held = blobs(tmp_path, [4000])
    t.load("other", dev, held)
    bs = blobs(tmp_path, [6000, 1000], seed=1)
    r = t.reserve("m", dev, [*bs, *held])
    # the node plans the next load with these bytes already counted
    assert t.used(dev) == 11_000 and t.missing_bytes(dev, bs) == 0
    assert not t.resident("m", dev)
    with pytest.raises(ValueError, match="already"):
        t.reserve("m", dev, bs)
    assert t.cancel(r) == 0  # nothing was made: nothing to free
    assert t.used(dev) == 4000 and t.resident("other", dev)
    assert t.cancel(r) == 0  # idempotent
    r = t.reserve("m", dev, bs)
    assert t.fill(r) == 7000 and t.resident("m", dev)


def test_detach_stops_counting_at_once_and_free_lets_go(tmp_path, case):
    t, dev = case.tier, case.device
    bs = blobs(tmp_path, [3000, 2000])
    t.load("m", dev, bs)
    detached = t.detach("m", dev)
    assert t.used(dev) == 0 and not t.resident("m", dev)
    assert detached.nbytes == 5000
    assert t.free(detached) == 5000
    assert t.detach("m", dev).nbytes == 0


def test_a_failed_load_leaves_nothing_and_the_tier_keeps_serving(tmp_path, case):
    t, dev = case.tier, case.device
    good = blobs(tmp_path, [3000])
    t.load("other", dev, good)
    bad = blobs(tmp_path, [2000, 5000], seed=2)
    wrong = Blob(bad[1].digest, bad[1].path, bad[1].size + 1)  # the file is not its size
    with pytest.raises(IntegrityError):
        t.load("m", dev, [bad[0], wrong])
    assert not t.resident("m", dev) and t.used(dev) == 3000
    missing = Blob("0" * 32, tmp_path / "no-such-blob", 10)
    with pytest.raises(OSError):
        t.load("m", dev, [missing])
    assert t.used(dev) == 3000
    assert t.load("m", dev, bad) == 7000  # the same model loads once its blobs are right
    assert case.read(t.export("other", dev)[0]) == good[0].path.read_bytes()


def test_concurrent_loads_that_share_a_blob_make_it_once(tmp_path, case):
    t, dev = case.tier, case.device
    shared, a, b = blobs(tmp_path, [50_000, 1000, 1000])
    made: list[str] = []
    real = t._make

    def slow_make(device: str, blob: Blob) -> Any:
        made.append(blob.digest)
        time.sleep(0.2)
        return real(device, blob)

    t._make = slow_make  # type: ignore[method-assign]
    ra = t.reserve("a", dev, [shared, a])
    rb = t.reserve("b", dev, [shared, b])
    assert t.used(dev) == 52_000
    threads = [threading.Thread(target=t.fill, args=(r,)) for r in (ra, rb)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert sorted(made) == sorted([shared.digest, a.digest, b.digest])
    assert t.resident("a", dev) and t.resident("b", dev) and t.used(dev) == 52_000
    for key in ("a", "b"):
        assert case.read(t.export(key, dev)[0]) == shared.path.read_bytes()


def test_when_the_maker_of_a_shared_blob_fails_a_waiter_makes_it(tmp_path, case):
    t, dev = case.tier, case.device
    shared = blobs(tmp_path, [20_000])[0]
    real = t._make
    calls = []

    def flaky(device: str, blob: Blob) -> Any:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            time.sleep(0.2)
            raise OSError("the first maker fails")
        return real(device, blob)

    t._make = flaky  # type: ignore[method-assign]
    ra, rb = t.reserve("a", dev, [shared]), t.reserve("b", dev, [shared])
    errors: list[BaseException] = []

    def fill(r: Any) -> None:
        try:
            t.fill(r)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=fill, args=(r,), name=k) for k, r in (("a", ra),
                                                                             ("b", rb))]
    threads[0].start()
    time.sleep(0.05)  # a is the maker
    threads[1].start()
    for th in threads:
        th.join(10)
    assert calls == ["a", "b"] and len(errors) == 1
    assert t.resident("b", dev) and not t.resident("a", dev) and t.used(dev) == 20_000


def test_the_cuda_budget_counts_whole_granules(tmp_path):
    c = _cuda(granule=64 * KiB)
    try:
        t, dev = c.tier, c.device
        bs = blobs(tmp_path, [1, 64 * KiB, 64 * KiB + 1])
        assert t.missing_bytes(dev, bs) == (1 + 1 + 2) * 64 * KiB
        assert t.load("m", dev, bs) == 4 * 64 * KiB
        assert t.used(dev) == 4 * 64 * KiB == t.model_bytes("m", dev)
        assert [c.read(e) == b.path.read_bytes() for e, b in zip(t.export("m", dev), bs,
                                                                  strict=True)] == [True] * 3
    finally:
        c.close()


def test_loads_on_different_gpus_run_at_once(tmp_path):
    class Slow(FakeDriver):
        def __init__(self) -> None:
            super().__init__(total=64 * MiB)
            self.running = 0
            self.most = 0
            self.lock = threading.Lock()

        def copy_registered(self, index: int, path: Path, ptr: int, size: int) -> None:
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(0.3)
            super().copy_registered(index, path, ptr, size)
            with self.lock:
                self.running -= 1

    fake = Slow()
    tier = CudaTier(staging_buffers=2, staging_buffer_size=4096, driver=fake,
                    register_host=True)
    assert tier.start()[0]
    gpu0, gpu1 = ("cuda:" + d.uuid for d in tier.devices())
    bs = blobs(tmp_path, [10_000])
    threads = [threading.Thread(target=tier.load, args=(f"m{i}", dev, bs))
               for i, dev in enumerate((gpu0, gpu1))]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert fake.most == 2, "the two devices' loads took turns"
    assert time.monotonic() - t0 < 0.55
    assert tier.resident("m0", gpu0) and tier.resident("m1", gpu1)
    tier.close()
