"""HTTP(S) sources: every hop checked before it is requested, every range answer checked.

fsspec's HTTP filesystem lists directories; a file's ``HEAD`` and the bytes of a download
come through weightd's own wire (weightd/sources/wire.py: keep-alive connections, each
body read straight into the fetch's buffer on a thread of the source's pool; the
connections opened for a listing's ``HEAD`` requests are the ones its reads take next). Here:

- every request's URL, the first and every redirect's hop, is checked against
  ``allowed_sources`` before it is sent: by a client middleware on fsspec's aiohttp
  session for listings (aiohttp calls session middlewares once per hop), and by the same
  check in the wire's redirect loop for ``HEAD`` and the bytes; a hop outside is
  refused (:class:`~weightd.sources.base.RedirectRefused`, then ``NotPermitted``), so a
  302 to another host is never followed; at most 10 hops;
- directories are walked here, breadth first and bounded, and a link's name (as written
  and percent-decoded) is checked before it is listed or stat'ed: a link that climbs out
  of the model root refuses the model, and is never requested;
- a ranged ``GET`` must be answered with a 206 whose ``Content-Range`` is the range asked
  for (and the file's size), or with a 200 only when the whole file was asked for, with
  no ``Content-Encoding`` and a complete body; anything else is a transient error of that
  chunk (retried, then ``SourceUnavailable`` naming the file), and is never written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import re
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from weightd.config import Config
from weightd.errors import NotPermitted, SourceUnavailable
from weightd.sources.base import (
    SOURCE_CLASSES,
    Buffer,
    FileReader,
    RedirectRefused,
    RemoteFile,
    Source,
    _BadRange,
    _safe_relpath,
    canonical_url,
    check_allowed,
)
from weightd.sources.digests import OriginDigest, parse_origin_digest
from weightd.sources.wire import (
    AnswerCheck,
    AuthHeaders,
    HopCheck,
    Wire,
    content_encoding,
    origin_of,
    proxy_for,
    ssl_context,
)

T = TypeVar("T")

#: The most threads one source's blocking reads run on (concurrency 256 x 64 files, which
#: the config allows, would be 16,384): reads beyond wait for one.
MAX_THREADS = 256

#: Bounds of a directory walk: directories listed, depth, files.
MAX_LISTED_DIRS = 10_000
MAX_DEPTH = 32
MAX_FILES = 100_000

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


def _refuse_outside(allowed: tuple[str, ...], target: str) -> None:
    try:
        check_allowed(canonical_url(target), allowed)
    except NotPermitted as e:
        raise RedirectRefused(NotPermitted(
            f"the source redirected to {target}, which is not under any of "
            f"allowed_sources ({', '.join(allowed)})")) from e


def redirect_guard(allowed: tuple[str, ...]) -> Any:
    """An aiohttp client middleware that refuses any request outside ``allowed``."""

    async def guard(request: Any, handler: Any) -> Any:
        _refuse_outside(allowed, str(request.url))
        return await handler(request)

    return guard


def allowed_hops(allowed: tuple[str, ...]) -> HopCheck:
    """The range reader's check of each hop: the same as :func:`redirect_guard`'s."""

    def check(target: str, previous: str | None) -> None:
        if allowed:
            _refuse_outside(allowed, target)

    return check


def range_check(what: str, start: int, end: int, size: int | None) -> AnswerCheck:
    """The check of an answer to ``Range: bytes=start-(end-1)`` of a file of ``size``
    bytes (``what`` names it in the refusal)."""

    def check(url: str, status: int, headers: Mapping[str, str]) -> None:
        encoded = content_encoding(headers)
        if encoded is not None:
            raise _BadRange(f"{what}: the server answered with Content-Encoding {encoded!r} "
                            "(asked for identity): not the bytes asked for")
        length = headers.get("content-length")
        _check_range(what, status, headers.get("content-range"),
                     int(length) if length and length.isdigit() else None, start, end, size)

    return check


class WireSource(Source):
    """A source whose bytes come through a :class:`~weightd.sources.wire.Wire`: its
    connections and the threads its blocking reads run on (both closed by
    :meth:`close`)."""

    def __init__(self, url: str, fs: Any, path: str, config: Config) -> None:
        super().__init__(url, fs, path, config)
        self.wire = Wire(check_hop=self.hop_check(), auth=self.auth_headers(),
                         max_idle=self.plan.concurrency * config.max_parallel_files,
                         proxy=proxy_for(config.http_proxy), ca_bundle=config.http_ca_bundle)
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._threads_lock = threading.Lock()

    def hop_check(self) -> HopCheck:
        """The check of every hop of every request (default: ``allowed_sources``)."""
        return allowed_hops(self.config.allowed_sources)

    def auth_headers(self) -> AuthHeaders:
        """Headers that may be sent to a URL (default: none)."""
        return lambda url: {}

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._threads_lock:
            if self._threads is None:
                self._threads = concurrent.futures.ThreadPoolExecutor(
                    min(MAX_THREADS, self.plan.concurrency * self.config.max_parallel_files + 2),
                    thread_name_prefix="weightd-wire")
            return self._threads

    def _stat_pool(self) -> concurrent.futures.Executor:
        """The ``HEAD`` requests of a listing are blocking wire calls: they run on the
        wire's threads, which its reads take next."""
        return self._pool()

    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking wire call on the source's threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool(), functools.partial(fn, *args, **kwargs))

    def download_url(self, rf: RemoteFile) -> str:
        """The URL a file's bytes are read from."""
        return rf.path

    def open_file(self, rf: RemoteFile) -> FileReader:
        return WireReader(self, rf, parse_origin_digest(rf.origin_digest, rf.url, rf.size))

    async def _read_range(self, path: str, start: int, end: int,
                          size: int | None) -> Sequence[Buffer]:
        buf = memoryview(bytearray(end - start))
        await self.blocking(self.wire.read_into, path, buf, start=start,
                            check=range_check(path, start, end, size))
        return [buf]

    def close(self) -> None:
        self.wire.close()
        with self._threads_lock:
            threads, self._threads = self._threads, None
        if threads is not None:
            threads.shutdown(wait=False, cancel_futures=True)


class WireReader(FileReader):
    """A file read through its source's wire: each chunk straight into the fetch's
    buffer; a cancelled download stops its reads between two slices of a body."""

    fills_buffer = True

    def __init__(self, source: WireSource, rf: RemoteFile, digest: OriginDigest | None) -> None:
        super().__init__(source, rf, digest)
        self.wire_source = source
        self.url = source.download_url(rf)
        self.cancelled = threading.Event()

    async def read(self, start: int, end: int,
                   into: memoryview | None = None) -> Sequence[Buffer]:
        buf = into if into is not None else memoryview(bytearray(end - start))
        await self.wire_source.blocking(
            self.wire_source.wire.read_into, self.url, buf, start=start,
            check=range_check(self.rf.url, start, end, self.rf.size),
            cancel=self.cancelled)
        return [buf]

    def close(self) -> None:
        self.cancelled.set()


class HttpSource(WireSource):
    """A model served over HTTP(S), with directory listings."""

    @classmethod
    def storage_options(cls, protocol: str, config: Config) -> dict[str, Any]:
        opts: dict[str, Any] = {"skip_instance_cache": True}
        if config.allowed_sources:
            opts["client_kwargs"] = {"middlewares": (redirect_guard(config.allowed_sources),)}
        return opts

    @classmethod
    def url_options(cls, url: str, config: Config) -> dict[str, Any]:
        """The listing's requests (aiohttp, through fsspec) go through the proxy the byte
        path takes for this origin, and trust ``http_ca_bundle`` too."""
        opts: dict[str, Any] = {}
        try:
            origin = origin_of(url)
        except ValueError:
            return opts
        proxy = proxy_for(config.http_proxy)(origin)
        if proxy is not None:
            host = f"[{proxy.host}]" if ":" in proxy.host else proxy.host
            opts["proxy"] = f"http://{host}:{proxy.port}"
            if proxy.headers:  # aiohttp sends proxy_headers only with a CONNECT
                opts["proxy_headers" if origin[0] == "https" else "headers"] = proxy.headers
        if config.http_ca_bundle is not None and origin[0] == "https":
            opts["ssl"] = ssl_context(config.http_ca_bundle)
        return opts

    def _file_info(self, path: str, info: dict[str, Any]) -> dict[str, Any]:
        """A file the listing gave no size for (an index page names files only) is asked
        for it as :meth:`_info` says."""
        return info if info.get("size") is not None else self._info(path)

    def _info(self, path: str) -> dict[str, Any]:
        """A file's ``HEAD`` on the wire's keep-alive connections, which its ranged reads
        take next: fsspec's ``info`` asked through the fetch's own aiohttp session, and
        18 of them took 20 ms of a model's start here, ahead of its first byte, whose
        reads then opened connections of their own. As fsspec's ``info`` does: a
        ``GET``'s headers when the ``HEAD`` fails or gives no size (its fields over the
        ``HEAD``'s), and the same fields (so a file's identity is what it was). A
        refusal (a hop outside ``allowed_sources``) is not asked again.

        Raises:
            SourceNotFound, NotPermitted, SourceUnavailable: as the ``GET`` (or the
                ``HEAD``) was answered.
        """
        headers: dict[str, str] = {}
        final = path
        try:
            # a server that refuses HEAD (any error status) may serve GET, asked next
            with contextlib.suppress(OSError):
                headers, final = self.wire.headers_of("HEAD", path)
            if _size_of(headers) is None:
                got, final = self.wire.headers_of("GET", path)
                headers = {**headers, **got}
        except Exception as e:
            raise self.error(e, path) from e
        out: dict[str, Any] = {"name": path, "size": _size_of(headers), "url": final,
                               "type": "file"}
        if "content-type" in headers:
            out["mimetype"] = headers["content-type"].partition(";")[0]
        if headers.get("accept-ranges") == "none":
            out["partial"] = False
        for key in ("ETag", "Content-MD5", "Digest", "Last-Modified"):
            if headers.get(key.lower()):
                out[key] = headers[key.lower()]
        return out

    def _find(self, root: str) -> list[tuple[str, str, dict[str, Any]]]:
        """The files under ``root``, by listing each directory once; each link's name is
        checked before the link is listed or stat'ed."""
        prefix = root.rstrip("/") + "/"
        todo: deque[tuple[str, int]] = deque([(root, 0)])
        queued = {prefix}
        listed = 0
        out: dict[str, dict[str, Any]] = {}
        while todo:
            directory, depth = todo.popleft()
            listed += 1
            if listed > MAX_LISTED_DIRS:
                raise SourceUnavailable(f"{self.url}: more than {MAX_LISTED_DIRS} directories")
            try:
                entries = self.fs.ls(directory, detail=True)
            except Exception as e:
                raise self.error(e, directory) from e
            for entry in entries:
                name = str(entry["name"])
                if not name.startswith(prefix):
                    continue  # listings can link outside the directory; never follow them
                rel = name[len(prefix):]
                is_dir = entry.get("type") == "directory" or rel.endswith("/")
                rel = rel.rstrip("/")
                if not rel:
                    continue
                _safe_relpath(rel, self.url)  # before anything is asked about it
                if not is_dir:
                    out.setdefault(name, dict(entry))
                elif depth + 1 > MAX_DEPTH:
                    raise SourceUnavailable(f"{self.url}: directories nested more than "
                                            f"{MAX_DEPTH} deep")
                elif name.rstrip("/") + "/" not in queued:
                    queued.add(name.rstrip("/") + "/")
                    todo.append((name.rstrip("/") + "/", depth + 1))
            if len(out) > MAX_FILES:
                raise SourceUnavailable(f"{self.url}: more than {MAX_FILES} files")
        return [(p, p[len(prefix):], info) for p, info in sorted(out.items())]


def _size_of(headers: Mapping[str, str]) -> int | None:
    """A file's size from the headers of a ``HEAD`` or ``GET`` of it, as fsspec reads it:
    ``Content-Length`` unless the body is encoded, else a ``Content-Range``'s total."""
    length = headers.get("content-length")
    if length is not None:
        ok = content_encoding(headers) is None and length.strip().isdigit()
        return int(length) if ok else None
    total = headers.get("content-range", "").rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


def _check_range(url: str, status: int, content_range: str | None, length: int | None,
                 start: int, end: int, size: int | None) -> None:
    """Refuse an answer to ``Range: bytes=start-(end-1)`` that is not those bytes."""
    asked = f"asked for bytes {start}-{end - 1}"
    if status == 206:
        m = _CONTENT_RANGE.match(content_range or "")
        if (m is None or int(m.group(1)) != start or int(m.group(2)) != end - 1
                or (size is not None and m.group(3) != "*" and int(m.group(3)) != size)):
            raise _BadRange(f"{url}: {asked} of {size if size is not None else '?'}, the "
                            f"server answered Content-Range: {content_range!r}")
        return
    if status == 200:
        if start == 0 and size is not None and end == size and length in (None, size):
            return  # the whole file was asked for, and given
        raise _BadRange(f"{url}: {asked}, the server ignored the range (HTTP 200, "
                        f"Content-Length {length}): not the Content-Range asked for")
    raise _BadRange(f"{url}: {asked}, the server answered HTTP {status}")


SOURCE_CLASSES["http"] = HttpSource
