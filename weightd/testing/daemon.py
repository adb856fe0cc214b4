"""Waiting for a ``weightd serve`` process to answer on its socket."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def wait_for_daemon(socket: str | Path, proc: subprocess.Popen[bytes] | None = None, *,
                    timeout: float = 60.0) -> None:
    """Return once the daemon on ``socket`` answers its gRPC health check with SERVING.

    Raises:
        RuntimeError: ``proc`` exited first, or ``timeout`` seconds passed.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    path = Path(socket)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode} before it answered "
                               f"on {path}")
        if path.exists():
            try:
                with grpc.insecure_channel(f"unix://{path}") as ch:
                    resp = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"the daemon did not answer on {path} within {timeout:.0f}s")
