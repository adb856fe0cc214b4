"""A local Hugging Face hub on 127.0.0.1: the endpoints weightd and huggingface_hub use,
with a second server as its CDN for the bytes of LFS files.

Point a client at it as huggingface_hub's own tests do, with ``HF_ENDPOINT`` (or
weightd's ``hf_endpoint``), and allow its CDN with ``hf_download_hosts``
(:attr:`FakeHub.cdn_host`). It speaks:

- ``GET /api/models/{repo}/revision/{revision}`` (and ``/api/models/{repo}``, for
  ``main``): ``{"id", "sha", "siblings", "private"}``;
- ``GET /api/models/{repo}/tree/{revision}[/{path}]?recursive=&cursor=``: entries
  ``{"type", "path", "size", "oid"[, "lfs": {"oid", "size", "pointerSize"}]}`` in pages of
  ``page_size``, the next page in a ``Link: <...>; rel="next"`` header;
- ``HEAD``/``GET /{repo}/resolve/{revision}/{path}``: a file kept in git is served here
  (``Range`` honoured, ``ETag`` its git blob id); an LFS file is a ``302`` to the CDN with
  ``X-Linked-Etag`` (its sha256) and ``X-Linked-Size``; both carry ``X-Repo-Commit``.

Errors carry ``X-Error-Code`` as the hub's do (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``); a private repository needs ``Authorization: Bearer <token>``. A fault
hook (:data:`~weightd.testing.servers.FaultHook`) makes the hub answer a request with a
status and headers instead (a 429 with ``Retry-After``); the CDN is a
:class:`~weightd.testing.servers.RangeHTTPServer`, with its own hooks and token buckets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from weightd.testing.servers import _RANGE, Fault, FaultHook, RangeHTTPServer, RequestLog

#: Files stored with LFS (served by the CDN): these suffixes, or anything this large.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".pth")
LFS_MIN_SIZE = 10 * 1024 * 1024


def git_blob_id(data: bytes) -> str:
    """git's id of a file: SHA-1 of ``blob <size>\\0`` and its bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class HubFile:
    """One file of a commit: its size, git blob id and, for an LFS file, its sha256
    (the bytes are then at the CDN), else its bytes."""

    path: str
    size: int
    oid: str
    sha256: str | None
    data: bytes | None
    pointer_size: int = 0


@dataclass
class _Repo:
    private: bool
    refs: dict[str, str]
    commits: dict[str, dict[str, HubFile]]


class FakeHub:
    """The hub and its CDN, each on its own 127.0.0.1 port.

    Args:
        root: a directory for the CDN's files.
        token: the token private repositories need.
        page_size: entries per page of a tree listing (the hub's is 1000).
        rate, conn_rate: the CDN's token buckets (bytes/s), see ``RangeHTTPServer``.

    Example
    -------
    >>> import tempfile
    >>> with FakeHub(tempfile.mkdtemp()) as hub:
    ...     sha = hub.commit("org/model", {"config.json": b"{}"})
    ...     len(sha), hub.url.startswith("http://127.0.0.1:")
    (40, True)
    """

    def __init__(self, root: str | os.PathLike[str], *, token: str | None = None,
                 page_size: int = 1000, rate: float | None = None,
                 conn_rate: float | None = None) -> None:
        self.root = Path(root)
        (self.root / "cdn" / "lfs").mkdir(parents=True, exist_ok=True)
        self.token = token
        self.page_size = page_size
        self.log = RequestLog()
        self.fault: FaultHook | None = None
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self.cdn = RangeHTTPServer(self.root / "cdn", rate=rate, conn_rate=conn_rate)
        self._server = _HubServer(("127.0.0.1", 0), _HubHandler)
        self._server.hub = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="fake-hub")
        self._thread.start()

    @property
    def url(self) -> str:
        """The endpoint (``HF_ENDPOINT``)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def cdn_host(self) -> str:
        """The CDN's ``host:port``, for ``hf_download_hosts``."""
        return self.cdn.url.split("://", 1)[1]

    def set_fault(self, fault: FaultHook | None) -> None:
        """Answer hub requests (not the CDN's: ``hub.cdn.set_fault``) as ``fault`` says."""
        self.fault = fault

    def commit(self, repo: str, files: Mapping[str, bytes | Path | None], *,
               branch: str = "main", private: bool | None = None) -> str:
        """Add a commit on ``branch`` (made if new) that changes ``files`` (``None``
        deletes one) from its parent; return its sha."""
        with self._lock:
            r = self._repos.setdefault(repo, _Repo(bool(private), {}, {}))
            if private is not None:
                r.private = private
            parent = r.refs.get(branch)
        tree = dict(r.commits[parent]) if parent else {}
        for path, content in sorted(files.items()):
            if content is None:
                tree.pop(path, None)
            else:
                tree[path] = self._store(path, content)
        sha = hashlib.sha1(json.dumps([parent, sorted((p, f.oid) for p, f in tree.items())])
                           .encode(), usedforsecurity=False).hexdigest()
        with self._lock:
            r.commits[sha] = tree
            r.refs[branch] = sha
        return sha

    def tag(self, repo: str, name: str, commit: str) -> None:
        with self._lock:
            self._repos[repo].refs[name] = commit

    def _store(self, path: str, content: bytes | Path) -> HubFile:
        size = len(content) if isinstance(content, bytes) else content.stat().st_size
        if not (path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE):
            data = content if isinstance(content, bytes) else content.read_bytes()
            return HubFile(path, size, git_blob_id(data), None, data)
        sha = hashlib.sha256()
        if isinstance(content, bytes):
            sha.update(content)
        else:
            with open(content, "rb") as f:
                while block := f.read(16 << 20):
                    sha.update(block)
        digest = sha.hexdigest()
        dest = self.root / "cdn" / "lfs" / digest
        if not dest.exists():
            if isinstance(content, bytes):
                dest.write_bytes(content)
            else:
                try:
                    os.link(content, dest)
                except OSError:
                    shutil.copyfile(content, dest)
        pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\n"
                   f"size {size}\n").encode()
        return HubFile(path, size, git_blob_id(pointer), digest, None, len(pointer))

    def resolve(self, repo: str, revision: str, authorized: bool
                ) -> tuple[_Repo | None, str | None, str]:
        """(repo, commit, error code) for a request: the code names what is missing."""
        with self._lock:
            r = self._repos.get(repo)
            if r is None or (r.private and not authorized):
                return None, None, "RepoNotFound"
            commit = r.refs.get(revision) or (revision if revision in r.commits else None)
        return (r, commit, "") if commit else (r, None, "RevisionNotFound")

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        self.cdn.stop()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _HubServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub


_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HubServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._route(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._route(body=False)

    def _answer(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None,
                *, send_body: bool = True) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body and body:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, *, send_body: bool = True) -> None:
        body = json.dumps({"error": message}).encode()
        self._answer(status, body, {"X-Error-Code": code, "X-Error-Message": message,
                                    "Content-Type": "application/json"}, send_body=send_body)

    def _route(self, *, body: bool) -> None:
        hub = self.server.hub
        split = urllib.parse.urlsplit(self.path)
        path = split.path
        fault = hub.fault(self.command, path) if hub.fault else None
        if fault is not None:
            fault = fault if isinstance(fault, Fault) else Fault(int(fault))
            hub.log.add("FAULT", path, 0)
            self._answer(fault.status, headers=dict(fault.headers), send_body=body)
            return
        auth = self.headers.get("Authorization", "")
        authorized = hub.token is not None and auth == f"Bearer {hub.token}"
        if (m := _API.match(path)) and self.command == "GET":
            repo, kind, rev, sub = m.groups()
            kind, rev = kind or "revision", rev or "main"  # /api/models/{repo}: main
            r, commit, code = hub.resolve(repo, urllib.parse.unquote(rev), authorized)
            if commit is None or r is None:
                self._not_found(code, repo, auth)
                return
            hub.log.add("API", path, 0)
            if kind == "revision":
                self._json({"id": repo, "modelId": repo, "sha": commit, "private": r.private,
                            "siblings": [{"rfilename": p} for p in sorted(r.commits[commit])]})
            else:
                self._tree(repo, rev, commit, r.commits[commit],
                           urllib.parse.unquote(sub or "").strip("/"),
                           urllib.parse.parse_qs(split.query))
            return
        if m := _RESOLVE.match(path):
            repo, rev, rel = m.groups()
            r, commit, code = hub.resolve(repo, urllib.parse.unquote(rev), authorized)
            if commit is None or r is None:
                self._not_found(code, repo, auth, send_body=body)
                return
            f = r.commits[commit].get(urllib.parse.unquote(rel))
            if f is None:
                self._error(404, "EntryNotFound", f"{rel} not in {repo}@{rev}", send_body=body)
                return
            self._file(f, commit, path, body=body)
            return
        self._error(404, "NotFound", f"no such endpoint: {path}")

    def _not_found(self, code: str, repo: str, auth: str, *, send_body: bool = True) -> None:
        if code == "RepoNotFound":  # the hub says 401 without a token, 404 with one
            self._error(401 if not auth else 404, code, f"Repository Not Found for {repo}",
                        send_body=send_body)
        else:
            self._error(404, code, "Invalid rev id", send_body=send_body)

    def _json(self, data: Any, headers: Mapping[str, str] | None = None) -> None:
        self._answer(200, json.dumps(data).encode(),
                     {"Content-Type": "application/json", **(headers or {})})

    def _tree(self, repo: str, rev: str, commit: str, files: Mapping[str, HubFile], sub: str,
              query: Mapping[str, list[str]]) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        prefix = sub + "/" if sub else ""
        entries: dict[str, dict[str, Any]] = {}
        for p, f in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for i in range(1, len(parts)):  # the directories on the way
                d = prefix + "/".join(parts[:i])
                if recursive or i == 1:
                    entries.setdefault(d, {"type": "directory", "oid": git_blob_id(d.encode()),
                                           "size": 0, "path": d})
            if recursive or len(parts) == 1:
                entry: dict[str, Any] = {"type": "file", "oid": f.oid, "size": f.size, "path": p}
                if f.sha256 is not None:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size,
                                    "pointerSize": f.pointer_size}
                entries[p] = entry
        if sub and not entries:
            self._error(404, "EntryNotFound", f"{sub} not in {repo}@{rev}")
            return
        listed = [entries[k] for k in sorted(entries)]
        cursor = int(query.get("cursor", ["0"])[0])
        page = listed[cursor:cursor + self.server.hub.page_size]
        headers = {}
        if cursor + len(page) < len(listed):
            base = f"http://{self.headers.get('Host')}{urllib.parse.urlsplit(self.path).path}"
            nxt = urllib.parse.urlencode({"recursive": str(recursive).lower(),
                                          "cursor": cursor + len(page)})
            headers["Link"] = f'<{base}?{nxt}>; rel="next"'
        self._json(page, headers)

    def _file(self, f: HubFile, commit: str, path: str, *, body: bool) -> None:
        hub = self.server.hub
        common = {"X-Repo-Commit": commit, "ETag": f'"{f.oid}"', "Accept-Ranges": "bytes"}
        if f.sha256 is not None:
            hub.log.add("REDIRECT", path, 0)
            self._answer(302, headers={
                **common, "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size),
                "Location": f"{hub.cdn.url}/lfs/{f.sha256}?X-Amz-Signature=fake"},
                send_body=body)
            return
        data = f.data or b""
        start, end, status = 0, len(data), 200
        rng = self.headers.get("Range")
        if rng and (m := _RANGE.match(rng.strip())) and m.group(1):
            start = int(m.group(1))
            end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
            if start >= len(data):
                self._answer(416, headers={"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
            common["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        hub.log.add("GET" if body else "HEAD", path, end - start if body else 0)
        self._answer(status, data[start:end], common, send_body=body)
