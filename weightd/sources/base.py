"""Resolving references to files, stat, and ranged reads through fsspec."""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import hashlib
import logging
import os
import posixpath
import re
import socket
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import fsspec
from fsspec.asyn import AsyncFileSystem

from weightd.config import Config
from weightd.errors import (
    FormatError,
    IntegrityError,
    NotPermitted,
    SourceNotFound,
    SourceUnavailable,
    WeightdError,
)
from weightd.formats import MAX_INDEX_BYTES, parse_index_json
from weightd.retry import RetryPolicy
from weightd.sources.digests import OriginDigest, parse_origin_digest

log = logging.getLogger(__name__)

MiB = 1024 * 1024

#: What a read hands the writer: the bytes as they arrived, or a view of the fetch's
#: buffer that the read filled.
Buffer = bytes | bytearray | memoryview

#: Side files a framework needs next to the shards (config, tokenizer, pooling...).
DEFAULT_INCLUDE: tuple[str, ...] = (
    "*.safetensors",
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "tokenizer*",
)

#: Told of a model's first shard as soon as its own stat is in, while a listing still
#: waits for the other files' (see :meth:`Source.list_files`): the file, and whether
#: other shards follow it. It returns an event set once the shard's read has begun (its
#: first tensor written, or the read ended), which the other files' stats wait for
#: (:data:`LEAD_HOLD` at most), or None (the shard is not read now): they go at once.
FirstShard = Callable[["RemoteFile", bool], "threading.Event | None"]
#: Seconds the first shard's ``info`` call (a ``HEAD``) is made alone before the other
#: files' (see :meth:`Source._remotes`): over loopback it is answered in 1.5-4 ms; where a
#: round trip is longer, the others wait no more than this.
FIRST_HEAD_START = 0.005
#: Seconds at most the other files' ``info`` calls wait for the first shard's read to
#: begin (see :data:`FirstShard`): at 200 MB/s, over loopback, its first tensor is in
#: 20-30 ms after its read starts; a slower link holds the listing no longer than this.
LEAD_HOLD = 0.05

_PROTOCOL_ALIASES = {"https": "http", "local": "file", "gcs": "gs", "s3a": "s3"}


@dataclass(frozen=True)
class ChunkPlan:
    """How one protocol is read: bytes per ranged read, and reads in flight per file
    fetched at once (a model's reads share ``concurrency × max_parallel_files``).

    ``ramp``: the ranges at the start and at the end of a model's bytes are smaller than
    ``chunk_size`` (see weightd/store/fetch.py, ``_Schedule``), so that its first tensor
    lands in about one chunk's time and its last is not behind a burst of whole chunks;
    off where each read costs the server a whole object (moto's S3) or there is no
    network (``file://``)."""

    chunk_size: int
    concurrency: int
    ramp: bool = False


#: Chosen by measurement where loopback can tell (``python bench/fetch.py --sweep``; the
#: tables and the reasons are in docs/fetch-tuning.md). Peak memory of a fetch is about
#: ``(concurrency + 2) * chunk_size * max_parallel_files``.
_DEFAULT_PLANS: dict[str, ChunkPlan] = {
    "file": ChunkPlan(chunk_size=16 * MiB, concurrency=4),
    # loopback cannot rank these (flat within noise); 8 connections per file for origins
    # that give each connection a share (CDNs), 8 MiB chunks so that fewer buffers are
    # faulted per fetch and a chunk lands sooner (docs/fetch-tuning.md)
    "http": ChunkPlan(chunk_size=8 * MiB, concurrency=8, ramp=True),
    "hf": ChunkPlan(chunk_size=8 * MiB, concurrency=8, ramp=True),
    # AWS: 8-16 MB byte-range GETs, one connection per ~85-90 MB/s wanted; moto cannot
    # rank them (it reads the whole object for every range)
    "s3": ChunkPlan(chunk_size=16 * MiB, concurrency=8),
    "gs": ChunkPlan(chunk_size=16 * MiB, concurrency=8),
}


def chunk_plan(protocol: str, config: Config) -> ChunkPlan:
    """The chunk size and concurrency for a protocol, config overrides applied."""
    base = _DEFAULT_PLANS.get(_PROTOCOL_ALIASES.get(protocol, protocol), ChunkPlan(16 * MiB, 8))
    return ChunkPlan(
        chunk_size=config.chunk_size or base.chunk_size,
        concurrency=config.concurrency or base.concurrency,
        ramp=base.ramp,
    )


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model at its source, as one stat saw it.

    Attributes:
        url: the full URL with protocol (``s3://bucket/key``); the cache's key.
        path: the path the filesystem object takes.
        relpath: POSIX path relative to the model's root (where it goes in the snapshot).
        size: bytes.
        identity: changes whenever the content may have changed (ETag, version, mtime).
        origin_digest: the file's digest as the listing states it, ``algorithm:hex``
            (Hugging Face's LFS sha256), or empty (see weightd/sources/digests.py).
    """

    url: str
    path: str
    relpath: str
    size: int
    identity: str
    origin_digest: str = ""


def canonical_url(ref: str) -> str:
    """Normalize a model reference to a URL with an explicit protocol.

    Plain paths and ``file://`` URLs become ``file://`` + the real absolute path (links
    and ``..`` resolved), so that ``allowed_sources`` cannot be bypassed.

    Example
    -------
    >>> canonical_url("s3://bucket/models/m/")
    's3://bucket/models/m'
    """
    if not ref or not ref.strip():
        raise SourceNotFound("empty model reference")
    ref = ref.strip()
    if "://" not in ref:
        return "file://" + os.path.realpath(os.path.expanduser(ref))
    scheme, rest = ref.split("://", 1)
    scheme = scheme.lower()
    if scheme in ("file", "local"):
        return "file://" + os.path.realpath("/" + rest.lstrip("/"))
    if scheme in ("http", "https"):
        host, _, path = rest.partition("/")
        segments = [unquote(p) for p in path.split("/")]
        if any(p in (".", "..") or "/" in p or "\\" in p for p in segments):
            raise NotPermitted(f"{ref}: '.' and '..' segments (also percent-encoded) are not "
                               "allowed in a model reference")
        return f"{scheme}://{host}/{path}".rstrip("/")
    # object stores: collapse duplicate slashes, refuse traversal segments
    parts = [p for p in rest.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise NotPermitted(f"{ref}: '.' and '..' are not allowed in a model reference")
    return source_class(scheme).canonical(f"{scheme}://" + "/".join(parts))


def check_allowed(url: str, allowed: Sequence[str]) -> None:
    """Refuse a canonical URL outside every ``allowed_sources`` prefix (empty: allow all).

    A prefix matches whole path segments: ``s3://models`` allows ``s3://models/x`` but
    not ``s3://models-private/x``.
    """
    if not allowed:
        return
    forms = source_class(url.split("://", 1)[0]).allowed_forms(url) if "://" in url else (url,)
    for prefix in allowed:
        p = canonical_url(prefix)
        if any(u == p or u.startswith(p.rstrip("/") + "/") for u in forms):
            return
    raise NotPermitted(f"{url}: not under any of allowed_sources ({', '.join(allowed)})")


def check_not_cache(url: str, cache_dir: str | os.PathLike[str]) -> None:
    """Refuse a local source that is the daemon's own cache, inside it or above it (a
    recursive listing of a parent directory would fetch the cache's blobs as a model).

    Raises:
        NotPermitted: naming the source and the cache.
    """
    if not url.startswith("file://"):
        return
    path, cache = url[len("file://"):], os.path.realpath(cache_dir)
    common = os.path.commonpath([path, cache])
    if common in (path, cache):
        where = ("is" if path == cache else "is inside" if common == cache else "contains")
        raise NotPermitted(f"{url}: {where} the weightd cache ({cache}), which is never a "
                           "model source")


_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")


#: Hex digits of sha256(canonical URL) that end every model name (64 bits).
MODEL_DIGEST_CHARS = 16
_MODEL_READABLE_CHARS = 140


def model_name(url: str) -> str:
    """A flat, filesystem-safe name for a model's snapshot directory, one per source.

    The readable part flattens the URL (``s3://bucket/org/model`` → ``s3--bucket--org--
    model``, characters outside ``[A-Za-z0-9._-]`` become ``_``, long names keep their
    tail); that alone is not injective (``org/llama`` and ``org--llama``, ``llama 7b`` and
    ``llama_7b`` flatten alike), so the name ends with 16 hex digits of the canonical
    URL's sha256: two sources never share a name.

    Example
    -------
    >>> model_name("s3://bucket/org/model")
    's3--bucket--org--model--b488b85f60f70d91'
    """
    scheme, rest = url.split("://", 1)
    parts = [_NAME_BAD.sub("_", p) for p in rest.split("/") if p]
    readable = "--".join([_PROTOCOL_ALIASES.get(scheme, scheme), *parts])
    if len(readable) > _MODEL_READABLE_CHARS:
        readable = readable[-_MODEL_READABLE_CHARS:].lstrip("-")
    return f"{readable}--{hashlib.sha256(url.encode()).hexdigest()[:MODEL_DIGEST_CHARS]}"


def _legacy_model_name(url: str) -> str:
    """The model name before names were injective (weightd 0.1): kept to build and test
    the migration of a cache made by it (Store renames such models on open)."""
    scheme, rest = url.split("://", 1)
    parts = [_NAME_BAD.sub("_", p) for p in rest.split("/") if p]
    name = "--".join([_PROTOCOL_ALIASES.get(scheme, scheme), *parts])
    if len(name) > 160:
        digest = hashlib.sha256(url.encode()).hexdigest()[:12]
        name = name[-140:].lstrip("-") + "--" + digest
    return name


def is_transient(e: BaseException) -> bool:
    """Whether a read error is worth retrying (connection trouble, 5xx, 429, short read)."""
    if isinstance(e, SourceNotFound | NotPermitted | IntegrityError | FileNotFoundError
                  | PermissionError):
        return False
    status = getattr(e, "status", None) or getattr(e, "code", None)
    if isinstance(status, int):
        return status in (408, 429, 500, 502, 503, 504)
    try:
        import aiohttp

        if isinstance(e, aiohttp.ClientError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(e, ConnectionError | TimeoutError | asyncio.TimeoutError | OSError
                      | _ShortRead)


class _ShortRead(OSError):
    """A ranged read returned fewer bytes than asked for."""


class _BadRange(_ShortRead):
    """A ranged read was answered with other bytes than those asked for (a Content-Range
    that does not match, or a 200 with the whole file to a ranged request): transient,
    and never written."""


class RedirectRefused(Exception):
    """A request (a redirect's hop) that would leave ``allowed_sources``, refused before
    it was made. Deliberately not an ``OSError``: aiohttp and fsspec would turn one into a
    connection error (retried) or into "not found"; :meth:`Source.error` finds it again
    in the chain and raises :attr:`error`."""

    def __init__(self, error: NotPermitted) -> None:
        super().__init__(str(error))
        self.error = error


def _causes(e: BaseException) -> list[BaseException]:
    """``e`` and what it was raised from, outermost first (fsspec wraps the real cause:
    a refused connection reaches us as ``FileNotFoundError`` from aiohttp's error)."""
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in out and len(out) < 16:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _connection_problem(e: BaseException) -> str | None:
    """"cannot connect to host:port: connection refused", "cannot resolve host h: ...",
    or None when no connection failure is behind ``e``."""
    for c in _causes(e):
        host, port = getattr(c, "host", None), getattr(c, "port", None)
        err = getattr(c, "os_error", None)
        if host is None or not isinstance(err, OSError):  # aiohttp's connector errors
            continue
        if isinstance(err, socket.gaierror):
            return f"cannot resolve host {host}: {err.strerror or err}"
        if isinstance(err, ConnectionRefusedError):
            return f"cannot connect to {host}:{port}: connection refused"
        if isinstance(err, TimeoutError):
            return f"cannot connect to {host}:{port}: timed out"
        return f"cannot connect to {host}:{port}: {(err.strerror or str(err)).lower()}"
    for c in _causes(e):
        if isinstance(c, socket.gaierror):
            return f"cannot resolve the source's host: {c.strerror or c}"
        if isinstance(c, ConnectionRefusedError):
            return "cannot connect to the source: connection refused"
    return None


def _no_credentials(e: BaseException) -> bool:
    try:
        from botocore.exceptions import NoCredentialsError
    except ImportError:  # pragma: no cover - s3fs brings botocore
        return False
    return any(isinstance(c, NoCredentialsError) for c in _causes(e))


#: How to give S3 credentials, for the message that says none were found.
S3_CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE for a profile in "
    "~/.aws/config, or run with an instance or pod role; for an S3-compatible store also "
    "set s3_endpoint_url (WEIGHTD_S3_ENDPOINT_URL, or AWS_ENDPOINT_URL)"
)


def translate_error(e: BaseException, what: str) -> WeightdError:
    """Map an fsspec/backend error to weightd's outcomes, with a message that names the
    cause (a refused connection, a host that does not resolve, missing S3 credentials)."""
    if isinstance(e, WeightdError):
        return e
    if _no_credentials(e):
        return NotPermitted(f"{what}: no S3 credentials found: {S3_CREDENTIALS_HINT}")
    problem = _connection_problem(e)
    if problem is not None:
        return SourceUnavailable(f"{what}: {problem}")
    if isinstance(e, FileNotFoundError):
        return SourceNotFound(f"{what}: not found at the source")
    if isinstance(e, PermissionError):
        return NotPermitted(f"{what}: the source refused access ({e})")
    status = getattr(e, "status", None)
    if status == 404:
        return SourceNotFound(f"{what}: not found at the source (HTTP 404)")
    if status in (401, 403):
        return NotPermitted(f"{what}: the source refused access (HTTP {status})")
    return SourceUnavailable(f"{what}: {type(e).__name__}: {e}")


def _identity(info: dict[str, Any]) -> str:
    for key in ("VersionId", "ETag", "etag", "generation", "md5Hash", "Last-Modified",
                "LastModified", "mtime", "last_commit"):
        value = info.get(key)
        if value:
            extra = f":{info.get('ino', '')}" if key == "mtime" else ""
            return f"{key}={str(value).strip(chr(34))}{extra}"
    return "size-only"


def _matches(relpath: str, patterns: Sequence[str]) -> bool:
    base = posixpath.basename(relpath)
    return any(fnmatch.fnmatchcase(relpath, p) or fnmatch.fnmatchcase(base, p) for p in patterns)


def _safe_relpath(rel: str, url: str) -> str:
    """Refuse a name from a source that could leave the model root, as written or once
    percent-decoded (an HTTP listing can link ``%2e%2e/secret``)."""
    for name in (rel, unquote(rel)):
        if (not name or name.startswith("/") or "\\" in name or "\x00" in name
                or any(p in ("", ".", "..") for p in name.split("/"))):
            raise NotPermitted(f"{url}: the source names a file {rel!r} that leaves the "
                               "model root")
    return rel


class FileReader:
    """One file of a source, opened for a download: :meth:`read` its chunks, then ask
    :meth:`identity` whether it changed meanwhile. :attr:`digest` is the file's digest as
    the origin states it (None when it gives none), checked by the fetch.

    Use it as a context manager (:meth:`Source.open_file`); subclasses hold what must
    stay open (a local file's descriptor).

    Attributes:
        fills_buffer: whether :meth:`read` fills the buffer it is given (then the fetch
            hands it one per chunk, reused once the chunk is written); otherwise it
            returns the blocks as they arrived.
        policy: how its chunks are retried, when not as the fetch's (``retry_*``
            settings) say: a mirror's reads fail fast, since the origin is behind them.
    """

    fills_buffer = False
    policy: RetryPolicy | None = None

    def __init__(self, source: Source, rf: RemoteFile, digest: OriginDigest | None) -> None:
        self.source = source
        self.rf = rf
        self.digest = digest

    async def read(self, start: int, end: int,
                   into: memoryview | None = None) -> Sequence[Buffer]:
        """Bytes ``[start, end)``: ``[into]`` filled when :attr:`fills_buffer` (``into``
        is then ``end - start`` bytes long), else the blocks they arrived in (see
        :meth:`Source.read_blocks`)."""
        return await self.source.read_blocks(self.rf.path, start, end, size=self.rf.size)

    def identity(self) -> str:
        """The file's identity now (compared with the listing's after a download)."""
        return self.source.stat(self.rf).identity

    def close(self) -> None:
        """Release what the reader holds."""

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Source classes by protocol (after aliases), filled by the modules that define them
#: (weightd/sources/__init__.py imports them all); others get :class:`Source`.
SOURCE_CLASSES: dict[str, type[Source]] = {}


def source_class(protocol: str) -> type[Source]:
    """The class that reads ``protocol`` (``https`` is ``http``, ``s3a`` is ``s3``...)."""
    return SOURCE_CLASSES.get(_PROTOCOL_ALIASES.get(protocol, protocol), Source)


class Source:
    """One model reference opened on its filesystem.

    Build it with :func:`open_source`; then :meth:`list_files` and :meth:`open_file`.
    Protocols with more to check than fsspec does subclass it (``local``, ``http``,
    ``s3``, ``hf`` modules); the hooks are :meth:`storage_options`, :meth:`_file_info`,
    :meth:`_check_link`, :meth:`_find`, :meth:`_read_range`, :meth:`_read_small` and
    :meth:`open_file`.
    """

    def __init__(self, url: str, fs: Any, path: str, config: Config):
        #: the fsspec filesystem (None for a source that speaks its protocol itself: hf)
        self.url = url
        self.fs = fs
        self.path = path
        self.config = config
        self.protocol = url.split("://", 1)[0]
        self.plan = chunk_plan(self.protocol, config)

    @classmethod
    def storage_options(cls, protocol: str, config: Config) -> dict[str, Any]:
        """Keyword arguments for the fsspec filesystem of this protocol."""
        return {}

    @classmethod
    def url_options(cls, url: str, config: Config) -> dict[str, Any]:
        """More keyword arguments for the filesystem, that depend on the URL (a proxy)."""
        return {}

    @classmethod
    def canonical(cls, url: str) -> str:
        """The one spelling of a reference of this protocol (``hf://org/m@main`` is
        ``hf://org/m``); ``url`` has its protocol and no traversal segments."""
        return url

    @classmethod
    def allowed_forms(cls, url: str) -> tuple[str, ...]:
        """The forms of a canonical URL that ``allowed_sources`` prefixes are matched
        against (an ``hf://`` reference also without its revision)."""
        return (url,)

    @classmethod
    def filesystem(cls, url: str, config: Config) -> tuple[Any, str]:
        """The filesystem object and the path it takes for a canonical URL.

        Raises:
            SourceNotFound: the protocol is unknown or its package is not installed.
        """
        protocol = url.split("://", 1)[0]
        try:
            fs, path = fsspec.core.url_to_fs(url, **cls.storage_options(protocol, config),
                                             **cls.url_options(url, config))
        except ImportError as e:
            extra = _EXTRAS.get(_PROTOCOL_ALIASES.get(protocol, protocol))
            hint = f": pip install '{extra}'" if extra else f": {e}"
            raise SourceNotFound(f"{url}: the {protocol} protocol is not installed{hint}") from e
        except ValueError as e:
            raise SourceNotFound(f"{url}: unknown protocol {protocol!r} "
                                 f"({protocols_text()})") from e
        return fs, path

    def close(self) -> None:
        """Release what the source holds (connections, threads); it reads no more."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_async(self) -> bool:
        return isinstance(self.fs, AsyncFileSystem) and getattr(self.fs, "async_impl", False)

    def _url_of(self, path: str) -> str:
        if self.protocol in ("http", "https"):
            return path
        return f"{self.protocol}://{path.lstrip('/') if self.protocol != 'file' else path}"

    def error(self, e: BaseException, what: str) -> WeightdError:
        """:func:`translate_error`, except that a refused redirect anywhere in the chain
        of causes is the :class:`NotPermitted` it carries (naming ``what``)."""
        seen: BaseException | None = e
        for _ in range(32):  # a chain of causes is short; bounded all the same
            if seen is None:
                break
            if isinstance(seen, RedirectRefused):
                return NotPermitted(f"{what}: {seen.error}")
            seen = seen.__cause__ or seen.__context__
        return translate_error(e, what)

    def _info(self, path: str) -> dict[str, Any]:
        try:
            return dict(self.fs.info(path))
        except Exception as e:
            raise self.error(e, self._url_of(path)) from e

    def _file_info(self, path: str, info: dict[str, Any]) -> dict[str, Any]:
        """What a file's size and identity come from: the listing's ``info``, or one
        ``info`` call when the listing gave no size."""
        return info if info.get("size") is not None else self._info(path)

    def _origin_digest(self, info: dict[str, Any]) -> str:
        """The file's digest as the origin states it in a listing, as
        ``algorithm:hex`` (see weightd/sources/digests.py); empty when there is none."""
        return ""

    def _remote(self, path: str, relpath: str, info: dict[str, Any]) -> RemoteFile:
        relpath = _safe_relpath(relpath, self.url)  # before anything is asked of the source
        info = self._file_info(path, info)
        size = info.get("size")
        if size is None:
            raise SourceUnavailable(f"{self._url_of(path)}: the source does not say its size")
        return RemoteFile(url=self._url_of(path), path=path, relpath=relpath, size=int(size),
                          identity=f"{int(size)}:{_identity(info)}",
                          origin_digest=self._origin_digest(info))

    def _stat_pool(self) -> concurrent.futures.Executor | None:
        """The threads a listing's ``info`` calls run on side by side (see
        :meth:`_remotes`), or None: one after another."""
        return None

    def _remotes(self, files: Sequence[tuple[str, str, dict[str, Any]]],
                 first: FirstShard | None = None) -> list[RemoteFile]:
        """:meth:`_remote` of each (path, relpath, listing info), every relpath checked
        first; the ``info`` calls of a listing that gives no sizes (an HTTP index page:
        one HEAD per file) are made side by side on :meth:`_stat_pool`'s threads: in
        sequence, 18 of them took 32-58 ms of a model's start on loopback, ahead of its
        first byte. The first file in order that fails raises, as in sequence, and the
        calls not started yet are not made.

        ``first``: told of the first shard (by relpath) once its own call is answered.
        Its call is made first, with a head start of :data:`FIRST_HEAD_START` on the
        others: side by side, 18 of them took 14-35 ms here, and a model's first bytes
        waited for the slowest; with its call among them it was answered after most of
        them (a 2-core machine answers them about one by one), alone in 1.5-4 ms. The
        head start bounds what the others wait where an answer takes a long round trip.
        Answered within it, the first shard is told before the others are asked: asked
        first, their threads and requests put its read 4.5-9 ms later. Where ``first``
        returns an event (a streaming replica's fetch), they are then asked once its read
        has begun (its first tensor written, :data:`LEAD_HOLD` at most): asked while its
        header and first tensor were read, they shared this machine's 2 cores with them,
        and the first tensor at 200 MB/s came 7-11 ms later.
        Only where calls are made side by side: a listing that gives sizes has no wait
        to spare, and ``first`` is not told."""
        for _, rel, _ in files:
            _safe_relpath(rel, self.url)
        pool = self._stat_pool()
        if pool is None or sum(info.get("size") is None for _, _, info in files) < 2:
            return [self._remote(*f) for f in files]
        shards = sorted((rel, i) for i, (_, rel, _) in enumerate(files)
                        if rel.endswith(".safetensors"))
        futures: dict[int, concurrent.futures.Future[RemoteFile]] = {}
        try:
            lead = shards[0][1] if first is not None and shards else None
            told = False
            if first is not None and lead is not None:
                futures[lead] = pool.submit(self._remote, *files[lead])
                concurrent.futures.wait([futures[lead]], timeout=FIRST_HEAD_START)
                if futures[lead].done() and futures[lead].exception() is None:
                    begun = first(futures[lead].result(), len(shards) > 1)
                    told = True
                    if begun is not None:
                        begun.wait(LEAD_HOLD)
            for i, f in enumerate(files):
                if i not in futures:
                    futures[i] = pool.submit(self._remote, *f)
            if (first is not None and lead is not None and not told
                    and futures[lead].exception() is None):
                first(futures[lead].result(), len(shards) > 1)
            return [futures[i].result() for i in range(len(files))]
        finally:
            for fut in futures.values():
                fut.cancel()
            concurrent.futures.wait(futures.values())

    def stat(self, rf: RemoteFile) -> RemoteFile:
        """Stat one file again (to see whether it changed during a download): one
        ``info`` call, or one ``os.stat`` for a local file."""
        return self._remote(rf.path, rf.relpath, {})

    def list_files(
        self,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        *,
        first: FirstShard | None = None,
    ) -> list[RemoteFile]:
        """The model's files with size and identity, sorted by relative path.

        A single ``.safetensors`` file is the model; an ``*.index.json`` brings itself,
        every shard its weight map names and the side files beside it; a directory brings
        every file under it that matches ``include`` (default :data:`DEFAULT_INCLUDE`) and
        no ``exclude`` glob. Globs match the relative path or the file name.

        ``first``: told of the first shard while the listing goes on, where it asks each
        file's size one by one (see :meth:`_remotes`); the listing may still fail after
        it, and the caller then drops whatever it began.

        Raises:
            FormatError: one listed file lies "under" another (``x.json`` and
                ``x.json/y.json``), or the index json is malformed or too large.
            NotPermitted, SourceNotFound, SourceUnavailable.
        """
        include = tuple(include) if include else DEFAULT_INCLUDE
        path = self.path.rstrip("/")
        lower = path.lower()
        if lower.endswith(".safetensors"):
            self._check_link(path)
            info = self._info(path)
            if info.get("type") == "directory":
                raise SourceNotFound(f"{self.url}: is a directory, not a .safetensors file")
            return [self._remote(path, posixpath.basename(path), info)]
        if lower.endswith(".index.json"):
            out = self._list_index(path, include, exclude, first)
        else:
            files = self._find(path)
            if not files:
                self._info(path)  # find() swallows errors: say why, when it was not emptiness
                raise SourceNotFound(f"{self.url}: no files at the source")
            out = self._remotes([(p, rel, info) for p, rel, info in files
                                 if _matches(rel, include) and not _matches(rel, exclude)],
                                first)
            if not any(f.relpath.endswith(".safetensors") for f in out):
                raise SourceNotFound(f"{self.url}: no .safetensors files (after include/exclude)")
        check_relpaths(self.url, [f.relpath for f in out])
        return sorted(out, key=lambda f: f.relpath)

    def _find(self, root: str) -> list[tuple[str, str, dict[str, Any]]]:
        """Every file under ``root``: (path, relpath, listing info)."""
        try:
            found = self.fs.find(root, detail=True, withdirs=False)
        except Exception as e:
            raise self.error(e, self.url) from e
        prefix = root.rstrip("/") + "/"
        out = []
        for p, info in sorted(found.items()):
            if info.get("type") == "directory":
                continue
            if not p.startswith(prefix):
                # listings can link outside the directory; never follow them
                continue
            out.append((p, p[len(prefix):], dict(info)))
        return out

    def _check_link(self, path: str) -> None:
        """Refuse a file the model reaches through a link out of ``allowed_sources``
        (local files only; every file of the model is checked as it is listed)."""

    def _read_small(self, path: str, limit: int) -> bytes:
        """A small file (an index json) read whole, but never more than ``limit`` + 1
        bytes of it, whatever the source says its size is."""
        try:
            with self.fs.open(path, "rb") as f:
                return bytes(f.read(limit + 1))
        except Exception as e:
            raise self.error(e, self._url_of(path)) from e

    def _list_index(self, path: str, include: Sequence[str], exclude: Sequence[str],
                    first: FirstShard | None = None) -> list[RemoteFile]:
        self._check_link(path)
        raw = self._read_small(path, MAX_INDEX_BYTES)
        if len(raw) > MAX_INDEX_BYTES:
            raise FormatError(self._url_of(path), f"index file is larger than the limit of "
                                                  f"{MAX_INDEX_BYTES} bytes")
        index = parse_index_json(raw, path=self._url_of(path))
        parent = posixpath.dirname(path)
        wanted = set(index.shards)
        found = {rel: (p, info) for p, rel, info in self._find(parent)}
        missing = sorted(wanted - set(found))
        if missing:
            raise SourceNotFound(f"{self._url_of(path)}: shards named in the index are missing at "
                                 f"the source: {', '.join(missing[:5])}")
        return self._remotes([(p, rel, info) for rel, (p, info) in found.items()
                              if rel in wanted or p == path or (
                                  not rel.endswith(".safetensors") and _matches(rel, include)
                                  and not _matches(rel, exclude))], first)

    def open_file(self, rf: RemoteFile) -> FileReader:
        """Open one listed file for a download (use it as a context manager)."""
        return FileReader(self, rf, parse_origin_digest(rf.origin_digest, rf.url, rf.size))

    async def read_blocks(self, path: str, start: int, end: int, *,
                          size: int | None = None) -> Sequence[Buffer]:
        """Bytes ``[start, end)`` of a file (of ``size`` bytes, when known) as the buffers
        they arrived in.

        For S3 the response body is taken block by block from aiohttp (as the socket
        delivered it) instead of joined into one ``bytes``: the join is a copy of every
        byte into freshly faulted memory, as costly as the ``recv`` itself (see
        docs/fetch-tuning.md); HTTP reads into one buffer (weightd/sources/wire.py).
        Other filesystems give one block. A short read, or an answer for another range
        than the one asked for, raises a transient error.
        """
        try:
            blocks = await self._read_range(path, start, end, size)
        except RedirectRefused as e:
            raise NotPermitted(f"{self._url_of(path)}: {e.error}") from e
        got = sum(len(b) for b in blocks)
        if got != end - start:
            raise _ShortRead(f"{self._url_of(path)}: asked for bytes {start}-{end}, "
                             f"got {got} bytes")
        return blocks

    async def _read_range(self, path: str, start: int, end: int,
                          size: int | None) -> Sequence[Buffer]:
        if self.is_async:
            return [await self.fs._cat_file(path, start=start, end=end)]
        return [await asyncio.to_thread(self.fs.cat_file, path, start, end)]


def check_relpaths(url: str, relpaths: Collection[str]) -> None:
    """Refuse a listing in which one file is a directory of another (``x.json`` and
    ``x.json/y.json``: an object store holds both, a snapshot directory cannot).

    Raises:
        FormatError: naming ``url`` and both files.
    """
    names = set(relpaths)
    for rel in sorted(names):
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in names:
                raise FormatError(url, f"the source has both a file {'/'.join(parts[:i])!r} "
                                       f"and a file {rel!r} under it: a snapshot cannot hold "
                                       "both")


def open_source(ref: str, config: Config) -> Source:
    """Open a model reference, after checking it against ``config.allowed_sources``.

    Raises:
        NotPermitted: the reference is outside ``allowed_sources``, or is (in, or
            above) the cache.
        SourceNotFound: unknown protocol, or nothing there.
    """
    url = canonical_url(ref)
    check_allowed(url, config.allowed_sources)
    check_not_cache(url, config.cache_dir)
    cls = source_class(url.split("://", 1)[0])
    fs, path = cls.filesystem(url, config)
    return cls(url, fs, path, config)


#: The protocols weightd is made for: the package behind each, and the extra with it.
_BACKENDS = {"s3": "s3fs", "http": "aiohttp", "https": "aiohttp", "file": None,
             "hf": None, "gs": "gcsfs"}
_EXTRAS = {"gs": "weightd[gcs]"}


def protocols_text() -> str:
    """The protocols this installation reads, and how to add the others."""
    import importlib.util

    have: list[str] = []
    lack: list[str] = []
    for protocol, package in _BACKENDS.items():
        ok = package is None or importlib.util.find_spec(package) is not None
        (have if ok else lack).append(protocol)
    text = "available: " + ", ".join(p if p != "file" else "file (or a plain path)"
                                     for p in have)
    if lack:
        text += "; " + ", ".join(f"{p} with pip install '{_EXTRAS.get(p, _BACKENDS[p])}'"
                                 for p in lack)
    return text
