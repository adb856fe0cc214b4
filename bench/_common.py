"""Helpers shared by the benchmarks: the machine, memory and page cache (the daemon
process is ``weightd.testing.daemon.DaemonProcess``).

Nothing here imports torch: a benchmark's driver process stays small, and only the
processes it measures pay for torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import math
import mmap
import os
import platform
import resource
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from weightd.testing.procfs import drop_page_cache  # noqa: F401 - the benchmarks' one

MiB = 1024 * 1024
GiB = 1024 * MiB


# --- the machine -------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _fs_of(path: Path) -> dict[str, str]:
    """The filesystem type and device a path lives on (longest mount-point match)."""
    best: tuple[int, dict[str, str]] = (-1, {})
    real = os.path.realpath(path)
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype, *_ = line.split()
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best[0]:
                best = (len(mnt), {"device": dev, "mount": mnt, "fstype": fstype})
    return best[1]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(workdir: Path) -> dict[str, Any]:
    """What a reader needs to judge the numbers: CPU, memory, kernel, disk, versions."""
    vm = psutil.virtual_memory()
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return {
        "cpu_model": _cpu_model(),
        "cpus_logical": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "ram_bytes": vm.total,
        "ram_available_bytes_at_start": vm.available,
        "swap_bytes": psutil.swap_memory().total,
        "kernel": platform.release(),
        "os": platform.platform(),
        "workdir": str(workdir),
        "workdir_fs": _fs_of(workdir),
        "memlock_limit": {"soft": soft, "hard": hard},
        "euid": os.geteuid(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in (
            "torch", "safetensors", "numpy", "grpcio", "weightd", "weightd-client", "psutil",
            "runai-model-streamer", "fastsafetensors", "s3fs", "moto")},
        "loadavg_at_start": os.getloadavg(),
    }


def describe_machine(info: dict[str, Any]) -> str:
    fs = info.get("workdir_fs", {})
    v = info["versions"]
    return (f"{info['cpu_model']}, {info['cpus_usable']} cores, "
            f"{info['ram_bytes'] / GiB:.1f} GiB RAM, kernel {info['kernel']}, "
            f"workdir {info['workdir']} on {fs.get('fstype', '?')} ({fs.get('device', '?')}); "
            f"python {info['python']}, torch {v['torch']}, safetensors {v['safetensors']}")


# --- statistics --------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def size_label(n: int) -> str:
    """``536870912`` → ``"0.5GiB"``, ``67108864`` → ``"64MiB"``."""
    if n >= GiB:
        return f"{n / GiB:g}GiB"
    return f"{n / MiB:g}MiB"


# --- memory ------------------------------------------------------------------------------


def fits_in_memory(need: int, *, margin: int = 2 * GiB) -> tuple[bool, int]:
    """Whether ``need`` more bytes fit in what the kernel calls available, with a margin."""
    avail = psutil.virtual_memory().available
    return need + margin <= avail, avail


# --- page cache --------------------------------------------------------------------------


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


def _mincore_bytes(path: Path) -> int:
    size = path.stat().st_size
    if size == 0:
        return 0
    page = mmap.PAGESIZE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
        pages = -(-size // page)
        vec = (ctypes.c_ubyte * pages)()
        view = np.frombuffer(mm, dtype=np.uint8)
        try:
            if _libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec):
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), str(path))
        finally:
            del view
        return sum(v & 1 for v in vec) * page


def cached_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache, as ``fincore`` (util-linux) reports them
    (mincore through ctypes where fincore is missing)."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES",
                              str(path)], check=True, capture_output=True, text=True).stdout
        return int(out.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return _mincore_bytes(path)


def cached_fraction(paths: Sequence[Path]) -> float:
    """The share of the files' bytes in the page cache (fincore counts whole pages, so
    each file is capped at its size)."""
    sizes = [p.stat().st_size for p in paths]
    total = sum(sizes)
    cached = sum(min(cached_bytes(p), size) for p, size in zip(paths, sizes, strict=True))
    return cached / total if total else 0.0


def proc_status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status``, e.g. ``VmLck`` (bytes mlocked)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def read_through(paths: Iterable[Path]) -> None:
    """Read every file once, so that its pages are in the page cache."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(16 * MiB):
                pass
