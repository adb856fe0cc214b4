"""HTTP(S) range reads straight into the caller's buffer: the byte path of ``http(s)://``
and ``hf://`` sources.

Each ranged ``GET`` runs on a thread of the source's own pool, on a keep-alive
``http.client`` connection taken from a pool per origin, and its body is read with
``readinto`` into a buffer the fetch owns: the kernel copies the bytes once, from the
socket into that buffer (CPython's buffered reader reads a large ``readinto`` straight
from the socket), and ``recv`` runs without the GIL. aiohttp, which fsspec's HTTP
filesystem uses, copies each body piece twice in Python on one event-loop thread
(``recv`` into a new ``bytes``, the parser's slice) and has no ``readinto``; measured on
loopback it read 0.6 GB/s where this reads 1.1-1.4 GB/s and ``curl -o /dev/null`` 0.9-1.1
(docs/fetch-tuning.md, "The wire").

What it checks, for every request:

- every hop, the first and each redirect's (at most :data:`MAX_REDIRECTS`), is given to
  the source's ``check_hop`` before it is requested (``allowed_sources`` for HTTP, the
  hub's hosts for ``hf://``), and only ``http``/``https`` hops are followed;
- headers from ``auth`` (a token) are sent only where ``auth`` says, per hop: a redirect
  to another host never carries them;
- a ranged answer must be the range asked for (``check``: a 206 whose ``Content-Range``
  names it, a 200 only for the whole file), with no ``Content-Encoding``, and its body
  complete; otherwise the chunk fails with a transient error and nothing of it is kept;
- a status of 400 or more is :class:`HttpStatusError` (its ``status`` and a server-given
  ``retry_after``), which :func:`~weightd.sources.base.is_transient` and the retry
  helper read.

Proxies: a request goes through the proxy :func:`proxy_for` names for its origin (the
``http_proxy`` setting, else ``HTTP_PROXY`` / ``HTTPS_PROXY`` from the environment; hosts
in ``NO_PROXY`` go direct): an ``http://`` request as an absolute-URI ``GET`` to the
proxy, an ``https://`` one through a ``CONNECT`` tunnel, TLS end to end with the origin
(or with a proxy that re-signs it: its CA in ``http_ca_bundle``). The proxy is not a
hop: every hop that ``check_hop`` sees is still the origin's URL, so ``allowed_sources``
and the redirect checks apply to the origins, never to the proxy's address.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import os
import socket
import ssl
import threading
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from weightd.errors import NotPermitted, SourceUnavailable
from weightd.retry import parse_retry_after

log = logging.getLogger(__name__)

#: Redirects followed for one request (aiohttp's default too).
MAX_REDIRECTS = 10

#: Seconds a connect or a single ``recv`` may take before the chunk fails (and is retried).
TIMEOUT = 60.0

#: Body bytes of a redirect or error answer read to keep its connection; beyond, it is closed.
_DRAIN_LIMIT = 64 * 1024

#: Bytes per ``readinto`` call: between two, a cancelled read stops.
_SLICE = 4 * 1024 * 1024

_REDIRECTS = (301, 302, 303, 307, 308)

Origin = tuple[str, str, int]

#: ``check_hop(target, previous)``: raise to refuse ``target`` (``previous`` is None for a
#: request's first hop, else the URL that redirected to it).
HopCheck = Callable[[str, str | None], None]

#: ``auth(url)``: the headers (a token) that may be sent to ``url``.
AuthHeaders = Callable[[str], Mapping[str, str]]

#: ``check(url, status, headers)``: raise when an answer is not the one asked for.
AnswerCheck = Callable[[str, int, Mapping[str, str]], None]


class HttpStatusError(OSError):
    """An HTTP answer of status 400 or more.

    Attributes:
        status: the status code (404, 429, 503...).
        retry_after: seconds the server asked to wait (``Retry-After``), or None.
        url: the URL that answered.
        headers: the answer's headers, names lower-cased (the hub's ``X-Error-Code``).
    """

    def __init__(self, url: str, status: int, reason: str, retry_after: float | None,
                 headers: Mapping[str, str] | None = None) -> None:
        wait = f", Retry-After {retry_after:g}s" if retry_after is not None else ""
        super().__init__(f"{url}: HTTP {status} {reason}{wait}".rstrip())
        self.url = url
        self.status = status
        self.retry_after = retry_after
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class Proxy:
    """A forward proxy: where to connect, and the ``Proxy-Authorization`` it is given."""

    host: str
    port: int
    authorization: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Proxy-Authorization": self.authorization} if self.authorization else {}

    def __str__(self) -> str:  # never the credentials
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


#: ``proxy(origin)``: the proxy a request to ``origin`` goes through, or None (direct).
ProxyFor = Callable[[tuple[str, str, int]], Proxy | None]


class ProxyUnavailable(OSError):
    """The proxy cannot be reached (transient, like any connection error): its message
    names the proxy, not the origin."""


def parse_proxy(url: str, what: str) -> Proxy:
    """A proxy from ``http://[user:password@]host[:port]`` (``host:port`` alone, as
    environments often write it, is ``http://``; the port defaults to 80)."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise SourceUnavailable(f"{what}: the proxy {parts.scheme}://{parts.hostname or ''} "
                                "is not an http:// proxy (the only kind weightd speaks)")
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode()
    try:
        port = parts.port or 80
    except ValueError as e:
        raise SourceUnavailable(f"{what}: the proxy's port is not a number") from e
    return Proxy(parts.hostname, port, authorization)


def proxy_for(setting: str | None, environ: Mapping[str, str] | None = None) -> ProxyFor:
    """Which proxy each origin's requests go through: ``setting`` (the ``http_proxy``
    setting) for http and https alike, else the environment's ``http_proxy`` /
    ``https_proxy`` (either case, as curl and urllib read them); an origin whose host
    ``NO_PROXY`` names goes direct either way."""
    env = dict(os.environ if environ is None else environ)
    found: dict[str, str] = {}
    for key, value in env.items():  # urllib's rules: lower case wins over upper case
        low = key.lower()
        if low.endswith("_proxy") and value and (key == low or low not in env):
            found[low[:-len("_proxy")]] = value
    no_proxy = found.get("no", "")
    cache: dict[tuple[str, str, int], Proxy | None] = {}

    def resolve(origin: tuple[str, str, int]) -> Proxy | None:
        if origin in cache:
            return cache[origin]
        scheme, host, port = origin
        url = setting or found.get(scheme)
        proxy = None
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
        if url and not (no_proxy and bypass(f"{host}:{port}", {"no": no_proxy})):
            proxy = parse_proxy(url, "http_proxy" if setting else f"{scheme.upper()}_PROXY")
        cache[origin] = proxy
        return proxy

    return resolve


def ssl_context(ca_bundle: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """The system's trusted CAs, and those of ``ca_bundle`` (``http_ca_bundle``) too.

    Raises:
        SourceUnavailable: ``ca_bundle`` is not a PEM file of certificates.
    """
    ctx = ssl.create_default_context()
    if ca_bundle is not None:
        try:
            ctx.load_verify_locations(cafile=os.fspath(ca_bundle))
        except (OSError, ssl.SSLError) as e:
            raise SourceUnavailable(f"http_ca_bundle {os.fspath(ca_bundle)}: not a PEM file "
                                    f"of CA certificates ({e})") from e
    return ctx


def _direct(origin: tuple[str, str, int]) -> Proxy | None:
    return None


class Cancelled(Exception):
    """The read was cancelled (its download failed or stopped) before its body ended."""


def origin_of(url: str) -> Origin:
    """(scheme, host, port) of an ``http(s)`` URL, the port made explicit."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url}")
    return scheme, parts.hostname.lower(), parts.port or (443 if scheme == "https" else 80)


def _target(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _no_auth(url: str) -> Mapping[str, str]:
    return {}


class Wire:
    """Keep-alive HTTP(S) connections per origin, for blocking calls from many threads.

    Args:
        check_hop: called before every hop (see :data:`HopCheck`).
        auth: headers that may go to a URL (see :data:`AuthHeaders`).
        max_idle: idle connections kept per origin.
        timeout: seconds for a connect or a single read.
        proxy: the proxy of each origin (see :func:`proxy_for`; default: none).
        ca_bundle: a PEM file of CA certificates trusted besides the system's.

    The pool's lock guards only the lists of idle connections; every connect, send and
    read happens outside it.
    """

    def __init__(self, *, check_hop: HopCheck, auth: AuthHeaders = _no_auth,
                 max_idle: int = 64, timeout: float = TIMEOUT, proxy: ProxyFor = _direct,
                 ca_bundle: str | os.PathLike[str] | None = None) -> None:
        self.check_hop = check_hop
        self.auth = auth
        self.max_idle = max_idle
        self.timeout = timeout
        self.proxy = proxy
        self.ca_bundle = ca_bundle
        self._lock = threading.Lock()
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._busy: set[http.client.HTTPConnection] = set()
        self._closed = False
        self._ssl: ssl.SSLContext | None = None

    # --- connections ---------------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl_context(self.ca_bundle)
        return self._ssl

    def _new(self, origin: Origin) -> http.client.HTTPConnection:
        scheme, host, port = origin
        proxy = self.proxy(origin)
        if scheme == "https":
            if proxy is None:
                return http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                                   context=self._context())
            conn = http.client.HTTPSConnection(proxy.host, proxy.port, timeout=self.timeout,
                                               context=self._context())
            conn.set_tunnel(host, port, headers=proxy.headers)  # CONNECT host:port, then TLS
            return conn
        if proxy is None:
            return http.client.HTTPConnection(host, port, timeout=self.timeout)
        return http.client.HTTPConnection(proxy.host, proxy.port, timeout=self.timeout)

    def _connect(self, origin: Origin, conn: http.client.HTTPConnection) -> None:
        """Connect a new connection now, so that a proxy that cannot be reached is named
        as such (not as the origin)."""
        proxy = self.proxy(origin)
        if conn.sock is not None or proxy is None:
            return
        try:
            conn.connect()
        except (ConnectionError, TimeoutError, socket.gaierror) as e:
            raise ProxyUnavailable(f"cannot connect to the proxy {proxy} for "
                                   f"{origin[0]}://{origin[1]}:{origin[2]}: "
                                   f"{e.strerror or e}".rstrip()) from None
        except OSError as e:
            if "Tunnel connection failed" not in str(e):
                raise
            raise ProxyUnavailable(f"the proxy {proxy} refused the tunnel to "
                                   f"{origin[1]}:{origin[2]}: {e}") from None

    def _acquire(self, origin: Origin, *, fresh: bool = False
                 ) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._closed:
                raise Cancelled("the source is closed")
            idle = self._idle.get(origin)
            conn = idle.pop() if idle and not fresh else None
        reused = conn is not None
        if conn is None:
            conn = self._new(origin)
        with self._lock:
            self._busy.add(conn)
        return conn, reused

    def _release(self, origin: Origin, conn: http.client.HTTPConnection, *, keep: bool) -> None:
        with self._lock:
            self._busy.discard(conn)
            idle = self._idle.setdefault(origin, [])
            if keep and not self._closed and len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close idle connections, and shut the sockets of busy ones down so that their
        reads end now (their threads then fail with an error of that read)."""
        with self._lock:
            self._closed = True
            idle = [c for conns in self._idle.values() for c in conns]
            self._idle.clear()
            busy = list(self._busy)
        for conn in idle:
            conn.close()
        for conn in busy:
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    # --- requests --------------------------------------------------------------------------

    def _send(self, origin: Origin, method: str, url: str, headers: Mapping[str, str]
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request on a pooled connection; a kept-alive connection that the
        server closed meanwhile is replaced once, by a new one (nothing was answered on
        it; the other idle ones may be as stale)."""
        proxy = self.proxy(origin)
        target, hdrs = _target(url), dict(headers)
        if proxy is not None and origin[0] == "http":  # an absolute-URI request to the proxy
            parts = urlsplit(url)
            target = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{target}"
            hdrs.update(proxy.headers)
        for attempt in (1, 2):
            conn, reused = self._acquire(origin, fresh=attempt == 2)
            try:
                self._connect(origin, conn)
                conn.request(method, target, headers=hdrs)
                return conn, conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._release(origin, conn, keep=False)
                if not reused or attempt == 2:
                    raise
            except BaseException:
                self._release(origin, conn, keep=False)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _finish(self, origin: Origin, conn: http.client.HTTPConnection,
                resp: http.client.HTTPResponse) -> None:
        """Drain a small unread body to keep the connection; close it otherwise."""
        keep = False
        try:
            if resp.length is not None and resp.length <= _DRAIN_LIMIT and not resp.will_close:
                resp.read()
                keep = True
        except OSError:
            keep = False
        finally:
            self._release(origin, conn, keep=keep and resp.isclosed())

    def open(self, method: str, url: str, headers: Mapping[str, str] | None = None
             ) -> tuple[Origin, http.client.HTTPConnection, http.client.HTTPResponse, str]:
        """Send a request, following redirects (each hop checked first); the answer of
        the last hop, whatever its status, and its URL. The caller must pass the
        connection to :meth:`done` or :meth:`abandon`."""
        self.check_hop(url, None)
        previous: str | None = None
        for _ in range(MAX_REDIRECTS + 1):
            origin = origin_of(url)
            hop_headers = {**(headers or {}), **self.auth(url)}
            conn, resp = self._send(origin, method, url, hop_headers)
            location = resp.getheader("Location")
            if resp.status not in _REDIRECTS or not location:
                return origin, conn, resp, url
            self._finish(origin, conn, resp)
            previous, url = url, urljoin(url, location.strip())
            if urlsplit(url).scheme.lower() not in ("http", "https"):
                raise NotPermitted(f"{previous}: the source redirected to {url}, which is "
                                   "not an http(s) URL")
            self.check_hop(url, previous)
        raise SourceUnavailable(f"{url}: more than {MAX_REDIRECTS} redirects")

    def done(self, origin: Origin, conn: http.client.HTTPConnection,
             resp: http.client.HTTPResponse) -> None:
        """Give back a connection whose answer was read (or drain what is left)."""
        self._finish(origin, conn, resp)

    def abandon(self, origin: Origin, conn: http.client.HTTPConnection) -> None:
        """Close a connection whose answer was not read (a bad answer, an error)."""
        self._release(origin, conn, keep=False)

    def raise_for_status(self, url: str, resp: http.client.HTTPResponse) -> None:
        if resp.status >= 400:
            raise HttpStatusError(url, resp.status, resp.reason or "",
                                  parse_retry_after(resp.getheader("Retry-After")),
                                  _headers(resp))

    def read_into(self, url: str, into: memoryview, *, start: int, check: AnswerCheck,
                  cancel: threading.Event | None = None,
                  headers: Mapping[str, str] | None = None) -> None:
        """Fill ``into`` with bytes ``[start, start + len(into))`` of ``url`` (blocking).

        Raises:
            HttpStatusError: a status of 400 or more.
            OSError: the connection failed, or the body ended short (transient).
            Cancelled: ``cancel`` was set meanwhile.
            whatever ``check`` raises for an answer that is not the range asked for.
        """
        end = start + len(into)
        hdrs = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity",
                **(headers or {})}
        origin, conn, resp, final = self.open("GET", url, hdrs)
        complete = False
        try:
            self.raise_for_status(final, resp)
            check(final, resp.status, _headers(resp))
            pos = 0
            while pos < len(into):
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"{url}: bytes {start}-{end - 1} cancelled")
                n = resp.readinto(into[pos:pos + _SLICE])
                if not n:
                    raise ShortBody(f"{url}: asked for bytes {start}-{end - 1}, the body "
                                    f"ended after {pos} bytes")
                pos += n
            complete = resp.isclosed() or resp.length == 0
        except http.client.IncompleteRead as e:
            raise ShortBody(f"{url}: asked for bytes {start}-{end - 1}, the body ended "
                            f"after {len(e.partial)} more bytes") from e
        finally:
            if complete:
                self._release(origin, conn, keep=not resp.will_close)
            else:
                self.abandon(origin, conn)

    def headers_of(self, method: str, url: str, headers: Mapping[str, str] | None = None
                   ) -> tuple[dict[str, str], str]:
        """The headers of the answer to a ``HEAD`` or a ``GET`` of ``url`` (names
        lower-cased) and the URL that gave it, redirects followed (blocking). A ``HEAD``'s
        connection is kept; a ``GET``'s body is not read, and its connection is closed.

        Raises:
            HttpStatusError: a status of 400 or more.
        """
        origin, conn, resp, final = self.open(method, url, {"Accept-Encoding": "identity",
                                                            **(headers or {})})
        try:
            self.raise_for_status(final, resp)
            return _headers(resp), final
        finally:
            if method == "HEAD":
                self.done(origin, conn, resp)  # (an answer to a HEAD has no body)
            else:
                self.abandon(origin, conn)

    def get(self, url: str, *, limit: int, headers: Mapping[str, str] | None = None
            ) -> tuple[bytes, Mapping[str, str], str]:
        """The whole body of a small answer (at most ``limit`` + 1 bytes are read), its
        headers and the URL that gave it (blocking).

        Raises:
            HttpStatusError: a status of 400 or more.
        """
        origin, conn, resp, final = self.open("GET", url, {"Accept-Encoding": "identity",
                                                           **(headers or {})})
        complete = False
        try:
            self.raise_for_status(final, resp)
            body = resp.read(limit + 1)
            complete = resp.isclosed()
            return body, _headers(resp), final
        finally:
            if complete:
                self._release(origin, conn, keep=not resp.will_close)
            else:
                self.abandon(origin, conn)


class ShortBody(OSError):
    """A body that ended before the bytes it announced (transient)."""


def _headers(resp: http.client.HTTPResponse) -> dict[str, str]:
    """The answer's headers, names lower-cased (a repeated header: its last value)."""
    return {k.lower(): v for k, v in resp.getheaders()}


def content_encoding(headers: Mapping[str, Any]) -> str | None:
    """The ``Content-Encoding`` of an answer when it is not ``identity`` (what weightd
    asks for: an encoded body is not the file's bytes), else None."""
    enc = str(headers.get("content-encoding", "identity")).strip().lower()
    return None if enc in ("", "identity") else enc
