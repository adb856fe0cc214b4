"""What ``/proc`` says of a process's memory, for the tests and the benchmarks."""

from __future__ import annotations

import os
from collections.abc import Iterable


def smaps_rollup(pid: int) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` as ``{field: kB}`` (Rss, Pss, Pss_Anon, Pss_File...)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                out[parts[0][:-1]] = int(parts[1])
    return out


def drop_page_cache(paths: Iterable[str | os.PathLike[str]]) -> None:
    """``posix_fadvise(DONTNEED)`` each file: the kernel drops its clean, unmapped,
    unlocked pages, so that the next read comes from the disk (the "cold" half of a
    benchmark or a test). Mapped or mlocked pages stay."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
