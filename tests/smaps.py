"""Read /proc/<pid>/smaps: how much of a file a process maps, shares and locks."""

from __future__ import annotations


def smaps_for(pid: int, path: str) -> dict[str, int]:
    """Sum the smaps fields (kB) over every mapping of ``path`` in process ``pid``."""
    totals: dict[str, int] = {}
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                inside = len(parts) >= 6 and parts[5] == path
                continue
            if inside and len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                totals[parts[0][:-1]] = totals.get(parts[0][:-1], 0) + int(parts[1])
    return totals

