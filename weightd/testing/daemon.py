"""A ``weightd serve`` process for tests and benchmarks, and waiting for one to answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


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


class DaemonProcess:
    """``weightd serve`` in a subprocess on its own socket and cache under ``home``, its
    output in a log file there; the constructor returns once it answers.

    Used by the tests and the benchmarks (a real process on a real unix socket).
    """

    def __init__(self, home: str | Path, *, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = (), timeout: float = 60.0,
                 socket: str | Path | None = None) -> None:
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        self.socket = Path(socket) if socket is not None else home / "run" / "weightd.sock"
        self.cache_dir = home / "cache"
        self.log_path = home / f"daemon-{time.monotonic_ns()}.log"
        self.env = {**os.environ, "WEIGHTD_SOCKET": str(self.socket),
                    "WEIGHTD_CACHE_DIR": str(self.cache_dir), **(env or {})}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (open while the process runs)
        self.proc = subprocess.Popen([sys.executable, "-m", "weightd.cli", "serve", *args],
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_ready(timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        try:
            wait_for_daemon(self.socket, self.proc, timeout=timeout)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; its log, {self.log_path}:\n{self.log()}") from e

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def client(self) -> Any:
        """A ``weightd_client.Client`` on this daemon's socket (close it, or use ``with``)."""
        import weightd_client

        return weightd_client.Client(self.socket)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the daemon (SIGTERM: a clean stop), wait, kill it if it hangs; return
        its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
