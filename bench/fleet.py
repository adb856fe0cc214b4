#!/usr/bin/env python3
"""A fleet launching a model: N nodes of one cluster start the same model at once.

    python bench/fleet.py [--nodes 1,2,4,8] [--size 32MiB] [--shards 4] [--rate 10MB]
                          [--runs 3] [--parallel-files N] [--out bench/out/fleet.json]
                          [--plot docs/img/fleet.png]
    python bench/fleet.py --from-json bench/out/fleet.json --plot docs/img/fleet.png

On this machine, N ``weightd serve`` processes are the nodes (each its own cache and
socket, a ``weightd.testing.daemon.DaemonProcess``), one ``RangeHTTPServer`` is the
origin (its token bucket shared by every connection: ``--rate`` for the whole cluster,
as a hub or bucket that throttles it), and moto's S3 server in a child process is the
cluster's mirror. All N nodes are asked at the same moment (one thread per node, each
an ``Acquire`` on the host tier over the node's socket: ready is when the model is
resident there) for a model none of them has. Three ways:

- ``no mirror``: today's behaviour, every node pulls from the origin;
- ``mirror, cold``: a mirror that has never seen the model (one node pulls, the others
  wait for it and read the mirror);
- ``mirror, warm``: the model is in the mirror already (pushed by a node outside the N),
  every node's cache is empty.

For each N and way, the median over ``--runs`` rounds (each round a model of its own,
so that no cache or mirror holds it before): the bytes the origin served divided by the
model's size (goal: 1.00 cold, 0 warm, whatever N; N without a mirror), and the time for
the last node to be ready divided by the time of one node alone without a mirror,
measured in the same run (goal: within 1.5x).

moto reads the whole object for every ranged GET: the model's shards are no larger than
the S3 chunk (16 MiB by default), so that every blob is one GET and moto's cost is one
read of each blob per node; more, smaller chunks would measure moto, not weightd.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import describe_machine, machine_info, markdown_table, median  # noqa: E402
from fetch import MotoProcess  # noqa: E402

from weightd.config import format_size, parse_size  # noqa: E402
from weightd.testing import RangeHTTPServer, write_synthetic_model  # noqa: E402
from weightd.testing.daemon import DaemonProcess  # noqa: E402

MiB = 1024 * 1024
WAYS = ("no mirror", "mirror, cold", "mirror, warm")


def _stub(socket: Path) -> Any:
    """A channel to a node's socket that carries this process's credentials (leases
    belong to the caller the daemon's credential handshake names), and the stub class."""
    import grpc

    from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc
    from weightd_client.credentials import CredentialInterceptor

    channel = grpc.intercept_channel(grpc.insecure_channel(f"unix://{socket}"),
                                     CredentialInterceptor(socket))
    return channel, pb_grpc.WeightdStub


def acquire_all(nodes: list[DaemonProcess], url: str) -> list[float]:
    """Ask every node for ``url`` at the same moment; seconds until each was ready (its
    Acquire on the host tier answered), then release the leases."""
    from weightd.leases import process_start_time
    from weightd_client._proto.weightd.v1 import weightd_pb2 as pb

    me = pb.ClientInfo(pid=os.getpid(), start_time=process_start_time(os.getpid()) or 0,
                       name="bench/fleet.py")
    channels = [_stub(d.socket) for d in nodes]
    stubs = [cls(ch) for ch, cls in channels]
    barrier = threading.Barrier(len(nodes) + 1)

    def one(stub: Any) -> tuple[float, str]:
        barrier.wait()
        t0 = time.perf_counter()
        resp = stub.Acquire(pb.AcquireRequest(source=url, device="cpu", client=me), timeout=900)
        return time.perf_counter() - t0, resp.lease_id

    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
        futures = [pool.submit(one, s) for s in stubs]
        barrier.wait()
        done = [f.result() for f in futures]
    for stub, (_, lease) in zip(stubs, done, strict=True):
        stub.Release(pb.ReleaseRequest(lease_id=lease), timeout=30)
    for ch, _ in channels:
        ch.close()
    return [t for t, _ in done]


def mirror_bytes(nodes: list[DaemonProcess], model: str) -> int:
    """What the nodes say they read from the mirror for ``model`` (their Status). A
    node counts a fetch's bytes once it is durable, which can be just after the Acquire
    that waited for it to be served answered: each node is asked until it has (30 s)."""
    from weightd_client._proto.weightd.v1 import weightd_pb2 as pb

    total = 0
    for d in nodes:
        ch, cls = _stub(d.socket)
        with ch:
            deadline = time.monotonic() + 30
            while True:
                st = cls(ch).Status(pb.StatusRequest(), timeout=30)
                counted = [m for m in st.model_bytes if m.model == model]
                if counted or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        total += sum(m.mirror for m in counted)
    return total


class Fleet:
    """N daemons, their homes under ``work``, with or without the mirror."""

    def __init__(self, work: Path, n: int, env: dict[str, str]) -> None:
        self.homes = [work / f"node-{uuid.uuid4().hex[:8]}" for _ in range(n)]
        self.nodes: list[DaemonProcess] = []
        try:
            for home in self.homes:
                self.nodes.append(DaemonProcess(home, env=env, timeout=120))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for d in self.nodes:
            d.stop()
        for home in self.homes:
            shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="1,2,4,8", help="cluster sizes (comma-separated)")
    ap.add_argument("--size", default="32MiB", help="model size")
    ap.add_argument("--shards", type=int, default=4, help="shards of the model")
    ap.add_argument("--rate", default="10MB", help="the origin's rate for all nodes (per s)")
    ap.add_argument("--runs", type=int, default=3, help="rounds per N and way (median)")
    ap.add_argument("--parallel-files", type=int, default=None,
                    help="max_parallel_files of every node, every way (default: weightd's)")
    ap.add_argument("--workdir", default="/var/tmp", help="where caches and models go")
    ap.add_argument("--out", default="bench/out/fleet.json")
    ap.add_argument("--plot", default=None, help="write a PNG (needs matplotlib: [bench])")
    ap.add_argument("--from-json", default=None, metavar="JSON",
                    help="run nothing: print the table of an earlier run's --out (and --plot)")
    args = ap.parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        print(report["table"])
        if args.plot:
            plot(report, Path(args.plot))
            print(f"wrote {args.plot}")
        return 0
    sizes = [int(x) for x in args.nodes.split(",")]
    size, rate = parse_size(args.size), float(parse_size(args.rate))
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="weightd-bench-fleet-", dir=args.workdir))
    info = machine_info(work)
    print(describe_machine(info))
    print(f"model {format_size(size)} in {args.shards} shards, origin {rate / 1e6:g} MB/s for "
          f"the cluster, N = {sizes}, {args.runs} rounds each, max_parallel_files "
          f"{args.parallel_files or 'default'}\n")
    results: list[dict[str, Any]] = []
    try:
        with MotoProcess() as moto, RangeHTTPServer(work / "www", rate=rate) as origin:
            import boto3

            s3 = boto3.client("s3", endpoint_url=moto.endpoint_url, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
            s3.create_bucket(Bucket="mirror")
            models: dict[tuple[str, int], str] = {}
            for w, way in enumerate(WAYS):
                for r in range(args.runs):
                    d = work / "www" / f"m{w}{r}"
                    write_synthetic_model(d, total_bytes=size, tensors=8 * args.shards,
                                          shards=args.shards, seed=100 + 10 * w + r)
                    models[(way, r)] = f"{origin.url}/m{w}{r}"
            model_size = sum(p.stat().st_size for p in (work / "www" / "m00").iterdir())
            for n in sizes:
                mirror_env = {
                    "WEIGHTD_MIRRORS": f"s3://mirror/n{n}-{uuid.uuid4().hex[:6]}",
                    "WEIGHTD_MIRROR_ENDPOINT_URL": moto.endpoint_url,
                    "WEIGHTD_MIRROR_ACCESS_KEY_ID": "testing",
                    "WEIGHTD_MIRROR_SECRET_ACCESS_KEY": "testing",
                    "WEIGHTD_HOST_MLOCK": "false", "WEIGHTD_LOG_LEVEL": "WARNING"}
                plain_env = {"WEIGHTD_HOST_MLOCK": "false", "WEIGHTD_LOG_LEVEL": "WARNING"}
                if args.parallel_files is not None:
                    for env in (mirror_env, plain_env):
                        env["WEIGHTD_MAX_PARALLEL_FILES"] = str(args.parallel_files)
                for way in WAYS:
                    fleet = Fleet(work, n, plain_env if way == "no mirror" else mirror_env)
                    try:
                        for r in range(args.runs):
                            url = models[(way, r)]
                            if way == "mirror, warm":  # a node outside the N pushes it
                                seeder = Fleet(work, 1, mirror_env)
                                try:
                                    acquire_all(seeder.nodes, url)
                                finally:
                                    seeder.stop()  # waits for its write-back
                            origin.log.reset()
                            times = acquire_all(fleet.nodes, url)
                            name = _model_name(url)
                            row = {"n": n, "way": way, "run": r, "times": times,
                                   "last": max(times),
                                   "origin_bytes": origin.log.bytes_served(),
                                   "mirror_bytes": mirror_bytes(fleet.nodes, name),
                                   "model_bytes": model_size}
                            results.append(row)
                            print(f"N={n} {way:<13} round {r}: last ready {max(times):6.2f}s, "
                                  f"origin {row['origin_bytes'] / model_size:.2f}x the model, "
                                  f"mirror {row['mirror_bytes'] / model_size:.2f}x", flush=True)
                    finally:
                        fleet.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = summarize(results, sizes, model_size, info, args, rate)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print("\n" + report["table"])
    print(f"\nwrote {out}")
    if args.plot:
        plot(report, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


def _model_name(url: str) -> str:
    from weightd.sources import canonical_url, model_name

    return model_name(canonical_url(url))


def summarize(results: list[dict[str, Any]], sizes: list[int], model_size: int,
              info: dict[str, Any], args: argparse.Namespace, rate: float) -> dict[str, Any]:
    alone = median([r["last"] for r in results if r["way"] == "no mirror" and r["n"] == 1])
    rows, table = [], []
    for way in WAYS:
        for n in sizes:
            mine = [r for r in results if r["way"] == way and r["n"] == n]
            if not mine:
                continue
            origin_x = median([r["origin_bytes"] / model_size for r in mine])
            mirror_x = median([r["mirror_bytes"] / model_size for r in mine])
            last = median([r["last"] for r in mine])
            rows.append({"way": way, "n": n, "origin_x": origin_x, "mirror_x": mirror_x,
                         "last_s": last, "last_vs_alone": last / alone if alone else None,
                         "runs": len(mine)})
            table.append((way, n, f"{origin_x:.2f}", f"{mirror_x:.2f}", f"{last:.2f}",
                          f"{last / alone:.2f}x" if alone else "-"))
    text = markdown_table(("way", "N", "origin bytes ÷ model", "mirror bytes ÷ model",
                           "last node ready (s, median)", "÷ one node alone"), table)
    return {"machine": info, "model_bytes": model_size, "shards": args.shards,
            "origin_rate": rate, "runs": args.runs, "alone_s": alone, "rows": rows,
            "parallel_files": args.parallel_files,
            "results": results, "table": text}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ticks = sorted({r["n"] for r in report["rows"]})
    for way, marker in zip(WAYS, ("o", "s", "^"), strict=True):
        rows = [r for r in report["rows"] if r["way"] == way]
        ns = [r["n"] for r in rows]
        ax1.plot(ns, [r["origin_x"] for r in rows], marker=marker, label=way)
        ax2.plot(ns, [r["last_vs_alone"] for r in rows], marker=marker, label=way)
    ax1.set(xlabel="nodes starting the model at once", ylabel="origin bytes ÷ model size",
            title="bytes pulled from the origin", xscale="log", xticks=ticks)
    ax2.axhline(1.5, color="grey", linestyle="--", linewidth=1, label="goal: 1.5x")
    ax2.set(xlabel="nodes starting the model at once",
            ylabel="last node ready ÷ one node alone", title="time to the last node ready",
            xscale="log", xticks=ticks)
    for ax in (ax1, ax2):
        ax.minorticks_off()  # a log axis would label 3 and 6 as 3x10^0 and 6x10^0
        ax.set_xticklabels([str(n) for n in ticks])
        ax.grid(alpha=0.3)
        ax.legend()
    rate = report["origin_rate"] / 1e6
    files = report.get("parallel_files")
    fig.suptitle(f"{format_size(report['model_bytes'])} model in {report['shards']} shards, "
                 f"origin {rate:g} MB/s for the cluster, "
                 f"{'max_parallel_files ' + str(files) + ', ' if files else ''}"
                 f"median of {report['runs']} rounds (bench/fleet.py)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
