"""HTTP(S) sources: every hop checked before it is requested, every range answer checked.

fsspec's HTTP filesystem follows redirects (aiohttp does) and walks every directory link
a listing gives. Here:

- a client middleware on the source's aiohttp session checks each request's URL, the
  first and every redirect's hop, against ``allowed_sources`` before it is sent (aiohttp
  calls session middlewares once per hop); a hop outside is refused
  (:class:`~weightd.sources.base.RedirectRefused`, then ``NotPermitted``), so a 302 to
  another host is never followed, for listings, ``HEAD`` and ranged ``GET`` alike;
  aiohttp's own limit bounds the hops (10);
- directories are walked here, breadth first and bounded, and a link's name (as written
  and percent-decoded) is checked before it is listed or stat'ed: a link that climbs out
  of the model root refuses the model, and is never requested;
- a ranged ``GET`` must be answered with a 206 whose ``Content-Range`` is the range asked
  for (and the file's size), or with a 200 only when the whole file was asked for;
  anything else is a transient error of that chunk (retried, then ``SourceUnavailable``
  naming the file), and is never written.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

from weightd.config import Config
from weightd.errors import NotPermitted, SourceUnavailable
from weightd.sources.base import (
    SOURCE_CLASSES,
    MiB,
    RedirectRefused,
    Source,
    _BadRange,
    _safe_relpath,
    canonical_url,
    check_allowed,
)

#: aiohttp's read buffer per ranged HTTP response (its default, 256 KiB, pauses and
#: resumes the socket every 512 KiB).
_READ_BUFSIZE = 4 * MiB

#: Bounds of a directory walk: directories listed, depth, files.
MAX_LISTED_DIRS = 10_000
MAX_DEPTH = 32
MAX_FILES = 100_000

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


def redirect_guard(allowed: tuple[str, ...]) -> Any:
    """An aiohttp client middleware that refuses any request outside ``allowed``."""

    async def guard(request: Any, handler: Any) -> Any:
        target = str(request.url)
        try:
            check_allowed(canonical_url(target), allowed)
        except NotPermitted as e:
            raise RedirectRefused(NotPermitted(
                f"the source redirected to {target}, which is not under any of "
                f"allowed_sources ({', '.join(allowed)})")) from e
        return await handler(request)

    return guard


class HttpSource(Source):
    """A model served over HTTP(S), with directory listings."""

    @classmethod
    def storage_options(cls, protocol: str, config: Config) -> dict[str, Any]:
        opts: dict[str, Any] = {"skip_instance_cache": True}
        if config.allowed_sources:
            opts["client_kwargs"] = {"middlewares": (redirect_guard(config.allowed_sources),)}
        return opts

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

    async def _read_range(self, path: str, start: int, end: int,
                          size: int | None) -> list[bytes]:
        """A ranged GET on fsspec's own aiohttp session (its headers, auth, encoding)."""
        fs: Any = self.fs
        if not (self.is_async and hasattr(fs, "set_session")):
            return await super()._read_range(path, start, end, size)
        kw = dict(getattr(fs, "kwargs", None) or {})
        headers = dict(kw.pop("headers", None) or {})
        headers["Range"] = f"bytes={start}-{end - 1}"
        kw.setdefault("read_bufsize", _READ_BUFSIZE)
        session = await fs.set_session()
        url = fs.encode_url(path) if hasattr(fs, "encode_url") else path
        async with session.get(url, headers=headers, **kw) as r:
            fs._raise_not_found_for_status(r, path)
            _check_range(path, r.status, r.headers.get("Content-Range"), r.content_length,
                         start, end, size)
            return [data async for data, _ in r.content.iter_chunks() if data]


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
