#!/usr/bin/env python3
"""Concurrency: how fast the calls that should stay fast are while the node is busy.

    python bench/concurrency.py [--runs 5] [--baseline-tree DIR] [--scenarios warm,status,transport]
                                [--big 1GiB] [--small 32MiB] [--cold 64] [--out FILE]

Scenarios:

- ``warm``: a client process loads (``weightd_client.Client.load`` + ``release``) a
  resident 32 MiB model in a loop: idle, and while another 1 GiB model is being loaded
  from a dropped page cache (``posix_fadvise(DONTNEED)`` on its blobs after it was
  evicted). Reported: p50 / p99 / max of the warm loads that *started* while the big
  load was in flight. Goal: p99 under 5 ms, max under 20 ms.
- ``status``: 64 cold Acquires of one model from a slow HTTP source (the test server
  holds every GET of its shards for ``--hold`` seconds) are in flight; the driver calls
  Status in a loop until they are all answered. Goal: p99 under 50 ms.
- ``transport``: one trivial unary call (grpc.health Check) on a sync gRPC server with
  64 threads and on grpc.aio, in this process, on a unix socket: what the event loop
  costs (or saves) per call, the measurement behind choosing grpc.aio.

``--baseline-tree DIR`` runs the same scenarios against another checkout of weightd
(the daemon and the client processes import it through PYTHONPATH), in the same script,
alternating with this checkout: "before" and "after". Every figure is the median of
``--runs`` runs; the JSON (``--out``) has every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    drop_page_cache,
    machine_info,
    markdown_table,
    median,
    percentile,
    size_label,
)

from weightd.config import parse_size  # noqa: E402
from weightd.testing import RangeHTTPServer, write_synthetic_model  # noqa: E402
from weightd.testing.daemon import DaemonProcess  # noqa: E402
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb  # noqa: E402
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc  # noqa: E402
from weightd_client.credentials import CredentialInterceptor, credential_socket  # noqa: E402

#: The client process of the warm scenario: loads and releases one model in a loop for
#: as long as asked, and answers with (start, seconds) of every load (CLOCK_MONOTONIC is
#: shared by every process, so the driver can line them up with its own events).
WARM_CLIENT = r"""
import json, sys, time
import weightd_client
client = weightd_client.Client(sys.argv[1], timeout=60)
for line in sys.stdin:
    req = json.loads(line)
    for _ in range(20):  # warm up the channel, the handshake, torch's first views
        client.load(req["source"], fallback=False).release()
    print(json.dumps({"go": time.monotonic()}), flush=True)
    samples, end = [], time.monotonic() + req["seconds"]
    while time.monotonic() < end:
        t0 = time.monotonic()
        client.load(req["source"], fallback=False).release()
        samples.append((t0, time.monotonic() - t0))
    print(json.dumps({"samples": samples}), flush=True)
"""


class Tree:
    """A checkout of weightd to run the daemon and the clients from."""

    def __init__(self, name: str, path: Path | None) -> None:
        self.name = name
        self.path = path

    def env(self) -> dict[str, str]:
        if self.path is None:
            return {}
        paths = [str(self.path), str(self.path / "clients" / "python")]
        return {"PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")])}


def stub(socket: Path) -> pb_grpc.WeightdStub:
    """A raw stub with this process's credentials (plain, for a daemon from before
    credentials: it has no credential socket)."""
    channel = grpc.insecure_channel(f"unix://{socket}")
    if Path(credential_socket(socket)).exists():
        channel = grpc.intercept_channel(channel, CredentialInterceptor(socket))
    return pb_grpc.WeightdStub(channel)


def me(name: str) -> pb.ClientInfo:
    """This process as a ClientInfo (a daemon from before credentials leases in its
    name, and reaps the lease unless the start time is right; later ones ignore both)."""
    stat = Path("/proc/self/stat").read_bytes()
    start = int(stat[stat.rfind(b")") + 2:].split()[19])
    return pb.ClientInfo(pid=os.getpid(), start_time=start, name=name)


def stats(xs: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max in milliseconds, and the count."""
    ms = [x * 1000 for x in xs]
    return {"n": len(ms), "p50": percentile(ms, 50), "p99": percentile(ms, 99),
            "max": max(ms) if ms else float("nan")}


def blobs_of(d: DaemonProcess, source: Path) -> list[Path]:
    snap = d.cache_dir / "snapshots"
    name = next(p.name for p in snap.iterdir() if p.name.endswith(source.name))
    return [Path(os.path.realpath(p)) for p in (snap / name).iterdir()
            if p.name.endswith(".safetensors")]


# warm: a warm load while another model loads from a dropped page cache ------------------------


def warm(tree: Tree, work: Path, models: dict[str, Path], runs: int) -> dict[str, Any]:
    home = work / tree.name / "warm"
    shutil.rmtree(home, ignore_errors=True)
    d = DaemonProcess(home, env=tree.env(), timeout=120)
    out: dict[str, Any] = {"idle": [], "loading": [], "big_load_s": []}
    client = subprocess.Popen([sys.executable, "-c", WARM_CLIENT, str(d.socket)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **tree.env()})
    try:
        s = stub(d.socket)
        for m in models.values():
            list(s.Fetch(pb.FetchRequest(source=str(m)), timeout=600))
        small, big = str(models["small"]), str(models["big"])
        big_blobs = blobs_of(d, models["big"])
        assert client.stdin is not None and client.stdout is not None

        def measure(seconds: float) -> tuple[float, list[tuple[float, float]]]:
            client.stdin.write(json.dumps({"source": small, "seconds": seconds}) + "\n")
            client.stdin.flush()
            go = json.loads(client.stdout.readline())["go"]
            return go, [tuple(x) for x in json.loads(client.stdout.readline())["samples"]]

        for r in range(runs):
            _, idle = measure(1.5)
            out["idle"].append(stats([x for _, x in idle]))
            with contextlib.suppress(grpc.RpcError):
                s.Evict(pb.EvictRequest(source=big), timeout=60)
            drop_page_cache(big_blobs)
            times: dict[str, float] = {}

            def load_big(times: dict[str, float] = times) -> None:
                time.sleep(0.3)  # the client is looping by now
                times["start"] = time.monotonic()
                got = s.Acquire(pb.AcquireRequest(source=big, client=me("big")),
                                timeout=600)
                times["end"] = time.monotonic()
                s.Release(pb.ReleaseRequest(lease_id=got.lease_id), timeout=60)

            loader = threading.Thread(target=load_big)
            loader.start()
            _, samples = measure(3.0)
            loader.join(600)
            during = [x for t0, x in samples if times["start"] <= t0 <= times["end"]]
            out["loading"].append(stats(during))
            out["big_load_s"].append(times["end"] - times["start"])
            print(f"  {tree.name} warm run {r + 1}: idle p99 {out['idle'][-1]['p99']:.2f} ms; "
                  f"during a {out['big_load_s'][-1]:.2f} s load: {stats(during)}", flush=True)
    finally:
        client.kill()
        client.wait(10)
        d.stop()
    return out


# status: Status while 64 cold Acquires of a slow source are in flight ---------------------------


def status(tree: Tree, work: Path, runs: int, cold: int, hold: float) -> dict[str, Any]:
    home = work / tree.name / "status"
    shutil.rmtree(home, ignore_errors=True)
    root = home / "www"
    root.mkdir(parents=True)
    out: dict[str, Any] = {"idle": [], "busy": [], "acquire_s": []}

    def slow(method: str, path: str) -> None:
        if method == "GET" and path.endswith(".safetensors"):
            time.sleep(hold)

    with RangeHTTPServer(root, fault=slow) as http:  # type: ignore[arg-type]
        d = DaemonProcess(home / "d", env=tree.env(), timeout=120)
        try:
            s = stub(d.socket)
            for r in range(runs):
                write_synthetic_model(root / f"slow{r}", total_bytes=2 * 1024 * 1024,
                                      tensors=4, shards=2, seed=r)
                idle = []
                for _ in range(50):
                    t0 = time.perf_counter()
                    s.Status(pb.StatusRequest(), timeout=30)
                    idle.append(time.perf_counter() - t0)
                url = f"{http.url}/slow{r}"
                t_start = time.monotonic()
                calls = [s.Acquire.future(pb.AcquireRequest(source=url, client=me("cold")),
                                          timeout=600) for _ in range(cold)]
                time.sleep(0.2)  # in the daemon by now
                busy = []
                while not all(c.done() for c in calls):
                    t0 = time.perf_counter()
                    s.Status(pb.StatusRequest(), timeout=120)
                    busy.append(time.perf_counter() - t0)
                    time.sleep(0.005)
                took = time.monotonic() - t_start
                for c in calls:
                    s.Release(pb.ReleaseRequest(lease_id=c.result().lease_id), timeout=60)
                out["idle"].append(stats(idle))
                out["busy"].append(stats(busy))
                out["acquire_s"].append(took)
                print(f"  {tree.name} status run {r + 1}: idle p99 "
                      f"{out['idle'][-1]['p99']:.2f} ms; during {cold} cold acquires "
                      f"({took:.1f} s): {stats(busy)}", flush=True)
        finally:
            d.stop()
    return out


# transport: sync gRPC against grpc.aio, one trivial call ---------------------------------------


def transport(work: Path, runs: int, calls: int = 2000) -> dict[str, Any]:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    out: dict[str, Any] = {"sync": [], "aio": []}
    sock = work / "transport.sock"

    def measure() -> dict[str, float]:
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            check = health_pb2_grpc.HealthStub(ch).Check
            for _ in range(200):
                check(health_pb2.HealthCheckRequest(), timeout=10)
            lat = []
            for _ in range(calls):
                t0 = time.perf_counter()
                check(health_pb2.HealthCheckRequest(), timeout=10)
                lat.append(time.perf_counter() - t0)
        return stats(lat)

    for _ in range(runs):
        sock.unlink(missing_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        server.add_insecure_port(f"unix://{sock}")
        server.start()
        try:
            out["sync"].append(measure())
        finally:
            server.stop(0).wait()

        sock.unlink(missing_ok=True)
        loop = asyncio.new_event_loop()
        started = threading.Event()
        holder: dict[str, Any] = {}

        async def serve(holder: dict[str, Any] = holder,
                        started: threading.Event = started) -> None:
            aio = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), aio)
            aio.add_insecure_port(f"unix://{sock}")
            await aio.start()
            holder["server"], holder["stop"] = aio, asyncio.Event()
            started.set()
            await holder["stop"].wait()
            await aio.stop(0)

        thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
        thread.start()
        started.wait(30)
        try:
            out["aio"].append(measure())
        finally:
            loop.call_soon_threadsafe(holder["stop"].set)
            thread.join(30)
            loop.close()
    return out


# driver ---------------------------------------------------------------------------------------


def summary(results: dict[str, Any], key: str, part: str) -> dict[str, float]:
    """The medians over runs of p50 / p99 / max of one part of a scenario."""
    rows = results[key][part]
    return {q: median([r[q] for r in rows]) for q in ("p50", "p99", "max")}


def report(results: dict[str, Any], trees: list[Tree], args: argparse.Namespace) -> str:
    lines = []
    names = [t.name for t in trees]
    if "warm" in args.scenarios:
        rows = []
        for name in names:
            r = results[name]["warm"]
            for part, what in (("idle", "idle"), ("loading", f"while {args.big} loads")):
                m = summary(results[name], "warm", part)
                rows.append([name, what, f"{m['p50']:.2f}", f"{m['p99']:.2f}",
                             f"{m['max']:.1f}", median([x["n"] for x in r[part]])])
        lines += [f"### Warm load of a resident {args.small} model (ms, medians of "
                  f"{args.runs} runs)", "",
                  markdown_table(["code", "when", "p50", "p99", "max", "loads"], rows), ""]
        for name in names:
            lines.append(f"- {name}: the {args.big} load took "
                         f"{median(results[name]['warm']['big_load_s']):.2f} s (median)")
        lines.append("")
    if "status" in args.scenarios:
        rows = []
        for name in names:
            for part, what in (("idle", "idle"), ("busy", f"{args.cold} cold Acquires")):
                m = summary(results[name], "status", part)
                rows.append([name, what, f"{m['p50']:.2f}", f"{m['p99']:.2f}",
                             f"{m['max']:.1f}"])
        lines += [f"### Status latency (ms, medians of {args.runs} runs; every GET held "
                  f"{args.hold} s)", "", markdown_table(["code", "when", "p50", "p99", "max"],
                                                        rows), ""]
    if "transport" in args.scenarios:
        t = results["transport"]
        rows = [[k, *(f"{median([r[q] for r in t[k]]):.3f}" for q in ("p50", "p99", "max"))]
                for k in ("sync", "aio")]
        lines += ["### One trivial unary call (ms, in-process, medians of runs)", "",
                  markdown_table(["server", "p50", "p99", "max"], rows), ""]
    if len(names) == 2 and "warm" in args.scenarios:
        before, after = (summary(results[n], "warm", "loading") for n in names[::-1])
        lines.append(f"Warm p99 while loading, {names[0]} / {names[1]}: "
                     f"{after['p99'] / before['p99']:.3g}x")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--scenarios", default="warm,status,transport")
    p.add_argument("--baseline-tree", type=Path, default=None,
                   help="another checkout of weightd to measure as 'before'")
    p.add_argument("--big", default="1GiB", help="the model loaded from a cold page cache")
    p.add_argument("--small", default="32MiB", help="the resident model loaded warm")
    p.add_argument("--cold", type=int, default=64, help="cold Acquires in flight")
    p.add_argument("--hold", type=float, default=2.0, help="seconds each slow GET is held")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/weightd-bench-concurrency"))
    p.add_argument("--out", type=Path, default=HERE / "out" / "concurrency.json")
    args = p.parse_args(argv)
    args.scenarios = set(args.scenarios.split(","))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    # `python -m` puts the working directory first on sys.path: run the daemons from
    # here, so that each imports the tree it is given (PYTHONPATH) and not this checkout
    os.chdir(work)
    trees = [Tree("after", None)]
    if args.baseline_tree is not None:
        trees.append(Tree("before", args.baseline_tree.resolve()))
    models = {"small": work / "models" / "small", "big": work / "models" / "big"}
    for name, size in (("small", args.small), ("big", args.big)):
        if not (models[name] / "config.json").exists():
            write_synthetic_model(models[name], total_bytes=parse_size(size), tensors=64,
                                  shards=max(1, parse_size(size) // (256 * 1024 * 1024)))
    results: dict[str, Any] = {"machine": machine_info(work), "args": {
        k: (sorted(v) if isinstance(v, set) else str(v)) for k, v in vars(args).items()}}
    for tree in trees:
        results[tree.name] = {}
        if "warm" in args.scenarios:
            results[tree.name]["warm"] = warm(tree, work, models, args.runs)
        if "status" in args.scenarios:
            results[tree.name]["status"] = status(tree, work, args.runs, args.cold, args.hold)
    if "transport" in args.scenarios:
        results["transport"] = transport(work, args.runs)
    text = report(results, trees, args)
    results["report"] = text
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\n{text}\n\nmodels: {size_label(parse_size(args.small))} resident, "
          f"{size_label(parse_size(args.big))} loading; raw results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
