"""Hugging Face sources (``hf://org/model[@revision][/path]``): weightd speaks the hub's
HTTP API itself, and reads the bytes through its own range reader (weightd/sources/wire.py).

- **Reference.** ``hf://org/model`` is the branch ``main`` (and the same model as
  ``hf://org/model@main``); ``@revision`` names a branch, a tag or a commit
  (``@refs/pr/1`` or ``@refs%2Fpr%2F1`` for a pull request); a path after it narrows the
  model to a directory, a ``.safetensors`` file or an ``*.index.json``.
- **Endpoint.** ``hf_endpoint``, else ``HF_ENDPOINT``, else ``https://huggingface.co``.
- **Commit.** ``GET {endpoint}/api/models/{repo}/revision/{revision}`` gives the commit
  (``sha``) once per fetch; every file is listed and read at that commit, so a branch
  that moves during the fetch cannot mix two commits.
- **Listing.** ``GET {endpoint}/api/models/{repo}/tree/{commit}/{path}?recursive=true``
  (paged by its ``Link: <...>; rel="next"`` header, bounded: :data:`MAX_FILES` entries,
  :data:`MAX_PAGES` pages): size, git blob id and, for an LFS file, its sha256.
- **Identity.** ``size:sha256=<LFS sha256>``, or ``size:oid=<git blob id>`` for a file
  kept in git: the file's content, not the commit. A fetch at a new commit that did not
  change a file reads no data of it (its ``url``, ``hf://org/model/<path>``, names no
  revision either).
- **Origin digest.** The LFS sha256, or the git blob id (SHA-1 of ``blob <size>\\0`` and
  the bytes), computed while the file is written; a mismatch is ``IntegrityError``.
- **Bytes.** ``GET {endpoint}/{repo}/resolve/{commit}/{path}`` with ``Range``; the hub
  answers an LFS file with a redirect to its CDN (a signed URL), which is followed when
  its host is the hub's: see "Trust" below. Each answer is checked as for HTTP
  (weightd/sources/http.py).
- **Token.** ``HF_TOKEN``, else the token file ``huggingface-cli login`` writes
  (``HF_TOKEN_PATH``, else ``$HF_HOME/token``, else ``~/.cache/huggingface/token``), sent
  as ``Authorization: Bearer`` to the endpoint's own origin only (the API and ``resolve``),
  never to the CDN (its URLs are signed) and never logged: it is in no URL and no message.
- **Rate limits.** A 429 (or 503) with ``Retry-After`` is waited out by the retry helper
  (weightd/retry.py), bounded by ``retry_max_seconds``; API calls and ranges alike.

**Trust.** ``allowed_sources`` names repositories (``hf://org/`` or ``hf://org/model``,
which allows every revision of it; ``hf://org/model@v1`` allows that revision only), not
hosts: the hub is trusted to name its CDN. So a hop is followed when it stays on the
endpoint's origin (scheme, host and port), or goes to a host of ``hf_download_hosts``
(default: ``hf.co``, ``huggingface.co`` and their subdomains, where the hub's CDNs live),
never from ``https`` down to ``http``; any other host is refused before it is asked
(``NotPermitted`` naming it). The bytes of LFS files are checked against the sha256 the
API listed, those of other files against their git blob id, so a CDN that served other
bytes than the hub's is caught too.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from weightd.config import Config
from weightd.errors import NotPermitted, SourceNotFound, SourceUnavailable, WeightdError
from weightd.retry import RetryPolicy, retry_call
from weightd.sources.base import (
    SOURCE_CLASSES,
    RedirectRefused,
    RemoteFile,
    _safe_relpath,
    is_transient,
    translate_error,
)
from weightd.sources.digests import from_hf_info
from weightd.sources.http import WireSource
from weightd.sources.wire import AuthHeaders, HopCheck, HttpStatusError, origin_of

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"

#: Bounds of a listing: entries (files and directories) and pages.
MAX_FILES = 100_000
MAX_PAGES = 1_000

#: The most bytes one API answer may have (a page of the tree is ~0.3 MB per 1000 files).
MAX_API_BYTES = 32 * 1024 * 1024

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Revisions with slashes that the hub knows (as huggingface_hub's HfFileSystem does).
_SPECIAL_REF = re.compile(r"^(refs/(?:pr/\d+|convert/[\w.-]+))(?:/(.*))?$")
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


@dataclass(frozen=True)
class HfRef:
    """A parsed ``hf://`` reference.

    Attributes:
        repo: ``org/name``.
        revision: the branch, tag or commit asked for (``main`` when none was).
        path: the path in the repository ("" for its root).
    """

    repo: str
    revision: str
    path: str

    def url(self, *, with_revision: bool = True) -> str:
        """The canonical URL (the revision percent-encoded, left out when it is main)."""
        rev = (f"@{quote(self.revision, safe='')}"
               if with_revision and self.revision != DEFAULT_REVISION else "")
        return f"hf://{self.repo}{rev}" + (f"/{self.path}" if self.path else "")


def parse_ref(url: str) -> HfRef:
    """Parse ``hf://org/name[@revision][/path]``.

    Example
    -------
    >>> parse_ref("hf://org/model@refs/pr/3/sub")
    HfRef(repo='org/model', revision='refs/pr/3', path='sub')

    Raises:
        SourceNotFound: not an ``hf://org/name`` reference.
    """
    rest = url.split("://", 1)[1] if "://" in url else url
    org, _, after = rest.partition("/")
    name, _, tail = after.partition("/")
    revision = DEFAULT_REVISION
    if "@" in name:
        name, _, rev_start = name.partition("@")
        rev_and_path = rev_start + (f"/{tail}" if tail else "")
        special = _SPECIAL_REF.match(unquote(rev_and_path)) if "%2F" not in rev_start.upper() \
            else None
        if special is not None:
            revision, tail = special.group(1), special.group(2) or ""
        else:
            revision = unquote(rev_start)
    if org in ("datasets", "spaces") or not (_REPO_PART.match(org) and _REPO_PART.match(name)):
        raise SourceNotFound(f"{url}: not a Hugging Face model reference (hf://org/model"
                             "[@revision][/path]; datasets and spaces are not read)")
    if not revision or any(c in revision for c in "\0\n\r"):
        raise SourceNotFound(f"{url}: an empty or malformed revision")
    return HfRef(f"{org}/{name}", revision, tail.strip("/"))


def hf_token() -> str | None:
    """The user's hub token: ``HF_TOKEN``, else the file ``huggingface-cli login`` wrote."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("HF_TOKEN_PATH") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                  "huggingface"), "token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _host_matches(host: str, port: int, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        want_host, _, want_port = pattern.strip().lower().rpartition(":") \
            if re.search(r":\d+$", pattern.strip()) else (pattern.strip().lower(), "", "")
        if want_port and int(want_port) != port:
            continue
        if want_host.startswith("*."):
            if host.endswith(want_host[1:]) and host != want_host[2:]:
                return True
        elif fnmatch.fnmatchcase(host, want_host):
            return True
    return False


class HfSource(WireSource):
    """A model repository on the Hugging Face hub (or a server that speaks its API)."""

    def __init__(self, url: str, fs: Any, path: str, config: Config) -> None:
        self.ref = parse_ref(url)
        self.endpoint = (config.hf_endpoint or os.environ.get("HF_ENDPOINT")
                         or DEFAULT_ENDPOINT).rstrip("/")
        try:
            self.endpoint_origin = origin_of(self.endpoint)
        except ValueError as e:
            raise SourceNotFound(f"hf_endpoint {self.endpoint!r} is not an http(s) URL") from e
        self._token = hf_token()
        super().__init__(url, fs, path, config)
        self.policy = RetryPolicy(attempts=config.retry_attempts,
                                  max_seconds=config.retry_max_seconds)
        self._commit: str | None = None
        self._trees: dict[str, list[dict[str, Any]]] = {}

    # --- references --------------------------------------------------------------------------

    @classmethod
    def canonical(cls, url: str) -> str:
        try:
            return parse_ref(url).url()
        except SourceNotFound:
            return url  # a prefix (hf://org) in allowed_sources, or refused when opened

    @classmethod
    def allowed_forms(cls, url: str) -> tuple[str, ...]:
        try:
            ref = parse_ref(url)
        except SourceNotFound:
            return (url,)
        return (ref.url(), ref.url(with_revision=False))

    @classmethod
    def filesystem(cls, url: str, config: Config) -> tuple[Any, str]:
        return None, parse_ref(url).path

    # --- the hub's trust -------------------------------------------------------------------

    def hop_check(self) -> HopCheck:
        hosts = self.config.hf_download_hosts

        def check(target: str, previous: str | None) -> None:
            scheme, host, port = origin_of(target)
            if (scheme, host, port) == self.endpoint_origin:
                return
            downgrade = scheme == "http" and previous is not None and \
                urlsplit(previous).scheme.lower() == "https"
            if previous is not None and not downgrade and _host_matches(host, port, hosts):
                return
            raise RedirectRefused(NotPermitted(
                f"the hub redirected to {urlsplit(target).scheme}://{host}:{port}, which is "
                f"neither the hub ({self.endpoint}) nor one of hf_download_hosts "
                f"({', '.join(hosts) or 'none'})" + (" (and from https to http)"
                                                      if downgrade else "")))

        return check

    def auth_headers(self) -> AuthHeaders:
        def auth(url: str) -> Mapping[str, str]:
            if self._token and origin_of(url) == self.endpoint_origin:
                return {"Authorization": f"Bearer {self._token}"}
            return {}

        return auth

    # --- the API ---------------------------------------------------------------------------

    def _what(self) -> str:
        return self.ref.url()

    def _refusal(self, e: HttpStatusError, what: str) -> WeightdError:
        """The outcome of an API answer of 400 or more, by the hub's ``X-Error-Code``
        (it answers 401 for a repository that is missing or private alike)."""
        code = e.headers.get("x-error-code", "")
        token = "a token was sent" if self._token else "no token: set HF_TOKEN"
        if code == "RevisionNotFound":
            return SourceNotFound(f"{what}: the hub has no revision {self.ref.revision!r} of "
                                  f"{self.ref.repo}")
        if code == "EntryNotFound":
            return SourceNotFound(f"{what}: not in the repository at this revision")
        if code == "RepoNotFound":
            return SourceNotFound(f"{what}: the hub has no repository {self.ref.repo} (or it "
                                  f"is private: {token})")
        if code == "GatedRepo" or e.status in (401, 403):
            return NotPermitted(f"{what}: the hub refused access to {self.ref.repo} (HTTP "
                                f"{e.status}{', gated' if code == 'GatedRepo' else ''}; {token})")
        return translate_error(e, what)

    def _get(self, url: str, what: str, *, limit: int,
             headers: Mapping[str, str] | None = None) -> tuple[bytes, Mapping[str, str]]:
        """GET a small answer of the hub, retried (429 with Retry-After, 5xx, resets),
        its errors translated (naming ``what``)."""
        try:
            body, got, _ = retry_call(lambda: self.wire.get(url, limit=limit, headers=headers),
                                      policy=self.policy, is_transient=is_transient, what=what)
        except HttpStatusError as e:
            raise self._refusal(e, what) from e
        except WeightdError:
            raise
        except Exception as e:
            raise self.error(e, what) from e
        return body, got

    def _api(self, url: str, what: str) -> tuple[Any, Mapping[str, str]]:
        """GET a JSON answer of the API."""
        body, headers = self._get(url, what, limit=MAX_API_BYTES,
                                  headers={"Accept": "application/json"})
        if len(body) > MAX_API_BYTES:
            raise SourceUnavailable(f"{what}: the hub's answer is larger than "
                                    f"{MAX_API_BYTES} bytes")
        try:
            return json.loads(body), headers
        except ValueError as e:
            raise SourceUnavailable(f"{what}: the hub's answer is not JSON ({e})") from e

    @property
    def commit(self) -> str:
        """The commit the revision names now, asked of the hub once per source."""
        if self._commit is None:
            rev = quote(self.ref.revision, safe="")
            data, _ = self._api(f"{self.endpoint}/api/models/{self.ref.repo}/revision/{rev}",
                                self._what())
            sha = data.get("sha") if isinstance(data, dict) else None
            if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{40}", sha):
                raise SourceUnavailable(f"{self._what()}: the hub's answer names no commit")
            self._commit = sha
            log.info("%s is commit %s", self._what(), sha)
        return self._commit

    def _tree(self, directory: str) -> list[dict[str, Any]]:
        """Every entry under ``directory`` (recursive), as the hub lists them."""
        if directory in self._trees:
            return self._trees[directory]
        sub = "/" + quote(directory) if directory else ""
        url: str | None = (f"{self.endpoint}/api/models/{self.ref.repo}/tree/{self.commit}"
                           f"{sub}?recursive=true&expand=false")
        entries: list[dict[str, Any]] = []
        for _ in range(MAX_PAGES):
            if url is None:
                break
            page, headers = self._api(url, self._what())
            if not isinstance(page, list):
                raise SourceUnavailable(f"{self._what()}: the hub's listing is not a list")
            entries += [e for e in page if isinstance(e, dict)]
            if len(entries) > MAX_FILES:
                raise SourceUnavailable(f"{self._what()}: more than {MAX_FILES} entries")
            m = _LINK_NEXT.search(headers.get("link", ""))
            url = m.group(1) if m else None
        else:
            raise SourceUnavailable(f"{self._what()}: more than {MAX_PAGES} pages of listing")
        self._trees[directory] = entries
        return entries

    # --- the hooks of Source ---------------------------------------------------------------

    def _url_of(self, path: str) -> str:
        return f"hf://{self.ref.repo}/{path}" if path else self._what()

    def _find(self, root: str) -> list[tuple[str, str, dict[str, Any]]]:
        prefix = root.rstrip("/") + "/" if root else ""
        out = []
        for entry in self._tree(root.rstrip("/")):
            path = str(entry.get("path", ""))
            if entry.get("type") != "file" or not path.startswith(prefix):
                continue
            out.append((path, path[len(prefix):], entry))
        return sorted(out)

    def _info(self, path: str) -> dict[str, Any]:
        path = path.strip("/")
        if not path:
            self.commit  # noqa: B018 - the repository and revision exist, or this raises
            return {"type": "directory", "size": 0}
        for entry in self._tree(posixpath.dirname(path)):
            if entry.get("path") == path:
                return dict(entry)
        raise SourceNotFound(f"{self._url_of(path)}: not in {self._what()} (commit "
                             f"{self.commit[:12]})")

    def _remote(self, path: str, relpath: str, info: dict[str, Any]) -> RemoteFile:
        relpath = _safe_relpath(relpath, self.url)
        _safe_relpath(path, self.url)
        size = info.get("size")
        if not isinstance(size, int) or size < 0:
            raise SourceUnavailable(f"{self._url_of(path)}: the hub's listing gives no size")
        digest = from_hf_info(info)
        if digest is None:
            raise SourceUnavailable(f"{self._url_of(path)}: the hub's listing gives neither "
                                    "an LFS sha256 nor a git blob id")
        key = "sha256" if digest.algorithm == "sha256" else "oid"
        return RemoteFile(url=self._url_of(path), path=path, relpath=relpath, size=size,
                          identity=f"{size}:{key}={digest.expected}",
                          origin_digest=digest.text())

    def stat(self, rf: RemoteFile) -> RemoteFile:
        return rf  # a file at a commit never changes

    def download_url(self, rf: RemoteFile) -> str:
        return (f"{self.endpoint}/{self.ref.repo}/resolve/{self.commit}/"
                f"{quote(rf.path)}")

    def _read_small(self, path: str, limit: int) -> bytes:
        url = f"{self.endpoint}/{self.ref.repo}/resolve/{self.commit}/{quote(path)}"
        return self._get(url, self._url_of(path), limit=limit)[0]


SOURCE_CLASSES["hf"] = HfSource
