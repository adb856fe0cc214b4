"""A corpus of malformed safetensors files, each one a model directory of one shard.

Every file here must be refused by weightd with a :class:`~weightd.errors.FormatError`
(``INVALID_ARGUMENT`` through the daemon) that names the file and says what is wrong,
quickly and without leaving anything behind. :func:`build_corpus` writes them under a
directory; each :class:`HostileCase` says which words the refusal's reason should hold
(any one of them, case-insensitive), so a test can check that the reason is the right one
and not an accident of some earlier check.

Run it as a script to write the corpus somewhere and print what the parser says::

    python tests/hostile_corpus.py /tmp/corpus
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SHARD = "model.safetensors"
MiB = 1024 * 1024


@dataclass(frozen=True)
class HostileCase:
    """One malformed shard: its name, its model directory and the expected reason.

    Attributes:
        name: a short id (also the directory name).
        path: the model directory (holds ``model.safetensors`` and nothing else).
        reason: words of which at least one must appear in the refusal (lower case).
        big: the file is tens of MB (the test also checks the time it takes).
    """

    name: str
    path: Path
    reason: tuple[str, ...]
    big: bool = False

    @property
    def shard(self) -> Path:
        return self.path / SHARD


def _file(header: bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file: the 8-byte length (``length`` overrides it), header, data."""
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _entry(dtype: str, shape: list[object], start: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def _million_tensors() -> bytes:
    # 1,000,000 one-byte U8 tensors (about 50 MB of JSON): more than MAX_TENSORS a shard
    # may declare, refused before the header is decoded.
    return _wide_short(1_000_000)


def _wide_short(n: int) -> bytes:
    # ``n`` one-byte U8 tensors that tile ``n`` bytes... but the data section is one byte
    # short: the whole header must be read to refuse it.
    parts = [b"{"]
    parts.extend(b'"%x":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]},' % (i, i, i + 1)
                 for i in range(n))
    parts[-1] = parts[-1][:-1]
    parts.append(b"}")
    header = b"".join(parts)
    return _file(header, b"\0" * (n - 1))


def _huge_whitespace() -> bytes:
    # 50 MB of whitespace inside a header under the 100 MB limit, then a tensor whose
    # bytes are not there.
    entry = _json({"w": _entry("F32", [4], 0, 16)})
    header = b"{" + b" " * (50 * MiB) + entry[1:]
    return _file(header, b"\0" * 8)


def _huge_array() -> bytes:
    # a 16 MB array where a tensor entry (an object) belongs
    header = b'{"w":[' + b"0," * (8 * MiB) + b"0]}"
    return _file(header)


def _deep(open_: bytes, close: bytes, depth: int = 100_000) -> bytes:
    return _file(open_ * depth + close * depth)


def _deep_object() -> bytes:
    # {"a":{"a":{...}}} 100,000 levels down
    return _file(b'{"a":' * 100_000 + b"{}" + b"}" * 100_000)


#: name -> (contents, reason words, big)
_CASES: dict[str, tuple[Callable[[], bytes], tuple[str, ...], bool]] = {
    "empty-file": (lambda: b"", ("bytes", "short", "length", "empty", "small"), False),
    "seven-bytes": (lambda: b"\x08\0\0\0\0\0\0", ("bytes", "short", "length", "small"), False),
    "header-length-huge": (
        lambda: _file(b"{}", length=2**63 + 5), ("header", "length", "limit", "large"), False),
    "header-length-over-limit": (
        lambda: _file(b"{}", length=100_000_001), ("header", "limit", "large"), False),
    "header-length-past-eof": (
        lambda: _file(b'{"__metadata__":{}}', length=4096),
        ("past", "end", "eof", "beyond", "truncated", "short", "file"), False),
    "header-length-zero": (lambda: _file(b"", length=0), ("header", "json", "empty"), False),
    "deep-array": (lambda: _deep(b"[", b"]"), ("object", "nest", "deep", "json"), False),
    "deep-object": (_deep_object, ("nest", "deep", "object", "entry", "dtype"), False),
    "huge-json-whitespace": (_huge_whitespace, ("offset", "data", "bytes", "end"), True),
    "huge-json-array": (_huge_array, ("object", "entry", "array"), True),
    "million-tensors": (_million_tensors, ("tensors", "limit"), True),
    "wide-and-one-byte-short": (lambda: _wide_short(130_000),
                                ("offset", "data", "bytes", "end", "short"), True),
    "not-json": (lambda: _file(b"this is not json"), ("json",), False),
    "truncated-json": (lambda: _file(b'{"w":{"dtype":"F32",'), ("json", "end"), False),
    "header-not-an-object": (lambda: _file(b"[1,2,3]"), ("object", "array"), False),
    "non-utf8-header": (
        lambda: _file(b'{"w\xff\xfe":' + _json(_entry("U8", [1], 0, 1)) + b"}", b"\0"),
        ("utf-8", "utf8", "unicode", "decode"), False),
    "nul-in-name": (
        lambda: _file(b'{"w\x00":' + _json(_entry("U8", [1], 0, 1)) + b"}", b"\0"),
        ("json", "control", "invalid"), False),
    "unknown-dtype": (
        lambda: _file(_json({"w": _entry("F128", [1], 0, 16)}), b"\0" * 16),
        ("dtype", "f128"), False),
    "wrong-byte-count": (
        lambda: _file(_json({"w": _entry("F32", [2], 0, 4)}), b"\0" * 4),
        ("bytes", "size", "shape", "offset"), False),
    "overlapping-offsets": (
        lambda: _file(_json({"a": _entry("U8", [8], 0, 8), "b": _entry("U8", [8], 4, 12)}),
                      b"\0" * 12),
        ("overlap", "offset", "tile", "gap"), False),
    "offsets-out-of-range": (
        lambda: _file(_json({"w": _entry("U8", [1000], 0, 1000)}), b"\0" * 8),
        ("offset", "data", "bytes", "end", "beyond", "past"), False),
    "offsets-reversed": (
        lambda: _file(_json({"w": _entry("U8", [0], 8, 4)}), b"\0" * 8),
        ("offset", "start", "end"), False),
    "offsets-negative": (
        lambda: _file(_json({"w": _entry("U8", [4], -4, 0)}), b"\0" * 4),
        ("offset", "negative", "integer"), False),
    "gap-between-tensors": (
        lambda: _file(_json({"a": _entry("U8", [4], 0, 4), "b": _entry("U8", [4], 8, 12)}),
                      b"\0" * 12),
        ("gap", "tile", "offset", "cover"), False),
    "trailing-bytes": (
        lambda: _file(_json({"a": _entry("U8", [4], 0, 4)}), b"\0" * 12),
        ("data", "bytes", "tile", "after", "trailing", "end"), False),
    "negative-shape": (
        lambda: _file(_json({"w": _entry("U8", [-1], 0, 1)}), b"\0"),
        ("shape", "negative", "dimension"), False),
    "nan-shape": (
        lambda: _file(b'{"w":{"dtype":"U8","shape":[NaN],"data_offsets":[0,1]}}', b"\0"),
        ("shape", "nan", "json", "integer", "dimension"), False),
    "float-shape": (
        lambda: _file(b'{"w":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}', b"\0"),
        ("shape", "integer", "dimension"), False),
    "shape-overflow": (
        lambda: _file(_json({"w": _entry("U8", [2**62, 2**62], 0, 1)}), b"\0"),
        ("shape", "overflow", "large", "dimension", "elements"), False),
    "duplicate-tensor-names": (
        lambda: _file(b'{"w":' + _json(_entry("U8", [1], 0, 1)) + b',"w":'
                      + _json(_entry("U8", [1], 1, 2)) + b"}", b"\0\0"),
        ("duplicate", "twice", "repeat", "more than once"), False),
    "metadata-not-str-to-str": (
        lambda: _file(_json({"__metadata__": {"epochs": 3},
                             "w": _entry("U8", [1], 0, 1)}), b"\0"),
        ("metadata", "string"), False),
    "metadata-nested": (
        lambda: _file(_json({"__metadata__": {"a": {"b": "c"}},
                             "w": _entry("U8", [1], 0, 1)}), b"\0"),
        ("metadata", "string"), False),
    "entry-missing-offsets": (
        lambda: _file(_json({"w": {"dtype": "U8", "shape": [1]}}), b"\0"),
        ("data_offsets", "missing", "key"), False),
    "entry-unknown-key": (
        lambda: _file(_json({"w": {**_entry("U8", [1], 0, 1), "extra": 1}}), b"\0"),
        ("key", "extra", "unknown"), False),
}


def build_corpus(root: str | Path, *, only: set[str] | None = None) -> list[HostileCase]:
    """Write every case as ``root/<name>/model.safetensors``; return the cases, in order.

    Args:
        root: a directory (created).
        only: write just these cases (by name).

    Returns:
        One :class:`HostileCase` a case.
    """
    root = Path(root)
    out = []
    for name, (make, reason, big) in _CASES.items():
        if only is not None and name not in only:
            continue
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / SHARD).write_bytes(make())
        out.append(HostileCase(name, d, reason, big))
    return out


def case_names() -> list[str]:
    return list(_CASES)


if __name__ == "__main__":  # pragma: no cover - a tool for people
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from weightd.errors import FormatError
    from weightd.formats import read_layout

    for case in build_corpus(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus"):
        t0 = time.perf_counter()
        try:
            read_layout(case.shard)
            said = "ACCEPTED"
        except FormatError as e:
            said = e.reason
        dt = time.perf_counter() - t0
        ok = any(w in said.lower() for w in case.reason)
        print(f"{case.name:<26} {dt:6.2f}s {'ok ' if ok else 'BAD'} {said[:150]}")
