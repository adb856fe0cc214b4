"""Parser for Hugging Face sharded-checkpoint index files.

A sharded checkpoint ships ``model.safetensors.index.json``::

    {"metadata": {"total_size": 123},
     "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors", ...}}

The shard names come from a remote source and become local file names, so they are
checked like paths from an untrusted archive: relative, no ``..`` or ``.`` component,
no empty component, no backslash, no control character.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from weightd.errors import FormatError

__all__ = ["MAX_INDEX_BYTES", "IndexJson", "parse_index_json"]

#: The largest index file accepted. The largest public indexes (hundreds of thousands
#: of tensors) are around 10 MB.
MAX_INDEX_BYTES = 50_000_000

_SHOW_LIMIT = 80


@dataclass(frozen=True, slots=True)
class IndexJson:
    """A validated ``*.safetensors.index.json``.

    Attributes
    ----------
    path : str
        Where the index was read from (used in error messages).
    metadata : dict
        The index's ``metadata`` object (empty when absent); values are not checked.
    weight_map : dict of str to str
        Tensor name to shard file name, relative to the index's directory.
    """

    path: str
    metadata: dict[str, Any]
    weight_map: dict[str, str]

    @property
    def shards(self) -> list[str]:
        """The shard file names, sorted, each once."""
        return sorted(set(self.weight_map.values()))


def parse_index_json(data: bytes | bytearray | memoryview, *, path: str) -> IndexJson:
    """Parse and validate a Hugging Face safetensors index file.

    Parameters
    ----------
    data : bytes
        The file's content.
    path : str
        Where it came from, for error messages and :attr:`IndexJson.path`.

    Returns
    -------
    IndexJson
        The validated index.

    Raises
    ------
    FormatError
        When the content is not UTF-8 JSON, not an object, has a duplicate key, has no
        valid ``weight_map``, a ``metadata`` that is not an object, or a shard name that
        is not a plain relative path (absolute, ``..``, backslash, empty...). Nothing
        else is raised.

    Examples
    --------
    >>> index = parse_index_json(
    ...     b'{"metadata": {}, "weight_map": {"w": "model-1.safetensors"}}',
    ...     path="model.safetensors.index.json",
    ... )
    >>> index.shards
    ['model-1.safetensors']
    """
    try:
        return _parse(data, path)
    except MemoryError as e:
        raise FormatError(path, "index is too large to parse in the memory available") from e


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _object_pairs(path: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise FormatError(path, f"index JSON repeats the key {_show(key)}")
                seen.add(key)
        return obj

    return hook


def _parse(data: bytes | bytearray | memoryview, path: str) -> IndexJson:
    if len(data) > MAX_INDEX_BYTES:
        raise FormatError(path, f"index is {len(data)} bytes, over the limit of {MAX_INDEX_BYTES}")
    try:
        text = str(data, "utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(path, f"index is not valid UTF-8 (byte {e.start}: {e.reason})") from e
    try:
        root = json.loads(text, object_pairs_hook=_object_pairs(path))
    except FormatError:
        raise
    except json.JSONDecodeError as e:
        raise FormatError(path, f"index is not valid JSON: {e.msg} at character {e.pos}") from e
    except RecursionError as e:
        raise FormatError(path, "index JSON is nested too deeply") from e
    except ValueError as e:  # e.g. an integer with more digits than int() allows
        raise FormatError(path, f"index is not valid JSON: {e}") from e

    if not isinstance(root, dict):
        raise FormatError(
            path, f"index must be a JSON object with a weight_map, got {type(root).__name__}"
        )

    metadata = root.get("metadata", {})
    if not isinstance(metadata, dict):
        raise FormatError(
            path, f"index 'metadata' must be an object, got {type(metadata).__name__}"
        )

    if "weight_map" not in root:
        raise FormatError(path, "index has no 'weight_map' (tensor name -> shard file)")
    weight_map = root["weight_map"]
    if not isinstance(weight_map, dict):
        raise FormatError(
            path,
            f"index 'weight_map' must be an object of tensor name to shard file, "
            f"got {type(weight_map).__name__}",
        )
    if not weight_map:
        raise FormatError(path, "index 'weight_map' is empty: it lists no tensor")
    for name, shard in weight_map.items():
        if not name or not _is_utf8(name):
            raise FormatError(
                path, f"weight_map has an invalid tensor name {_show(name)} (empty or not UTF-8)"
            )
        if type(shard) is not str:
            raise FormatError(
                path,
                f"weight_map[{_show(name)}] must be a shard file name (a string), "
                f"got {type(shard).__name__}",
            )
        problem = _shard_name_problem(shard)
        if problem:
            raise FormatError(
                path, f"weight_map[{_show(name)}]: shard name {_show(shard)} {problem}"
            )
    return IndexJson(path=path, metadata=metadata, weight_map=weight_map)


def _shard_name_problem(shard: str) -> str:
    """Say why ``shard`` is not a plain relative file name, or return ``""``."""
    if not shard:
        return "is empty"
    if "\\" in shard:
        return "contains a backslash (shard names are relative paths with '/')"
    if shard.startswith("/"):
        return "is an absolute path (shard names must be relative to the index)"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in shard):
        return "contains a control character"
    if not _is_utf8(shard):
        return "is not valid Unicode (lone surrogate)"
    for part in shard.split("/"):
        if part == "..":
            return "contains '..' (it would point outside the model's directory)"
        if part in ("", "."):
            return "has an empty or '.' path component (use a plain relative path)"
    return ""
