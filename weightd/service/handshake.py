"""The credential socket: who is calling, as the kernel says (not as a request claims).

gRPC's Python server does not expose a unix socket's peer credentials (the auth
context of a UDS connection is empty: grpc/grpc#15511, #28755). So the daemon also
listens on ``<socket>.cred``, beside its gRPC socket and with the same mode and group.
A client connects once per process; the daemon reads ``SO_PEERCRED`` (pid, uid, gid)
of the connection, takes a pidfd of the peer (``SO_PEERPIDFD``, else ``pidfd_open``
while the peer is still connected) and answers one JSON line: ``{"token": ...}`` (or
``{"error": ...}``). The token names that process in every later call (gRPC metadata
``weightd-token``, see weightd_client.credentials); nothing else is ever read from the
connection, and nothing of this runs on the warm path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import socket
import struct
from pathlib import Path

from weightd.errors import NotPermitted
from weightd.leases import Credentials

log = logging.getLogger(__name__)

__all__ = ["CredentialServer", "peer_credentials"]

_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5; not in Python 3.11's names
_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int, int | None]:
    """``(pid, uid, gid, pidfd)`` of a unix socket's peer, from the kernel.

    ``pidfd`` is None where the kernel has no ``SO_PEERPIDFD`` (before Linux 6.5).
    """
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    try:
        pidfd: int | None = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError:
        pidfd = None
    return pid, uid, gid, pidfd


class CredentialServer:
    """Answers each connection on ``path`` with the token of the connecting process.

    Args:
        path: the credential socket (the gRPC socket's path + ``.cred``).
        credentials: the registry that issues tokens (the node's).
    """

    def __init__(self, path: Path, credentials: Credentials) -> None:
        self.path = path
        self.credentials = credentials
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # the gRPC socket's check found no live daemon
        old = os.umask(0o117)  # born 0660, like the gRPC socket: never world-accessible
        try:
            self._server = await asyncio.start_unix_server(self._answer, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o660)

    async def _answer(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            pid, uid, gid, pidfd = peer_credentials(sock)
            if pidfd is None and pid > 0:
                with contextlib.suppress(OSError):
                    pidfd = os.pidfd_open(pid)
                if not _still_connected(sock):  # then that pid may name another process
                    if pidfd is not None:
                        os.close(pidfd)
                    raise NotPermitted("the process hung up before its credentials were read")
            caller = self.credentials.register(pid, uid, gid, pidfd)
            answer = {"token": caller.token, "pid": caller.pid, "uid": caller.uid}
            log.debug("credentials for pid %d (uid %d, gid %d)", pid, uid, gid)
        except (NotPermitted, OSError) as e:
            answer = {"error": str(e)}
            log.warning("credential handshake refused: %s", e)
        try:
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except OSError:
            pass  # the client went away: nothing to tell it
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.path.unlink(missing_ok=True)


def _still_connected(sock: socket.socket) -> bool:
    """Whether the peer has not hung up: its pid (from connect time) still names it, so
    a pidfd opened now is the peer's (without ``SO_PEERPIDFD``)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP)
    return not poller.poll(0)
