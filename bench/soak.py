#!/usr/bin/env python3
"""Soak: a daemon under churn for a while; count errors and watch its memory.

    python bench/soak.py [--duration 60] [--clients 8] [--kill-rate 1.0]
                         [--restart kill|term|none] [--sample 5] [--json FILE]

Three synthetic models (8 MiB in one shard from a local directory, 16 MiB in two
shards over HTTP, 32 MiB in four shards from a local directory) and one ``weightd
serve`` on its own socket and cache. ``--clients`` light client processes (gRPC and
mmap, no torch) loop: pick a model at random, Acquire it, map every shard read-only and
check a sample of its bytes against the source (first 4 KiB of each shard and the first
and last byte of every tensor), hold it for 0-300 ms, Release it, and now and then ask
for an Evict. The driver SIGKILLs a random client ``--kill-rate`` times a second on
average (its leases must be reaped) and starts a new one; halfway through, with
``--restart``, it kills (or stops) the daemon and starts it again on the same cache.

At the end: every client is killed, the daemon must show no lease within 3 s, is stopped
with SIGTERM (exit 0), and ``weightd verify`` must be clean. The report counts cycles,
expected refusals (the daemon down during the restart, an Evict of a model another
client holds) and errors (goal: none), and prints the daemon's RSS, open fds and
mappings over time. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MiB = 1024 * 1024


# --- the sample both sides compute -----------------------------------------------------


def sample_digest(shards: list[tuple[bytes | mmap.mmap, list[tuple[int, int]]]]) -> str:
    """xxh3-64 of the first 4 KiB of each shard and of each tensor's first and last byte.

    ``shards``: (the shard's bytes, [(offset, length) of each tensor]) in shard order.
    """
    import xxhash

    h = xxhash.xxh3_64()
    for data, tensors in shards:
        h.update(data[:4096])
        for offset, length in tensors:
            if length:
                h.update(data[offset:offset + 1])
                h.update(data[offset + length - 1:offset + length])
    return h.hexdigest()


def expected_digest(model_dir: Path) -> str:
    """The sample of a model's source files, in the order the daemon lists shards."""
    from weightd.formats import read_layout

    shards = []
    for path in sorted(model_dir.glob("*.safetensors")):
        layout = read_layout(path)
        shards.append((path.read_bytes(), [(t.offset, t.nbytes) for t in layout.tensors]))
    return sample_digest(shards)


# --- the client process --------------------------------------------------------------------


def worker(socket_path: str, sources: list[str], seed: int) -> None:
    """Loop forever: acquire, check, hold, release; one JSON line per cycle on stdout."""
    import grpc

    from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
    from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc
    from weightd_client.credentials import CredentialInterceptor

    rng = random.Random(seed)
    client = pb.ClientInfo(name="soak")  # the daemon leases in the kernel's pid

    def connect() -> tuple[Any, Any]:
        # a new interceptor: a restarted daemon knows no token of the old one
        ch = grpc.intercept_channel(grpc.insecure_channel(f"unix://{socket_path}"),
                                    CredentialInterceptor(socket_path))
        return ch, pb_grpc.WeightdStub(ch)

    channel, stub = connect()
    while True:
        source = rng.choice(sources)
        t0 = time.monotonic()
        event: dict[str, Any] = {"ev": "ok", "source": source}
        try:
            resp = stub.Acquire(pb.AcquireRequest(source=source, client=client), timeout=120)
            event["acquire_ms"] = (time.monotonic() - t0) * 1000
            shards = []
            files = []
            for i, s in enumerate(resp.shards):
                f = open(s.path, "rb")  # noqa: SIM115 - closed below
                m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
                files.append((f, m))
                header_len = struct.unpack("<Q", m[:8])[0]
                if 8 + header_len > len(m) or len(m) != s.size:
                    raise RuntimeError(f"{s.path}: bad size or header")
                shards.append((m, [(t.offset, t.length) for t in resp.tensors if t.shard == i]))
            event["digest"] = sample_digest(shards)
            time.sleep(rng.uniform(0, 0.3))
            for f, m in files:
                m.close()
                f.close()
            stub.Release(pb.ReleaseRequest(lease_id=resp.lease_id), timeout=30)
            if rng.random() < 0.1:
                try:
                    stub.Evict(pb.EvictRequest(source=source), timeout=30)
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                    event["evict"] = "in use"
        except grpc.RpcError as e:
            event = {"ev": "rpc_error", "source": source, "code": e.code().name,
                     "details": (e.details() or "")[:300]}
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                # the daemon is gone or restarting: a new channel reconnects at once
                channel.close()
                time.sleep(0.2)
                channel, stub = connect()
        except Exception as e:
            event = {"ev": "error", "source": source, "error": f"{type(e).__name__}: {e}"}
        event["t"] = time.time()
        print(json.dumps(event), flush=True)


# --- the driver ----------------------------------------------------------------------------


class Clients:
    """The client processes, their events, and killing them."""

    def __init__(self, socket_path: Path, sources: list[str]) -> None:
        self.socket = socket_path
        self.sources = sources
        self.procs: list[subprocess.Popen[str]] = []
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.kills = 0
        self.started = 0

    def spawn(self) -> None:
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                              str(self.socket), json.dumps(self.sources),
                              str(random.randrange(2**31))],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(p)
        self.started += 1
        threading.Thread(target=self._read, args=(p,), daemon=True).start()

    def _read(self, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.events.append(ev)

    def kill_one(self) -> None:
        live = [p for p in self.procs if p.poll() is None]
        if not live:
            return
        victim = random.choice(live)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        self.kills += 1
        self.procs.remove(victim)
        self.spawn()

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait(10)


def proc_stats(pid: int) -> dict[str, float]:
    out: dict[str, float] = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
    with open(f"/proc/{pid}/maps") as f:
        out["maps"] = sum(1 for _ in f)
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def daemon_status(d: Any) -> Any:
    import weightd_client

    with weightd_client.Client(d.socket, timeout=10) as c:
        return c.status()


def run(ns: argparse.Namespace) -> dict[str, Any]:
    from weightd.testing import RangeHTTPServer, write_synthetic_model
    from weightd.testing.daemon import DaemonProcess

    workdir = Path(tempfile.mkdtemp(prefix="weightd-soak-", dir=ns.workdir))
    src = workdir / "src"
    write_synthetic_model(src / "small", total_bytes=8 * MiB, tensors=16, seed=1)
    write_synthetic_model(src / "www" / "medium", total_bytes=16 * MiB, tensors=32, shards=2,
                          seed=2)
    write_synthetic_model(src / "large", total_bytes=32 * MiB, tensors=64, shards=4, seed=3)
    http = RangeHTTPServer(src / "www")
    models = {str(src / "small"): src / "small", f"{http.url}/medium": src / "www" / "medium",
              str(src / "large"): src / "large"}
    expected = {source: expected_digest(path) for source, path in models.items()}
    env = {"WEIGHTD_LOG_LEVEL": "WARNING"}
    if ns.host_budget:
        env["WEIGHTD_HOST_BUDGET"] = ns.host_budget
    daemon = DaemonProcess(workdir, env=env)
    clients = Clients(daemon.socket, list(models))
    samples: list[dict[str, float]] = []
    restart_window: tuple[float, float] | None = None
    start = time.monotonic()
    t_wall0 = time.time()
    try:
        for _ in range(ns.clients):
            clients.spawn()
        next_sample = start
        restarted = ns.restart == "none"
        while (now := time.monotonic()) - start < ns.duration:
            if now >= next_sample:
                st = proc_stats(daemon.pid)
                try:
                    status = daemon_status(daemon)
                    st["leases"] = len(status.leases)
                    st["host_mib"] = next(t.bytes_used for t in status.tiers if t.tier == 2) / MiB
                except Exception:
                    st["leases"] = st["host_mib"] = float("nan")
                st["t"] = now - start
                samples.append(st)
                next_sample += ns.sample
            if not restarted and now - start >= ns.duration / 2:
                t0 = time.time()
                if ns.restart == "kill":
                    daemon.proc.send_signal(signal.SIGKILL)
                    daemon.proc.wait(10)
                    daemon.stop()
                else:
                    assert daemon.stop() == 0, "the daemon did not stop cleanly"
                daemon = DaemonProcess(workdir, env=env)
                restart_window = (t0, time.time() + 1.0)
                restarted = True
                print(f"daemon restarted ({ns.restart}) in {time.time() - t0:.1f}s",
                      file=sys.stderr)
            if ns.kill_rate and random.random() < ns.kill_rate * 0.1:
                clients.kill_one()
            time.sleep(0.1)
        clients.kill_all()
        deadline = time.monotonic() + 3
        leases = -1
        while time.monotonic() < deadline:
            leases = len(daemon_status(daemon).leases)
            if leases == 0:
                break
            time.sleep(0.1)
        final = proc_stats(daemon.pid)
        final["t"] = time.monotonic() - start
        final["leases"] = leases
        samples.append(final)
    finally:
        clients.kill_all()
        code = daemon.stop()
        http.stop()
    verify = subprocess.run([sys.executable, "-m", "weightd.cli", "verify"],
                            env={**os.environ, "WEIGHTD_CACHE_DIR": str(daemon.cache_dir),
                                 "WEIGHTD_SOCKET": str(workdir / "none.sock")},
                            capture_output=True, text=True)
    counts: Counter[str] = Counter()
    errors: list[dict[str, Any]] = []
    acquire_ms: list[float] = []
    for ev in clients.events:
        if ev["ev"] == "ok":
            if ev.get("digest") != expected[ev["source"]]:
                errors.append({**ev, "error": "wrong bytes"})
                continue
            counts["cycles"] += 1
            acquire_ms.append(ev["acquire_ms"])
            if ev.get("evict"):
                counts["evict refused: in use (expected)"] += 1
        elif (ev["ev"] == "rpc_error" and ev["code"] == "UNAVAILABLE" and restart_window
              and restart_window[0] <= ev["t"] <= restart_window[1]):
            counts["daemon down during the restart (expected)"] += 1
        elif (ev["ev"] == "rpc_error" and ev["code"] == "RESOURCE_EXHAUSTED"
              and ns.host_budget and "host tier" in ev["details"]):
            counts["host budget full of leased models (expected with --host-budget)"] += 1
        else:
            errors.append(ev)
    acquire_ms.sort()
    report = {
        "duration_s": ns.duration, "clients": ns.clients, "restart": ns.restart,
        "kills": clients.kills, "client_processes": clients.started, "counts": dict(counts),
        "errors": errors, "leases_after_kill_all": leases, "daemon_exit": code,
        "verify_exit": verify.returncode, "verify": verify.stderr.strip().splitlines()[-1:],
        "acquire_ms_p50": acquire_ms[len(acquire_ms) // 2] if acquire_ms else None,
        "acquire_ms_p99": acquire_ms[int(len(acquire_ms) * 0.99)] if acquire_ms else None,
        "samples": samples, "started": t_wall0, "workdir": str(workdir),
    }
    if not ns.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return report


def print_report(r: dict[str, Any]) -> None:
    print(f"\nsoak: {r['duration_s']:.0f}s, {r['clients']} clients, restart={r['restart']}, "
          f"{r['kills']} clients SIGKILLed ({r['client_processes']} started)")
    for k, v in sorted(r["counts"].items()):
        print(f"  {k}: {v}")
    print(f"  acquire latency: p50 {r['acquire_ms_p50']:.1f} ms, p99 {r['acquire_ms_p99']:.1f} ms"
          if r["acquire_ms_p50"] is not None else "  no acquire completed")
    print(f"  errors: {len(r['errors'])}")
    for e in r["errors"][:10]:
        print(f"    {e}")
    print(f"  leases 3 s after killing every client: {r['leases_after_kill_all']}")
    print(f"  daemon exit on SIGTERM: {r['daemon_exit']}; weightd verify: exit "
          f"{r['verify_exit']} {' '.join(r['verify'])}")
    print("\n| t (s) | RSS (MiB) | HWM (MiB) | fds | maps | leases | host (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for s in r["samples"]:
        print(f"| {s['t']:.0f} | {s.get('VmRSS', 0):.1f} | {s.get('VmHWM', 0):.1f} | "
              f"{s['fds']:.0f} | {s['maps']:.0f} | {s.get('leases', float('nan')):.0f} | "
              f"{s.get('host_mib', float('nan')):.1f} |")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    ap.add_argument("--clients", type=int, default=8, help="client processes at once")
    ap.add_argument("--kill-rate", type=float, default=1.0,
                    help="client SIGKILLs per second, on average (default 1)")
    ap.add_argument("--restart", choices=("kill", "term", "none"), default="kill",
                    help="restart the daemon halfway: after SIGKILL (default), SIGTERM, or not")
    ap.add_argument("--host-budget", default="", help="the daemon's host_budget (e.g. 48MiB "
                    "forces evictions); default: the daemon's")
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--workdir", default=None, help="where models and cache go (default: TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", default=None, help="also write the report here")
    ns = ap.parse_args()
    report = run(ns)
    print_report(report)
    if ns.json:
        Path(ns.json).write_text(json.dumps(report, indent=1))
    ok = (not report["errors"] and report["leases_after_kill_all"] == 0
          and report["daemon_exit"] == 0 and report["verify_exit"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
