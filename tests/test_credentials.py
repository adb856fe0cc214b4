"""The credential handshake with a real daemon: one token per process, a new one after a
fork and after a daemon restart, and what a call without a valid token gets."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.daemon import DaemonProcess, raw_stub
from weightd.testing import write_synthetic_model
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc
from weightd_client.credentials import Credential, credential_socket, handshake

MiB = 1024 * 1024


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path / "d")
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    write_synthetic_model(tmp_path / "m", total_bytes=1 * MiB, tensors=2)
    return tmp_path / "m"


def test_the_credential_socket_is_beside_the_grpc_socket_and_as_closed(daemon):
    cred = Path(credential_socket(daemon.socket))
    st, main = cred.stat(), daemon.socket.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (main.st_uid, main.st_gid)
    assert handshake(daemon.socket) == handshake(daemon.socket)  # one token a process


def test_a_socket_reached_through_links_serves_acquires_too(daemon, model, tmp_path):
    # WEIGHTD_SOCKET through a linked directory, or a link to the socket itself: the
    # credential socket is beside the real socket, not beside the link
    import weightd_client

    (tmp_path / "lnk").symlink_to(daemon.socket.parent)
    (tmp_path / "alias.sock").symlink_to(daemon.socket)
    for path in (tmp_path / "lnk" / daemon.socket.name, tmp_path / "alias.sock"):
        with weightd_client.Client(path) as client:
            assert client.status().pid == daemon.pid
            with client.load(model, fallback=False) as weights:
                assert len(weights) == 2 and weights.lease_id


def test_a_forked_child_gets_its_own_token_and_its_own_leases(daemon, model):
    cred = Credential(daemon.socket)
    mine = cred.token()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the same Credential object, another process
        try:
            os.close(read)
            os.write(write, cred.token().encode())
        finally:
            os._exit(0)
    os.close(write)
    theirs = os.read(read, 200).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert theirs and theirs != mine
    assert cred.token() == mine


def test_a_client_keeps_working_across_a_daemon_restart(tmp_path, model):
    import weightd_client

    home = tmp_path / "d"
    d = DaemonProcess(home)
    with weightd_client.Client(d.socket, timeout=30) as client:
        first = client.load(str(model), fallback=False)
        first.release()
        assert d.stop() == 0, d.log()
        d = DaemonProcess(home)  # the same socket, the same cache: tokens are new
        try:
            again = client.load(str(model), fallback=False)
            assert [x.pid for x in d.status().leases] == [os.getpid()]
            assert again.lease_id
            again.release()
        finally:
            assert d.stop() == 0, d.log()


def test_a_call_without_a_valid_token_is_unauthenticated_and_says_why(daemon, model):
    with grpc.insecure_channel(f"unix://{daemon.socket}") as ch:
        stub = pb_grpc.WeightdStub(ch)
        for metadata in ((), (("weightd-token", "made-up"),)):
            with pytest.raises(grpc.RpcError) as e:
                stub.Acquire(pb.AcquireRequest(source=str(model)), timeout=30,
                             metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert dict(e.value.trailing_metadata())["weightd-error"] == "Unauthenticated"
            assert "credential" in e.value.details()
        # pins and evictions change the node for everyone: the caller must be known (and
        # is logged), though any member may (review 1, nit)
        for call in (lambda: stub.Pin(pb.PinRequest(source=str(model)), timeout=30),
                     lambda: stub.Unpin(pb.UnpinRequest(source=str(model)), timeout=30),
                     lambda: stub.Evict(pb.EvictRequest(source=str(model)), timeout=30)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()
        assert not daemon.status().pins
        # what needs no credentials still answers
        assert stub.Status(pb.StatusRequest(), timeout=10).pid == daemon.pid


OTHER = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from tests.daemon import raw_stub
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
st = raw_stub(sys.argv[1]).Status(pb.StatusRequest(), timeout=10)
print(json.dumps([[x.lease_id, x.pid, x.client_name, x.age_seconds] for x in st.leases]))
"""


def test_status_names_each_holder_and_gives_the_lease_id_to_its_owner_and_operators(
        daemon, model):
    # another process of root is an operator: it sees the id (to `weightd release` it);
    # a plain group member does not (tests/test_ownership.py, tests/test_access.py)
    got = raw_stub(daemon.socket).Acquire(pb.AcquireRequest(
        source=str(model), client=pb.ClientInfo(name="replica 7")), timeout=30)
    mine = raw_stub(daemon.socket).Status(pb.StatusRequest(), timeout=10).leases
    assert [(x.lease_id, x.pid, x.client_name, x.uid) for x in mine] == [
        (got.lease_id, os.getpid(), "replica 7", os.geteuid())]
    assert mine[0].age_seconds >= 0
    out = subprocess.run([sys.executable, "-c", OTHER, str(daemon.socket),
                          str(Path(__file__).resolve().parent.parent)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (lease,) = json.loads(out.stdout)
    assert lease[:3] == [got.lease_id, os.getpid(), "replica 7"]  # root: an operator
    daemon.release(got.lease_id)
