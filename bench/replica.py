"""The replica side of bench/cold_start.py: one model-server process that loads a model
with one method, touches every page, reports, and waits to be told to release.

Replicas are multiprocessing children (forked from a forkserver that imported torch,
safetensors.torch and weightd_client, or fresh interpreters with ``--spawn``); only this
module touches torch, the driver never imports it. Each loader takes the run's ``spec``
and returns ``(tensors by name, release(), extra measurements)``. A loader that raises
reports the error to the driver instead of dying silently, so that a peer that does not
run is listed with its reason.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20

PRELOAD = ["torch", "safetensors.torch", "weightd_client"]

Loaded = tuple[Any, Callable[[], None], dict[str, Any]]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def load_weightd(spec: dict[str, Any]) -> Loaded:
    """``weightd_client.Client().load(source)``: the daemon's pages (or GPU buffers)."""
    import weightd_client

    extra: dict[str, Any] = {}
    prof = None
    if spec.get("profile"):
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.monotonic_ns()
    client = weightd_client.Client()
    t1 = time.monotonic_ns()
    extra["client_ms"] = (t1 - t0) / 1e6
    # Instrumentation only: time the Acquire RPC and keep the daemon's own server_ms.
    with contextlib.suppress(AttributeError):
        rpc = client._stub.Acquire

        def timed_acquire(*a: Any, **kw: Any) -> Any:
            r0 = time.monotonic_ns()
            resp = rpc(*a, **kw)
            extra["acquire_rpc_ms"] = (time.monotonic_ns() - r0) / 1e6
            extra["server_ms"] = resp.server_ms
            return resp

        client._stub.Acquire = timed_acquire
    m = client.load(spec["source"], spec.get("device", "cpu"), fallback=False,
                    timeout=spec.get("timeout", 600))
    _sync(spec.get("device", "cpu"))
    if prof is not None:
        prof.disable()
        import io
        import pstats

        for key in ("cumulative", "tottime"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(30)
            extra[f"profile_{key}"] = buf.getvalue()
    extra["load_call_ms"] = (time.monotonic_ns() - t1) / 1e6

    def release() -> None:
        m.release()
        client.close()

    return m, release, extra


def load_weightd_stream(spec: dict[str, Any]) -> Loaded:
    """``weightd_client.Client().stream(source)``: each tensor as its bytes land (views
    of the file the daemon writes), then the lease. ``t_first_ns`` / ``t_last_ns``: when
    the first and the last tensor came out of the iterator (CLOCK_MONOTONIC)."""
    import weightd_client

    client = weightd_client.Client()
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    weights = client.stream(spec["source"], spec.get("device", "cpu"),
                            timeout=spec.get("timeout", 600))
    try:
        for name, tensor in weights:
            now = time.monotonic_ns()
            extra.setdefault("t_first_ns", now)
            extra["t_last_ns"] = now
            out[name] = tensor
    except BaseException:
        weights.release()
        client.close()
        raise
    _sync(spec.get("device", "cpu"))

    def release() -> None:
        out.clear()
        weights.release()
        client.close()

    return out, release, extra


def load_file(spec: dict[str, Any]) -> Loaded:
    """``safetensors.torch.load_file(shard, device)`` for each shard."""
    from safetensors.torch import load_file as st_load_file

    device = spec.get("device", "cpu")
    out: dict[str, Any] = {}
    for f in spec["files"]:
        out.update(st_load_file(f, device=device))
    _sync(device)
    return out, out.clear, {}


def load_safe_open(spec: dict[str, Any]) -> Loaded:
    """``safe_open(shard)`` + ``get_tensor(name)`` for every name."""
    from safetensors import safe_open

    out: dict[str, Any] = {}
    for f in spec["files"]:
        with safe_open(f, framework="pt", device=spec.get("device", "cpu")) as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[name] = fh.get_tensor(name)
    return out, out.clear, {}


def _read_into(path: str, view: memoryview) -> None:
    """Read the whole file into ``view`` (its size), in pieces: one read() returns at
    most ~2 GiB on Linux."""
    size = len(view)
    with open(path, "rb", buffering=0) as fh:
        done = 0
        while done < size:
            n = fh.readinto(view[done:done + 256 * MiB])
            if not n:
                raise EOFError(f"{path}: short read at {done} of {size}")
            done += n


def load_copy(spec: dict[str, Any]) -> Loaded:
    """The simplest copying loader: read each shard into this process's memory, tensors
    are views of that buffer (one private copy, no zero-fill: torch.empty)."""
    import torch

    from weightd.formats import layout_from_bytes
    from weightd_client.tensors import torch_dtype

    out: dict[str, Any] = {}
    for f in spec["files"]:
        size = os.path.getsize(f)
        buf = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        _read_into(f, view)
        for t in layout_from_bytes(view, path=f).tensors:  # offsets index into the file
            dtype = torch_dtype(t.dtype, path=f)
            data = buf[t.offset:t.offset + t.nbytes]
            out[t.name] = (data.view(dtype) if t.nbytes else torch.empty(0, dtype=dtype)
                           ).view(t.shape)
    return out, out.clear, {}


def load_seqread(spec: dict[str, Any]) -> Loaded:
    """Not a loader: a plain sequential ``read()`` of every shard into one reused 1 MiB
    buffer, with ``POSIX_FADV_SEQUENTIAL``: the disk's own pace (the baseline of the disk
    scenario). No tensors. (1 MiB reads ran at 2.5-3.2 GB/s from a dropped page cache
    here, 16 MiB reads at 1.4-1.5 GB/s: the stronger baseline is kept.)"""
    buf = bytearray(MiB)
    total = 0
    for f in spec["files"]:
        with open(f, "rb", buffering=0) as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while n := fh.readinto(buf):
                total += n
    return {}, lambda: None, {"bytes_read": total}


def load_runai(spec: dict[str, Any]) -> Loaded:
    """run:ai model streamer's ``SafetensorsStreamer`` (local files, or s3:// URLs with
    the endpoint in ``spec["s3"]``); every tensor kept (owned=True)."""
    from runai_model_streamer import SafetensorsStreamer

    kwargs: dict[str, Any] = {}
    files = spec["files"]
    if spec.get("s3"):
        from runai_model_streamer.s3_utils.s3_utils import S3Credentials

        s3 = spec["s3"]
        files = spec["remote_files"]
        kwargs["s3_credentials"] = S3Credentials(
            access_key_id=s3["key"], secret_access_key=s3["secret"],
            region_name="us-east-1", endpoint=s3["endpoint_url"])
    out: dict[str, Any] = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(files, device=spec.get("device", "cpu"), **kwargs)
        for name, tensor in streamer.get_tensors():
            out[name] = tensor
    _sync(spec.get("device", "cpu"))
    return out, out.clear, {}


def load_fastsafetensors(spec: dict[str, Any]) -> Loaded:
    """fastsafetensors' ``SafeTensorsFileLoader`` on the CPU (``nogds=True``: pread
    through a bounce buffer into host memory)."""
    from fastsafetensors import SafeTensorsFileLoader

    device = spec.get("device", "cpu")
    loader = SafeTensorsFileLoader(None, device, nogds=True)
    loader.add_filenames({0: list(spec["files"])})
    fb = loader.copy_files_to_device()
    out = {name: fb.get_tensor(name) for name in loader.get_keys()}
    _sync(device)

    def release() -> None:
        out.clear()
        fb.close()
        loader.close()

    return out, release, {}


def load_download(spec: dict[str, Any]) -> Loaded:
    """What a server without weightd does with a remote model: download every file with
    fsspec (s3fs / HTTP) into its own directory, then ``load_file`` each shard."""
    import fsspec
    from safetensors.torch import load_file as st_load_file

    tmp = tempfile.mkdtemp(prefix="replica-", dir=spec["scratch"])
    out: dict[str, Any] = {}
    try:
        fs, _ = fsspec.core.url_to_fs(spec["remote_files"][0], **spec.get("storage_options", {}))
        local = [os.path.join(tmp, f"{i}.safetensors") for i in range(len(spec["remote_files"]))]
        fs.get(list(spec["remote_files"]), local)
        for f in local:
            out.update(st_load_file(f, device=spec.get("device", "cpu")))
    finally:
        # The tensors keep their mmaps; the directory entries can go now.
        shutil.rmtree(tmp, ignore_errors=True)
    _sync(spec.get("device", "cpu"))
    return out, out.clear, {}


def load_curl(spec: dict[str, Any]) -> Loaded:
    """``curl -o`` each shard into a directory of its own (one after the other), then
    ``load_file`` each: the plainest way to load a model from an HTTP origin."""
    import subprocess

    from safetensors.torch import load_file as st_load_file

    tmp = tempfile.mkdtemp(prefix="replica-", dir=spec["scratch"])
    out: dict[str, Any] = {}
    try:
        local = [os.path.join(tmp, f"{i}.safetensors") for i in range(len(spec["remote_files"]))]
        for url, path in zip(spec["remote_files"], local, strict=True):
            subprocess.run(["curl", "-sSf", "-o", path, url], check=True, timeout=600)
        for f in local:
            out.update(st_load_file(f, device=spec.get("device", "cpu")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the tensors keep their mmaps
    _sync(spec.get("device", "cpu"))
    return out, out.clear, {}


def load_cuda_memcpy(spec: dict[str, Any]) -> Loaded:
    """Not a loader: the host-to-device baseline of the gpu scenario. The shards' bytes
    are read into pinned host memory first (not timed), then one ``copy_`` per shard into
    one device allocation each, non-blocking, synchronized once: the rate the PCIe link
    gives a plain pinned ``cudaMemcpy``."""
    import torch

    device = spec.get("device", "cuda")
    hosts = []
    for f in spec["files"]:
        size = os.path.getsize(f)
        h = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        _read_into(f, memoryview(h.numpy()))
        hosts.append(h)
    torch.cuda.synchronize()
    t0 = time.monotonic_ns()
    devs = [torch.empty(h.numel(), dtype=torch.uint8, device=device) for h in hosts]
    for d, h in zip(devs, hosts, strict=True):
        d.copy_(h, non_blocking=True)
    torch.cuda.synchronize()
    dt = (time.monotonic_ns() - t0) / 1e9
    nbytes = sum(h.numel() for h in hosts)
    out = {f"shard{i}": d for i, d in enumerate(devs)}
    return out, out.clear, {"h2d_bytes": nbytes, "h2d_s": dt, "h2d_gbps": nbytes / dt / 1e9}


# What each loader imports, done before the barrier: times run "from after imports".
IMPORTS: dict[str, list[str]] = {
    "runai": ["runai_model_streamer"],
    "fastsafetensors": ["fastsafetensors"],
    "download": ["fsspec", "fsspec.implementations.http", "s3fs"],
    "safe_open": ["safetensors"],
}

LOADERS: dict[str, Callable[[dict[str, Any]], Loaded]] = {
    "weightd": load_weightd, "weightd-stream": load_weightd_stream, "curl": load_curl,
    "load_file": load_file, "safe_open": load_safe_open,
    "copy": load_copy, "seqread": load_seqread, "runai": load_runai,
    "fastsafetensors": load_fastsafetensors, "download": load_download,
    "cuda_memcpy": load_cuda_memcpy,
}


def touch(tensors: Any, how: str) -> int:
    """Read every page of every tensor (the same for every method): ``page``, one byte
    in every 4 KiB page plus each tensor's last byte; ``sum``, every byte."""
    import torch

    acc = 0
    cuda = False
    for t in tensors.values():
        if not t.numel():
            continue
        cuda = cuda or t.is_cuda
        u = t.contiguous().view(-1).view(torch.uint8)
        if how == "sum":
            # Summed as int64 words (a uint8 sum would cast to int64 in temporary
            # buffers, ~100 MB/s here), the tail bytes as uint8.
            n8 = u.numel() // 8 * 8
            try:
                words = u[:n8].view(torch.int64)
            except RuntimeError:  # storage offset not 8-byte aligned
                words, n8 = u[:0].view(torch.int64), 0
            acc += int(words.sum()) + int(u[n8:].sum())
        else:
            acc += int(u[::PAGE].sum()) + int(u[-1])
    if cuda:
        torch.cuda.synchronize()
    return acc


def io_read_bytes(pid: int | str = "self") -> int:
    """Bytes a process made the storage layer fetch (``/proc/<pid>/io`` read_bytes:
    reads and page faults that missed the page cache); 0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def replica_main(spec: dict[str, Any], conn: Any, barrier: Any) -> None:
    """One replica: import, wait at the barrier, load, touch, report, wait, release."""
    t_start = time.monotonic_ns()
    os.environ["WEIGHTD_SOCKET"] = spec["socket"]
    os.environ.update(spec.get("env", {}))
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import weightd_client  # noqa: F401

    loader = LOADERS[spec["loader"]]
    for module in IMPORTS.get(spec["loader"], []):
        with contextlib.suppress(ImportError):  # the loader itself says what is missing
            importlib.import_module(module)
    if spec.get("device", "cpu").startswith("cuda"):
        # The context is a process's fixed cost, not the loader's, and its memory must be
        # in the driver's "before": torch.cuda.init() alone creates no context.
        torch.zeros(1, device=spec["device"])
        torch.cuda.synchronize()
    # Start every method from the same garbage-collector state: otherwise a full
    # collection over torch's objects (~200 ms here) lands in whichever loader happens to
    # allocate at the wrong moment. freeze() is what preforking servers do.
    gc.freeze()
    io_before = io_read_bytes()
    conn.send({"event": "imported", "pid": os.getpid(),
               "import_ms": (time.monotonic_ns() - t_start) / 1e6})
    try:
        while True:  # EOF once the driver closes the write end: all wake together
            barrier.recv_bytes()
    except EOFError:
        pass
    t_wake = time.monotonic_ns()
    try:
        tensors, release, extra = loader(spec)
        t_ready = time.monotonic_ns()
        checksum = touch(tensors, spec["touch"])
        t_touched = time.monotonic_ns()
    except Exception as e:  # a peer that does not run: say why, in one line
        last = traceback.extract_tb(e.__traceback__)[-1]
        conn.send({"event": "error", "error": f"{type(e).__name__}: {e} "
                   f"({os.path.basename(last.filename)}:{last.lineno})"})
        return
    conn.send({"event": "done", "pid": os.getpid(), "t_wake": t_wake, "t_ready": t_ready,
               "t_touched": t_touched, "tensors": len(tensors),
               "nbytes": sum(t.numel() * t.element_size() for t in tensors.values()),
               "checksum": checksum, "io_read_bytes": io_read_bytes() - io_before,
               **{k: v for k, v in extra.items()}})
    conn.recv()  # the driver reads our smaps first
    del tensors
    release()
    conn.send({"event": "released"})
