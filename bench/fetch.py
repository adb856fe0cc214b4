#!/usr/bin/env python3
"""Fetch throughput: weightd against curl, fsspec and s3fs on 127.0.0.1.

    python bench/fetch.py [--size 1GiB] [--shards 4] [--runs 5] [--out bench/out/fetch.json]
                          [--rate 200MB [--conn-rate 50MB]] [--server nginx|python]
                          [--sweep] [--wire-compare]

What it does, in one process:

1. writes a synthetic multi-shard safetensors model into a temp dir on local disk
   (``--workdir``, default /var/tmp: never a tmpfs);
2. serves that dir on 127.0.0.1: with nginx (sendfile, autoindex) when it is installed
   and no rate is asked, else with ``weightd.testing.RangeHTTPServer`` in a child process
   (sendfile too); ``--rate`` / ``--conn-rate`` shape every body with that server's token
   buckets (a total rate shared by every connection, a rate per connection), so that the
   link, not the loopback, is the bottleneck, as on a real node;
3. uploads it to moto's S3 server (``weightd.testing.MotoS3Server``, in a child process);
4. measures GB/s (10^9 bytes / wall seconds), alternating the methods run after run,
   each download into a fresh directory on the same disk (deleted, and the disk synced,
   outside the timed part), with the source files warm in the page cache:

   - HTTP: weightd fetch of the directory URL; ``curl -s -o FILE URL`` per shard in
     sequence, and all shards at once (``curl -Z``); fsspec ``HTTPFileSystem().get_file``
     per shard;
   - S3: weightd fetch of the ``s3://`` prefix; ``s3fs.S3FileSystem(...).get(recursive=True)``;
   - for weightd, three times: the **wire only** (weightd's read loop as a fetch runs it,
     files in parallel, chunks handed in order to a writer thread per file that hashes
     them and writes nothing: the bytes into the writer), **until written** (in the whole
     fetch, until the last byte was hashed and written to its temporary file: page cache,
     not yet fsynced; the fetch's ``FetchEvents.written``), **until ready** (every file
     written and verified: from here a node serves the model, ``FetchEvents.ready``), and
     the **whole fetch** (validate, fsync, rename);
   - the share of weightd's wall time spent hashing, and raw xxh3-128 speed in memory;
   - the whole machine's CPU seconds per GB fetched (every process and kernel thread,
     the origin on the same cores included: on loopback the fetch is bound by CPU).

   weightd fsyncs every blob before it becomes visible; curl, fsspec and s3fs do not.
   The ``+fsync`` rows add the time to fsync what a baseline wrote, for a like-for-like
   comparison; the wire rows compare with the baselines as they are.
5. ``--sweep``: weightd over chunk_size x concurrency for HTTP and S3 (S3 on a smaller
   model, moto being slow with many ranged reads), and file:// against shutil.copyfile.
6. ``--wire-compare``: the HTTP read loop alone, one large file into memory (nothing
   written): aiohttp (what fsspec's HTTP filesystem uses) keeping the body's blocks or
   copying them into a buffer, ``http.client`` on threads reading into a buffer
   (weightd's wire), and ``curl -o /dev/null``: the measurement behind
   weightd/sources/wire.py.

Without ``--rate`` everything is loopback: these numbers measure the client side (CPU,
copies, hashing, disk), not a network.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from weightd.config import Config, format_size, parse_size
from weightd.sources.base import chunk_plan
from weightd.store import Fetcher, Store
from weightd.store.fetch import FetchEvents, Ready
from weightd.testing import write_synthetic_model

GB = 1e9
MiB = 1024 * 1024
BUCKET = "bench"

#: What issue 16 asks of the wire (bytes hashed and written, before the fsync): keep
#: pace with curl -o, on loopback and at a rate limit.
WIRE_GOALS = {"curl -o": 0.95}


# --- measurements ------------------------------------------------------------------------


@dataclass
class Sample:
    """One timed download."""

    method: str
    run: int
    bytes: int
    seconds: float
    fsync_seconds: float = 0.0  # baselines: time to fsync what they wrote (not in seconds)
    hash_seconds: float = 0.0  # weightd: summed over its writer threads
    wire_seconds: float = 0.0  # weightd: until the last byte was hashed and written
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / GB

    @property
    def wire_gbps(self) -> float:
        return self.bytes / self.wire_seconds / GB if self.wire_seconds else float("nan")

    @property
    def gbps_fsync(self) -> float:
        return self.bytes / (self.seconds + self.fsync_seconds) / GB


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def _fsync_files(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def _clean(path: Path) -> None:
    """Remove a download and flush the disk, so that the next timed run starts even."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def _warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 * MiB):
                pass


def weightd_fetch(url: str, dest: Path, *, run: int, method: str = "weightd",
                  chunk_size: int | None = None, concurrency: int | None = None,
                  s3_endpoint: str | None = None) -> Sample:
    config = Config(cache_dir=dest, chunk_size=chunk_size, concurrency=concurrency,
                    s3_endpoint_url=s3_endpoint)
    last = [0.0]
    ready_at = [0.0]

    class Events(FetchEvents):
        def written(self, rf: Any, offset: int, nbytes: int) -> None:
            last[0] = max(last[0], time.perf_counter())  # the writer threads', in order

        def ready(self, ready: Ready) -> None:
            ready_at[0] = time.perf_counter()  # verified: a node serves it from here on

    with Store.open(dest) as store:
        fetcher = Fetcher(store, config)
        t0 = time.perf_counter()
        snap = fetcher.fetch(url, events=Events())
        seconds = time.perf_counter() - t0
    plan = chunk_plan(url.split("://", 1)[0], config)
    return Sample(method, run, snap.stats.bytes_fetched, seconds,
                  hash_seconds=snap.stats.hash_seconds, wire_seconds=last[0] - t0,
                  extra={"chunk_size": plan.chunk_size, "concurrency": plan.concurrency,
                         "files": snap.stats.files, "ready_seconds": ready_at[0] - t0})


def weightd_wire(url: str, dest: Path, *, run: int, s3_endpoint: str | None = None) -> Sample:
    """weightd's read loop alone, as a fetch runs it (its source, plan, retries, buffers,
    files in parallel, chunks handed in order to a writer thread per file), the writer
    hashing each chunk (xxh3) and writing nothing: the bytes into the writer."""
    import concurrent.futures

    import fsspec.asyn

    from weightd.sources import open_source
    from weightd.store.fetch import _Buffers, _Schedule

    config = Config(cache_dir=dest, s3_endpoint_url=s3_endpoint)
    with Store.open(dest) as store:
        fetcher = Fetcher(store, config)
        t0 = time.perf_counter()
        with open_source(url, config) as source:
            files = source.list_files()
            buffers = _Buffers(source.plan.chunk_size)
            schedule = _Schedule(files, source.plan.concurrency * config.max_parallel_files,
                                 source.plan.chunk_size, start=source.plan.concurrency)
            hashed = [0.0]

            def one(f: Any) -> int:
                h = xxhash.xxh3_128()

                def sink(offset: int, blocks: Any) -> None:
                    t = time.perf_counter()
                    for b in blocks:
                        h.update(b)
                    hashed[0] += time.perf_counter() - t

                with source.open_file(f) as reader:
                    fsspec.asyn.sync(fsspec.asyn.get_loop(), fetcher._read_all, reader, f, sink,
                                     buffers, schedule, *schedule.place(f))
                return int(f.size)

            with concurrent.futures.ThreadPoolExecutor(config.max_parallel_files) as pool:
                total = sum(pool.map(one, files))
        seconds = time.perf_counter() - t0
    return Sample("weightd wire only", run, total, seconds, hash_seconds=hashed[0],
                  wire_seconds=seconds)


def curl_fetch(base: str, names: list[str], dest: Path, *, run: int) -> Sample:
    dest.mkdir(parents=True)
    total, seconds = 0, 0.0
    for name in names:
        out = dest / name
        t0 = time.perf_counter()
        subprocess.run(["curl", "-s", "-o", str(out), f"{base}/{name}"], check=True)
        seconds += time.perf_counter() - t0
        total += out.stat().st_size
    return Sample("curl -o", run, total, seconds,
                  fsync_seconds=_fsync_files(_files_under(dest)))


def curl_parallel(base: str, names: list[str], dest: Path, *, run: int) -> Sample:
    """All shards at once, one connection each (``curl -Z``), as weightd fetches files."""
    dest.mkdir(parents=True)
    args = ["curl", "-s", "--no-progress-meter", "-Z", "--parallel-immediate",
            "--parallel-max", str(max(1, len(names)))]
    for name in names:
        args += ["-o", str(dest / name), f"{base}/{name}"]
    t0 = time.perf_counter()
    subprocess.run(args, check=True)
    seconds = time.perf_counter() - t0
    total = sum((dest / n).stat().st_size for n in names)
    return Sample("curl -Z", run, total, seconds, fsync_seconds=_fsync_files(_files_under(dest)))


def fsspec_get_file(base: str, names: list[str], dest: Path, *, run: int) -> Sample:
    from fsspec.implementations.http import HTTPFileSystem

    dest.mkdir(parents=True)
    fs = HTTPFileSystem()
    total, seconds = 0, 0.0
    for name in names:
        out = dest / name
        t0 = time.perf_counter()
        fs.get_file(f"{base}/{name}", str(out))
        seconds += time.perf_counter() - t0
        total += out.stat().st_size
    return Sample("fsspec get_file", run, total, seconds,
                  fsync_seconds=_fsync_files(_files_under(dest)))


def s3fs_get(endpoint: str, prefix: str, dest: Path, *, run: int) -> Sample:
    import s3fs

    t0 = time.perf_counter()
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    fs.get(prefix, str(dest), recursive=True)
    seconds = time.perf_counter() - t0
    files = _files_under(dest)
    return Sample("s3fs.get", run, sum(p.stat().st_size for p in files), seconds,
                  fsync_seconds=_fsync_files(files))


def copyfile(src: Path, dest: Path, *, run: int) -> Sample:
    dest.mkdir(parents=True)
    total, seconds = 0, 0.0
    for p in _files_under(src):
        out = dest / p.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        shutil.copyfile(p, out)
        seconds += time.perf_counter() - t0
        total += p.stat().st_size
    return Sample("shutil.copyfile", run, total, seconds,
                  fsync_seconds=_fsync_files(_files_under(dest)))


def disk_write_speed(directory: Path, nbytes: int, repeats: int) -> list[float]:
    """GB/s of writing ``nbytes`` in 16 MiB writes to a new file, fsync included: the
    ceiling for anything that makes its writes durable (weightd) on this disk."""
    buf = np.random.default_rng(2).bytes(16 * MiB)
    out = []
    for i in range(repeats):
        path = directory / f"disk-speed-{i}"
        os.sync()
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for _ in range(0, nbytes, len(buf)):
                os.write(fd, buf)
            os.fsync(fd)
        finally:
            os.close(fd)
        out.append(nbytes / (time.perf_counter() - t0) / GB)
        path.unlink()
    return out


def xxh3_speed(nbytes: int, repeats: int) -> list[float]:
    """GB/s of xxh3-128 over ``nbytes`` in memory, fed in 16 MiB updates like a fetch."""
    buf = memoryview(np.random.default_rng(1).bytes(nbytes))
    out = []
    for _ in range(repeats):
        h = xxhash.xxh3_128()
        t0 = time.perf_counter()
        for o in range(0, nbytes, 16 * MiB):
            h.update(buf[o:o + 16 * MiB])
        h.hexdigest()
        out.append(nbytes / (time.perf_counter() - t0) / GB)
    return out


# --- servers --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NGINX_CONF = """\
worker_processes 2;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    absolute_redirect off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        autoindex on;
    }}
}}
"""


@contextlib.contextmanager
def nginx(root: Path, tmp: Path) -> Iterator[str]:
    """Serve ``root`` with nginx on 127.0.0.1; yield its base URL."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, root=root))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"nginx exited ({proc.returncode}): {err}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not start listening within 10 s")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_HTTP_CHILD = """
import sys
from weightd.testing import RangeHTTPServer
rate, conn_rate = (float(x) if x != "-" else None for x in sys.argv[2:4])
srv = RangeHTTPServer(sys.argv[1], rate=rate, conn_rate=conn_rate)
print(srv.url, flush=True)
sys.stdin.read()
srv.stop()
"""


@contextlib.contextmanager
def python_http(root: Path, rate: float | None, conn_rate: float | None) -> Iterator[str]:
    """``weightd.testing.RangeHTTPServer`` (with its token buckets) in a child process,
    so that serving does not take the benchmark's GIL; yield its base URL."""
    proc = subprocess.Popen([sys.executable, "-c", _HTTP_CHILD, str(root),
                             "-" if rate is None else str(rate),
                             "-" if conn_rate is None else str(conn_rate)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError("the Python HTTP server did not start")
        yield url
    finally:
        if proc.stdin:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_MOTO_CHILD = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from weightd.testing import MotoS3Server
srv = MotoS3Server()
print(srv.endpoint_url, flush=True)
sys.stdin.read()
srv.stop()
"""


class MotoProcess:
    """``weightd.testing.MotoS3Server`` in a child process, so that moto's Python work does
    not hold the benchmark's GIL (in the same process it would slow down every client
    measured here, weightd and s3fs alike)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _MOTO_CHILD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.endpoint_url = self.proc.stdout.readline().strip()
        if not self.endpoint_url.startswith("http://"):
            self.stop()
            raise RuntimeError("moto's S3 server did not start")

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> str:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=bucket)
        for path in _files_under(local):
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def stop(self) -> None:
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> MotoProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- machine ------------------------------------------------------------------------------


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _mount_of(path: Path) -> dict[str, str]:
    best: dict[str, str] = {}
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype, *_ = line.split()
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and \
                    len(mnt) >= len(best.get("mount", "")):
                best = {"device": dev, "mount": mnt, "fstype": fstype}
    return best


def machine(workdir: Path) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    nginx_v = None
    if shutil.which("nginx"):
        r = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
        nginx_v = (r.stderr or r.stdout).strip()
    curl_v = None
    if shutil.which("curl"):
        curl_v = subprocess.run(["curl", "--version"], capture_output=True,
                                text=True).stdout.splitlines()[0]
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "disk": _mount_of(workdir),
        "workdir": str(workdir),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("weightd", "fsspec", "s3fs", "aiohttp",
                                              "aiobotocore", "botocore", "moto", "xxhash",
                                              "numpy")},
        "nginx": nginx_v,
        "curl": curl_v,
    }


# --- reporting ------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _by_method(samples: list[Sample]) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for s in samples:
        out.setdefault(s.method, []).append(s)
    return out


def _paired_ratio(a: list[Sample], b: list[Sample], *, fsync_b: bool = False,
                  wire_a: bool = False) -> float:
    """Median over runs of weightd/baseline within the same run (robust to drift)."""
    bb = {s.run: s for s in b}
    ratios = [(s.wire_gbps if wire_a else s.gbps)
              / (bb[s.run].gbps_fsync if fsync_b else bb[s.run].gbps)
              for s in a if s.run in bb]
    return statistics.median(ratios) if ratios else float("nan")


def summarize(section: str, samples: list[Sample],
              goals: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per method (and per baseline +fsync); weightd's whole fetch and its wire
    (bytes hashed and written, before the fsync) as ratios against each baseline."""
    goals = goals or {}
    by = _by_method(samples)
    rows: list[dict[str, Any]] = []
    w = by.get("weightd", [])
    for method, ss in by.items():
        st = _stats([s.gbps for s in ss])
        row: dict[str, Any] = {"section": section, "method": method, **st, "runs": len(ss),
                               "values": [s.gbps for s in ss]}
        cpu = [s.extra["machine_cpu_seconds"] for s in ss if "machine_cpu_seconds" in s.extra]
        if cpu:
            row["cpu_per_gb"] = statistics.median(cpu) / (ss[0].bytes / GB)
        rows.append(row)
        if method == "weightd":
            row["hash_share"] = statistics.median(s.hash_seconds / s.seconds for s in ss)
            wire = [s.wire_gbps for s in ss]
            rows.append({"section": section, "method": "weightd, until written", **_stats(wire),
                         "runs": len(ss), "values": wire})
            continue
        if method.startswith("weightd"):
            continue
        if w:
            row["weightd_ratio"] = _paired_ratio(w, ss)
            row["written_ratio"] = _paired_ratio(w, ss, wire_a=True)
            if "weightd wire only" in by:
                row["wire_ratio"] = _paired_ratio(by["weightd wire only"], ss)
            row["goal"] = goals.get(method)
            stf = _stats([s.gbps_fsync for s in ss])
            rows.append({"section": section, "method": method + " +fsync", **stf,
                         "runs": len(ss), "values": [s.gbps_fsync for s in ss],
                         "weightd_ratio": _paired_ratio(w, ss, fsync_b=True)})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| source | method | median GB/s | min | max | machine CPU s per GB | "
          "weightd fetch / this | weightd until written / this | weightd wire only / this | "
          "goal (wire) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        ratio = f"{r['weightd_ratio']:.2f}" if "weightd_ratio" in r else ""
        written = f"{r['written_ratio']:.2f}" if "written_ratio" in r else ""
        wire = f"{r['wire_ratio']:.2f}" if "wire_ratio" in r else ""
        goal = ""
        if r.get("goal") and "wire_ratio" in r:
            ok = r["wire_ratio"] >= r["goal"]
            goal = f">= {r['goal']:g}: {'met' if ok else 'NOT met'}"
        method = r["method"]
        if "hash_share" in r:
            method += f" (hashing {100 * r['hash_share']:.1f}% of wall)"
        cpu = f"{r['cpu_per_gb']:.2f}" if "cpu_per_gb" in r else ""
        print(f"| {r['section']} | {method} | {r['median']:.3f} | {r['min']:.3f} | "
              f"{r['max']:.3f} | {cpu} | {ratio} | {written} | {wire} | {goal} |")


def print_sweep(title: str, samples: list[Sample], chunks: list[int],
                concs: list[int]) -> list[dict[str, Any]]:
    by: dict[tuple[int, int], list[float]] = {}
    for s in samples:
        by.setdefault((s.extra["chunk_size"], s.extra["concurrency"]), []).append(s.gbps)
    print(f"\n{title}: median GB/s (min-max) of weightd by chunk_size (rows) x "
          "concurrency per file (columns)\n")
    print("| chunk \\ conc | " + " | ".join(str(c) for c in concs) + " |")
    print("| ---: | " + " | ".join("---:" for _ in concs) + " |")
    table: list[dict[str, Any]] = []
    for ch in chunks:
        cells = []
        for c in concs:
            v = by.get((ch * MiB, c))
            if v:
                cells.append(f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})")
                table.append({"chunk_mib": ch, "concurrency": c, **_stats(v), "values": v})
            else:
                cells.append("-")
        print(f"| {ch} MiB | " + " | ".join(cells) + " |")
    if table:
        best = max(table, key=lambda r: r["median"])
        print(f"\nbest: chunk {best['chunk_mib']} MiB x concurrency {best['concurrency']}: "
              f"{best['median']:.2f} GB/s")
    return table


# --- main ----------------------------------------------------------------------------------


def _machine_cpu() -> float:
    """Seconds of CPU the whole machine has spent busy (every process and the kernel's
    threads: the origin, the writeback): /proc/stat, 0 where there is none."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait


def _alternate(runs: int, methods: list[tuple[str, Callable[[Path, int], Sample]]],
               scratch: Path, label: str) -> list[Sample]:
    """Run every method once per round, rotating their order; each into a fresh dir."""
    samples: list[Sample] = []
    for r in range(runs):
        k = r % len(methods)
        for name, fn in methods[k:] + methods[:k]:
            dest = scratch / f"{label}-{name.replace(' ', '_')}-{r}"
            _clean(dest)
            cpu0 = _machine_cpu()
            s = fn(dest, r)
            s.extra["machine_cpu_seconds"] = _machine_cpu() - cpu0
            _clean(dest)
            samples.append(s)
            print(f"  {label:5} run {r}: {s.method:16} {s.gbps:6.3f} GB/s "
                  f"({s.bytes / GB:.3f} GB in {s.seconds:.2f} s"
                  + (f", wire {s.wire_seconds:.2f} s ({s.wire_gbps:.3f} GB/s), hashing "
                     f"{s.hash_seconds:.2f} s"
                     + (f", ready {s.extra['ready_seconds']:.2f} s"
                        if "ready_seconds" in s.extra else "")
                     if s.method.startswith("weightd") else
                     f", +fsync {s.fsync_seconds:.2f} s") + ")", flush=True)
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--size", default="1GiB", help="model size (default 1GiB)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5, help="repeats of each method (default 5)")
    ap.add_argument("--rate", default=None,
                    help="HTTP origin's total rate, bytes/s with units (200MB): a token bucket "
                         "shared by every connection")
    ap.add_argument("--conn-rate", default=None,
                    help="HTTP origin's rate per connection, bytes/s with units (50MB)")
    ap.add_argument("--server", choices=("nginx", "python"), default=None,
                    help="the HTTP origin (default: nginx when installed and no rate is set, "
                         "else weightd.testing.RangeHTTPServer in a child process)")
    ap.add_argument("--wire-compare", action="store_true",
                    help="also compare HTTP read loops into memory (aiohttp, http.client "
                         "threads, curl -o /dev/null) on one file")
    ap.add_argument("--out", default="bench/out/fetch.json")
    ap.add_argument("--workdir", default="/var/tmp",
                    help="where the model, the server roots and the caches go (local disk)")
    ap.add_argument("--s3-size", default=None, help="S3 model size (default: --size)")
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--sweep", action="store_true",
                    help="also sweep chunk_size x concurrency (HTTP, S3, file://)")
    ap.add_argument("--sweep-runs", type=int, default=3)
    ap.add_argument("--sweep-s3-size", default="256MiB")
    ap.add_argument("--sweep-chunks", default="4,8,16,32,64", help="MiB")
    ap.add_argument("--sweep-concurrency", default="2,4,8,16")
    args = ap.parse_args(argv)

    size = parse_size(args.size)
    s3_size = parse_size(args.s3_size) if args.s3_size else size
    rate = float(parse_size(args.rate)) if args.rate else None
    conn_rate = float(parse_size(args.conn_rate)) if args.conn_rate else None
    server = args.server or ("nginx" if shutil.which("nginx") and rate is None
                             and conn_rate is None else "python")
    args.server_used = server
    if server == "nginx" and (rate is not None or conn_rate is not None):
        print("--rate and --conn-rate need --server python (nginx is not shaped here)",
              file=sys.stderr)
        return 2
    chunks = [int(x) for x in args.sweep_chunks.split(",")]
    concs = [int(x) for x in args.sweep_concurrency.split(",")]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log lines
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    workdir = Path(args.workdir)
    disk = _mount_of(workdir)
    if disk.get("fstype") in ("tmpfs", "ramfs"):
        print(f"{workdir} is on {disk['fstype']}: pick a local disk with --workdir",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="weightd-bench-fetch-", dir=workdir))
    os.chmod(work, 0o755)  # nginx workers run as an unprivileged user
    report: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(work),
        "params": {"size": size, "shards": args.shards, "runs": args.runs, "s3_size": s3_size,
                   "rate": rate, "conn_rate": conn_rate, "server": server},
        "notes": [
            "GB/s = 10^9 bytes / wall seconds; all traffic on 127.0.0.1 (loopback), source "
            "files warm in the page cache",
            "every download goes into a fresh dir on the same disk; deletion and a sync "
            "between runs are not timed",
            "weightd fsyncs every blob before rename; curl, fsspec get_file, s3fs.get and "
            "copyfile do not: the '+fsync' rows add the time to fsync their output",
            "hash share = weightd hash_seconds (summed over its per-file writer threads) / "
            "wall seconds",
            "moto's S3 server (in its own process) reads the whole object for every ranged "
            "GET: the S3 numbers measure moto as much as the client, and punish small chunks",
        ],
        "samples": {},
        "summary": [],
    }
    print(f"machine: {report['machine']['cpu_model']}, {report['machine']['cpus_usable']} CPUs, "
          f"{format_size(report['machine']['memory_bytes'])} RAM, "
          f"{disk.get('fstype')} on {disk.get('device')}; work dir {work}; load average "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    for n in report["notes"]:
        print(f"note: {n}")
    t_start = time.monotonic()
    try:
        srv_root = work / "srv"
        model = srv_root / "org" / "model"
        t0 = time.monotonic()
        shards = write_synthetic_model(model, total_bytes=size, shards=args.shards)
        names = [p.name for p in shards]
        print(f"wrote {format_size(sum(p.stat().st_size for p in shards))} in {len(shards)} "
              f"shards in {time.monotonic() - t0:.1f} s")
        _warm(_files_under(model))
        os.sync()  # the model's own writeback must not land in the first timed run
        scratch = work / "dst"
        scratch.mkdir()

        http_base: str | None = None
        stack = contextlib.ExitStack()
        with stack:
            if not args.no_http:
                if server == "nginx":
                    http_base = stack.enter_context(nginx(srv_root, work / "nginx"))
                    print(f"nginx serving {srv_root} at {http_base}")
                else:
                    http_base = stack.enter_context(python_http(srv_root, rate, conn_rate))
                    print(f"RangeHTTPServer (child process) serving {srv_root} at {http_base}"
                          + (f", {rate / 1e6:g} MB/s in all" if rate else "")
                          + (f", {conn_rate / 1e6:g} MB/s per connection" if conn_rate else ""))
                    if rate:
                        print(f"link time (model size / rate): {size / rate:.2f} s")
            moto: MotoProcess | None = None
            s3_url = ""
            if not args.no_s3:
                moto = stack.enter_context(MotoProcess())
                s3_model = model
                if s3_size != size:
                    s3_model = work / "s3src" / "model"
                    write_synthetic_model(s3_model, total_bytes=s3_size, shards=args.shards)
                t0 = time.monotonic()
                s3_url = moto.upload_dir(s3_model, BUCKET, "org/model")
                print(f"moto S3 at {moto.endpoint_url}; uploaded {s3_url} in "
                      f"{time.monotonic() - t0:.1f} s")

            all_samples: list[Sample] = []
            if http_base:
                url = f"{http_base}/org/model"
                print(f"\nHTTP ({url}), {args.runs} rounds:")
                http_methods: list[tuple[str, Callable[[Path, int], Sample]]] = [
                    ("weightd", lambda d, r: weightd_fetch(url, d, run=r)),
                    ("weightd wire only", lambda d, r: weightd_wire(url, d, run=r)),
                    ("curl -o", lambda d, r: curl_fetch(url, names, d, run=r)),
                    ("curl -Z", lambda d, r: curl_parallel(url, names, d, run=r)),
                    ("fsspec get_file", lambda d, r: fsspec_get_file(url, names, d, run=r)),
                ]
                if not shutil.which("curl"):
                    print("no curl on PATH: the curl baselines are left out "
                          "(apt-get install -y curl)")
                    http_methods = [m for m in http_methods if not m[0].startswith("curl")]
                ss = _alternate(args.runs, http_methods, scratch, "http")
                report["samples"]["http"] = [asdict(s) for s in ss]
                label = "HTTP" + (f" at {rate / 1e6:g} MB/s" if rate else "") + \
                    (f" ({conn_rate / 1e6:g} MB/s per conn)" if conn_rate else "")
                report["summary"] += summarize(label, ss, WIRE_GOALS)
                if rate:
                    link = size / rate
                    report["link_seconds"] = link
                    for method, group in _by_method(ss).items():
                        med = statistics.median(x.seconds for x in group)
                        line = f"{method}: {med:.2f} s = {med / link:.3f} x the link time"
                        if method == "weightd":
                            wmed = statistics.median(x.wire_seconds for x in group)
                            rmed = statistics.median(x.extra.get("ready_seconds", 0.0)
                                                     for x in group)
                            line += (f" (until written {wmed:.2f} s = {wmed / link:.3f} x; "
                                     f"until ready, when a node serves it, {rmed:.2f} s = "
                                     f"{rmed / link:.3f} x)")
                        print(f"  {line}")
                        report.setdefault("link_ratios", {})[method] = med / link
                all_samples += ss
            if moto:
                ep = moto.endpoint_url
                print(f"\nS3 ({s3_url} on moto), {args.runs} rounds:")
                ss = _alternate(args.runs, [
                    ("weightd", lambda d, r: weightd_fetch(s3_url, d, run=r, s3_endpoint=ep)),
                    ("weightd wire only", lambda d, r: weightd_wire(s3_url, d, run=r,
                                                                    s3_endpoint=ep)),
                    ("s3fs.get", lambda d, r: s3fs_get(ep, s3_url, d, run=r)),
                ], scratch, "s3")
                report["samples"]["s3"] = [asdict(s) for s in ss]
                report["summary"] += summarize("S3 (moto)", ss)
                all_samples += ss

            xx = xxh3_speed(min(size, 1 << 30), max(3, args.runs))
            report["xxh3_128_gbps"] = xx
            report["summary"].append({"section": "memory", "method": "xxh3-128 (1 core)",
                                      **_stats(xx), "runs": len(xx)})
            dw = disk_write_speed(scratch, min(size, 1 << 30), max(3, args.runs))
            report["disk_write_fsync_gbps"] = dw
            report["summary"].append({"section": "disk", "method": "write + fsync (16 MiB writes)",
                                      **_stats(dw), "runs": len(dw)})
            report["default_seconds"] = time.monotonic() - t_start
            report["loadavg_after_default"] = os.getloadavg()

            print(f"\n## fetch, {format_size(size)} in {args.shards} shards, "
                  f"{args.runs} runs each, alternating (weightd / this: ratio of medians, "
                  "in brackets the median of per-round ratios)\n")
            print_table(report["summary"])

            if args.wire_compare and http_base:
                report["wire_compare"] = wire_compare(f"{http_base}/org/model/{names[0]}",
                                                      args.runs)
            if args.sweep:
                report["sweep"] = sweep(args, work, scratch, model, http_base, moto, chunks,
                                        concs)
    finally:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        report["total_seconds"] = time.monotonic() - t_start
        report["loadavg_at_end"] = os.getloadavg()
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"\nraw numbers: {out}; total {report['total_seconds']:.0f} s")
        shutil.rmtree(work, ignore_errors=True)
    return 0


# --- read loops alone (--wire-compare) ------------------------------------------------------


def _ranges(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(o, min(o + chunk, size)) for o in range(0, size, chunk)]


async def _aiohttp_read(url: str, size: int, chunk: int, conc: int, *, copy: bool) -> None:
    import asyncio

    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as session:
        sem = asyncio.Semaphore(conc)

        async def one(a: int, b: int) -> None:
            async with sem, session.get(url, headers={"Range": f"bytes={a}-{b - 1}"},
                                        read_bufsize=4 * MiB) as r:
                if copy:  # into one buffer per chunk, as a reader into a preallocated one
                    buf, pos = memoryview(bytearray(b - a)), 0
                    async for data, _ in r.content.iter_chunks():
                        buf[pos:pos + len(data)] = data
                        pos += len(data)
                    got = pos
                else:  # the blocks as aiohttp hands them over (weightd before the wire)
                    got = sum([len(d) async for d, _ in r.content.iter_chunks()])
                if got != b - a:
                    raise RuntimeError(f"short read: {got} of {b - a}")

        await asyncio.gather(*(one(a, b) for a, b in _ranges(size, chunk)))


def _wire_read(url: str, size: int, chunk: int, conc: int) -> None:
    import concurrent.futures
    import mmap

    from weightd.sources.http import allowed_hops, range_check
    from weightd.sources.wire import Wire

    wire = Wire(check_hop=allowed_hops(()))
    local = __import__("threading").local()

    def one(a: int, b: int) -> None:
        if not hasattr(local, "buf"):
            local.buf = mmap.mmap(-1, chunk)  # reused, as the fetch reuses its buffers
        wire.read_into(url, memoryview(local.buf)[:b - a], start=a,
                       check=range_check(url, a, b, size))

    with concurrent.futures.ThreadPoolExecutor(conc) as pool:
        list(pool.map(lambda ab: one(*ab), _ranges(size, chunk)))
    wire.close()


def wire_compare(url: str, runs: int, chunk: int = 16 * MiB, conc: int = 8) -> dict[str, Any]:
    """GB/s of reading one file over HTTP into memory in ranged GETs of ``chunk`` bytes,
    ``conc`` at once: nothing is written or hashed."""
    import asyncio
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as r:
        size = int(r.headers["Content-Length"])
    methods: dict[str, Callable[[], object]] = {
        "aiohttp, blocks kept": lambda: asyncio.run(_aiohttp_read(url, size, chunk, conc,
                                                                  copy=False)),
        "aiohttp, into a buffer": lambda: asyncio.run(_aiohttp_read(url, size, chunk, conc,
                                                                    copy=True)),
        "http.client threads, readinto (wire)": lambda: _wire_read(url, size, chunk, conc),
    }
    if shutil.which("curl"):
        methods["curl -o /dev/null"] = lambda: subprocess.run(
            ["curl", "-s", "-o", "/dev/null", url], check=True)
    out: dict[str, list[float]] = {m: [] for m in methods}
    names = list(methods)
    for r in range(runs):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            methods[name]()
            out[name].append(size / (time.perf_counter() - t0) / GB)
    base = statistics.median(out["curl -o /dev/null"]) if "curl -o /dev/null" in out else None
    print(f"\n## read loops alone: {format_size(size)} in {chunk // MiB} MiB ranges, {conc} at "
          f"once, into memory, {runs} rounds\n")
    print("| read loop | median GB/s | min | max | vs curl -o /dev/null |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, v in out.items():
        st = _stats(v)
        vs = f"{st['median'] / base:.2f}" if base else ""
        print(f"| {name} | {st['median']:.2f} | {st['min']:.2f} | {st['max']:.2f} | {vs} |")
    return {"size": size, "chunk": chunk, "concurrency": conc, "gbps": out}


def sweep(args: argparse.Namespace, work: Path, scratch: Path, model: Path,
          http_base: str | None, moto: MotoProcess | None, chunks: list[int],
          concs: list[int]) -> dict[str, Any]:
    combos = [(ch, c) for ch in chunks for c in concs]
    out: dict[str, Any] = {"chunks_mib": chunks, "concurrency": concs}

    def grid(label: str, fn: Callable[[Path, int, int, int], Sample]) -> list[Sample]:
        samples: list[Sample] = []
        t0 = time.monotonic()
        for r in range(args.sweep_runs):
            k = (r * len(combos)) // max(1, args.sweep_runs)
            for ch, c in combos[k:] + combos[:k]:
                dest = scratch / f"sweep-{label}-{ch}-{c}-{r}"
                _clean(dest)
                samples.append(fn(dest, r, ch * MiB, c))
                _clean(dest)
            print(f"  {label} sweep round {r} done ({time.monotonic() - t0:.0f} s)", flush=True)
        return samples

    if http_base:
        url = f"{http_base}/org/model"
        print(f"\nsweep HTTP: {format_size(parse_size(args.size))}, {len(combos)} combos x "
              f"{args.sweep_runs} rounds")
        ss = grid("http", lambda d, r, ch, c: weightd_fetch(url, d, run=r, chunk_size=ch,
                                                             concurrency=c))
        out["http"] = print_sweep(f"HTTP ({args.server_used})", ss, chunks, concs)
    if moto:
        s3_size = parse_size(args.sweep_s3_size)
        src = work / "sweep-s3src" / "model"
        write_synthetic_model(src, total_bytes=s3_size, shards=args.shards)
        s3_url = moto.upload_dir(src, BUCKET, "sweep/model")
        ep = moto.endpoint_url
        print(f"\nsweep S3: {format_size(s3_size)}, {len(combos)} combos x "
              f"{args.sweep_runs} rounds")
        ss = grid("s3", lambda d, r, ch, c: weightd_fetch(s3_url, d, run=r, chunk_size=ch,
                                                           concurrency=c, s3_endpoint=ep))
        out["s3"] = print_sweep(f"S3 (moto, {format_size(s3_size)})", ss, chunks, concs)

    # file://: a few combos against shutil.copyfile
    file_combos = [(32, 2), (16, 4), (64, 1), (8, 8), (64, 4)]
    methods: list[tuple[str, Callable[[Path, int], Sample]]] = [
        ("shutil.copyfile", lambda d, r: copyfile(model, d, run=r))]

    def file_fetch(ch: int, c: int) -> Callable[[Path, int], Sample]:
        def run(d: Path, r: int) -> Sample:
            s = weightd_fetch(f"file://{model}", d, run=r, chunk_size=ch * MiB, concurrency=c)
            s.method = f"weightd {ch}MiB x{c}"
            return s
        return run

    for ch, c in file_combos:
        methods.append((f"weightd {ch}MiB x{c}", file_fetch(ch, c)))
    print(f"\nsweep file:// ({model}), {args.sweep_runs} rounds:")
    ss = _alternate(args.sweep_runs, methods, scratch, "file")
    rows = []
    base = [s for s in ss if s.method == "shutil.copyfile"]
    b_med = statistics.median(s.gbps for s in base)
    bf_med = statistics.median(s.gbps_fsync for s in base)
    print("\n| file:// method | median GB/s | min | max | vs copyfile | vs copyfile+fsync |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for method, group in _by_method(ss).items():
        st = _stats([s.gbps for s in group])
        rows.append({"method": method, **st, "values": [s.gbps for s in group]})
        print(f"| {method} | {st['median']:.3f} | {st['min']:.3f} | {st['max']:.3f} | "
              f"{st['median'] / b_med:.2f} | {st['median'] / bf_med:.2f} |")
        if method == "shutil.copyfile":
            stf = _stats([s.gbps_fsync for s in group])
            rows.append({"method": "shutil.copyfile +fsync", **stf,
                         "values": [s.gbps_fsync for s in group]})
            print(f"| shutil.copyfile +fsync | {stf['median']:.3f} | {stf['min']:.3f} | "
                  f"{stf['max']:.3f} | | |")
    out["file"] = rows
    return out


if __name__ == "__main__":
    sys.exit(main())
