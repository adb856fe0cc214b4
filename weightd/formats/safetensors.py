"""Strict parser for safetensors shard headers.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of
UTF-8 JSON, then the data section. The JSON maps tensor names to
``{"dtype": ..., "shape": [...], "data_offsets": [start, end]}`` (offsets relative to
the data section) and may hold one ``"__metadata__"`` object of string to string.

Every file this parser accepts, the safetensors library (0.8) accepts too, and reads
the same tensors (a fuzz test checks it). The parser refuses on purpose some files the
library accepts: duplicate tensor names (the library keeps the last), unknown keys in a
tensor entry (ignored by the library), a ``null`` ``__metadata__``, duplicate
``__metadata__`` keys, empty tensor names, dimensions above 2**63-1 (torch's limit),
tensor entries over 16 KiB and more than :data:`MAX_METADATA_ENTRIES` metadata pairs
(see the Note). Each refusal is a :class:`~weightd.errors.FormatError` that names the
file, the tensor and what is wrong; no other exception escapes for any input bytes.

Like the library, the parser requires the tensors' byte ranges to tile the data
section exactly (no gap, no overlap, nothing after the last tensor). It does not
require alignment, which older writers do not give: :attr:`ShardLayout.aligned` says
whether every tensor can be viewed in place.

Note [hostile headers]
----------------------
Headers come from remote sources, so a header of up to :data:`MAX_HEADER_BYTES` must
be refused or parsed in seconds and in a few times its size of memory. Decoding the
whole JSON at once cannot promise that: Python objects are much larger than the JSON
that makes them (``"ab":{},`` is 8 bytes of JSON and about 200 bytes of objects), and
nothing can be refused before the whole document is decoded. So the top-level object
is walked member by member, and each member is refused as soon as it is read:

- a tensor entry must be a flat object (no nested object) of at most
  ``_MAX_ENTRY_CHARS`` characters, checked by a regular expression (C speed, no
  backtracking) before the C JSON scanner decodes it and a hook turns it into a
  compact tuple; anything nested inside it is bounded by that size, and nesting too
  deep for the interpreter is caught as ``RecursionError``;
- ``__metadata__`` is read pair by pair; a value that is not a string is refused
  before it is decoded, and at most ``MAX_METADATA_ENTRIES`` pairs are accepted.

What remains is 3 to 5 times the header: per tensor, its name, a ``TensorInfo``, its
shape tuple and an entry in the by-name index. The cyclic garbage collector is paused
while parsing: it would otherwise rescan the growing list of tensors again and again.

That bounds one header; many at once are bounded as a whole. A shard may declare at most
:data:`MAX_TENSORS` tensors, counted by their ``"data_offsets"`` keys before anything is
parsed (a quote inside a string is escaped, so only hostile names can add to the count), so
no layout is larger than about ``MAX_TENSORS`` × 300 bytes. And at most
:data:`PARSE_SLOTS` headers over :data:`SMALL_HEADER_BYTES` are parsed at once in a
process; others wait for a slot (a small header never waits). Eight million-tensor
headers at once used to need more than 2 GiB; now each is refused in milliseconds.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, BinaryIO

from weightd.errors import FormatError

__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_BYTES",
    "MAX_METADATA_ENTRIES",
    "MAX_TENSORS",
    "PARSE_SLOTS",
    "ShardLayout",
    "TensorInfo",
    "header_length",
    "layout_from_bytes",
    "parse_header",
    "read_layout",
]

#: Bits per element of every dtype safetensors 0.8 knows (``Dtype::bitsize`` in
#: safetensors/src/tensor.rs).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

#: The largest header (JSON bytes, without the 8-byte prefix) that is accepted; the
#: same limit as the safetensors library's ``MAX_HEADER_SIZE``.
MAX_HEADER_BYTES = 100_000_000

#: The most tensors one shard may declare. Real checkpoints hold a few hundred to a few
#: thousand per shard (DeepSeek-V3, 671B parameters, has about 91,000 in all, over 163
#: shards); a million-tensor header is an attack on the daemon's memory.
MAX_TENSORS = 131_072

#: Headers larger than this (bytes of JSON) take one of :data:`PARSE_SLOTS` slots.
SMALL_HEADER_BYTES = 1024 * 1024

#: How many large headers one process parses at once (a header of 100 MB needs a few
#: hundred MB while it is parsed; parsing is CPU-bound under the GIL, so more at once
#: would not go faster).
PARSE_SLOTS = 2
_PARSE_SLOTS = threading.BoundedSemaphore(PARSE_SLOTS)

#: The most ``__metadata__`` pairs accepted (files in the wild have a handful; see the
#: Note in the module docstring). The safetensors library has no such limit.
MAX_METADATA_ENTRIES = 100_000

_PREFIX_BYTES = 8
_METADATA_KEY = "__metadata__"
_ENTRY_KEYS = ("dtype", "shape", "data_offsets")
_ENTRY_KEYS_TEXT = "dtype, shape, data_offsets"
# A real entry is under 2 KB even pretty-printed with a 64-dimension shape.
_MAX_ENTRY_CHARS = 16_384
# torch (and every consumer we know) stores sizes as int64.
_MAX_DIM = 2**63 - 1
# The library computes sizes in usize (64 bits) and refuses what overflows.
_MAX_NUMEL = 2**64 - 1
# Longer shapes take the slow path, which stops multiplying as soon as the product is
# too large, so a hostile shape cannot make us multiply huge integers.
_FAST_PROD_NDIM = 16
_CANONICAL_DTYPE = {name: name for name in DTYPE_BITS}
_DTYPE_BITS_GET = DTYPE_BITS.get
_KNOWN_DTYPES_TEXT = ", ".join(sorted(DTYPE_BITS))
_SHOW_LIMIT = 80

# json's C string scanner: (text, index after the opening quote) -> (str, end).
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_WS_RE = re.compile(r"[ \t\n\r]*+")
_COLON_RE = re.compile(r"[ \t\n\r]*+:[ \t\n\r]*+")
# After a member: optional whitespace, then ',' or '}' (group 1), then whitespace.
_SEPARATOR_RE = re.compile(r"[ \t\n\r]*+([,}])[ \t\n\r]*+")
# The longest prefix of a flat object: '{' then anything but quotes and braces, or
# complete strings. Possessive quantifiers keep it linear.
_FLAT_OBJECT_PREFIX_RE = re.compile(r'\{(?:[^"{}]++|"[^"\\]*+(?:\\.[^"\\]*+)*+")*+', re.DOTALL)
# A JSON "-0" (serde_json, in the library, reads it as a float and refuses it). The
# search ignores strings, so a match only means the careful decoder is used.
_NEGATIVE_ZERO_RE = re.compile(r"-0(?![0-9.eE])")
# One whole top-level member: a name with no escape and no control character (group
# 1), ':', a flat object (group 2), then ',' or '}' (group 3), with whitespace
# wherever JSON allows it. Members it does not match take the careful path.
_MEMBER_RE = re.compile(
    r'"([^"\\\x00-\x1f]*+)"[ \t\n\r]*+:[ \t\n\r]*+'
    r'(\{(?:[^"{}]++|"[^"\\]*+(?:\\.[^"\\]*+)*+")*+\})'
    r"[ \t\n\r]*+([,}])[ \t\n\r]*+",
    re.DOTALL,
)
_FIRST_CHAR_KIND = {
    "{": "an object",
    "[": "an array",
    '"': "a string",
    "t": "a boolean",
    "f": "a boolean",
    "n": "null",
    "-": "a number",
    "N": "a number",
    "I": "a number",
    **{digit: "a number" for digit in "0123456789"},
}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives in a safetensors shard.

    Attributes
    ----------
    name : str
        The tensor's name in the header.
    dtype : str
        The safetensors dtype string, e.g. ``"BF16"`` (a key of :data:`DTYPE_BITS`).
    shape : tuple of int
        The tensor's shape; ``()`` for a scalar.
    start, end : int
        ``data_offsets``: the byte range relative to the start of the data section.
    data_offset : int
        Absolute file offset of the data section (``8 + header_len``).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    data_offset: int

    @property
    def offset(self) -> int:
        """Absolute file offset of the tensor's first byte."""
        return self.data_offset + self.start

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.start

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar, 0 when a dimension is 0)."""
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class ShardLayout:
    """The validated header of one safetensors shard.

    Attributes
    ----------
    path : str
        The file the layout was read from (used in error messages).
    header_len : int
        Length of the JSON header in bytes.
    data_offset : int
        Absolute offset of the data section: ``8 + header_len``.
    file_size : int
        Size of the whole file in bytes.
    tensors : tuple of TensorInfo
        Every tensor, sorted by ``start`` (ties: by ``end``, then by name). Their byte
        ranges tile the data section exactly.
    metadata : dict of str to str
        The header's ``__metadata__`` (empty when absent).
    """

    path: str
    header_len: int
    data_offset: int
    file_size: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    # The by-name index; the parser passes the one it built, others leave it empty.
    _by_name: dict[str, TensorInfo] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self._by_name) != len(self.tensors):
            object.__setattr__(self, "_by_name", {t.name: t for t in self.tensors})

    @property
    def data_size(self) -> int:
        """Size of the data section in bytes."""
        return self.file_size - self.data_offset

    @property
    def aligned(self) -> bool:
        """Whether every tensor can be viewed in place with its own dtype.

        True when the data section starts at a multiple of 8 and every tensor's
        absolute offset is a multiple of its element size in bytes. Files written by
        older tools may be unaligned; they are valid, but a consumer must copy (or view
        as bytes) instead of viewing in place.
        """
        if self.data_offset % 8:
            return False
        for t in self.tensors:
            itemsize = max(1, DTYPE_BITS[t.dtype] // 8)
            if t.offset % itemsize:
                return False
        return True

    def tensor(self, name: str) -> TensorInfo:
        """Return the tensor called ``name``.

        Raises
        ------
        KeyError
            When the shard has no such tensor.
        """
        return self._by_name[name]

    def names(self) -> list[str]:
        """Return the tensor names in file order (by offset)."""
        return [t.name for t in self.tensors]


def header_length(prefix: bytes | memoryview, *, path: str, file_size: int) -> int:
    """Validate a shard's 8-byte prefix and return the header length it declares.

    Parameters
    ----------
    prefix : bytes or memoryview
        The first bytes of the file (at least 8 unless the file is shorter).
    path : str
        The file's name, for error messages.
    file_size : int
        Size of the whole file in bytes.

    Returns
    -------
    int
        The length of the JSON header that follows the prefix.

    Raises
    ------
    FormatError
        When the file is shorter than 8 bytes, or the length is 0, larger than
        :data:`MAX_HEADER_BYTES` or reaches past the end of the file.
    """
    if file_size < _PREFIX_BYTES or len(prefix) < _PREFIX_BYTES:
        size = min(file_size, len(prefix))
        raise FormatError(
            path,
            f"file is {size} bytes, shorter than the 8-byte header length that starts "
            "every safetensors file",
        )
    (n,) = struct.unpack_from("<Q", prefix)
    if n == 0:
        raise FormatError(path, "header length is 0 (the smallest header is '{}')")
    if n > MAX_HEADER_BYTES:
        raise FormatError(
            path,
            f"header length {n} is over the limit of {MAX_HEADER_BYTES} bytes "
            "(not a safetensors file, or a corrupt one)",
        )
    if _PREFIX_BYTES + n > file_size:
        raise FormatError(
            path,
            f"header length {n} reaches past the end of the file "
            f"(file is {file_size} bytes; the header needs {_PREFIX_BYTES + n}); "
            "the file is truncated or not a safetensors file",
        )
    return int(n)


def parse_header(header: bytes | memoryview, *, path: str, file_size: int) -> ShardLayout:
    """Parse and validate a safetensors JSON header.

    Parameters
    ----------
    header : bytes or memoryview
        The JSON bytes only, without the 8-byte length prefix.
    path : str
        The file's name, for error messages and :attr:`ShardLayout.path`.
    file_size : int
        Size of the whole file in bytes; the data section is everything after the
        header, and the tensors must tile it exactly.

    Returns
    -------
    ShardLayout
        The validated layout.

    Raises
    ------
    FormatError
        For any header that is not a valid safetensors header for a file of
        ``file_size`` bytes (the reason says what is wrong). Nothing else is raised.

    Examples
    --------
    >>> hdr = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    >>> layout = parse_header(hdr, path="x.safetensors", file_size=8 + len(hdr) + 8)
    >>> layout.tensor("w").offset == 8 + len(hdr)
    True
    """
    # Many small containers make the cyclic GC run over and over while decoding a big
    # header, for nothing: nothing here makes cycles. Pause it (process-wide, so only
    # re-enable what we disabled).
    if len(header) <= SMALL_HEADER_BYTES:
        return _parse_paused(header, path=path, file_size=file_size)
    with _PARSE_SLOTS:
        return _parse_paused(header, path=path, file_size=file_size)


def _parse_paused(header: bytes | memoryview, *, path: str, file_size: int) -> ShardLayout:
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _parse_header(header, path=path, file_size=file_size)
    except MemoryError as e:
        raise FormatError(path, "header is too large to parse in the memory available") from e
    finally:
        if gc_was_enabled:
            gc.enable()


def read_layout(path: str | os.PathLike[str], *, fileobj: BinaryIO | None = None) -> ShardLayout:
    """Read and validate the header of a local safetensors file.

    Only the 8-byte prefix and the header are read, never the data section.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read, or, with ``fileobj``, the name to report in errors.
    fileobj : binary file object, optional
        An open, seekable binary file to read instead of opening ``path``. Its size
        is taken from ``fstat`` when it has a file descriptor, else by seeking to the
        end; it is read from offset 0 and its position is left after the header.

    Returns
    -------
    ShardLayout
        The validated layout.

    Raises
    ------
    FormatError
        When the file is not a valid safetensors file.
    OSError
        When the file cannot be opened or read.
    """
    name = os.fsdecode(path)
    if fileobj is not None:
        return _read_layout_from(fileobj, name)
    with open(name, "rb") as f:
        return _read_layout_from(f, name)


def layout_from_bytes(data: bytes | memoryview, *, path: str = "<bytes>") -> ShardLayout:
    """Validate a whole safetensors file held in memory and return its layout.

    Parameters
    ----------
    data : bytes or memoryview
        The complete file.
    path : str, optional
        The name to report in errors.

    Returns
    -------
    ShardLayout
        The validated layout; offsets index into ``data``.

    Raises
    ------
    FormatError
        When ``data`` is not a valid safetensors file.
    """
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    size = len(view)
    n = header_length(view[:_PREFIX_BYTES], path=path, file_size=size)
    return parse_header(view[_PREFIX_BYTES : _PREFIX_BYTES + n], path=path, file_size=size)


# --------------------------------------------------------------------------- private


def _read_layout_from(f: BinaryIO, name: str) -> ShardLayout:
    size = _file_size(f)
    f.seek(0)
    prefix = _read_exactly(f, min(size, _PREFIX_BYTES), name)
    n = header_length(prefix, path=name, file_size=size)
    header = _read_exactly(f, n, name)
    return parse_header(header, path=name, file_size=size)


def _file_size(f: BinaryIO) -> int:
    try:
        fd = f.fileno()
    except (OSError, AttributeError, ValueError):
        fd = -1
    if fd >= 0:
        return os.fstat(fd).st_size
    return f.seek(0, os.SEEK_END)


def _read_exactly(f: BinaryIO, n: int, name: str) -> bytes:
    data = f.read(n)
    if len(data) < n:
        parts = [data]
        got = len(data)
        while got < n:
            chunk = f.read(n - got)
            if not chunk:
                raise FormatError(
                    name,
                    f"file ended after {got} of {n} bytes while reading its header "
                    "(was it truncated while being read?)",
                )
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
    return data


class _Bad:
    """Why a tensor entry is invalid; reported by the caller, who knows its name."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _DuplicateKey(Exception):
    """A key repeated inside one tensor entry (raised from the decoder's hook)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


# A validated tensor entry: (dtype, shape, start, end).
_Entry = tuple[str, tuple[int, ...], int, int]


def _skip_ws(text: str, i: int = 0) -> int:
    m = _WS_RE.match(text, i)
    return m.end() if m else i


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return f"a non-integer number ({_show(value)})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return "an object"


def _kind_at(text: str, i: int) -> str:
    """Say what JSON value starts at ``text[i]`` without decoding it."""
    if i >= len(text):
        return "the end of the header"
    return _FIRST_CHAR_KIND.get(text[i], repr(text[i]))


def _show(value: object) -> str:
    text = repr(value)
    if len(text) > _SHOW_LIMIT:
        text = text[: _SHOW_LIMIT - 3] + "..."
    return text


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_entry(dtype: object, shape: object, offsets: object, data_size: int) -> _Entry | _Bad:
    """Validate one tensor entry's values; return the compact entry or why it is bad."""
    # Fast path for the valid non-empty entries of ordinary files (no dimension is 0,
    # so the product is small); _explain_entry decides the rest.
    if type(dtype) is str and type(shape) is list and type(offsets) is list and len(offsets) == 2:
        bits = _DTYPE_BITS_GET(dtype)
        start, end = offsets
        if (
            bits is not None
            and type(start) is int
            and type(end) is int
            and 0 <= start < end <= data_size
            and len(shape) <= _FAST_PROD_NDIM
        ):
            for dim in shape:
                if type(dim) is not int or dim < 0 or dim > _MAX_DIM:
                    break
            else:
                if math.prod(shape) * bits == (end - start) * 8:
                    return (_CANONICAL_DTYPE[dtype], tuple(shape), start, end)
    return _explain_entry(dtype, shape, offsets, data_size)


def _explain_entry(dtype: object, shape: object, offsets: object, data_size: int) -> _Entry | _Bad:
    """The slow path of _check_entry: every check, in order, with its reason."""
    if type(dtype) is not str:
        return _Bad(f"dtype must be a string, got {_kind(dtype)}")
    canonical = _CANONICAL_DTYPE.get(dtype)
    if canonical is None:
        return _Bad(f"unknown dtype {_show(dtype)} (safetensors knows {_KNOWN_DTYPES_TEXT})")
    bits = DTYPE_BITS[canonical]

    if type(shape) is not list:
        return _Bad(f"shape must be a list of non-negative integers, got {_kind(shape)}")
    for i, dim in enumerate(shape):
        if type(dim) is not int:
            return _Bad(
                f"shape must be a list of non-negative integers; dimension {i} is {_kind(dim)}"
            )
        if dim < 0:
            return _Bad(f"shape {_show(shape)} has a negative dimension")
        if dim > _MAX_DIM:
            return _Bad(f"shape {_show(shape)} has a dimension larger than 2**63-1")
    dims: tuple[int, ...] = tuple(shape)

    if type(offsets) is not list or len(offsets) != 2:
        what = f"{len(offsets)} items" if type(offsets) is list else _kind(offsets)
        return _Bad(f"data_offsets must be a list of exactly two non-negative integers, got {what}")
    start, end = offsets
    if type(start) is not int or type(end) is not int:
        bad = start if type(start) is not int else end
        return _Bad(f"data_offsets must hold two non-negative integers, got {_kind(bad)}")
    if start < 0 or end < 0:
        return _Bad(f"data_offsets {_show(offsets)} are negative")
    if end < start:
        return _Bad(f"data_offsets [{start}, {end}] are reversed (end before start)")
    if end > data_size:
        return _Bad(
            f"data_offsets [{start}, {end}] reach past the end of the data section "
            f"({data_size} bytes)"
        )

    # Multiply left to right like the library, which refuses a shape whose running
    # product overflows 64 bits even when a later dimension is 0.
    numel = 1
    for dim in dims:
        numel *= dim
        if numel > _MAX_NUMEL:
            if 0 in dims:
                return _Bad(
                    f"shape {_show(shape)} overflows 64 bits before its zero dimension "
                    "(the safetensors library refuses it)"
                )
            return _Bad(
                f"shape {_show(shape)} of {canonical} needs more bytes than the whole "
                f"data section ({data_size} bytes)"
            )
    nbits = numel * bits
    if nbits % 8:
        return _Bad(
            f"shape {_show(shape)} of {canonical} is {nbits} bits, not a whole number of bytes"
        )
    need = nbits // 8
    if end - start != need:
        return _Bad(
            f"data_offsets [{start}, {end}] hold {end - start} bytes but shape "
            f"{_show(shape)} of {canonical} needs {need} bytes"
        )
    return (canonical, dims, start, end)


def _parse_int(literal: str) -> int | float:
    """Decode a JSON integer; "-0" becomes a float, which every check refuses."""
    return -0.0 if literal == "-0" else int(literal)


def _entry_hook(data_size: int) -> Any:
    """The decoder's object_pairs_hook: validate a tensor entry as soon as it is read."""

    def hook(pairs: list[tuple[str, Any]]) -> _Entry | _Bad | dict[str, Any]:
        if len(pairs) == 3:
            (k0, dtype), (k1, shape), (k2, offsets) = pairs
            if k0 == "dtype" and k1 == "shape" and k2 == "data_offsets":
                return _check_entry(dtype, shape, offsets, data_size)
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise _DuplicateKey(key)
                seen.add(key)
        return obj

    return hook


class _HeaderReader:
    """Walks the top-level object of one header (see the Note in the module docstring).

    ``read`` is the hot loop (one pass per tensor), written for speed: messages are
    built only on failure, and the C scanner is called directly.
    """

    def __init__(self, text: str, *, path: str, data_size: int, data_offset: int) -> None:
        self.text = text
        self.path = path
        self.data_size = data_size
        self.data_offset = data_offset
        decoder = json.JSONDecoder(
            object_pairs_hook=_entry_hook(data_size),
            parse_int=_parse_int if _NEGATIVE_ZERO_RE.search(text) else None,
        )
        # The C scanner behind raw_decode, without its Python wrapper (hot loop).
        self.scan_once: Callable[[str, int], tuple[Any, int]] = decoder.scan_once  # type: ignore[attr-defined]

    def fail(self, reason: str) -> FormatError:
        return FormatError(self.path, reason)

    def syntax(self, expected: str, i: int, where: str) -> FormatError:
        return self.fail(
            f"header is not valid JSON: expected {expected} {where}at character {i}, "
            f"found {_kind_at(self.text, i)}"
        )

    def read(self) -> tuple[list[TensorInfo], dict[str, TensorInfo], dict[str, str]]:
        text = self.text
        n = len(text)
        i = _skip_ws(text)
        if i >= n or text[i] != "{":
            raise self.fail(
                "header must be a JSON object mapping tensor names to entries, "
                f"got {_kind_at(text, i)}"
            )
        tensors: list[TensorInfo] = []
        by_name: dict[str, TensorInfo] = {}
        metadata: dict[str, str] | None = None
        i = _skip_ws(text, i + 1)
        more = i >= n or text[i] != "}"
        if not more:
            i += 1
        name = ""
        # Locals for the hot loop.
        scanstring = _scanstring
        colon = _COLON_RE.match
        flat_prefix = _FLAT_OBJECT_PREFIX_RE.match
        separator = _SEPARATOR_RE.match
        scan_entry = self.scan_entry
        append = tensors.append
        member = _MEMBER_RE.match
        try:
            while more:
                # Fast path: a whole member `"name": {flat entry},` in one match, for
                # names without escapes; anything else takes the careful steps below.
                m = member(text, i)
                if m is not None:
                    name, sep = m.group(1, 3)
                    start, stop = m.span(2)
                    if (
                        stop - start <= _MAX_ENTRY_CHARS
                        and name
                        and name not in by_name
                        and name != _METADATA_KEY
                        and name.isascii()
                    ):
                        info, _ = scan_entry(name, start)
                        by_name[name] = info
                        append(info)
                        more = sep == ","
                        i = m.end()
                        continue
                if i >= n or text[i] != '"':
                    raise self.syntax("a string (a tensor name)", i, "")
                name, i = scanstring(text, i + 1)
                m = colon(text, i)
                if m is None:
                    raise self.syntax("':'", _skip_ws(text, i), f"after key {_show(name)} ")
                i = m.end()
                if name == _METADATA_KEY:
                    if metadata is not None:
                        raise self.fail("header has two __metadata__ keys")
                    metadata, i = self.read_metadata(i)
                else:
                    if name in by_name or not name or not name.isascii():
                        self.check_name(name, by_name)
                    if i >= n or text[i] != "{":
                        raise self.fail(
                            f"tensor {_show(name)}: entry must be an object with keys "
                            f"{_ENTRY_KEYS_TEXT}, got {_kind_at(text, i)}"
                        )
                    limit = i + _MAX_ENTRY_CHARS
                    m = flat_prefix(text, i, limit)
                    stop = m.end() if m else i
                    if stop >= n or text[stop] != "}":
                        raise self.fail(f"tensor {_show(name)}: {self.why_not_flat(stop, limit)}")
                    info, i = scan_entry(name, i)
                    by_name[name] = info
                    append(info)
                m = separator(text, i)
                if m is None:
                    raise self.syntax(
                        "',' or '}'", _skip_ws(text, i), f"after the value of {_show(name)} "
                    )
                more = m.group(1) == ","
                i = m.end()
        except RecursionError as e:
            raise self.fail(f"tensor {_show(name)}: entry is nested too deeply") from e
        except json.JSONDecodeError as e:
            raise self.fail(f"header is not valid JSON: {e.msg} at character {e.pos}") from e
        except (StopIteration, ValueError) as e:
            if isinstance(e, FormatError):
                raise
            # StopIteration: no JSON value where one must be; ValueError: e.g. an
            # integer with more digits than int() accepts.
            raise self.fail(
                f"header is not valid JSON near tensor {_show(name)}: {e or 'expected a value'}"
            ) from e
        if i != n and _skip_ws(text, i) != n:
            raise self.fail(
                f"header is not valid JSON: extra data after the top-level object at character {i}"
            )
        return tensors, by_name, metadata or {}

    def scan_entry(self, name: str, start: int) -> tuple[TensorInfo, int]:
        """Decode the entry object of tensor ``name`` that starts at ``start``; return it
        and the index after it."""
        try:
            entry, end = self.scan_once(self.text, start)
        except _DuplicateKey as e:
            raise self.fail(f"tensor {_show(name)}: key {_show(e.key)} appears twice") from e
        if type(entry) is not tuple:
            entry = self.entry_from(name, entry)
        return TensorInfo(name, entry[0], entry[1], entry[2], entry[3], self.data_offset), end

    def check_name(self, name: str, by_name: dict[str, TensorInfo]) -> None:
        if name in by_name:
            raise self.fail(f"tensor name {_show(name)} appears twice in the header")
        if not name:
            raise self.fail("a tensor has an empty name")
        if not _is_utf8(name):
            raise self.fail(f"tensor name {_show(name)} is not valid Unicode (lone surrogate)")

    def why_not_flat(self, stop: int, limit: int) -> str:
        """Explain why the entry starting before ``stop`` is not a short flat object."""
        text = self.text
        if stop < min(limit, len(text)) and text[stop] == "{":
            reason = "entry holds a nested object"
        elif stop >= limit and limit < len(text):
            reason = f"entry is longer than {_MAX_ENTRY_CHARS} characters"
        else:
            reason = "entry is not valid JSON (an unterminated string, or no closing '}')"
        return f"{reason}; a tensor entry is {{{_ENTRY_KEYS_TEXT}}}"

    def entry_from(self, name: str, value: _Bad | dict[str, Any]) -> _Entry:
        """Validate an entry the decoder's hook could not (bad, or keys in another order)."""
        where = f"tensor {_show(name)}"
        if isinstance(value, _Bad):
            raise self.fail(f"{where}: {value.reason}")
        for key in _ENTRY_KEYS:
            if key not in value:
                raise self.fail(f"{where}: missing key {key!r}")
        for key in value:
            if key not in _ENTRY_KEYS:
                raise self.fail(
                    f"{where}: unknown key {_show(key)} "
                    f"(a tensor entry has exactly {_ENTRY_KEYS_TEXT})"
                )
        checked = _check_entry(
            value["dtype"], value["shape"], value["data_offsets"], self.data_size
        )
        if isinstance(checked, _Bad):
            raise self.fail(f"{where}: {checked.reason}")
        return checked

    def read_metadata(self, i: int) -> tuple[dict[str, str], int]:
        """Read ``__metadata__`` pair by pair; refuse a non-string before decoding it."""
        text = self.text
        n = len(text)
        if i >= n or text[i] != "{":
            raise self.fail(
                f"__metadata__ must be an object of string to string, got {_kind_at(text, i)}"
            )
        scanstring = _scanstring
        metadata: dict[str, str] = {}
        i = _skip_ws(text, i + 1)
        more = i >= n or text[i] != "}"
        if not more:
            i += 1
        while more:
            if i >= n or text[i] != '"':
                raise self.syntax("a string", i, "(a key in __metadata__) ")
            key, i = scanstring(text, i + 1)
            m = _COLON_RE.match(text, i)
            if m is None:
                raise self.syntax("':'", _skip_ws(text, i), f"after __metadata__ key {_show(key)} ")
            i = m.end()
            if i >= n or text[i] != '"':
                raise self.fail(
                    f"__metadata__[{_show(key)}] must be a string, got {_kind_at(text, i)} "
                    "(__metadata__ maps strings to strings)"
                )
            value, i = scanstring(text, i + 1)
            if key in metadata:
                raise self.fail(f"__metadata__ key {_show(key)} appears twice")
            if not (_is_utf8(key) and _is_utf8(value)):
                raise self.fail(f"__metadata__[{_show(key)}] is not valid Unicode (lone surrogate)")
            metadata[key] = value
            if len(metadata) > MAX_METADATA_ENTRIES:
                raise self.fail(f"__metadata__ has more than {MAX_METADATA_ENTRIES} entries")
            m = _SEPARATOR_RE.match(text, i)
            if m is None:
                raise self.syntax(
                    "',' or '}'", _skip_ws(text, i), f"after __metadata__[{_show(key)}] "
                )
            more = m.group(1) == ","
            i = m.end()
        return metadata, i


def _parse_header(header: bytes | memoryview, *, path: str, file_size: int) -> ShardLayout:
    if isinstance(header, memoryview) and (header.ndim != 1 or header.itemsize != 1):
        header = header.cast("B")
    header_len = len(header)
    if header_len == 0:
        raise FormatError(path, "header length is 0 (the smallest header is '{}')")
    if header_len > MAX_HEADER_BYTES:
        raise FormatError(
            path, f"header length {header_len} is over the limit of {MAX_HEADER_BYTES} bytes"
        )
    data_offset = _PREFIX_BYTES + header_len
    if data_offset > file_size:
        raise FormatError(
            path,
            f"header of {header_len} bytes does not fit in a file of {file_size} bytes",
        )
    data_size = file_size - data_offset
    try:
        text = str(header, "utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(path, f"header is not valid UTF-8 (byte {e.start}: {e.reason})") from e
    declared = text.count('"data_offsets"')  # C speed; see the Note
    if declared > MAX_TENSORS:
        raise FormatError(
            path, f"header declares {declared} tensors, more than the limit of {MAX_TENSORS} "
            "per shard (split the checkpoint into more shards)",
        )

    reader = _HeaderReader(text, path=path, data_size=data_size, data_offset=data_offset)
    tensors, by_name, metadata = reader.read()
    tensors.sort(key=attrgetter("start", "end", "name"))
    _check_tiling(tensors, data_size, path)
    return ShardLayout(
        path=path,
        header_len=header_len,
        data_offset=data_offset,
        file_size=file_size,
        tensors=tuple(tensors),
        metadata=metadata,
        _by_name=by_name,
    )


def _check_tiling(tensors: list[TensorInfo], data_size: int, path: str) -> None:
    """Check that the sorted tensors' byte ranges cover [0, data_size) exactly once."""
    pos = 0
    last: TensorInfo | None = None  # the tensor that ends at pos
    for t in tensors:
        if t.start < pos and last is not None:  # last is set whenever pos > 0
            raise FormatError(
                path,
                f"tensor {_show(t.name)}: bytes [{t.start}, {t.end}) overlap tensor "
                f"{_show(last.name)} at [{last.start}, {last.end})",
            )
        if t.start > pos:
            after = f"after tensor {_show(last.name)}" if last else "at the start"
            raise FormatError(
                path,
                f"gap in the data section: bytes [{pos}, {t.start}) {after} belong to no "
                f"tensor (next is {_show(t.name)}); tensors must cover the data section "
                "without holes",
            )
        if t.end > pos:
            pos = t.end
            last = t
    if pos != data_size:
        after = f"after tensor {_show(last.name)}" if last else "(no tensor holds any byte)"
        raise FormatError(
            path,
            f"gap in the data section: its last {data_size - pos} bytes [{pos}, {data_size}) "
            f"{after} belong to no tensor; the file has trailing bytes or a tensor is missing",
        )
