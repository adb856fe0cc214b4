"""Budgets, LRU eviction, pins that survive restarts, and the daemon-backed CLI."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import run_cli
from tests.daemon import DaemonProcess, wait_for
from weightd.testing import write_synthetic_model
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb

MiB = 1024 * 1024


@pytest.fixture
def models(tmp_path: Path) -> dict[str, str]:
    out = {}
    for i, name in enumerate("abc"):
        write_synthetic_model(tmp_path / "src" / name, total_bytes=12 * MiB, tensors=8, seed=i)
        out[name] = str(tmp_path / "src" / name)
    return out


@pytest.fixture
def tight(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path, env={"WEIGHTD_HOST_BUDGET": "30MiB"})
    yield d
    assert d.stop() == 0, d.log()


def acquire(d: DaemonProcess, source: str) -> pb.AcquireResponse:
    return d.acquire(source)


def release(d: DaemonProcess, lease_id: str) -> None:
    d.release(lease_id)


def host_resident(d: DaemonProcess) -> set[str]:
    listed = d.stub().List(pb.ListRequest(), timeout=10).models
    return {m.source.rsplit("/", 1)[-1] for m in listed
            if any(r.tier == pb.TIER_HOST for r in m.resident)}


def test_lru_unleased_model_is_evicted_first(tight, models):
    for name in ("a", "b", "a"):  # a is used again after b: b is least recently used
        release(tight, acquire(tight, models[name]).lease_id)
        time.sleep(0.02)
    got = acquire(tight, models["c"])
    assert got.loaded
    assert host_resident(tight) == {"a", "c"}
    assert "evicted" in tight.log()


def test_a_blob_shared_with_the_model_being_loaded_is_not_counted_as_freed(tmp_path):
    # V = S + X and N = S + Y share the shard S; W is a model of its own. The budget
    # holds V and W. Loading N must evict W as well as V: evicting V frees only X, since
    # N keeps S (counting S as freed put the host tier over its budget).
    import shutil

    src = tmp_path / "src"
    write_synthetic_model(src / "s", total_bytes=6 * MiB, tensors=2, seed=1)
    write_synthetic_model(src / "w", total_bytes=5 * MiB, tensors=2, seed=3)
    # X and Y: the second shard of a two-shard model, so that their tensor names
    # (layers.2, layers.3) are not S's (layers.0, layers.1): shards may not share names
    for name, size, seed in (("x", 2, 2), ("y", 4, 4)):
        write_synthetic_model(src / name, total_bytes=2 * size * MiB, tensors=4, shards=2,
                              seed=seed)
    v, n, w = src / "V", src / "N", src / "w"
    for model, own in ((v, "x"), (n, "y")):
        model.mkdir()
        shutil.copy(src / "s" / "model.safetensors", model / "s.safetensors")
        shutil.copy(src / own / "model-00002-of-00002.safetensors", model / f"{own}.safetensors")
    size = {m: sum(p.stat().st_size for p in m.glob("*.safetensors")) for m in (v, n, w)}
    budget = size[v] + size[w]
    with DaemonProcess(tmp_path / "d", env={"WEIGHTD_HOST_BUDGET": str(budget)}) as d:
        for model in (v, w, n):
            release(d, acquire(d, str(model)).lease_id)
            time.sleep(0.02)
        (host,) = [t for t in d.status().tiers if t.tier == pb.TIER_HOST]
        assert host.bytes_used <= host.bytes_budget == budget, (host.bytes_used, budget)
        assert host_resident(d) == {"N"}
        assert host.bytes_used == size[n]


def test_leased_models_survive_pressure(tight, models):
    la = acquire(tight, models["a"])
    lb = acquire(tight, models["b"])
    with pytest.raises(grpc.RpcError) as e:
        acquire(tight, models["c"])
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "need" in e.value.details() and "free" in e.value.details()
    assert host_resident(tight) == {"a", "b"}
    release(tight, la.lease_id)
    assert acquire(tight, models["c"]).loaded  # a, now unleased, makes room
    assert host_resident(tight) == {"b", "c"}
    release(tight, lb.lease_id)


def test_pinned_model_is_never_evicted(tight, models):
    tight.stub().Pin(pb.PinRequest(source=models["a"]), timeout=10)
    wait_pins(tight, "resident")
    for name in ("b", "c"):
        release(tight, acquire(tight, models[name]).lease_id)
    assert "a" in host_resident(tight)
    with pytest.raises(grpc.RpcError) as e:
        tight.stub().Evict(pb.EvictRequest(source=models["a"]), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def wait_pins(d: DaemonProcess, state: str, timeout: float = 30) -> list[pb.PinInfo]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pins = list(d.status().pins)
        if pins and all(p.state == state for p in pins):
            return pins
        time.sleep(0.05)
    raise AssertionError(f"pins not {state}: {d.status().pins}")


def test_pin_survives_a_restart_and_is_rewarmed(tmp_path, models):
    d = DaemonProcess(tmp_path)
    d.stub().Pin(pb.PinRequest(source=models["b"]), timeout=10)
    wait_pins(d, "resident")
    assert d.stop() == 0
    d2 = DaemonProcess(tmp_path)
    try:
        pins = wait_pins(d2, "resident")  # no client asked
        assert [p.source for p in pins] == [f"file://{models['b']}"]
        assert host_resident(d2) == {"b"}
        host = next(t for t in d2.status().tiers if t.tier == pb.TIER_HOST)
        assert host.bytes_used >= 12 * MiB
        assert d2.stub().Unpin(pb.UnpinRequest(source=models["b"]), timeout=10).was_pinned
        assert list(d2.status().pins) == []
    finally:
        assert d2.stop() == 0
    d3 = DaemonProcess(tmp_path)
    try:
        time.sleep(0.5)
        assert list(d3.status().pins) == [] and host_resident(d3) == set()
    finally:
        assert d3.stop() == 0


def test_a_pin_that_cannot_warm_says_why(tight, tmp_path):
    # the source has the model, so the pin is recorded (one that resolves to nothing is
    # refused at once: tests/test_cli.py), but it does not fit the host budget
    write_synthetic_model(tmp_path / "src" / "big", total_bytes=40 * MiB, tensors=8)
    tight.stub().Pin(pb.PinRequest(source=str(tmp_path / "src" / "big")), timeout=10)
    deadline = time.monotonic() + 30
    while not (pins := list(tight.status().pins))[0].state.startswith("failed: "):
        assert time.monotonic() < deadline, pins
        time.sleep(0.05)
    assert len(pins) == 1 and "need" in pins[0].state, pins


def test_disk_budget_evicts_least_recently_used_cached_models(tmp_path, models):
    d = DaemonProcess(tmp_path, env={"WEIGHTD_DISK_BUDGET": "30MiB"})
    try:
        held = acquire(d, models["a"])  # resident and leased: never evicted from disk
        for name in ("b", "c"):
            list(d.stub().Fetch(pb.FetchRequest(source=models[name]), timeout=60))
            time.sleep(0.02)
        cached = {m.source.rsplit("/", 1)[-1] for m in
                  d.stub().List(pb.ListRequest(), timeout=10).models}
        assert cached == {"a", "c"}
        snaps = {p.name for p in (d.cache_dir / "snapshots").iterdir()}
        assert not any(s.endswith("--b") for s in snaps)
        release(d, held.lease_id)
    finally:
        assert d.stop() == 0


def test_disk_budget_ranks_models_by_their_last_acquire(tmp_path, models):
    # The daemon writes last-used times to the index in batches (a warm Acquire writes
    # nothing); the disk budget must still see every Acquire, however recent.
    write_synthetic_model(tmp_path / "src" / "d", total_bytes=12 * MiB, tensors=8, seed=3)
    d = DaemonProcess(tmp_path, env={"WEIGHTD_DISK_BUDGET": "40MiB",
                                     "WEIGHTD_HOST_BUDGET": "20MiB"})  # one resident model
    try:
        for name in ("a", "b", "c"):  # fetched in this order: a is the oldest on disk
            list(d.stub().Fetch(pb.FetchRequest(source=models[name]), timeout=60))
            time.sleep(0.02)
        for name in ("c", "a", "c"):  # a used after b; c ends resident (kept)
            release(d, acquire(d, models[name]).lease_id)
            time.sleep(0.02)
        list(d.stub().Fetch(pb.FetchRequest(source=str(tmp_path / "src" / "d")), timeout=60))
        cached = {m.source.rsplit("/", 1)[-1] for m in
                  d.stub().List(pb.ListRequest(), timeout=10).models}
        assert cached == {"a", "c", "d"}  # b, fetched but never used since, went
    finally:
        assert d.stop() == 0


def test_cli_talks_to_the_daemon(tmp_path, models):
    d = DaemonProcess(tmp_path)
    env = {"WEIGHTD_SOCKET": str(d.socket), "WEIGHTD_CACHE_DIR": str(d.cache_dir)}
    try:
        path = run_cli("fetch", models["a"], env=env, check=True).stdout.strip()
        assert Path(path).is_dir()
        assert "--a" in run_cli("ls", env=env, check=True).stdout
        run_cli("pin", models["a"], env=env, check=True)
        wait_pins(d, "resident")
        status = run_cli("status", env=env, check=True).stdout
        assert "pin " in status and "resident" in status and "host" in status
        evict = run_cli("evict", models["a"], env=env)
        assert evict.returncode == 1 and "pinned" in evict.stderr
        run_cli("unpin", models["a"], env=env, check=True)
        assert run_cli("evict", models["a"], env=env, check=True).returncode == 0
        assert run_cli("unpin", models["a"], env=env).returncode == 1
    finally:
        assert d.stop() == 0
    gone = run_cli("status", env=env)
    assert gone.returncode == 1 and "no weightd daemon answers" in gone.stderr


def test_metrics_endpoint_changes_after_a_load(tmp_path, models):
    import re
    import urllib.parse
    import urllib.request

    d = DaemonProcess(tmp_path, env={"WEIGHTD_METRICS_ADDRESS": "127.0.0.1:0"})
    try:
        url = re.search(r"metrics on (http://\S+)", d.log())
        assert url, d.log()

        def scrape() -> str:
            with urllib.request.urlopen(url.group(1), timeout=10) as r:  # type: ignore[union-attr]
                return r.read().decode()

        def value(text: str, name: str) -> float:
            m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
            return float(m.group(1)) if m else 0.0

        before = scrape()
        got = acquire(d, models["a"])
        with pytest.raises(grpc.RpcError):
            acquire(d, str(tmp_path / "missing"))
        after = scrape()
        assert value(after, 'weightd_resident_bytes{device="cpu",tier="host"}') >= 12 * MiB
        assert value(before, 'weightd_resident_bytes{device="cpu",tier="host"}') == 0
        assert value(after, 'weightd_acquire_seconds_count{tier="host"}') == 1
        assert value(after, 'weightd_leases{tier="host"}') == 1
        # the fetch is counted once its blobs are durable, which may come a moment after
        # its first Acquire was answered (served from the verified temporary files)
        wait_for(lambda: value(scrape(), 'weightd_fetched_bytes_total{protocol="file"}')
                 >= 12 * MiB, timeout=10, what="the fetch's bytes in the metrics")
        assert value(after, 'weightd_errors_total{code="NOT_FOUND",method="Acquire"}') == 1
        release(d, got.lease_id)
        assert value(scrape(), 'weightd_leases{tier="host"}') == 0
        env = {"WEIGHTD_METRICS_ADDRESS": urllib.parse.urlsplit(url.group(1)).netloc}
        table = run_cli("stats", env=env, check=True).stdout
        assert "weightd_resident_bytes" in table
    finally:
        assert d.stop() == 0
