"""Leases: who holds which model on which tier, and reaping the leases of dead processes.

A lease is tied to a process by its pid *and* its start time (``/proc/<pid>/stat`` field
22), so a pid reused by a new process is not mistaken for the old holder.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from weightd.errors import LeaseNotFound

log = logging.getLogger(__name__)


def process_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Lease:
    lease_id: str
    model: str
    tier: str          # "host" or "cuda"
    device: str        # "cpu" or "cuda:<uuid>"
    pid: int
    start_time: int
    client_name: str
    since: float = field(default_factory=time.time)


class LeaseTable:
    """Thread-safe table of live leases, with a reaper thread for dead holders.

    Args:
        on_end: called (outside the table's lock) with each lease that ends, by release
            or by reaping.
        reap_interval: seconds between checks of the holders' processes.
    """

    def __init__(self, on_end: Callable[[Lease, str], None] | None = None,
                 reap_interval: float = 0.5) -> None:
        self._leases: dict[str, Lease] = {}
        self._by_tier: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._on_end = on_end
        self._interval = reap_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, model: str, tier: str, device: str, pid: int, start_time: int,
            client_name: str = "") -> Lease:
        lease = Lease(secrets.token_hex(12), model, tier, device, pid, start_time, client_name)
        with self._lock:
            self._leases[lease.lease_id] = lease
            self._by_tier[tier] += 1
        return lease

    def release(self, lease_id: str) -> Lease:
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is not None:
                self._by_tier[lease.tier] -= 1
        if lease is None:
            raise LeaseNotFound(f"no lease {lease_id!r} (released already, or never granted)")
        self._ended(lease, "released")
        return lease

    def _ended(self, lease: Lease, why: str) -> None:
        log.info("lease %s on %s (%s) of pid %d %s", lease.lease_id, lease.model, lease.device,
                 lease.pid, why)
        if self._on_end is not None:
            self._on_end(lease, why)

    def all(self) -> list[Lease]:
        with self._lock:
            return sorted(self._leases.values(), key=lambda lease: lease.since)

    def on_tier(self, tier: str) -> int:
        """How many leases are held on ``tier`` ("host" or "cuda"), without a scan."""
        with self._lock:
            return self._by_tier[tier]

    def count(self, model: str, device: str | None = None) -> int:
        with self._lock:
            return sum(1 for lease in self._leases.values()
                       if lease.model == model and (device is None or lease.device == device))

    def held(self, model: str, device: str | None = None) -> bool:
        return self.count(model, device) > 0

    def reap(self) -> list[Lease]:
        """End the leases whose process is gone (or whose pid now names another process)."""
        with self._lock:
            dead = [lease for lease in self._leases.values()
                    if process_start_time(lease.pid) != lease.start_time]
            for lease in dead:
                del self._leases[lease.lease_id]
                self._by_tier[lease.tier] -= 1
        for lease in dead:
            self._ended(lease, "reaped: its process is gone")
        return dead

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="weightd-reaper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.reap()
            except Exception:  # the reaper must survive anything a callback does
                log.exception("lease reaper failed; trying again")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
