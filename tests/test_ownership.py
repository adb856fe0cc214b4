"""Leases belong to the process that took them (issue 13).

The daemon learns each caller's pid, uid and gid from the kernel (SO_PEERCRED on its
credential socket), not from the request. These tests run clients as other users (as
tests/test_access.py does), so they need root and skip otherwise; the daemon runs as
root, the clients as two members of the socket's group.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.daemon import DaemonProcess
from tests.test_access import (
    GROUP,
    MEMBER,
    _ensure_user,
    _python_for_others,
    need_other_users,
)
from weightd.testing import write_synthetic_model
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc

MiB = 1024 * 1024
OTHER_MEMBER = "weightd-test-member2"

#: A client run as another user: one JSON command a line on stdin, one answer a line.
WORKER = r"""
import json, os, site, sys
site.addsitedir(sys.argv[2])
import grpc
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc
channel = grpc.insecure_channel("unix://" + sys.argv[1])
try:
    from weightd_client.credentials import CredentialInterceptor
    channel = grpc.intercept_channel(channel, CredentialInterceptor(sys.argv[1]))
except ImportError:  # a daemon from before credentials
    pass
stub = pb_grpc.WeightdStub(channel)
me = pb.ClientInfo(pid=os.getpid(), name="worker of " + str(os.getuid()))
for line in sys.stdin:
    req = json.loads(line)
    try:
        if req["cmd"] == "acquire":
            got = stub.Acquire(pb.AcquireRequest(source=req["source"], client=me), timeout=60)
            out = {"lease_id": got.lease_id}
        elif req["cmd"] == "status":
            st = stub.Status(pb.StatusRequest(), timeout=10)
            out = {"leases": [{"lease_id": x.lease_id, "pid": x.pid, "name": x.client_name,
                               "model": x.model} for x in st.leases]}
        elif req["cmd"] == "release":
            stub.Release(pb.ReleaseRequest(lease_id=req["lease_id"]), timeout=10)
            out = {"ok": True}
        elif req["cmd"] == "verify":
            out = {"checked": stub.Verify(pb.VerifyRequest(), timeout=60).checked}
        elif req["cmd"] == "gc":
            r = stub.Gc(pb.GcRequest(max_bytes=0, dry_run=req["dry_run"]), timeout=60)
            out = {"models": list(r.models)}
        elif req["cmd"] == "evict":
            out = {"freed": stub.Evict(pb.EvictRequest(source=req["source"]),
                                       timeout=10).bytes_freed}
        else:
            out = {"error": "unknown command"}
    except grpc.RpcError as e:
        out = {"code": e.code().name, "details": e.details(),
               "class": dict(e.trailing_metadata() or ()).get("weightd-error")}
    print(json.dumps(out), flush=True)
"""


class Worker:
    def __init__(self, socket: Path, user: pwd.struct_passwd, gid: int) -> None:
        self.proc = subprocess.Popen(
            [_python_for_others(), "-c", WORKER, str(socket),
             sysconfig.get_paths()["purelib"]],
            user=user.pw_uid, group=user.pw_gid, extra_groups=[gid], cwd="/",
            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker died: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def members() -> dict[str, pwd.struct_passwd]:
    need_other_users()
    return {"a": _ensure_user(MEMBER, (GROUP,)), "b": _ensure_user(OTHER_MEMBER, (GROUP,))}


@pytest.fixture
def node(members: dict[str, pwd.struct_passwd]) -> Iterator[tuple[DaemonProcess, Path, int]]:
    top = Path(tempfile.mkdtemp(prefix="weightd-owner-", dir="/tmp"))
    try:
        os.chmod(top, 0o711)
        (top / "run").mkdir(mode=0o711)
        os.chmod(top / "run", 0o711)
        model = top / "model"
        write_synthetic_model(model, total_bytes=1 * MiB, tensors=2)
        for p in [model, *model.iterdir()]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        with pytest.MonkeyPatch.context() as mp:
            for key in list(os.environ):
                if key.startswith("WEIGHTD_"):
                    mp.delenv(key)
            d = DaemonProcess(top)
        gid = grp.getgrnam(GROUP).gr_gid
        for sock in d.socket.parent.iterdir():  # the gRPC socket and its credential socket
            os.chown(sock, -1, gid)
        try:
            yield d, model, gid
        finally:
            assert d.stop() == 0, d.log()
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    made: list[Worker] = []
    yield made
    for w in made:
        w.close()


def test_status_shows_every_holder_but_a_lease_id_only_to_its_owner(node, members, workers):
    d, model, gid = node
    a, b = Worker(d.socket, members["a"], gid), Worker(d.socket, members["b"], gid)
    workers += [a, b]
    lease = a.call("acquire", source=str(model))["lease_id"]
    assert lease
    seen_by_b = b.call("status")["leases"]
    assert [(x["pid"], x["name"]) for x in seen_by_b] == [
        (a.pid, f"worker of {members['a'].pw_uid}")]
    assert seen_by_b[0]["lease_id"] == ""  # not B's to know
    assert [x["lease_id"] for x in a.call("status")["leases"]] == [lease]


def test_a_lease_can_be_released_only_by_its_owner(node, members, workers):
    d, model, gid = node
    a = Worker(d.socket, members["a"], gid)
    a2 = Worker(d.socket, members["a"], gid)  # the same user, another process
    b = Worker(d.socket, members["b"], gid)
    workers += [a, a2, b]
    lease = a.call("acquire", source=str(model))["lease_id"]
    for other in (b, a2):
        out = other.call("release", lease_id=lease)
        assert out.get("code") == "PERMISSION_DENIED", out
        assert out["class"] == "NotPermitted"
        out = other.call("evict", source=str(model))
        assert out.get("code") == "FAILED_PRECONDITION", out  # still leased: not evicted
    assert [x.pid for x in d.status().leases] == [a.pid]
    assert a.call("release", lease_id=lease) == {"ok": True}
    # the daemon's own user (here root) may end any lease, as an operator
    again = a.call("acquire", source=str(model))["lease_id"]
    d.release(again)
    assert list(d.status().leases) == []


def test_calls_without_credentials_can_neither_lease_nor_release(node, members, workers):
    d, model, gid = node
    a = Worker(d.socket, members["a"], gid)
    workers.append(a)
    lease = a.call("acquire", source=str(model))["lease_id"]
    with grpc.insecure_channel(f"unix://{d.socket}") as ch:  # no handshake, no token
        raw = pb_grpc.WeightdStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            raw.Acquire(pb.AcquireRequest(source=str(model),
                                          client=pb.ClientInfo(pid=os.getpid())), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            raw.Release(pb.ReleaseRequest(lease_id=lease), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()
        assert [x.lease_id for x in raw.Status(pb.StatusRequest(), timeout=10).leases] == [""]
    assert [x.pid for x in d.status().leases] == [a.pid]


def test_verify_and_gc_through_the_daemon_are_for_operators(node, members, workers):
    d, model, gid = node
    a = Worker(d.socket, members["a"], gid)
    workers.append(a)
    a.call("acquire", source=str(model))
    for cmd, args in (("verify", {}), ("gc", {"dry_run": False})):
        out = a.call(cmd, **args)
        assert out.get("code") == "PERMISSION_DENIED" and out["class"] == "NotPermitted", out
    assert a.call("gc", dry_run=True) == {"models": []}  # a plan is anyone's to see
    # the daemon's own user (root here) may
    assert d.stub().Verify(pb.VerifyRequest(), timeout=60).checked > 0


HIDDEN_DAEMON = r"""
import site, sys
site.addsitedir(sys.argv[1])
from weightd.cli import main
sys.exit(main(["serve"]))
"""


def test_a_proc_that_hides_the_callers_process_does_not_end_its_lease(tmp_path, members):
    # The daemon runs as a member in a mount namespace whose /proc has hidepid=1: it
    # cannot read /proc/<pid>/stat of other users' processes (EPERM). The test process
    # (root) holds a lease; it must not be reaped as if the process had gone.
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    user = members["a"]
    top = Path(tempfile.mkdtemp(prefix="weightd-hidepid-", dir="/tmp"))
    try:
        for sub in ("", "run", "cache"):
            (top / sub).mkdir(exist_ok=True)
            os.chown(top / sub, user.pw_uid, user.pw_gid)
        os.chmod(top, 0o755)
        model = top / "model"
        write_synthetic_model(model, total_bytes=1 * MiB, tensors=2)
        for p in [model, *model.iterdir()]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        cmd = (f"mount -t proc -o hidepid=1 proc /proc && exec setpriv --reuid {user.pw_uid} "
               f"--regid {user.pw_gid} --clear-groups {_python_for_others()} -c "
               f"'{HIDDEN_DAEMON}' {sysconfig.get_paths()['purelib']}")
        d = DaemonProcess(top, launcher=("unshare", "--mount", "--propagation", "private",
                                         "sh", "-c", cmd))
        try:
            got = d.acquire(model)
            time.sleep(2.0)  # four reaper rounds
            assert [x.pid for x in d.status().leases] == [os.getpid()], d.log()
            d.release(got.lease_id)
        finally:
            assert d.stop() == 0, d.log()
    finally:
        shutil.rmtree(top, ignore_errors=True)
