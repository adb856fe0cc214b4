"""A static HTTP server with Range support and request counting, and moto's S3 server
wrapped to count requests and body bytes. Both bind 127.0.0.1 port 0.

Both take hooks that make them misbehave the way real origins do: fail a request (a
status, with headers such as ``Retry-After``, or a dropped connection), and for the HTTP
server also redirect a request elsewhere and answer a ranged GET with other bytes than
those asked for (a lying ``Content-Range``, a 200 that ignores the range, a short body,
an encoded body); moto's server can change the bytes of a body on their way out.

The HTTP server can also be slow the way a real origin is: a token bucket shared by
every connection (``rate``, bytes per second) and one per connection (``conn_rate``), so
that a benchmark on loopback has a network, not the loopback, as its bottleneck."""

from __future__ import annotations

import contextlib
import html
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")

@dataclass(frozen=True)
class Fault:
    """An answer a fault hook gives instead of the file: a status and its headers
    (``Fault(429, (("Retry-After", "2"),))``)."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()


#: A fault hook: (method, path) -> None to serve normally, an HTTP status (or a
#: :class:`Fault`) to answer with instead, or -1 to drop the connection without answering.
FaultHook = Callable[[str, str], "int | Fault | None"]

#: A redirect hook: (method, path) -> None to serve normally, or the ``Location`` to answer
#: a 302 with (absolute, or relative to the request).
RedirectHook = Callable[[str, str], str | None]


@dataclass(frozen=True)
class Lie:
    """How the HTTP server answers one ranged GET instead of honestly.

    Attributes:
        serve: the bytes ``[start, end)`` of the file sent instead of those asked for
            (default: those asked for).
        status: 206, or 200 for an answer that ignores the ``Range`` header.
        content_range: the ``Content-Range`` header sent with a 206 (default: the honest
            one for ``serve``).
        body_bytes: send only this many bytes of ``serve`` (a ``Content-Length`` that
            matches them: the body is not cut off, it is short by design).
        headers: more headers sent with it (``Content-Encoding: gzip``).
    """

    serve: tuple[int, int] | None = None
    status: int = 206
    content_range: str | None = None
    body_bytes: int | None = None
    headers: tuple[tuple[str, str], ...] = ()


#: A range hook: (path, start, end (exclusive), file size) of a ranged GET -> None to
#: answer honestly, or a :class:`Lie`.
RangeHook = Callable[[str, int, int, int], Lie | None]

#: A listing hook: the directory's path (as requested) -> hrefs added to its listing, as
#: written (relative, absolute or percent-encoded: a lying listing).
ListingHook = Callable[[str], list[str]]

#: A body hook for moto's server: (method, path) -> None, or a function applied to each
#: chunk of that response's body (same length in and out).
BodyHook = Callable[[str, str], Callable[[bytes], bytes] | None]


class TokenBucket:
    """A rate in bytes per second that every caller of :meth:`take` shares.

    A caller takes what it is about to send and sleeps off the debt when the bucket is
    empty: callers queue in the order they came, and the bytes taken over any stretch
    of time longer than a burst are ``rate`` per second. ``burst`` (default 20 ms of the
    rate, at least 64 KiB) is what may go out at once after a pause.

    Example
    -------
    >>> b = TokenBucket(1e6, burst=100_000)
    >>> b.take(100_000)  # the burst: no wait
    0.0
    """

    def __init__(self, rate: float, *, burst: int | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"a rate must be positive, got {rate}")
        self.rate = float(rate)
        self.burst = burst if burst is not None else max(64 * 1024, int(rate * 0.02))
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> float:
        """Take ``n`` bytes; sleep until the bucket had them. Returns the seconds slept."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)
        return wait


class RequestLog:
    """Thread-safe counts of requests, body bytes served (per path) and connections
    accepted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.bytes: Counter[str] = Counter()
        self.connections = 0
        #: how many requests carried each header (names lower-cased)
        self.header_names: Counter[str] = Counter()
        #: requests by (the access key id that signed them, "" for none; the path)
        self.signers: Counter[tuple[str, str]] = Counter()
        #: (method, path) of the requests in the order they came (the last 100,000)
        self.order: list[tuple[str, str]] = []

    def connected(self) -> None:
        with self.lock:
            self.connections += 1

    def signed(self, key_id: str, path: str) -> None:
        with self.lock:
            self.signers[(key_id, path)] += 1

    def saw_headers(self, names: Iterable[str]) -> None:
        with self.lock:
            self.header_names.update(n.lower() for n in names)

    def add(self, method: str, path: str, nbytes: int) -> None:
        with self.lock:
            self.requests[(method, path)] += 1
            self.bytes[path] += nbytes
            if len(self.order) < 100_000:
                self.order.append((method, path))

    def add_bytes(self, path: str, nbytes: int) -> None:
        with self.lock:
            self.bytes[path] += nbytes

    def count(self, method: str | None = None, path_contains: str = "") -> int:
        with self.lock:
            return sum(n for (m, p), n in self.requests.items()
                       if (method is None or m == method) and path_contains in p)

    def bytes_served(self, path_contains: str = "") -> int:
        with self.lock:
            return sum(n for p, n in self.bytes.items() if path_contains in p)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.bytes.clear()
            self.connections = 0
            self.header_names.clear()
            self.signers.clear()
            self.order.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    conn_bucket: TokenBucket | None = None

    def setup(self) -> None:
        super().setup()
        # as real origins do (nginx's tcp_nodelay, on by default for kept-alive
        # connections): without it, a body shorter than a segment waited behind the
        # headers sent before it until the client's delayed ACK, 40 ms, and every small
        # file or short range cost a client 43 ms here where it costs 0.5
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.log.connected()
        if self.server.conn_rate is not None:
            self.conn_bucket = TokenBucket(self.server.conn_rate)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _fault(self) -> bool:
        hook = self.server.fault
        fault = hook(self.command, self.path) if hook else None
        if fault is None:
            return False
        if fault == -1:
            self.close_connection = True
            self.connection.shutdown(2)
            return True
        if not isinstance(fault, Fault):
            fault = Fault(int(fault))
        self.send_response(fault.status)
        for name, value in fault.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.server.log.add("FAULT", urllib.parse.unquote(
            urllib.parse.urlsplit(self.path).path), 0)
        return True

    def _redirect(self) -> bool:
        hook = self.server.redirect
        location = hook(self.command, self.path) if hook else None
        if location is None:
            return False
        self.send_response(HTTPStatus.FOUND)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.server.log.add("REDIRECT", urllib.parse.unquote(
            urllib.parse.urlsplit(self.path).path), 0)
        return True

    def _serve(self, *, body: bool) -> None:
        self.server.log.saw_headers(self.headers.keys())
        if self._fault() or self._redirect():
            return
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        root = self.server.root
        target = (root / rel.lstrip("/")).resolve()
        if not (target == root or root in target.parents) or not target.exists():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        if target.is_dir():
            self._listing(target, rel, body)
            return
        st = target.stat()
        size = st.st_size
        start, end = 0, size
        status = HTTPStatus.OK
        rng = self.headers.get("Range")
        if rng:
            m = _RANGE.match(rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                return
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:
                start, end = max(0, size - int(m.group(2))), size
            if start >= size or start >= end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = HTTPStatus.PARTIAL_CONTENT
        content_range = f"bytes {start}-{end - 1}/{size}"
        lie = (self.server.lie(rel, start, end, size)
               if self.server.lie is not None and rng and body else None)
        if lie is not None:
            status = HTTPStatus(lie.status)
            start, end = lie.serve or ((0, size) if lie.status == 200 else (start, end))
            content_range = lie.content_range or f"bytes {start}-{end - 1}/{size}"
            if lie.body_bytes is not None:
                end = start + lie.body_bytes
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{st.st_mtime_ns:x}-{size:x}"')
        self.send_header("Last-Modified", self.date_time_string(int(st.st_mtime)))
        self.send_header("Content-Type", "application/octet-stream")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", content_range)
        for name, value in lie.headers if lie is not None else ():
            self.send_header(name, value)
        self.end_headers()
        if not body:
            self.server.log.add("HEAD", rel, 0)
            return
        self.wfile.flush()
        with open(target, "rb") as f:
            sent = self._send_file(f.fileno(), start, end)
        self.server.log.add("GET", rel, sent)
        if self.server.drop_idle:
            self.close_connection = True  # without saying so: as an idle timeout would

    def _send_file(self, fd: int, start: int, end: int) -> int:
        """``sendfile`` bytes ``[start, end)``, in pieces the token buckets allow."""
        buckets = [b for b in (self.server.bucket, self.conn_bucket) if b is not None]
        piece = min([1 << 24] + [max(16 * 1024, min(256 * 1024, b.burst)) for b in buckets])
        sent = 0
        while sent < end - start:
            n = min(end - start - sent, piece)
            for bucket in buckets:
                bucket.take(n)
            if isinstance(self.connection, ssl.SSLSocket):  # TLS: no sendfile
                data = os.pread(fd, n, start + sent)
                self.connection.sendall(data)
                n = len(data)
            else:
                n = os.sendfile(self.connection.fileno(), fd, start + sent, n)
            if n == 0:
                break
            sent += n
        return sent

    def _listing(self, target: Path, rel: str, body: bool) -> None:
        links = self._links(target, rel)
        if self.server.extra_links is not None:
            links += [(href, href) for href in self.server.extra_links(rel)]
        items = [f'<a href="{html.escape(href)}">{html.escape(text)}</a>' for href, text in links]
        data = ("<html><body>\n" + "\n".join(items) + "\n</body></html>\n").encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
        self.server.log.add("LIST", rel, 0)

    def _links(self, target: Path, rel: str) -> list[tuple[str, str]]:
        """(href, text) of each entry of the listing of directory ``target``."""
        base = rel if rel.endswith("/") else rel + "/"
        names = [e.name + ("/" if e.is_dir() else "") for e in sorted(target.iterdir())]
        return [(urllib.parse.quote(base + name), name) for name in names]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: a fetch that opens its 32 ranged reads
    # at once (4 files x 8) overflowed it, the kernel dropped the SYNs past it and those
    # clients connected a second later (TCP's SYN retransmission), a 1 s stall in about
    # a third of the cold fetches of the benchmarks (TcpExtListenOverflows). Real origins
    # listen with hundreds (nginx 511, Linux's somaxconn 4096).
    request_queue_size = 1024
    root: Path
    log: RequestLog
    fault: FaultHook | None
    bucket: TokenBucket | None = None
    conn_rate: float | None = None
    drop_idle: bool = False
    redirect: RedirectHook | None = None
    lie: RangeHook | None = None
    extra_links: ListingHook | None = None


class RangeHTTPServer:
    """Serve a directory over HTTP/1.1 on 127.0.0.1 with Range, ETag and listings.

    Args:
        root: the directory served.
        fault: see :data:`FaultHook`.
        rate: bytes per second for all bodies together (a token bucket every connection
            shares), or None for as fast as loopback goes.
        conn_rate: bytes per second for each connection's bodies, or None.
        tls: serve HTTPS with this server context (see :func:`weightd.testing.tls.
            make_tls`), or None for plain HTTP.

    Example
    -------
    >>> import tempfile
    >>> with RangeHTTPServer(tempfile.mkdtemp(), rate=200e6) as srv:
    ...     srv.url.startswith("http://127.0.0.1:")
    True
    """

    def __init__(self, root: str | os.PathLike[str], *, fault: FaultHook | None = None,
                 rate: float | None = None, conn_rate: float | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._scheme = "https" if tls is not None else "http"
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._server.root = Path(root).resolve()
        self._server.log = RequestLog()
        self._server.fault = fault
        self.set_rate(rate, conn_rate)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="range-http")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self._server.server_address[1]}"

    @property
    def log(self) -> RequestLog:
        return self._server.log

    def set_fault(self, fault: FaultHook | None) -> None:
        self._server.fault = fault

    def set_rate(self, rate: float | None, conn_rate: float | None = None) -> None:
        """Shape bodies to ``rate`` bytes/s in all and ``conn_rate`` per connection (None:
        no limit); a connection opened before keeps the per-connection rate it had."""
        self._server.bucket = TokenBucket(rate) if rate is not None else None
        self._server.conn_rate = conn_rate

    def set_drop_idle(self, drop: bool) -> None:
        """Close each connection after its answer, without a ``Connection: close``
        header: what a server's idle timeout does to a client's kept-alive connection."""
        self._server.drop_idle = drop

    def set_redirect(self, redirect: RedirectHook | None) -> None:
        """Answer requests with a 302 to wherever ``redirect`` says (logged as REDIRECT)."""
        self._server.redirect = redirect

    def set_lie(self, lie: RangeHook | None) -> None:
        """Answer ranged GETs as ``lie`` says (see :class:`Lie`)."""
        self._server.lie = lie

    def set_links(self, links: ListingHook | None) -> None:
        """Add the hrefs ``links(path)`` gives to the listing of each directory."""
        self._server.extra_links = links

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> RangeHTTPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


class _CountingApp:
    def __init__(self, app: Any, log: RequestLog, fault: Callable[[], FaultHook | None],
                 body: Callable[[], BodyHook | None] = lambda: None,
                 conditions: Callable[[], str] = lambda: "honour") -> None:
        self.app = app
        self.log = log
        self.fault = fault
        self.body = body
        self.conditions = conditions
        # moto checks a condition and then writes, with no lock between (its server is
        # threaded): S3 does both at once. Conditional writes are serialized here, so that
        # the tests exercise weightd's locking, not moto's race.
        self._conditional = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        method = environ["REQUEST_METHOD"]
        path = urllib.parse.unquote(environ.get("PATH_INFO", ""))
        kind = method
        m = _CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
        self.log.signed(m.group(1) if m else "", path)
        conditional = method in ("PUT", "DELETE", "POST") and (
            "HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MATCH" in environ)
        if conditional:
            mode = self.conditions()
            if mode == "refuse":
                body = b"<Error><Code>NotImplemented</Code><Message>conditional writes are " \
                       b"not implemented</Message></Error>"
                start_response("501 Not Implemented", [("Content-Type", "application/xml"),
                                                       ("Content-Length", str(len(body)))])
                return [body]
            if mode == "ignore":
                environ.pop("HTTP_IF_NONE_MATCH", None)
                environ.pop("HTTP_IF_MATCH", None)
                conditional = False
        hook = self.fault()
        status = hook(method, path) if hook else None
        if status == -1:  # drop the connection without answering
            sock = environ.get("werkzeug.socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            raise ConnectionAbortedError("fault hook: connection dropped")
        if status is not None:
            fault = status if isinstance(status, Fault) else Fault(int(status))
            start_response(f"{fault.status} Fault", [*fault.headers, ("Content-Length", "0")])
            return [b""]
        self.log.add(kind, path, 0)
        change = self.body()
        if conditional:
            with self._conditional:  # moto answers within the call
                resp = self.app(environ, start_response)
                try:
                    answer = list(resp)
                finally:
                    getattr(resp, "close", lambda: None)()
        else:
            answer = self.app(environ, start_response)
        return self._counted(answer, path, change(method, path) if change else None)

    def _counted(self, body: Any, path: str, change: Callable[[bytes], bytes] | None) -> Any:
        """The response body, its bytes added to the log as they are sent."""
        try:
            for chunk in body:
                self.log.add_bytes(path, len(chunk))
                yield change(chunk) if change is not None and chunk else chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()


class MotoS3Server:
    """moto's S3 server on 127.0.0.1 (a real HTTP endpoint), counting requests per path.

    Attributes:
        endpoint_url: pass it to s3fs/boto3 (or as ``AWS_ENDPOINT_URL``).
    """

    def __init__(self, *, fault: FaultHook | None = None) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        self.log = RequestLog()
        self._fault = fault
        self._body: BodyHook | None = None
        self._conditions = "honour"
        app = _CountingApp(DomainDispatcherApplication(create_backend_app), self.log,
                           lambda: self._fault, lambda: self._body, lambda: self._conditions)
        self._server = make_server("127.0.0.1", 0, app, threaded=True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="moto-s3")
        self._thread.start()
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_port}"

    def set_fault(self, fault: FaultHook | None) -> None:
        self._fault = fault

    def set_body(self, body: BodyHook | None) -> None:
        """Change the bytes of response bodies as ``body`` says (e.g. flip one)."""
        self._body = body

    def set_conditions(self, mode: str) -> None:
        """How conditional writes (``If-None-Match`` / ``If-Match`` on a PUT, POST or
        DELETE) are answered: ``"honour"`` them (as S3 does), ``"ignore"`` the headers (a
        store without conditional writes that does not say so), or ``"refuse"`` them with
        501 NotImplemented."""
        if mode not in ("honour", "ignore", "refuse"):
            raise ValueError(f"unknown mode {mode!r}")
        self._conditions = mode

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def upload_dir(self, local: str | os.PathLike[str], bucket: str, prefix: str) -> str:
        """Upload a directory tree; return its ``s3://bucket/prefix`` URL."""
        s3 = self.client()
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=bucket)
        local = Path(local)
        for path in sorted(local.rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> MotoS3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
