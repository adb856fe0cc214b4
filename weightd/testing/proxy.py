"""A forward HTTP proxy on 127.0.0.1 that counts what it relays: absolute-URI ``GET`` and
``HEAD`` (plain ``http://`` origins) and ``CONNECT`` tunnels (``https://`` origins), as
Dragonfly's dfdaemon, squid or a corporate proxy take them.

It relays only to loopback (127.0.0.1, ::1, localhost): a test can never reach the
internet through it. With ``auth`` it answers 407 to a request without that
``Proxy-Authorization``.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import select
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_LOOPBACK = ("127.0.0.1", "::1", "localhost")

#: Headers of one hop, never relayed (RFC 9110 7.6.1), and the proxy's own.
_HOP = {"connection", "keep-alive", "proxy-authorization", "proxy-authenticate",
        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}

_PIECE = 1 << 20


class ProxyLog:
    """Thread-safe counts of what the proxy relayed: requests by (method, host:port, path)
    (``CONNECT`` with the path ``""``), body bytes, and refusals."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.bytes = 0
        self.refused = 0
        #: Proxy-Authorization values seen (to check what a client sent)
        self.authorizations: Counter[str] = Counter()

    def add(self, method: str, target: str, path: str) -> None:
        with self.lock:
            self.requests[(method, target, path)] += 1

    def count(self, method: str | None = None, target: str | None = None) -> int:
        """Requests relayed (of ``method``, to ``target`` = ``host:port``)."""
        with self.lock:
            return sum(n for (m, t, _), n in self.requests.items()
                       if (method is None or m == method) and (target is None or t == target))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _refuse(self, status: int, why: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        with self.server.log.lock:
            self.server.log.refused += 1
        body = why.encode()
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        got = self.headers.get("Proxy-Authorization")
        if got:
            with self.server.log.lock:
                self.server.log.authorizations[got] += 1
        if self.server.auth is None:
            return True
        if got == self.server.auth:
            return True
        self._refuse(407, "proxy authentication required",
                     (("Proxy-Authenticate", 'Basic realm="test"'),))
        return False

    def do_CONNECT(self) -> None:  # noqa: N802
        host, _, port_text = self.path.rpartition(":")
        host = host.strip("[]")
        if not self._authorized():
            return
        if host not in _LOOPBACK or not port_text.isdigit():
            self._refuse(403, f"this test proxy relays to loopback only, not {self.path}")
            return
        try:
            upstream = socket.create_connection((host, int(port_text)), timeout=10)
        except OSError as e:
            self._refuse(502, f"cannot connect to {self.path}: {e}")
            return
        self.server.log.add("CONNECT", f"{host}:{port_text}", "")
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        client = self.connection
        try:
            self._tunnel(client, upstream)
        finally:
            upstream.close()

    def _tunnel(self, client: socket.socket, upstream: socket.socket) -> None:
        socks = [client, upstream]
        while not self.server.stopping.is_set():
            ready, _, _ = select.select(socks, [], [], 0.5)
            for s in ready:
                try:
                    data = s.recv(_PIECE)
                except OSError:
                    return
                if not data:
                    return
                other = upstream if s is client else client
                try:
                    other.sendall(data)
                except OSError:
                    return
                if s is upstream:
                    with self.server.log.lock:
                        self.server.log.bytes += len(data)

    def do_GET(self) -> None:  # noqa: N802
        self._relay()

    def do_HEAD(self) -> None:  # noqa: N802
        self._relay()

    def _relay(self) -> None:
        parts = urlsplit(self.path)
        if not self._authorized():
            return
        if parts.scheme != "http" or not parts.hostname:
            self._refuse(400, f"not an absolute http:// URI: {self.path}")
            return
        if parts.hostname not in _LOOPBACK:
            self._refuse(403, f"this test proxy relays to loopback only, not {parts.hostname}")
            return
        port = parts.port or 80
        target = f"{parts.hostname}:{port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=30)
        try:
            try:
                conn.request(self.command, path, headers=headers)
                resp = conn.getresponse()
            except OSError as e:
                self._refuse(502, f"cannot reach {target}: {e}")
                return
            self.server.log.add(self.command, target, parts.path or "/")
            body = b"" if self.command == "HEAD" or resp.length is not None else resp.read()
            self.send_response(resp.status, resp.reason)
            for name, value in resp.getheaders():
                if name.lower() not in _HOP and not (
                        name.lower() == "content-length" and resp.length is None):
                    self.send_header(name, value)
            if resp.length is None and self.command != "HEAD":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if body:
                self.wfile.write(body)
                sent = len(body)
            else:
                sent = 0
                while piece := resp.read(_PIECE):
                    self.wfile.write(piece)
                    sent += len(piece)
            with self.server.log.lock:
                self.server.log.bytes += sent
        finally:
            conn.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    log: ProxyLog
    auth: str | None
    stopping: threading.Event

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up is no error of the proxy's (stay quiet about it)."""
        import sys

        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class ForwardProxy:
    """A forward proxy on 127.0.0.1, port 0 (see the module's docstring).

    Args:
        auth: ``(user, password)`` the proxy requires (Basic), or None.

    Example
    -------
    >>> with ForwardProxy() as proxy:
    ...     proxy.url.startswith("http://127.0.0.1:")
    True
    """

    def __init__(self, *, auth: tuple[str, str] | None = None) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.log = ProxyLog()
        self._server.stopping = threading.Event()
        self._server.auth = None if auth is None else "Basic " + base64.b64encode(
            f"{auth[0]}:{auth[1]}".encode()).decode()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="forward-proxy")
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> ProxyLog:
        return self._server.log

    def stop(self) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> ForwardProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.stop()
