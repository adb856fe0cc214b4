"""Credentials: which process is calling, as the kernel tells the daemon.

gRPC does not pass a unix socket's peer credentials to the server (grpc/grpc#15511,
#28755), so the daemon listens on a second socket beside its gRPC one
(``<socket>.cred``, same directory, same mode and group). A process connects there
once; the daemon reads the connection's ``SO_PEERCRED`` (pid, uid, gid) from the kernel
and answers one JSON line with a random token bound to that process. Every call then
carries the token as ``weightd-token`` metadata, and the daemon leases in the name of
the process the kernel named, whatever the request says.

:class:`Credential` does the handshake on first use, and again after a fork (the child
is another process) or when the daemon no longer knows the token (it restarted).
:class:`weightd_client.Client` uses it for every call; :class:`CredentialInterceptor`
adds it to a raw gRPC channel.

Example:
    >>> import grpc
    >>> from weightd_client.credentials import CredentialInterceptor
    >>> sock = "/run/weightd/weightd.sock"
    >>> channel = grpc.intercept_channel(                               # doctest: +SKIP
    ...     grpc.insecure_channel("unix://" + sock), CredentialInterceptor(sock))
"""

from __future__ import annotations

import collections
import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import grpc

from weightd_client.errors import DaemonUnavailable, NotPermitted, WeightdError

__all__ = ["SUFFIX", "TOKEN_KEY", "Credential", "CredentialInterceptor", "credential_socket",
           "handshake"]

#: The metadata key of the token on every call.
TOKEN_KEY = "weightd-token"
#: The credential socket is the gRPC socket's path with this suffix.
SUFFIX = ".cred"
_MAX_ANSWER = 4096


def credential_socket(grpc_socket: str | os.PathLike[str]) -> str:
    """The credential socket of the daemon listening on ``grpc_socket``."""
    return os.fspath(grpc_socket) + SUFFIX


def handshake(grpc_socket: str | os.PathLike[str], *, timeout: float = 10.0) -> str:
    """Ask the daemon for this process's token.

    Args:
        grpc_socket: the daemon's gRPC socket (the credential socket is beside it: beside
            the socket itself when the path is a link to it).
        timeout: seconds for the connect and the answer.

    Returns:
        The token, to send as ``weightd-token`` metadata.

    Raises:
        DaemonUnavailable: no daemon answers on the credential socket.
        NotPermitted: this user may not connect, or the daemon refused the process
            (e.g. it cannot see it: another PID namespace).
    """
    path = credential_socket(os.path.realpath(os.fspath(grpc_socket)))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            data = b""
            while b"\n" not in data and len(data) < _MAX_ANSWER:
                chunk = s.recv(_MAX_ANSWER)
                if not chunk:
                    break
                data += chunk
        except PermissionError as e:
            raise NotPermitted(f"cannot connect to the daemon's credential socket {path}: "
                               f"{e.strerror} (is this user in the socket's group?)") from e
        except OSError as e:
            raise DaemonUnavailable(f"weightd daemon unreachable at {path}: "
                                    f"{e.strerror or e}") from e
    try:
        answer = json.loads(data.split(b"\n", 1)[0])
    except ValueError as e:
        raise DaemonUnavailable(f"{path}: not a weightd credential socket (answer "
                                f"{data[:80]!r})") from e
    if not isinstance(answer, dict) or not isinstance(answer.get("token"), str):
        reason = answer.get("error") if isinstance(answer, dict) else None
        raise NotPermitted(f"{path}: the daemon refused credentials: {reason or answer!r}")
    return str(answer["token"])


class Credential:
    """This process's token for one daemon, fetched when first needed (thread-safe).

    Args:
        grpc_socket: the daemon's gRPC socket.
    """

    def __init__(self, grpc_socket: str | os.PathLike[str]) -> None:
        self.socket = os.fspath(grpc_socket)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._pid = 0

    def token(self) -> str:
        """The token, doing the handshake first when this process has none yet."""
        pid = os.getpid()
        with self._lock:
            if self._token is not None and self._pid == pid:
                return self._token
        token = handshake(self.socket)
        with self._lock:
            self._token, self._pid = token, pid
        return token

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_KEY, self.token()),)

    def forget(self) -> None:
        """Drop the token (the daemon no longer knows it): the next call shakes hands."""
        with self._lock:
            self._token = None


class _Details(collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                     "compression")), grpc.ClientCallDetails):
    pass


class CredentialInterceptor(grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
                            grpc.UnaryStreamClientInterceptor):
    """Adds this process's token to every call of a raw channel.

    Args:
        grpc_socket: the daemon's gRPC socket.
    """

    def __init__(self, grpc_socket: str | os.PathLike[str]) -> None:
        self.credential = Credential(grpc_socket)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        try:
            token = self.credential.metadata()
        except WeightdError:
            token = ()  # the call goes without; the daemon says what it needs
        return _Details(details.method, details.timeout,
                        tuple(details.metadata or ()) + token, details.credentials,
                        details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Callable[..., Any],
                              client_call_details: grpc.ClientCallDetails,
                              request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any],
                               client_call_details: grpc.ClientCallDetails,
                               request: Any) -> Any:
        return continuation(self._details(client_call_details), request)
