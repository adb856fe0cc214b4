"""What ``/proc`` says of a process's memory, for the tests and the benchmarks."""

from __future__ import annotations


def smaps_rollup(pid: int) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` as ``{field: kB}`` (Rss, Pss, Pss_Anon, Pss_File...)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                out[parts[0][:-1]] = int(parts[1])
    return out
