"""Many models, many replicas, at once: a bounded stress run against a real daemon.

More models than the host budget holds (so Acquires keep evicting and loading), a disk
budget and an operator's gc that keep removing cached models (so Acquires keep fetching
again), a source that changes revision under its leases, Evicts, and client processes
SIGKILLed while they hold leases. Throughout: no INTERNAL (or UNKNOWN) error, every
tensor served equals the source byte for byte, every blob and snapshot directory an
answer names exists, no lease outlives its process; at the end verify is clean.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from tests.daemon import DaemonProcess
from weightd.store import hash_file
from weightd.testing import write_synthetic_model
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb

MiB = 1024 * 1024
WORKER = Path(__file__).resolve().parent / "stress_worker.py"
SECONDS = 14.0  # how long the load runs (the whole test stays under ~30 s)
WORKERS = 5
#: What a caller may be told under this load, and why: a budget full of leases
#: (RESOURCE_EXHAUSTED), a source rewritten during its fetch (DATA_LOSS, "fetch again"),
#: an Evict of a model that is leased or being acquired (FAILED_PRECONDITION).
ALLOWED = {"RESOURCE_EXHAUSTED", "DATA_LOSS", "FAILED_PRECONDITION"}


def _write_revision(src: Path, seed: int, keep: Path) -> dict[str, str]:
    """Write a revision of a model into ``src`` (file by file, each by rename) and a
    copy under ``keep``; returns digest -> reference file of its shards."""
    tmp = keep.with_name(keep.name + ".w")
    write_synthetic_model(tmp, total_bytes=3 * MiB, tensors=6, shards=2, seed=seed)
    shutil.copytree(tmp, keep)
    src.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, src / f.name)
    tmp.rmdir()
    return {hash_file(p): str(p) for p in keep.glob("*.safetensors")}


def test_many_models_many_replicas_at_once(tmp_path, http_server, http_root):
    refs: dict[str, dict[str, str]] = {}
    for i in range(5):
        src = tmp_path / "src" / f"m{i}"
        refs[str(src)] = _write_revision(src, i, tmp_path / "ref" / f"m{i}")
    remote = http_root / "remote"
    refs[f"{http_server.url}/remote"] = _write_revision(remote, 10, tmp_path / "ref" / "remote")
    changing = tmp_path / "src" / "m0"
    refs[str(changing)] |= _write_revision(tmp_path / "src" / "m0-next", 20,
                                           tmp_path / "ref" / "m0-r2")
    shutil.rmtree(tmp_path / "src" / "m0-next")
    revisions = [tmp_path / "ref" / "m0", tmp_path / "ref" / "m0-r2"]
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    http_server.set_fault(lambda method, path: time.sleep(0.01) or None)  # a remote source

    d = DaemonProcess(tmp_path / "d", env={"WEIGHTD_HOST_BUDGET": "13MiB",
                                           "WEIGHTD_DISK_BUDGET": "16MiB",
                                           "WEIGHTD_FETCH_WORKERS": "2",
                                           "WEIGHTD_LOAD_WORKERS": "2"})
    until = time.time() + SECONDS
    workers: list[subprocess.Popen[str]] = []
    killed: list[int] = []
    lease_outlived: list[str] = []
    side_errors: list[str] = []
    stop = threading.Event()

    def spawn(seed: int) -> None:
        workers.append(subprocess.Popen(
            [sys.executable, str(WORKER), str(d.socket), "--refs", str(tmp_path / "refs.json"),
             "--until", str(until), "--seed", str(seed)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))

    def leased_pids() -> set[int]:
        return {x.pid for x in d.status().leases}

    def operator() -> None:
        # gc through the daemon, evictions, and a source that changes revision
        rng = random.Random(1)
        stub = d.stub()
        rev = 0
        while not stop.wait(rng.uniform(0.3, 0.9)):
            try:
                what = rng.random()
                if what < 0.35:
                    stub.Gc(pb.GcRequest(max_bytes=rng.choice([0, 8 * MiB])), timeout=30)
                elif what < 0.65:
                    stub.Evict(pb.EvictRequest(source=rng.choice(sorted(refs))), timeout=30)
                else:
                    rev ^= 1
                    for f in revisions[rev].iterdir():
                        shutil.copy(f, changing / (f.name + ".tmp"))
                        os.replace(changing / (f.name + ".tmp"), changing / f.name)
                    list(stub.Fetch(pb.FetchRequest(source=str(changing)), timeout=60))
            except grpc.RpcError as e:
                if e.code().name not in ALLOWED:
                    side_errors.append(f"{e.code().name}: {e.details()}")

    def killer() -> None:
        rng = random.Random(2)
        seed = 100
        while not stop.wait(rng.uniform(1.0, 2.0)) and time.time() < until - 2:
            live = [w for w in workers if w.poll() is None]
            if not live:
                continue
            victim = rng.choice(live)
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            killed.append(victim.pid)
            spawn(seed)
            seed += 1
            deadline = time.monotonic() + 2.0
            while victim.pid in leased_pids():
                if time.monotonic() > deadline:
                    lease_outlived.append(f"pid {victim.pid} still holds a lease 2 s after "
                                          "it was killed")
                    break
                time.sleep(0.05)

    try:
        for seed in range(WORKERS):
            spawn(seed)
        threads = [threading.Thread(target=operator), threading.Thread(target=killer)]
        for t in threads:
            t.start()
        while time.time() < until:
            time.sleep(0.2)
            assert d.proc.poll() is None, d.log()
        stop.set()
        for t in threads:
            t.join(60)
        outs: list[dict[str, Any]] = []
        for w in workers:
            out, err = w.communicate(timeout=60)
            outs += [json.loads(line) for line in out.splitlines() if line.strip()]
            if w.pid not in killed:
                assert w.returncode == 0, err[-2000:]
        deadline = time.monotonic() + 3
        while leased_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leased_pids() == set(), "leases outlived their processes"
        cycles = [o for o in outs if "source" in o]
        failed = [o for o in cycles if not o.get("ok")]
        wrong = [w for o in cycles for w in o.get("wrong", ())]
        forbidden = [o for o in failed if o.get("code") not in ALLOWED]
        print(f"\n{len(cycles)} cycles by {len(workers)} workers ({len(killed)} SIGKILLed): "
              f"{sum(bool(o.get('loaded')) for o in cycles)} loads, "
              f"{sum(bool(o.get('fetched')) for o in cycles)} fetches, "
              f"{len(failed)} refused ({sorted({o.get('code') for o in failed} - {None})})")
        assert wrong == [], wrong[:10]
        assert forbidden == [], forbidden[:5]
        assert side_errors == [], side_errors[:5]
        assert lease_outlived == []
        assert len(cycles) - len(failed) >= 50, "too little work got done to show anything"
        assert sum(bool(o.get("loaded")) for o in cycles) >= 10  # evictions forced loads
        assert len(killed) >= 3
        report = d.stub().Verify(pb.VerifyRequest(), timeout=120)
        assert list(report.corrupt) == [] and list(report.missing) == []
        assert not os.listdir(d.cache_dir / "tmp")
        log = d.log()
        assert "INTERNAL" not in log and "Traceback" not in log, log[-5000:]
    finally:
        stop.set()
        for w in workers:
            if w.poll() is None:
                w.kill()
        code = d.stop()
    assert code == 0, d.log()
