"""The cluster's mirror: an S3-compatible store (MinIO, Ceph RGW, a regional bucket) that
a cluster's nodes share between their caches and the origin, so that a model is pulled
from its origin once per cluster, not once per node.

Layout under the mirror's ``s3://bucket/prefix``::

    blobs/<xxh3-128>            a file's bytes, named by their digest (as in the cache)
    manifests/<sha256>.json     one per (canonical source, origin identity): the key is a
                                hash of the source's URL and of its listing's (relpath,
                                identity) pairs; it lists each file's relpath, size,
                                identity and digest
    locks/<sha256>.lock         the pull of that manifest in progress (who, since when)

A fetch that misses the node's cache has listed the origin already (a stat, no data): it
looks the manifest up and reads each file it names from ``blobs/`` through the fetch's
own download path, its xxh3 checked against the manifest (and the origin's own digest
against the bytes, where the listing gives one: ``hf://``). A file the mirror cannot give
(down, slow, 5xx, a corrupt or missing blob) costs a warning and comes from the origin.

On a miss, one node takes the manifest's lock with a conditional write (``PutObject``
with ``If-None-Match: *``), pulls from the origin, and writes back in the background:
each blob once it is verified and in the cache (the lock then lists it: the holder's
progress), the manifest once every blob is there (so a manifest never names a blob the
mirror lacks), then deletes the lock (``If-Match`` its own ETag). The others follow that
pull (bounded by ``mirror_wait``), polling the lock and the manifest with backoff and
jitter, and read each file from the mirror as soon as the lock lists its blob, while
the holder still pulls the rest; a lock that its holder stopped refreshing for
``mirror_lock_timeout`` is taken over (``PutObject`` with ``If-Match`` the stale lock's
ETag, so two nodes cannot both take it over where the store honours ``If-Match``), and
the files the mirror does not have by then come from the origin. A store without
conditional writes (a 501, or the header ignored: probed once) is said so in the log and
in Status, and then each node that misses may pull.

The mirror's client is its own: its endpoint (``mirror_endpoint_url``, never
``s3_endpoint_url`` or ``AWS_ENDPOINT_URL``), its credentials (``mirror_access_key_id`` +
``mirror_secret_access_key``, or ``mirror_profile``, else the default AWS chain), its
timeouts (``mirror_timeout``) and no retries of its own: the origin is behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import logging
import os
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec.asyn

from weightd.config import Config, format_size
from weightd.errors import NotPermitted, SourceUnavailable
from weightd.retry import RetryPolicy
from weightd.sources import FileReader, RemoteFile
from weightd.sources.digests import parse_origin_digest
from weightd.sources.s3 import S3Source
from weightd.store.index import ModelFile

log = logging.getLogger(__name__)

#: The manifest format's version (a reader refuses others).
MANIFEST_VERSION = 1

#: The largest manifest read (100,000 files at about 300 bytes each, with room).
MAX_MANIFEST_BYTES = 64 * 1024 * 1024

#: Write-backs in progress at once in a process; a fetch beyond them does not write back
#: (and so takes no lock: a lock's holder must write back).
MAX_WRITE_BACKS = 4

#: The longest pause between two looks at a lock and its manifest while waiting.
MAX_POLL = 0.25

#: Consecutive failed looks at the mirror after which a waiting node gives up.
MAX_POLL_ERRORS = 3

#: Files whose blobs a lock lists as they land (its holder's progress); beyond, the
#: waiting nodes wait for the manifest.
MAX_PROGRESS_FILES = 10_000

#: The least time between two writes of a lock by its holder.
PROGRESS_GAP = 0.1

_DIGEST = re.compile(r"^[0-9a-f]{32}$")


class MirrorUnavailable(SourceUnavailable):
    """The mirror could not be asked (down, slow, an error answer, no credentials).

    Attributes:
        status: the HTTP status of its answer (404 for a missing key, 412 for a failed
            condition), or None when there was no answer (down, a timeout).
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _bucket_prefix(url: str) -> tuple[str, str]:
    rest = url.split("://", 1)[1]
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


def manifest_id(source: str, files: Sequence[RemoteFile]) -> str:
    """The key of a model's manifest: sha256 of its canonical source URL and the sorted
    (relpath, identity) pairs of its listing. A changed file (a new identity) is a new
    manifest; the same source listed alike on any node is the same one."""
    h = hashlib.sha256(source.encode() + b"\0")
    for rel, identity in sorted((f.relpath, f.identity) for f in files):
        h.update(f"{rel}\t{identity}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ManifestEntry:
    """One file as a manifest lists it."""

    relpath: str
    size: int
    identity: str
    digest: str


@dataclass(frozen=True)
class Via:
    """Where a file's bytes come from instead of its origin: a reader of the mirror's
    blob (opened for the download) and the xxh3-128 the bytes must have."""

    open: Callable[[], FileReader]
    digest: str
    what: str


@dataclass(frozen=True)
class LockState:
    """A lock as read from the mirror.

    Attributes:
        holder: who holds it (host, pid and a random id per pull).
        since: when the holder took it (its clock, unix time).
        idle: seconds since the holder last wrote it (the store's clock: its
            ``Last-Modified`` against its ``Date``), what staleness is judged on.
        etag: the lock object's ETag (for ``If-Match``).
        files: the blobs its holder has put in the mirror so far (``relpath``, ``size``,
            ``identity``, ``digest``), as it wrote them.
    """

    holder: str
    since: float
    idle: float
    etag: str
    files: list[Any] = field(default_factory=list)


@dataclass
class Activity:
    """What this node is doing with the mirror for one source (shown in Status)."""

    source: str
    state: str  # "waiting", "pulling from the origin", "writing back"
    holder: str
    since: float = field(default_factory=time.time)


class _BlobReader(FileReader):
    """A mirror blob: its name is its content, so it does not change under a download
    (its xxh3 is checked instead); its chunks fail fast (the origin is behind it)."""

    def identity(self) -> str:
        return self.rf.identity


class MirrorSource(S3Source):
    """The mirror's bucket read as an S3 source (ranged reads, ``Content-Range`` checked)
    through the mirror's own filesystem object."""

    def open_blob(self, rf: RemoteFile, origin: RemoteFile) -> FileReader:
        """A reader of the blob ``rf`` that holds the bytes of ``origin``: the digest the
        origin's listing states for it (if any) is checked against them too."""
        reader = _BlobReader(self, rf, parse_origin_digest(origin.origin_digest, origin.url,
                                                           origin.size))
        reader.policy = RetryPolicy(attempts=2, max_seconds=self.config.mirror_timeout)
        return reader


class _Held:
    """A lock this node holds. A thread of its own writes it (``If-Match`` its ETag):
    every quarter of ``mirror_lock_timeout`` (a refresh), and soon after each blob the
    write-back put in the mirror (its progress: the waiting nodes read those blobs while
    the pull goes on), until it is released."""

    def __init__(self, mirror: Mirror, key: str, holder: str, source: str, etag: str,
                 since: float) -> None:
        self.mirror = mirror
        self.key = key
        self.holder = holder
        self.source = source
        self.since = since
        self.etag = etag
        self.lost = False
        self._files: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weightd-mirror-lock",
                                        daemon=True)
        self._thread.start()

    def publish(self, f: ModelFile) -> None:
        """``f``'s blob is in the mirror now: say so in the lock (soon, coalesced)."""
        with self._lock:
            if len(self._files) >= MAX_PROGRESS_FILES:
                return  # a model of that many files: the others wait for the manifest
            self._files.append({"relpath": f.relpath, "size": f.size,
                                "identity": f.identity, "digest": f.digest})
        self._wake.set()

    def _run(self) -> None:
        interval = max(0.2, self.mirror.config.mirror_lock_timeout / 4)
        due = time.monotonic() + interval
        while not self._stop.is_set():
            self._wake.wait(max(0.0, due - time.monotonic()))
            if self._stop.is_set():
                return
            self._wake.clear()
            with self._lock:
                body = _lock_body(self.holder, self.source, self.since, self._files)
            try:
                resp = self.mirror._call("put_object", Key=self.key, Body=body,
                                         IfMatch=self.etag)
                self.etag = str(resp.get("ETag", self.etag))
            except MirrorUnavailable as e:
                if e.status in (404, 412):
                    self.lost = True
                    log.warning("mirror %s: the lock on %s was taken over (this node's "
                                "refreshes were late): its pull goes on, another may pull "
                                "too", self.mirror.url, self.source)
                    return
                log.info("mirror %s: the lock on %s was not written: %s", self.mirror.url,
                         self.source, e)
            due = time.monotonic() + interval
            time.sleep(PROGRESS_GAP)  # at most a few writes a second

    def release(self) -> None:
        """Stop writing and delete the lock, unless another node took it over."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self.mirror.config.mirror_timeout * 3 + 1)
        if self.lost:
            return
        try:
            self.mirror._call("delete_object", Key=self.key, IfMatch=self.etag)
        except MirrorUnavailable as e:
            if e.status == 501:  # no conditional delete: a plain one (see the docs' window)
                with contextlib.suppress(MirrorUnavailable):
                    self.mirror._call("delete_object", Key=self.key)
            elif e.status not in (404, 412):
                log.warning("mirror %s: the lock on %s could not be deleted (%s): the other "
                            "nodes take it over once it is %gs old", self.mirror.url,
                            self.source, e, self.mirror.config.mirror_lock_timeout)


def _lock_body(holder: str, source: str, since: float, files: Sequence[dict[str, Any]]
               ) -> bytes:
    return json.dumps({"holder": holder, "source": source, "since": since,
                       "refreshed": time.time(), "files": list(files)}).encode()


def _status_of(e: BaseException) -> tuple[int | None, str]:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return (int(status) if status else None), str(response.get("Error", {}).get("Code", ""))
    return None, ""


class Mirror:
    """One mirror, ``s3://bucket/prefix``, with a client of its own (see the module).

    Args:
        url: the ``mirrors`` setting's entry.
        config: the rest of the settings (``mirror_*``, the chunk plan, retries).
    """

    def __init__(self, url: str, config: Config) -> None:
        self.url = url.rstrip("/")
        self.config = config
        self.bucket, self.prefix = _bucket_prefix(self.url)
        self.fs = self._filesystem()
        self.source = MirrorSource(self.url, self.fs, f"{self.bucket}/{self.prefix}", config)
        self._lock = threading.Lock()
        self._conditional: tuple[bool, str] | None = None
        #: False once the store refused a write (read-only credentials): no write-back
        self.writable = True
        self._endpoint: str | None = None
        self._activity: dict[str, Activity] = {}
        self._write_backs: list[_WriteBack] = []
        self._slots = threading.BoundedSemaphore(MAX_WRITE_BACKS)
        self.problems = 0
        self.last_problem = ""

    def _filesystem(self) -> Any:
        import s3fs

        c = self.config
        timeout = c.mirror_timeout
        opts: dict[str, Any] = {
            "skip_instance_cache": True, "use_listings_cache": False,
            # the mirror's endpoint, or AWS: never the origin's (AWS_ENDPOINT_URL and the
            # config file's endpoint_url are what botocore would read otherwise)
            "endpoint_url": c.mirror_endpoint_url,
            "config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                              "retries": {"max_attempts": 1, "mode": "standard"},
                              "ignore_configured_endpoint_urls": True},
        }
        if c.mirror_region:
            opts["client_kwargs"] = {"region_name": c.mirror_region}
        if c.mirror_access_key_id is not None:
            opts["key"], opts["secret"] = c.mirror_access_key_id, c.mirror_secret_access_key
        elif c.mirror_profile is not None:
            opts["profile"] = c.mirror_profile
        fs = s3fs.S3FileSystem(**opts)
        fs.retries = 1  # s3fs's own retries: none (the fetch's policy decides)
        return fs

    # --- keys --------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def blob_key(self, digest: str) -> str:
        return self._key("blobs", digest)

    def manifest_key(self, mid: str) -> str:
        return self._key("manifests", f"{mid}.json")

    def lock_key(self, mid: str) -> str:
        return self._key("locks", f"{mid}.lock")

    # --- the client ----------------------------------------------------------------------------

    def endpoint(self) -> str:
        """The endpoint the mirror's client talks to (no request is sent to know it, but
        the client is set up: its credentials resolved, which may touch the network)."""
        if self._endpoint is None:
            async def get() -> str:
                await self.fs.set_session()
                s3 = await self.fs.get_s3(self.bucket)
                return str(s3.meta.endpoint_url)

            self._endpoint = str(fsspec.asyn.sync(self.fs.loop, get))
        return self._endpoint

    def endpoint_text(self) -> str:
        """The endpoint as Status shows it, without setting anything up (Status runs on
        the daemon's event loop): the one the client found once it was set up, else the
        configured ``mirror_endpoint_url``, else the store's default."""
        if self._endpoint is not None:
            return self._endpoint
        return self.config.mirror_endpoint_url or "the store's default (not set up yet)"

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        """One S3 call on the mirror's client (``Bucket`` is the mirror's); a body is read
        (at most ``limit`` + 1 bytes, into ``"Data"``) when ``limit`` is given.

        Raises:
            MirrorUnavailable: with the answer's status (404 for a missing key, 412 for a
                failed condition) or None for no answer (down, a timeout).
        """
        limit = kwargs.pop("limit", None)

        async def call() -> dict[str, Any]:
            await self.fs.set_session()
            s3 = await self.fs.get_s3(self.bucket)
            resp: dict[str, Any] = await getattr(s3, method)(Bucket=self.bucket, **kwargs)
            if limit is not None:
                body = resp["Body"]
                try:
                    resp["Data"] = await body.read(limit + 1)
                finally:
                    body.close()
            return resp

        async def bounded() -> dict[str, Any]:
            return await asyncio.wait_for(call(), timeout=self.config.mirror_timeout * 3)

        try:
            return dict(fsspec.asyn.sync(self.fs.loop, bounded))
        except Exception as e:
            status, code = _status_of(e)
            if status is None and type(e).__name__ == "NoCredentialsError":
                why = ("no credentials: set mirror_access_key_id and mirror_secret_access_key, "
                       "or mirror_profile")
            elif status is None:
                why = f"{type(e).__name__}: {e}".rstrip(": ")
            else:
                why = f"HTTP {status} {code}".rstrip()
            raise MirrorUnavailable(f"mirror {self.url}: {method} {kwargs.get('Key', '')}: "
                                    f"{why}", status=status) from e

    def _get(self, key: str, *, head: bool = False) -> dict[str, Any] | None:
        """``GetObject`` of a small object (its body in ``"Data"``, at most
        :data:`MAX_MANIFEST_BYTES` + 1 bytes), or ``HeadObject``; None when it is not
        there (404)."""
        try:
            if head:
                return self._call("head_object", Key=key)
            return self._call("get_object", Key=key, limit=MAX_MANIFEST_BYTES)
        except MirrorUnavailable as e:
            if e.status == 404:
                return None
            raise

    # --- conditional writes -----------------------------------------------------------------

    def conditional_writes(self) -> tuple[bool, str]:
        """Whether the store honours ``If-None-Match: *`` on PutObject (probed once, with
        an object of its own under ``locks/``), and what was seen."""
        with self._lock:
            if self._conditional is not None:
                return self._conditional
        key = self._key("locks", f".probe-{uuid.uuid4().hex}")
        try:
            self._call("put_object", Key=key, Body=b"probe", IfNoneMatch="*")
            try:
                self._call("put_object", Key=key, Body=b"probe", IfNoneMatch="*")
                result = (False, "the store ignores If-None-Match (a second conditional "
                                 "create succeeded): each node may pull from the origin")
            except MirrorUnavailable as e:
                if e.status in (409, 412):
                    result = (True, "PutObject with If-None-Match: * honoured")
                else:
                    raise
        except MirrorUnavailable as e:
            if e.status in (400, 501):
                result = (False, f"no conditional writes ({e}): each node may pull from the "
                                 "origin")
            elif e.status == 403:
                self.writable = False
                result = (False, f"this node may not write to the mirror ({e}): it reads "
                                 "from it, and writes nothing back")
            else:
                raise  # the mirror cannot be asked now: probe again next time
        finally:
            with contextlib.suppress(MirrorUnavailable):
                self._call("delete_object", Key=key)
        with self._lock:
            self._conditional = result
        if not result[0]:
            log.warning("mirror %s: %s", self.url, result[1])
        else:
            log.info("mirror %s: %s", self.url, result[1])
        return result

    # --- manifests --------------------------------------------------------------------------

    def manifest(self, source: str, files: Sequence[RemoteFile]) -> dict[str, ManifestEntry] | None:
        """The manifest of ``source`` as listed now (``files``), or None when the mirror
        has none. A manifest that does not describe exactly this listing is none (and
        logged).

        Raises:
            MirrorUnavailable: the mirror cannot be asked.
        """
        key = self.manifest_key(manifest_id(source, files))
        resp = self._get(key)
        if resp is None:
            return None
        data = resp["Data"]
        try:
            if len(data) > MAX_MANIFEST_BYTES:
                raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
            doc = json.loads(data)
            if doc.get("version") != MANIFEST_VERSION or doc.get("source") != source:
                raise ValueError("another version or source")
            entries: dict[str, ManifestEntry] = {}
            for item in doc["files"]:
                entry = ManifestEntry(str(item["relpath"]), int(item["size"]),
                                      str(item["identity"]), str(item["digest"]))
                if not _DIGEST.match(entry.digest):
                    raise ValueError(f"{entry.relpath}: not an xxh3-128 digest: "
                                     f"{entry.digest!r}")
                entries[entry.relpath] = entry
            listed = {(f.relpath, f.size, f.identity) for f in files}
            if {(x.relpath, x.size, x.identity) for x in entries.values()} != listed:
                raise ValueError("its files are not the listing's")
        except (ValueError, KeyError, TypeError) as bad:
            self._problem(f"s3://{self.bucket}/{key}: not a manifest of {source} ({bad}): "
                          "ignored")
            return None
        return entries

    def put_manifest(self, source: str, files: Sequence[ModelFile]) -> None:
        """Write the manifest of a model whose blobs are all in the mirror."""
        listed = [RemoteFile(f.url, "", f.relpath, f.size, f.identity) for f in files]
        doc = {"version": MANIFEST_VERSION, "source": source, "written_at": time.time(),
               "written_by": _holder_name(),
               "files": [{"relpath": f.relpath, "size": f.size, "identity": f.identity,
                          "digest": f.digest} for f in sorted(files, key=lambda x: x.relpath)]}
        self._call("put_object", Key=self.manifest_key(manifest_id(source, listed)),
                   Body=json.dumps(doc, indent=1).encode(), ContentType="application/json")

    # --- blobs --------------------------------------------------------------------------------

    def has_blob(self, digest: str, size: int) -> bool:
        head = self._get(self.blob_key(digest), head=True)
        return head is not None and int(head.get("ContentLength", -1)) == size

    def upload_blob(self, digest: str, path: Path) -> None:
        """Upload a blob of the cache (multipart when large: s3fs's ``put_file``); the
        object appears whole or not at all."""
        try:
            self.fs.put_file(os.fspath(path), f"{self.bucket}/{self.blob_key(digest)}")
        except FileNotFoundError:
            raise
        except Exception as e:
            raise MirrorUnavailable(f"mirror {self.url}: upload of {digest}: "
                                    f"{type(e).__name__}: {e}") from e

    def via(self, f: RemoteFile, entry: ManifestEntry) -> Via:
        """How to read ``f`` from the mirror's blob ``entry.digest``."""
        key = self.blob_key(entry.digest)
        rf = RemoteFile(url=f"s3://{self.bucket}/{key}", path=f"{self.bucket}/{key}",
                        relpath=f.relpath, size=f.size, identity=f"{f.size}:xxh3={entry.digest}")
        return Via(lambda: self.source.open_blob(rf, f), entry.digest, f"mirror {self.url}")

    # --- locks --------------------------------------------------------------------------------

    def _read_lock(self, key: str) -> LockState | None:
        resp = self._get(key)
        if resp is None:
            return None
        files: list[Any] = []
        try:
            body = json.loads(resp["Data"])
            holder, since = str(body["holder"]), float(body["since"])
            files = list(body.get("files") or [])
        except (ValueError, KeyError, TypeError):
            holder, since = "unknown (unreadable lock)", 0.0
        modified = resp.get("LastModified")
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = time.time()
        with contextlib.suppress(TypeError, ValueError, IndexError):
            if date:
                now = email.utils.parsedate_to_datetime(date).timestamp()
        idle = max(0.0, now - modified.timestamp()) if modified is not None else 0.0
        return LockState(holder, since, idle, str(resp.get("ETag", "")), files)

    def _take(self, key: str, source: str, *, stale: LockState | None = None) -> _Held | None:
        """Create the lock (``If-None-Match: *``), or replace a stale one (``If-Match``
        its ETag); None when another node got there first."""
        holder, since = _holder_name(), time.time()
        condition = {"IfNoneMatch": "*"} if stale is None else {"IfMatch": stale.etag}
        try:
            resp = self._call("put_object", Key=key, Body=_lock_body(holder, source, since, []),
                              **condition)
        except MirrorUnavailable as e:
            if e.status in (404, 409, 412):
                return None
            raise
        return _Held(self, key, holder, source, str(resp.get("ETag", "")), since)

    def _step(self, pull: MirrorPull) -> bool:
        """One look at the manifest and its lock for a fetch that wants the model: take
        the lock when nobody holds it (or its holder went stale), use the manifest once
        it is there, else note the holder's progress (the blobs it has put so far).
        Whether the pull is settled (it holds the lock, or has the manifest)."""
        c, source, key = self.config, pull.source, pull.lock_key
        held = self._take(key, source)
        state: LockState | None = None
        if held is None:
            state = self._read_lock(key)
            if state is not None and state.idle > c.mirror_lock_timeout:
                held = self._take(key, source, stale=state)
                if held is not None:
                    log.warning("mirror %s: took over the lock on %s from %s, not refreshed "
                                "for %.0fs (over mirror_lock_timeout, %gs)", self.url, source,
                                state.holder, state.idle, c.mirror_lock_timeout)
        try:
            entries = self.manifest(source, pull.files)  # it may have come meanwhile
        except MirrorUnavailable:
            if held is not None:
                held.release()
            raise
        if entries is not None:
            if held is not None:
                held.release()
            pull.settle(entries)
            return True
        if held is not None:
            pull.hold(held)
            return True
        if state is not None:
            pull.progress(state.files)
            if pull.seen != state.holder:
                pull.seen = state.holder
                log.info("mirror %s: waiting for %s: %s is pulling it from the origin (lock "
                         "taken %.0fs ago)", self.url, source, state.holder,
                         max(0.0, time.time() - state.since))
            self._set_activity(source, "waiting", state.holder, state.since)
        return False

    def _follow(self, pull: MirrorPull) -> None:
        """Look again and again (full-jitter backoff, up to :data:`MAX_POLL`) until the
        pull is settled, the wait is over (``mirror_wait``) or the mirror keeps failing;
        the files not in the mirror by then come from the origin."""
        c = self.config
        deadline = time.monotonic() + c.mirror_wait
        pause = RetryPolicy(base_delay=0.1, max_delay=min(MAX_POLL, c.mirror_lock_timeout / 4))
        attempt = errors = 0
        try:
            while not pull.stopped.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    who = pull.seen or "the node that pulls it"
                    self._problem(f"waited {c.mirror_wait:g}s (mirror_wait) for {who} to put "
                                  f"{pull.source} in the mirror: the rest from the origin")
                    return
                attempt += 1
                if pull.stopped.wait(min(pause.delay(min(attempt, 8)) + 0.05, left)):
                    return
                try:
                    if self._step(pull):
                        return
                    errors = 0
                except MirrorUnavailable as e:
                    errors += 1
                    if errors >= MAX_POLL_ERRORS:
                        self._problem(f"{e}; the rest of {pull.source} from the origin")
                        return
        except Exception:  # never leave the fetch's files waiting
            log.exception("mirror %s: waiting for %s failed", self.url, pull.source)
        finally:
            self._clear_activity(pull.source, "waiting")
            pull.settle({})

    # --- one model fetch ---------------------------------------------------------------------

    def begin(self, source: str, files: Sequence[RemoteFile], todo: Sequence[RemoteFile],
              blob_path: Callable[[str], Path]) -> MirrorPull:
        """What the mirror does for a fetch of ``source`` (listed as ``files``) whose
        ``todo`` files miss the node's cache, decided before any file is read:

        - the manifest is there: its files come from the mirror;
        - nobody holds its lock (or its holder went stale): this node takes it, pulls from
          the origin and writes back;
        - another node holds it: this node follows that pull (a thread looks at the lock
          and the manifest): each file comes from the mirror once its blob is there
          (:meth:`MirrorPull.via` waits for it), from the origin once the wait is over;
        - no conditional writes: this node pulls and writes back, as every other may.

        Never raises: a mirror that fails is a warning, and the origin."""
        pull = MirrorPull(self, source, files, blob_path)
        if not todo:
            pull.settle({})
            return pull
        try:
            entries = self.manifest(source, files)
            if entries is not None:
                pull.settle(entries)
                return pull
            if not self._slots.acquire(blocking=False):
                log.info("mirror %s: %d write-backs in progress: %s is pulled from the "
                         "origin without one", self.url, MAX_WRITE_BACKS, source)
                pull.settle({})
                return pull
            pull.slot = True
            ok, _ = self.conditional_writes()
            if not self.writable:
                pull.settle({})
            elif not ok:
                pull.start_write_back()
                pull.settle({})
            elif not self._step(pull):
                threading.Thread(target=self._follow, args=(pull,), daemon=True,
                                 name="weightd-mirror-wait").start()
        except MirrorUnavailable as e:
            self._problem(f"{e}; pulling {source} from the origin")
            pull.settle({})
        return pull

    # --- seeding ------------------------------------------------------------------------------

    def push(self, source: str, files: Sequence[ModelFile], blob_path: Callable[[str], Path],
             report: Callable[[ModelFile, str], None] = lambda f, what: None) -> tuple[int, int]:
        """Put a model of the cache in the mirror: each blob it lacks, then the manifest.
        ``report(file, "uploaded" | "in the mirror")`` for each file. Returns (uploaded
        files, uploaded bytes).

        Raises:
            MirrorUnavailable, FileNotFoundError (a blob left the cache meanwhile).
        """
        uploaded = nbytes = 0
        for f in sorted(files, key=lambda x: x.relpath):
            if self.has_blob(f.digest, f.size):
                report(f, "in the mirror")
                continue
            self.upload_blob(f.digest, blob_path(f.digest))
            uploaded += 1
            nbytes += f.size
            report(f, "uploaded")
        self.put_manifest(source, files)
        return uploaded, nbytes

    # --- status -------------------------------------------------------------------------------

    def _problem(self, text: str) -> None:
        with self._lock:
            self.problems += 1
            self.last_problem = text
        log.warning("%s", text if text.startswith("mirror ") else f"mirror {self.url}: {text}")

    def _set_activity(self, source: str, state: str, holder: str, since: float) -> None:
        with self._lock:
            self._activity[source] = Activity(source, state, holder, since)

    def _clear_activity(self, source: str, state: str | None = None) -> None:
        with self._lock:
            a = self._activity.get(source)
            if a is not None and (state is None or a.state == state):
                del self._activity[source]

    def activity(self) -> list[Activity]:
        with self._lock:
            return sorted(self._activity.values(), key=lambda a: a.since)

    def conditional_text(self) -> str:
        with self._lock:
            known = self._conditional
        if known is None:
            return "not checked yet (at the first fetch that misses the mirror)"
        return ("yes: " if known[0] else "no: ") + known[1]

    def pending_write_backs(self) -> int:
        with self._lock:
            self._write_backs = [w for w in self._write_backs if w.is_alive()]
            return len(self._write_backs)

    def close(self, timeout: float | None = None) -> None:
        """Wait for the write-backs in progress (at most ``timeout`` seconds each, None:
        until they end); a lock still held after it is released."""
        with self._lock:
            jobs = list(self._write_backs)
        for job in jobs:
            job.join(timeout)
            if job.is_alive():
                log.warning("mirror %s: the write-back of %s did not end in %.0fs: its lock "
                            "is left for the other nodes to take over", self.url, job.pull.source,
                            timeout or 0)


def snapshot_files(snapshot: str | os.PathLike[str]
                   ) -> tuple[str, list[ModelFile], Callable[[str], Path]]:
    """The source, files and blob paths of a model's snapshot in a cache this process
    cannot open (the daemon's), from the manifest beside its revision directory.

    Raises:
        NotPermitted: the cache is not readable by this user (not in the daemon's group).
    """
    rev = Path(os.path.realpath(snapshot))
    manifest = rev.with_name(f"{rev.name}.manifest.json")
    try:
        doc = json.loads(manifest.read_bytes())
        files = [ModelFile(f["relpath"], f["url"], f["digest"], int(f["size"]),
                           f["identity"]) for f in doc["files"]]
    except PermissionError as e:
        raise NotPermitted(f"{manifest}: cannot read the daemon's cache (run as a member of "
                           "its group)") from e
    paths = {f.digest: Path(os.path.realpath(rev / f.relpath)) for f in files}
    for f in files:
        if not os.access(paths[f.digest], os.R_OK):
            raise NotPermitted(f"{paths[f.digest]}: cannot read the daemon's cache (run as a "
                               "member of its group)")
    return str(doc["source"]), files, paths.__getitem__


def _holder_name() -> str:
    return f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"


class MirrorPull:
    """The mirror's part in one model fetch (see :meth:`Mirror.begin`): which files it
    gives (:meth:`via`, which waits while another node's pull is followed), what failed
    (:meth:`failed`), and the write-back of what this node pulled from the origin
    (:meth:`verified`, :meth:`commit`, :meth:`abort`)."""

    def __init__(self, mirror: Mirror, source: str, files: Sequence[RemoteFile],
                 blob_path: Callable[[str], Path]) -> None:
        self.mirror = mirror
        self.source = source
        self.files = list(files)
        self.lock_key = mirror.lock_key(manifest_id(source, files))
        self.blob_path = blob_path
        self.entries: dict[str, ManifestEntry] = {}
        self.held: _Held | None = None
        self.slot = False
        self.job: _WriteBack | None = None
        self.repairs: set[str] = set()
        self.rewrite = False
        self.seen: str | None = None  # the holder being waited for
        self.stopped = threading.Event()
        self._listed = {f.relpath: f for f in files}
        self._settled = False
        self._aborted = False
        self._cond = threading.Condition()

    def free_slot(self) -> None:
        if self.slot:
            self.slot = False
            self.mirror._slots.release()

    # --- what the mirror gives ----------------------------------------------------------

    def progress(self, files: Sequence[Any]) -> None:
        """Blobs the holder of the lock says it has put in the mirror: those that are
        files of this listing (same relpath, size and identity) can be read now."""
        found = {}
        for item in files:
            try:
                e = ManifestEntry(str(item["relpath"]), int(item["size"]),
                                  str(item["identity"]), str(item["digest"]))
            except (KeyError, TypeError, ValueError):
                continue
            f = self._listed.get(e.relpath)
            if f is not None and (f.size, f.identity) == (e.size, e.identity) and \
                    _DIGEST.match(e.digest):
                found[e.relpath] = e
        if found:
            with self._cond:
                self.entries.update(found)
                self._cond.notify_all()

    def settle(self, entries: Mapping[str, ManifestEntry]) -> None:
        """No more files will come from the mirror than ``entries`` (and those known)."""
        with self._cond:
            self.entries.update(entries)
            self._settled = True
            self._cond.notify_all()
        if self.held is None and self.job is None:
            self.free_slot()

    def hold(self, held: _Held) -> None:
        """This node took the lock: it pulls from the origin what the mirror lacks, and
        writes it back."""
        self.held = held
        self.mirror._set_activity(self.source, "pulling from the origin", held.holder,
                                  held.since)
        self.start_write_back()
        self.settle({})

    def via(self, f: RemoteFile) -> Via | None:
        """Where to read ``f`` from, when the mirror has it; while another node's pull is
        followed, wait until its blob is there or the wait is over (then None: the
        origin)."""
        with self._cond:
            while f.relpath not in self.entries and not self._settled:
                self._cond.wait(1.0)
            entry = self.entries.get(f.relpath)
        return self.mirror.via(f, entry) if entry is not None else None

    def failed(self, f: RemoteFile, e: BaseException) -> None:
        """The mirror's copy of ``f`` could not be read: it comes from the origin, and its
        blob is put in the mirror again once verified (a repair)."""
        self.mirror._problem(f"mirror {self.mirror.url}: {f.relpath} of {self.source}: {e}; "
                             "reading it from the origin")
        with self._cond:
            if self._aborted:  # the fetch failed meanwhile: nothing will commit a repair
                return
            self.repairs.add(f.relpath)
            if self.job is None and self.mirror._slots.acquire(blocking=False):
                self.slot = True
                self.start_write_back(repair=True)

    # --- the write-back ------------------------------------------------------------------

    def verified(self, f: RemoteFile, digest: str, path: Path | None = None) -> None:
        """``f`` came from the origin, was verified and is in the cache as ``digest``
        (or, a shard not durable yet, in its temporary file ``path``, renamed to its blob
        later): its blob goes to the mirror now (before the rest of the model is
        fetched)."""
        entry = self.entries.get(f.relpath)
        if entry is not None and entry.digest != digest:
            log.warning("mirror %s: its manifest of %s names %s for %s, the origin's bytes "
                        "are %s: the manifest is written again", self.mirror.url, self.source,
                        entry.digest, f.relpath, digest)
            self.rewrite = True
        job = self.job
        if job is not None and (not job.repair or f.relpath in self.repairs):
            job.q.put(("blob", ModelFile(f.relpath, f.url, digest, f.size, f.identity), path))

    def start_write_back(self, *, repair: bool = False) -> None:
        self.job = _WriteBack(self, repair=repair)
        with self.mirror._lock:
            self.mirror._write_backs.append(self.job)
        self.job.start()

    def commit(self, files: Mapping[str, ModelFile]) -> None:
        """The model is in the cache as ``files``: write the rest back (its blobs that
        came from the cache, then the manifest) in the background."""
        self.stopped.set()
        if self.job is not None:
            self.job.q.put(("commit", list(files.values())))

    def abort(self) -> None:
        """The fetch failed: stop waiting, write no manifest, release the lock (once,
        however often it is called)."""
        with self._cond:
            if self._aborted:
                return
            self._aborted = True
        self.stopped.set()
        self.settle({})
        if self.job is not None:
            self.job.q.put(("abort",))


class _WriteBack(threading.Thread):
    """The write-back of one model, on a daemon thread: each blob as the fetch verifies
    it (the upload overlaps the rest of the pull, and the lock says it is there, for the
    nodes that wait), then on commit the blobs that came from the cache or the mirror and
    the manifest, last; then the lock is released. A repair (the manifest was there, some
    of its blobs were not readable) uploads those blobs only, and the manifest only when
    the origin's bytes disagreed with it."""

    def __init__(self, pull: MirrorPull, *, repair: bool) -> None:
        super().__init__(name="weightd-mirror-write", daemon=True)
        self.pull = pull
        self.repair = repair
        self.q: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.uploaded = 0
        self.nbytes = 0
        self._done: set[str] = set()

    def _blob(self, f: ModelFile, path: Path | None = None) -> None:
        """Upload one blob, from ``path`` (a temporary file) while it is there, else from
        the cache (the upload opens the file once: a rename meanwhile changes nothing)."""
        mirror = self.pull.mirror
        if f.digest in self._done:
            return
        # a repair overwrites what the mirror has (its size may be right, its bytes not)
        if self.repair or not mirror.has_blob(f.digest, f.size):
            try:
                mirror.upload_blob(f.digest, path or self.pull.blob_path(f.digest))
            except FileNotFoundError:
                if path is None:
                    raise
                mirror.upload_blob(f.digest, self.pull.blob_path(f.digest))  # renamed
            self.uploaded += 1
            self.nbytes += f.size
        self._done.add(f.digest)
        if self.pull.held is not None:
            self.pull.held.publish(f)

    def _commit(self, files: list[ModelFile]) -> bool:
        """Upload what is left, then the manifest; whether a manifest was written."""
        pull, mirror = self.pull, self.pull.mirror
        if pull.held is not None:
            mirror._set_activity(pull.source, "writing back", pull.held.holder,
                                 pull.held.since)
        for f in files:
            if not self.repair or f.relpath in pull.repairs:
                self._blob(f)
        if self.repair and not pull.rewrite:
            return False
        if (pull.held is None and not pull.rewrite
                and mirror.manifest(pull.source, pull.files) is not None):
            return False  # no lock (no conditional writes): another node wrote it
        mirror.put_manifest(pull.source, files)
        return True

    def run(self) -> None:
        pull, mirror = self.pull, self.pull.mirror
        failed: str | None = None
        t0 = time.monotonic()
        try:
            while True:
                item = self.q.get()
                if item[0] == "abort":
                    return
                if item[0] == "blob":
                    self._blob(*item[1:])
                    continue
                wrote = self._commit(item[1])
                log.info("mirror %s: wrote back %s: %d blobs (%s) uploaded%s in %.2fs",
                         mirror.url, pull.source, self.uploaded, format_size(self.nbytes),
                         ", then its manifest" if wrote else "", time.monotonic() - t0)
                return
        except (MirrorUnavailable, FileNotFoundError) as e:
            failed = str(e)
        except Exception as e:  # a write-back never fails a load; say why it stopped
            failed = f"{type(e).__name__}: {e}"
            log.exception("mirror %s: the write-back of %s failed", mirror.url, pull.source)
        finally:
            if failed is not None:
                mirror._problem(f"mirror {mirror.url}: the write-back of {pull.source} "
                                f"stopped ({failed}): no manifest written")
            if pull.held is not None:
                pull.held.release()
            mirror._clear_activity(pull.source)
            pull.free_slot()
