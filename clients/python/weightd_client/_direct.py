"""Loading a model straight from its source, without the daemon (the client's fallback).

Used only when the daemon cannot be reached and the caller allowed a fallback. It
chooses files the way the daemon does (weightd/sources): a single ``.safetensors``
file is the model; an ``*.index.json`` brings the shards its weight map names; a
directory brings every ``*.safetensors`` under it that matches ``include`` and no
``exclude`` glob (globs match the relative path or the file name).

Local files are loaded as ``safetensors.torch.load_file`` does (``safe_open``); remote ones are read
through fsspec, an optional dependency of the client, and must fit in memory. Nothing
is cached and nothing is shared with other processes: this is the slow path that keeps
a replica starting while the daemon is down.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import struct
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightd_client.errors import (
    DaemonUnavailable,
    FormatError,
    NotPermitted,
    SourceNotFound,
    SourceUnavailable,
    WeightdError,
)
from weightd_client.tensors import require_torch

if TYPE_CHECKING:
    import torch

_SHARD_GLOB = "*.safetensors"
_INDEX_SUFFIX = ".index.json"


@dataclass
class DirectModel:
    """What a direct load found: the tensors, merged metadata and the model's directory."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    snapshot_path: str


def _matches(relpath: str, patterns: Sequence[str]) -> bool:
    base = posixpath.basename(relpath)
    return any(fnmatch.fnmatchcase(relpath, p) or fnmatch.fnmatchcase(base, p) for p in patterns)


def _wanted(relpath: str, include: Sequence[str] | None, exclude: Sequence[str]) -> bool:
    return (relpath.endswith(".safetensors") and _matches(relpath, include or (_SHARD_GLOB,))
            and not _matches(relpath, exclude))


def _index_shards(raw: bytes, path: str) -> list[str]:
    """The shard names of an HF ``*.index.json``, each a plain relative path."""
    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(path, f"index is not valid JSON: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(path, "index has no weight_map object")
    shards = sorted({str(v) for v in weight_map.values()})
    for rel in shards:
        if (not rel or rel.startswith("/") or "\\" in rel
                or any(p in ("", ".", "..") for p in rel.split("/"))):
            raise FormatError(path, f"index names a shard {rel!r} outside the model's directory")
    return shards


def _header_metadata(data: bytes | memoryview, path: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file held in memory."""
    if len(data) < 8:
        raise FormatError(path, "file is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(path, f"header is not valid JSON: {e}") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _merge(into: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: str) -> None:
    for name, t in tensors.items():
        if name in into:
            raise FormatError(path, f"tensor {name!r} also appears in another shard")
        into[name] = t


def _local_path(source: str) -> Path | None:
    """The local path a reference names, or None for a remote URL."""
    if "://" not in source:
        return Path(os.path.expanduser(source))
    scheme, rest = source.split("://", 1)
    if scheme.lower() not in ("file", "local"):
        return None
    parsed = urllib.parse.urlsplit("file://" + rest)
    if parsed.netloc not in ("", "localhost"):
        raise SourceNotFound(f"{source}: file:// URLs must name a local path")
    return Path(urllib.request.url2pathname(parsed.path))


def load_local(path: Path, *, include: Sequence[str] | None = None,
               exclude: Sequence[str] = ()) -> DirectModel:
    """Load a local directory, ``.safetensors`` file or ``*.index.json``.

    Args:
        path: the model on a local filesystem.
        include: globs of shards to load from a directory (default: every
            ``*.safetensors``).
        exclude: globs of shards to leave out.

    Returns:
        The tensors (``safe_open`` + ``get_tensor``, as ``load_file``), their merged
        metadata and the model's directory.

    Raises:
        SourceNotFound: nothing there, or no shard left after include/exclude.
        FormatError: a shard or the index is malformed, or a tensor appears twice.
    """
    require_torch()
    import safetensors

    if not path.exists():
        raise SourceNotFound(f"{path}: no such file or directory")
    name = path.name.lower()
    if path.is_dir():
        root = path
        files = sorted(p for p in path.rglob(_SHARD_GLOB)
                       if p.is_file() and _wanted(p.relative_to(path).as_posix(), include, exclude))
        if not files:
            raise SourceNotFound(f"{path}: no .safetensors files (after include/exclude)")
    elif name.endswith(_INDEX_SUFFIX):
        root = path.parent
        files = [root / rel for rel in _index_shards(path.read_bytes(), str(path))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SourceNotFound(f"{path}: shards named in the index are missing: "
                                 f"{', '.join(missing[:5])}")
    elif name.endswith(".safetensors"):
        root, files = path.parent, [path]
    else:
        raise SourceNotFound(f"{path}: not a directory, a .safetensors file or an *{_INDEX_SUFFIX}")

    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for f in files:
        try:
            # one open per shard: what load_file does, with the metadata read on the way
            with safetensors.safe_open(str(f), framework="pt") as st:
                metadata.update(st.metadata() or {})
                _merge(tensors, {k: st.get_tensor(k) for k in st.keys()}, str(f))  # noqa: SIM118
        except WeightdError:
            raise
        except (safetensors.SafetensorError, ValueError) as e:
            raise FormatError(str(f), str(e)) from e
    return DirectModel(tensors, metadata, str(root))


def load_remote(source: str, *, socket: str, include: Sequence[str] | None = None,
                exclude: Sequence[str] = ()) -> DirectModel:
    """Load a model from a remote URL through fsspec, each shard read into memory.

    Args:
        source: the URL (``s3://…``, ``hf://…``, ``https://…``).
        socket: the daemon's socket (named in the error when fsspec is missing).
        include: globs of shards to load from a directory.
        exclude: globs of shards to leave out.

    Returns:
        The tensors, their merged metadata and the model directory's URL.

    Raises:
        DaemonUnavailable: fsspec, or the filesystem for the URL's protocol, is not
            installed (the daemon would have read it).
        SourceNotFound, NotPermitted, SourceUnavailable: from the source.
        FormatError: a shard or the index is malformed, or a tensor appears twice.
    """
    require_torch()
    import safetensors.torch

    protocol = source.split("://", 1)[0]
    try:
        import fsspec
        import fsspec.core
    except ImportError as e:
        raise DaemonUnavailable(
            f"weightd daemon unreachable at {socket}, and loading {source} straight from the "
            "source needs fsspec for remote sources (pip install fsspec)") from e
    options: dict[str, Any] = {}
    if protocol in ("s3", "s3a") and os.environ.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    try:
        fs, root = fsspec.core.url_to_fs(source, **options)
    except (ImportError, ValueError) as e:
        raise DaemonUnavailable(
            f"weightd daemon unreachable at {socket}, and loading {source} straight from the "
            f"source needs fsspec's {protocol!r} filesystem: {e}") from e

    def fail(e: Exception, what: str) -> WeightdError:
        if isinstance(e, FileNotFoundError):
            return SourceNotFound(f"{what}: not found at the source")
        if isinstance(e, PermissionError):
            return NotPermitted(f"{what}: the source refused access ({e})")
        return SourceUnavailable(f"{what}: {type(e).__name__}: {e}")

    root = root.rstrip("/")
    model_url = source.rstrip("/")
    try:
        if root.lower().endswith(".safetensors"):
            paths = [root]
            model_url = model_url.rsplit("/", 1)[0]
        elif root.lower().endswith(_INDEX_SUFFIX):
            parent = posixpath.dirname(root)
            paths = [posixpath.join(parent, rel)
                     for rel in _index_shards(bytes(fs.cat_file(root)), source)]
            model_url = model_url.rsplit("/", 1)[0]
        else:
            prefix = root + "/"
            paths = sorted(p for p in fs.find(root)
                           if p.startswith(prefix) and _wanted(p[len(prefix):], include, exclude))
            if not paths:
                raise SourceNotFound(f"{source}: no .safetensors files (after include/exclude)")
        tensors: dict[str, torch.Tensor] = {}
        metadata: dict[str, str] = {}
        for p in paths:
            # Deliberate copy: without the daemon, each shard is read into this
            # process's memory and the tensors are built from those bytes.
            data = bytes(fs.cat_file(p))
            metadata.update(_header_metadata(data, p))
            try:
                loaded = safetensors.torch.load(data)
            except (safetensors.SafetensorError, ValueError) as e:
                raise FormatError(p, str(e)) from e
            del data
            _merge(tensors, loaded, p)
    except WeightdError:
        raise
    except Exception as e:  # any backend error: classify like the daemon does
        raise fail(e, source) from e
    return DirectModel(tensors, metadata, model_url)


def load_direct(source: str, *, socket: str, include: Sequence[str] | None = None,
                exclude: Sequence[str] = ()) -> DirectModel:
    """Load a model from a local path, ``file://`` URL or remote URL, without the daemon.

    Args:
        source: the model reference, as given to the daemon.
        socket: the daemon's socket (for error messages).
        include: globs of shards to load from a directory.
        exclude: globs of shards to leave out.

    Returns:
        The tensors, their merged metadata and the model's directory (path or URL).

    Raises:
        SourceNotFound, NotPermitted, SourceUnavailable, FormatError: as the daemon would.
        DaemonUnavailable: a remote source and no fsspec (or its protocol's filesystem).
    """
    local = _local_path(source)
    if local is not None:
        return load_local(local, include=include, exclude=exclude)
    return load_remote(source, socket=socket, include=include, exclude=exclude)
