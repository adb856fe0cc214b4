"""The daemon's process life: the unix socket, signals, readiness, draining.

``weightd serve`` builds a :class:`~weightd.node.Node` over an exclusively locked cache,
serves ``weightd.v1.Weightd`` plus the standard health and reflection services with
grpc.aio on a unix socket (mode 0660), and the credential socket beside it
(weightd/service/handshake.py), tells systemd when it is ready (``NOTIFY_SOCKET``), and
on SIGTERM stops taking calls, lets the running ones finish, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import logging
import os
import signal
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from weightd import testhooks
from weightd.config import Config, ConfigError
from weightd.metrics import Metrics, MetricsServer, start_http
from weightd.node import Node
from weightd.rundir import UnsafeRuntimeDir, prepare_runtime_dir
from weightd.service import WeightdServicer
from weightd.service.handshake import CredentialServer
from weightd.service.servicer import MAX_MESSAGE
from weightd.store import Store
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc
from weightd_client.credentials import SUFFIX, credential_socket

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Weightd"].full_name

#: Allocations from this size up get their own mapping, returned to the system on free.
MMAP_THRESHOLD = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def return_freed_buffers() -> bool:
    """Make glibc give a fetch's chunk buffers back to the system once they are freed.

    glibc serves an allocation of several MiB from ``mmap`` only until the first such
    block is freed; then it raises its threshold and later buffers come from the
    per-thread heaps, which keep their freed memory. A daemon that fetched a model would
    then hold ~100 MiB of dead buffers for good (its PSS is counted against every
    replica). A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``, which also switches
    off the adjustment) keeps every buffer of 1 MiB or more in its own mapping. Returns
    False where the C library is not glibc (nothing to do, or nothing known to work).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def sd_notify(message: str) -> bool:
    """Send a datagram to systemd's ``NOTIFY_SOCKET`` (no-op when it is not set)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(addr)
            s.sendall(message.encode())
        except OSError as e:
            log.warning("could not notify systemd at %s: %s", addr, e)
            return False
    return True


def cuda_requested(config: Config, node: Node) -> bool:
    """Whether this daemon was asked to serve GPUs: a ``gpu_budget`` is set,
    ``CUDA_VISIBLE_DEVICES`` names devices, the ``cuda`` extra (cupy) is installed, or a
    recorded pin is on the cuda tier. Only then is an unavailable CUDA tier a warning."""
    return bool(config.gpu_budget or os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
                or importlib.util.find_spec("cupy") is not None
                or any(p.tier == "cuda" for p in node.pins()))


#: The longest path a unix socket may have (``sun_path`` is 108 bytes with its NUL; gRPC
#: counts the NUL too).
MAX_SOCKET_PATH = 107


def check_socket_path(path: Path) -> None:
    """Refuse a socket path too long for a unix socket: the gRPC socket's or its
    credential socket's beside it (5 bytes longer), before anything is done.

    Raises:
        ConfigError: naming the path, its length and the limit.
    """
    longest = len(os.fsencode(credential_socket(path)))
    if longest > MAX_SOCKET_PATH:
        raise ConfigError(
            f"socket {path} is {len(os.fsencode(str(path)))} bytes long: a unix socket's path "
            f"may have {MAX_SOCKET_PATH} bytes at most, and the daemon's credential socket "
            f"beside it ({SUFFIX}) {len(SUFFIX)} more, so at most "
            f"{MAX_SOCKET_PATH - len(SUFFIX)} here; choose a shorter socket path")


def _prepare_socket(path: Path) -> None:
    """Create or check the socket's directory (weightd/rundir.py: only the daemon's user
    may change it); refuse a live socket, remove a stale one."""
    try:
        prepare_runtime_dir(path.parent)
    except UnsafeRuntimeDir as e:  # the socket setting's problem: exit 2, as config is
        raise ConfigError(str(e)) from e
    if not os.path.lexists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            return
    raise SystemExit(f"weightd: another daemon is listening on {path}")


class Daemon:
    """One running daemon: build it with a config, ``await`` :meth:`start`, then
    :meth:`stop` (all on one asyncio event loop: grpc.aio's)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.socket = Path(config.socket).absolute()
        self.store = Store.open(config.cache_dir, exclusive=True)
        self.metrics = Metrics()
        self.metrics_http: MetricsServer | None = None
        self.node = Node(config, self.store, self.metrics)
        self.servicer = WeightdServicer(self.node, max_message=MAX_MESSAGE)
        self.credential_server = CredentialServer(
            Path(credential_socket(self.socket)), self.node.credentials)
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self._stopped = False

    async def start(self) -> None:
        # The metrics port first: an address that cannot be bound fails the start before
        # anything else runs and before a socket file exists.
        if self.config.metrics_address:
            self.metrics_http = start_http(self.config.metrics_address, self.metrics)
            log.info("metrics on %s", self.metrics_http.url)
        # the runtime directory is checked before any work (a refusal starts nothing);
        # the lease reaper, the CUDA tier and the pins' warm-up run before the first call
        # can arrive on the socket
        _prepare_socket(self.socket)
        self.node.start()
        # the credential socket first: a client that sees the gRPC socket can shake hands
        await self.credential_server.start()
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0)])
        pb_grpc.add_WeightdServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        old = os.umask(0o117)  # the socket is born 0660: never world-accessible
        try:
            self.server.add_insecure_port(f"unix://{self.socket}")
            await self.server.start()
        finally:
            os.umask(old)
        os.chmod(self.socket, 0o660)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("weightd serving on unix://%s (cache %s, pid %d)", self.socket,
                 self.config.cache_dir, os.getpid())
        # CUDA that nobody asked for is no warning (node.start logged it; Status says it)
        unasked = None if cuda_requested(self.config, self.node) else (
            f"cuda tier: {self.node.cuda.reason}")
        for problem in self.node.problems():
            if problem != unasked:
                log.warning("%s", problem)

    async def stop(self, grace: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        sd_notify("STOPPING=1")
        log.info("stopping: draining calls (up to %.0fs)", grace)
        await self.health.enter_graceful_shutdown()
        await self.credential_server.stop()
        if self.server is not None:
            await self.server.stop(grace)
        self.servicer.close()
        self.node.close()
        if self.metrics_http is not None:
            self.metrics_http.stop()
        self.store.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        log.info("stopped")


def serve(config: Config) -> int:
    """Run the daemon until SIGTERM or SIGINT; return the exit code.

    Raises:
        ConfigError: the socket's path is too long for a unix socket.
    """
    check_socket_path(Path(config.socket).absolute())
    testhooks.announce()  # loud when test-only pauses are armed
    if not return_freed_buffers():
        log.debug("mallopt is not available: freed fetch buffers may stay in the heap")
    return asyncio.run(_serve(config))


async def _serve(config: Config) -> int:
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("received %s", sig.name)
        stop.set()

    # asyncio's handlers wake the loop through its wakeup fd, whichever thread the
    # kernel delivered the signal to
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await daemon.start()
    sd_notify("READY=1")
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if config.watchdog and usec > 0:
        # systemd's watchdog: keep-alives at half the interval, while the loop runs
        interval = usec / 2e6
        while not stop.is_set():
            sd_notify("WATCHDOG=1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    await stop.wait()
    await daemon.stop()
    return 0
