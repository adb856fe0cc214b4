"""Run the daemon as a real process on a temporary unix socket, and client processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from weightd.testing.daemon import DaemonProcess as BaseDaemonProcess
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent


def raw_stub(socket: str | Path) -> pb_grpc.WeightdStub:
    """A raw stub on the daemon's socket, for tests that speak the wire protocol; its
    calls carry this process's credentials (weightd_client.credentials)."""
    from weightd_client.credentials import CredentialInterceptor

    channel = grpc.intercept_channel(grpc.insecure_channel(f"unix://{socket}"),
                                     CredentialInterceptor(socket))
    return pb_grpc.WeightdStub(channel)


class DaemonProcess(BaseDaemonProcess):
    """``weightd serve`` in a subprocess (weightd.testing), with raw stubs for the tests."""

    def stub(self) -> pb_grpc.WeightdStub:
        return raw_stub(self.socket)

    def status(self) -> pb.StatusResponse:
        with grpc.insecure_channel(f"unix://{self.socket}") as ch:
            return pb_grpc.WeightdStub(ch).Status(pb.StatusRequest(), timeout=10)

    def acquire(self, source: str | Path, *, timeout: float = 60,
                **kw: Any) -> pb.AcquireResponse:
        """One raw Acquire, in the name of this (the test's) process."""
        return self.stub().Acquire(pb.AcquireRequest(
            source=str(source), client=pb.ClientInfo(name="test"), **kw), timeout=timeout)

    def release(self, lease_id: str, *, timeout: float = 10) -> None:
        self.stub().Release(pb.ReleaseRequest(lease_id=lease_id), timeout=timeout)


def client_info(name: str = "tests") -> pb.ClientInfo:
    """This test process as the client of a raw Acquire."""
    from weightd.leases import process_start_time

    me = os.getpid()
    return pb.ClientInfo(pid=me, start_time=process_start_time(me) or 0, name=name)


class ClientProcess:
    """A model-server-like process (tests/client_worker.py) driven over stdin/stdout."""

    def __init__(self, socket: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "client_worker.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "WEIGHTD_SOCKET": str(socket), **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, cmd: str, timeout: float = 120, **args: Any) -> dict[str, Any]:
        self.send(cmd, **args)
        return self.receive(timeout)

    def send(self, cmd: str, **args: Any) -> None:
        """Send a command without waiting for its answer (see :meth:`receive`)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = 120) -> dict[str, Any]:
        """The answer to the command sent last."""
        line = _readline(self.proc, timeout)
        out = json.loads(line)
        if "error" in out:
            raise ClientError(out["error"], out.get("type", ""))
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def wait_for(cond: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something true (returned), at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class ClientError(Exception):
    def __init__(self, message: str, kind: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"client {proc.pid} did not answer in {timeout}s")
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"client {proc.pid} died:\n{err}")
    return line
