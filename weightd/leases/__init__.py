"""Leases: which process holds which model on which device, and reaping the dead ones.

A lease belongs to a :class:`Caller`: a process that the kernel named, not one that a
request claims. The daemon learns each caller's pid, uid and gid from its credential
socket (``SO_PEERCRED``, weightd/service/handshake.py) and hands it a token
(:class:`Credentials`); every call carries the token. A caller's liveness comes from a
pidfd (``SO_PEERPIDFD``, or ``pidfd_open`` where the kernel has no such option): it
cannot be fooled by a reused pid, and it works where ``/proc`` hides other users'
processes (``hidepid``), where ``/proc/<pid>/stat`` answers EPERM (or ENOENT) although
the process lives. Without pidfds (kernels before 5.3) the start time in
``/proc/<pid>/stat`` stands in, and a process that ``/proc`` hides is taken as alive
while ``kill(pid, 0)`` says it exists.

The lease ownership rule: a lease is released by its owner; the daemon's own user and
root may release any lease (an operator's tools); any other caller gets
:class:`~weightd.errors.NotPermitted`.

A client may name the lease it asks for (a random id of its own): when its Acquire fails
on its side (its deadline passed while the answer was on its way), it releases that id,
and a release that comes before the grant wins: the id is never granted to it after.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import select
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from weightd.errors import FormatError, LeaseNotFound, NotPermitted

log = logging.getLogger(__name__)

__all__ = ["Caller", "Credentials", "Lease", "LeaseTable", "new_lease_id", "process_start_time"]

#: How many client processes may hold a token at once; a handshake beyond it is refused
#: (each one costs a pidfd and a check every reap round).
MAX_CALLERS = 4096

#: Releases of lease ids not (yet) granted that are remembered, and for how long: an
#: Acquire that would grant one of them refuses instead (its caller gave up on it).
MAX_WITHDRAWN = 4096
WITHDRAWN_SECONDS = 120.0


def process_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks), or None if gone.

    Raises:
        PermissionError: ``/proc`` hides the process from this user (``hidepid=1``):
            it exists, its start time is unknown.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _exists(pid: int) -> bool:
    """Whether a process with this pid exists (``kill(pid, 0)``; EPERM: it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(eq=False)
class Caller:
    """A client process as the kernel named it, with the token the daemon gave it.

    Compared by identity: the credential registry keeps one per live process.
    """

    pid: int
    uid: int
    gid: int
    start_time: int | None  # None: /proc hides it (the pidfd says whether it lives)
    token: str
    since: float = field(default_factory=time.time)
    pidfd: int | None = field(default=None, repr=False)

    def alive(self) -> bool:
        """Whether the process still runs (its pid may since name another process)."""
        if self.pidfd is not None:
            poller = select.poll()
            poller.register(self.pidfd, select.POLLIN)
            return not poller.poll(0)  # a pidfd turns readable when its process exits
        if self.start_time is not None:
            try:
                return process_start_time(self.pid) == self.start_time
            except PermissionError:
                return _exists(self.pid)
        return _exists(self.pid)

    def privileged(self) -> bool:
        """Root, or the daemon's own user: an operator, who may end any lease."""
        return self.uid in (0, os.geteuid())


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError) as e:
        if isinstance(e, OSError) and e.errno == errno.ESRCH:
            raise NotPermitted(f"process {pid} is gone") from e
        return None


class Credentials:
    """Tokens of the client processes the daemon has met, one per live process.

    Args:
        limit: how many processes may hold a token at once.
    """

    def __init__(self, *, limit: int = MAX_CALLERS) -> None:
        self._lock = threading.Lock()
        self._by_token: dict[str, Caller] = {}
        self._by_pid: dict[int, Caller] = {}
        self.limit = limit

    def register(self, pid: int, uid: int, gid: int, pidfd: int | None = None) -> Caller:
        """The caller for a process the kernel named (its peer credentials), with its
        token; the same process asking again gets the same caller.

        Args:
            pid, uid, gid: from ``SO_PEERCRED``.
            pidfd: from ``SO_PEERPIDFD`` when the kernel gives one (taken over: closed
                here when not kept); else one is opened here.

        Raises:
            NotPermitted: no pid (a peer in a PID namespace the daemon cannot see), the
                process is gone, or too many processes hold a token.
        """
        if pid <= 0:
            if pidfd is not None:
                os.close(pidfd)
            raise NotPermitted("the daemon cannot see the calling process (it runs in "
                               "another PID namespace): share the daemon's PID namespace")
        if pidfd is None:
            pidfd = _pidfd(pid)
        try:
            start: int | None = process_start_time(pid)
        except PermissionError:
            start = None  # /proc hides it; the pidfd (or kill) says it lives
        fresh = Caller(pid, uid, gid, start, secrets.token_urlsafe(24), pidfd=pidfd)
        with self._lock:
            known = self._by_pid.get(pid)
        same = known is not None and known.uid == uid and known.alive() and (
            known.start_time is None or start is None or known.start_time == start)
        chosen: Caller | None = None
        with self._lock:
            if same and self._by_pid.get(pid) is known:
                chosen = known
            else:
                if known is not None:  # that pid names another process now
                    self._forget(known)
                if len(self._by_token) < self.limit:
                    chosen = fresh
                    self._by_token[fresh.token] = fresh
                    self._by_pid[pid] = fresh
        if chosen is not fresh:
            _close(fresh.pidfd)
        if chosen is None:
            raise NotPermitted(f"{self.limit} client processes hold credentials already; "
                               "try again when some have exited")
        return chosen

    def local(self) -> Caller:
        """The daemon's own process as a caller (pins warming, in-process callers)."""
        return self.register(os.getpid(), os.geteuid(), os.getegid())

    def get(self, token: str) -> Caller | None:
        with self._lock:
            return self._by_token.get(token)

    def callers(self) -> list[Caller]:
        with self._lock:
            return list(self._by_token.values())

    def tokens(self) -> set[str]:
        with self._lock:
            return set(self._by_token)

    def reap(self) -> list[Caller]:
        """Forget the callers whose process has exited; return them."""
        with self._lock:
            known = list(self._by_token.values())
        dead = [c for c in known if not c.alive()]  # syscalls: outside the lock
        with self._lock:
            for c in dead:
                self._forget(c)
        return dead

    def _forget(self, caller: Caller) -> None:
        if self._by_token.pop(caller.token, None) is None:
            return
        if self._by_pid.get(caller.pid) is caller:
            del self._by_pid[caller.pid]
        _close(caller.pidfd)
        caller.pidfd = None

    def close(self) -> None:
        with self._lock:
            for c in list(self._by_token.values()):
                self._forget(c)


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass(frozen=True)
class Lease:
    lease_id: str
    model: str
    tier: str          # "host" or "cuda"
    device: str        # "cpu" or "cuda:<uuid>"
    owner: Caller
    client_name: str
    revision: str = ""
    since: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.owner.pid

    @property
    def uid(self) -> int:
        return self.owner.uid


def new_lease_id() -> str:
    """A lease id: 96 random bits, hex."""
    return secrets.token_hex(12)


class LeaseTable:
    """Thread-safe table of live leases, with a reaper thread for dead holders.

    Args:
        credentials: the callers the leases belong to; the reaper forgets dead ones.
        on_end: called (outside the table's lock) with each lease that ends, by release
            or by reaping.
        reap_interval: seconds between checks of the holders' processes.
    """

    def __init__(self, credentials: Credentials | None = None,
                 on_end: Callable[[Lease, str], None] | None = None,
                 reap_interval: float = 0.5) -> None:
        self.credentials = credentials or Credentials()
        self._leases: dict[str, Lease] = {}
        self._by_tier: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._on_end = on_end
        self._interval = reap_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # (owner's token, lease id) -> when: released before they were granted
        self._withdrawn: OrderedDict[tuple[str, str], float] = OrderedDict()

    def add(self, model: str, tier: str, device: str, owner: Caller, client_name: str = "",
            revision: str = "", *, lease_id: str | None = None) -> Lease:
        """Grant a lease to ``owner``; ``lease_id`` is the id its caller proposed, or one
        :func:`new_lease_id` gave (an AcquireStream names its lease before it is granted),
        else a new one.

        Raises:
            FormatError: the proposed id is in use.
            LeaseNotFound: the caller released the proposed id already (it gave up).
        """
        lease = Lease(lease_id or new_lease_id(), model, tier, device, owner, client_name,
                      revision)
        with self._lock:
            if lease.lease_id in self._leases:
                raise FormatError("request", f"lease id {lease.lease_id} is in use")
            if self._withdrawn.pop((owner.token, lease.lease_id), None) is not None:
                raise LeaseNotFound(f"lease {lease.lease_id} was released before it was "
                                    "granted: its caller gave up on it")
            self._leases[lease.lease_id] = lease
            self._by_tier[tier] += 1
        return lease

    def release(self, lease_id: str, caller: Caller) -> Lease:
        """End a lease on behalf of ``caller``.

        Raises:
            LeaseNotFound: no such lease.
            NotPermitted: the lease belongs to another process, and ``caller`` is
                neither root nor the daemon's user.
        """
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                self._withdraw(caller, lease_id)
                raise LeaseNotFound(f"no lease {lease_id!r} (released already, or never granted)")
            if lease.owner is not caller and not caller.privileged():
                raise NotPermitted(f"lease {lease_id} belongs to pid {lease.pid}, not to the "
                                   f"caller (pid {caller.pid}, uid {caller.uid})")
            self._pop(lease)
        self._ended(lease, "released" if lease.owner is caller
                    else f"released by pid {caller.pid} (uid {caller.uid})")
        return lease

    def _withdraw(self, caller: Caller, lease_id: str) -> None:
        """Remember that ``caller`` released an id it does not hold (yet): it is not
        granted to it after (bounded in number and time). Caller holds the lock."""
        now = time.monotonic()
        self._withdrawn[(caller.token, lease_id)] = now
        while self._withdrawn and (len(self._withdrawn) > MAX_WITHDRAWN or next(
                iter(self._withdrawn.values())) < now - WITHDRAWN_SECONDS):
            self._withdrawn.popitem(last=False)

    def _pop(self, lease: Lease) -> None:
        del self._leases[lease.lease_id]
        self._by_tier[lease.tier] -= 1

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
        """End the leases of the callers whose process is gone."""
        self.credentials.reap()
        known = self.credentials.tokens()
        with self._lock:
            gone = [lease for lease in self._leases.values() if lease.owner.token not in known]
            for lease in gone:
                self._pop(lease)
        for lease in gone:
            self._ended(lease, "reaped: its process is gone")
        return gone

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
