"""Callers, their credentials and their leases (weightd.leases), on their own: one caller
per live process, liveness from a pidfd (or /proc, or kill), the ownership rule."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest

import weightd.leases as leases_mod
from weightd.errors import LeaseNotFound, NotPermitted
from weightd.leases import Caller, Credentials, LeaseTable, process_start_time


def child() -> subprocess.Popen[bytes]:
    """A process that lives until its stdin closes."""
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)


def end(p: subprocess.Popen[bytes]) -> None:
    p.communicate(b"", timeout=10)


def test_one_caller_per_live_process():
    creds = Credentials()
    me = creds.local()
    assert creds.local() is me and creds.get(me.token) is me
    assert (me.pid, me.uid) == (os.getpid(), os.geteuid())
    p = child()
    try:
        other = creds.register(p.pid, os.getuid(), os.getgid())
        assert other is not me and other.token != me.token and other.alive()
        assert creds.register(p.pid, os.getuid(), os.getgid()) is other
    finally:
        end(p)
    assert not other.alive()
    assert creds.reap() == [other]
    assert creds.get(other.token) is None and creds.get(me.token) is me
    with pytest.raises(NotPermitted, match="gone"):
        creds.register(p.pid, os.getuid(), os.getgid())  # no such process now


def test_a_pid_the_daemon_cannot_see_is_refused():
    with pytest.raises(NotPermitted, match="PID namespace"):
        Credentials().register(0, 1000, 1000)


def test_too_many_callers_are_refused_until_some_exit():
    creds = Credentials(limit=1)
    me = creds.local()
    p = child()
    try:
        with pytest.raises(NotPermitted, match="1 client processes"):
            creds.register(p.pid, os.getuid(), os.getgid())
    finally:
        end(p)
    assert creds.local() is me


def test_a_hidden_proc_is_not_a_dead_process(monkeypatch):
    # hidepid=1: /proc/<pid>/stat of another user's process answers EPERM
    def hidden(pid: int) -> int | None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(leases_mod, "process_start_time", hidden)
    p = child()
    try:
        with_pidfd = Credentials().register(p.pid, os.getuid(), os.getgid())
        assert with_pidfd.start_time is None and with_pidfd.pidfd is not None
        assert with_pidfd.alive()
        # a kernel without pidfds: kill(pid, 0) says whether it exists
        monkeypatch.setattr(os, "pidfd_open", lambda pid: (_ for _ in ()).throw(
            OSError(errno.ENOSYS, "no pidfd_open")))
        table = LeaseTable(Credentials())
        without = table.credentials.register(p.pid, os.getuid(), os.getgid())
        assert without.pidfd is None and without.alive()
        lease = table.add("m", "host", "cpu", without)
        assert table.reap() == []  # alive: not reaped
    finally:
        end(p)
    assert not with_pidfd.alive() and not without.alive()
    assert table.reap() == [lease]


def test_process_start_time_says_gone_or_raises_when_hidden(monkeypatch):
    me = os.getpid()
    assert process_start_time(me) == process_start_time(me) and process_start_time(me)
    p = child()
    end(p)
    assert process_start_time(p.pid) is None

    def eperm(*a: object, **k: object) -> object:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr("builtins.open", eperm)
    with pytest.raises(PermissionError):
        process_start_time(me)


def test_a_lease_is_released_by_its_owner_or_an_operator():
    creds = Credentials()
    table = LeaseTable(creds)
    owner = creds.local()
    stranger = Caller(owner.pid + 1, uid=os.geteuid() + 4242, gid=0, start_time=None,
                      token="t")
    lease = table.add("m", "host", "cpu", owner, "replica")
    with pytest.raises(NotPermitted, match=f"belongs to pid {owner.pid}"):
        table.release(lease.lease_id, stranger)
    assert table.count("m") == 1
    root = Caller(1, uid=0, gid=0, start_time=None, token="r")
    assert root.privileged() and not stranger.privileged()
    assert table.release(lease.lease_id, root) is lease
    with pytest.raises(LeaseNotFound):
        table.release(lease.lease_id, owner)
    again = table.add("m", "host", "cpu", owner)
    assert table.release(again.lease_id, owner) is again


def test_the_reaper_ends_the_leases_of_a_process_soon_after_it_exits():
    ended: list[str] = []
    creds = Credentials()
    table = LeaseTable(creds, on_end=lambda lease, why: ended.append(why), reap_interval=0.05)
    table.start()
    try:
        p = child()
        caller = creds.register(p.pid, os.getuid(), os.getgid())
        table.add("m", "host", "cpu", caller)
        table.add("n", "host", "cpu", caller)
        end(p)
        deadline = time.monotonic() + 5
        while len(ended) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        table.stop()
    assert ended == ["reaped: its process is gone"] * 2
    assert table.all() == []


def test_a_proposed_lease_released_before_its_grant_is_never_granted():
    # A client whose Acquire failed on its side releases the id it proposed; when that
    # release reaches the daemon before the grant, the grant is refused (no lease left).
    from weightd.errors import FormatError

    table = LeaseTable(Credentials())
    me = table.credentials.local()
    with pytest.raises(LeaseNotFound):
        table.release("ab" * 12, me)
    with pytest.raises(LeaseNotFound, match="released before it was granted"):
        table.add("m", "host", "cpu", me, lease_id="ab" * 12)
    assert table.all() == []
    lease = table.add("m", "host", "cpu", me, lease_id="cd" * 12)
    assert lease.lease_id == "cd" * 12
    with pytest.raises(FormatError, match="in use"):
        table.add("m", "host", "cpu", me, lease_id="cd" * 12)
    table.release(lease.lease_id, me)
    assert table.all() == []
