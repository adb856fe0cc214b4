"""Strict parser for safetensors shard headers.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of
UTF-8 JSON, then the data section. The JSON maps tensor names to
``{"dtype": ..., "shape": [...], "data_offsets": [start, end]}`` (offsets relative to
the data section) and may hold one ``"__metadata__"`` object of string to string.

This parser accepts what the safetensors library (0.8) accepts, with a few deliberate
refusals where the library is lenient (duplicate tensor names, unknown keys in a
tensor entry, a ``null`` ``__metadata__``, empty tensor names), and explains every
refusal with a :class:`~weightd.errors.FormatError` that names the file, the tensor
and what is wrong. No other exception escapes for any input bytes.

Note [hostile headers]
----------------------
Headers come from remote sources, so a header of up to :data:`MAX_HEADER_BYTES` must
be refused or parsed in seconds and in a few times its size of memory. Python's JSON
decoder turns small tokens into large objects (``[],`` is 3 bytes of JSON and about
60 bytes of list), so before decoding, one regular-expression pass (C speed, no
backtracking) checks that every array holds only scalars: the schema has no other
arrays, and this also bounds the nesting of arrays. Floats and ``NaN``/``Infinity``
decode to one shared marker instead of new objects, and each tensor entry is turned
into a compact tuple while the decoder runs (``object_pairs_hook``), so the memory of
a parsed header stays within a small multiple of its size. Deeply nested objects hit
the interpreter's recursion limit, which is caught and reported.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, BinaryIO

from weightd.errors import FormatError

__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_BYTES",
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

_PREFIX_BYTES = 8
_METADATA_KEY = "__metadata__"
_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))
_ENTRY_KEYS_TEXT = "dtype, shape, data_offsets"
# torch (and every consumer we know) stores sizes as int64.
_MAX_DIM = 2**63 - 1
# Shapes with more dimensions than this are multiplied out with an early exit so a
# hostile shape cannot make us multiply huge integers.
_FAST_PROD_NDIM = 16
_CANONICAL_DTYPE = {name: name for name in DTYPE_BITS}
_KNOWN_DTYPES_TEXT = ", ".join(sorted(DTYPE_BITS))
_SHOW_LIMIT = 80

# Matches the longest prefix of a JSON text made of: runs of anything but quotes and
# '[', complete strings, and arrays holding no array, object or string. Possessive
# quantifiers keep it linear. Where it stops short of the end there is either an
# array holding something it must not, or a string with no closing quote.
_FLAT_PREFIX_RE = re.compile(
    r'(?:[^"\[]++|"[^"\\]*+(?:\\.[^"\\]*+)*+"|\[[^\]\[{"]*+\])*+',
    re.DOTALL,
)


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
    _by_name: dict[str, TensorInfo] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
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
    try:
        return _parse_header(header, path=path, file_size=file_size)
    except MemoryError as e:
        raise FormatError(path, "header is too large to parse in the memory available") from e


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


class _NonInteger:
    """The one object every JSON float, NaN and Infinity decodes to (see the Note)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<non-integer number>"


_NON_INTEGER = _NonInteger()


class _Bad:
    """A tensor entry found invalid while decoding; reported once its name is known."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


# A tensor entry validated while decoding: (dtype, shape, start, end).
_Entry = tuple[str, tuple[int, ...], int, int]


def _non_integer(_text: str) -> _NonInteger:
    return _NON_INTEGER


def _kind(value: object) -> str:
    if value is _NON_INTEGER:
        return "a non-integer number"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return "an object"


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

    if 0 in dims:
        numel = 0
    elif len(dims) <= _FAST_PROD_NDIM:
        numel = math.prod(dims)
    else:
        limit = data_size * 8 // bits
        numel = 1
        for dim in dims:
            numel *= dim
            if numel > limit:
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


def _duplicate_key(pairs: list[tuple[str, Any]]) -> str:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return ""  # not reached: only called when a duplicate exists


def _parse_header(header: bytes | memoryview, *, path: str, file_size: int) -> ShardLayout:
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

    stop = _FLAT_PREFIX_RE.match(text)
    if stop is not None and stop.end() < len(text) and text[stop.end()] == "[":
        raise FormatError(
            path,
            f"header JSON has an array holding an array, object or string at character "
            f"{stop.end()}; the only arrays in a safetensors header are shape and "
            "data_offsets, which hold integers",
        )

    def object_hook(pairs: list[tuple[str, Any]]) -> Any:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            key = _duplicate_key(pairs)
            raise FormatError(path, f"header JSON repeats the key {_show(key)} in one object")
        if len(obj) == 3 and obj.keys() == _ENTRY_KEYS:
            values = obj.values()
            if not any(isinstance(v, dict | tuple | _Bad) for v in values) and not all(
                type(v) is str for v in values
            ):
                # A tensor entry (see the Note): keep only the compact form.
                return _check_entry(obj["dtype"], obj["shape"], obj["data_offsets"], data_size)
        return obj

    try:
        root = json.loads(
            text,
            object_pairs_hook=object_hook,
            parse_float=_non_integer,
            parse_constant=_non_integer,
        )
    except FormatError:
        raise
    except json.JSONDecodeError as e:
        raise FormatError(path, f"header is not valid JSON: {e.msg} at character {e.pos}") from e
    except RecursionError as e:
        raise FormatError(path, "header JSON is nested too deeply") from e
    except ValueError as e:  # e.g. an integer with more digits than int() allows
        raise FormatError(path, f"header is not valid JSON: {e}") from e
    del text

    if not isinstance(root, dict):
        if isinstance(root, tuple | _Bad):
            raise FormatError(
                path,
                "header must be a JSON object mapping tensor names to entries, but it "
                "is a single tensor entry (keys dtype, shape, data_offsets)",
            )
        raise FormatError(
            path,
            f"header must be a JSON object mapping tensor names to entries, got {_kind(root)}",
        )

    metadata: dict[str, str] = {}
    tensors: list[TensorInfo] = []
    for name, value in root.items():
        if name == _METADATA_KEY:
            metadata = _check_metadata(value, path)
            continue
        if not name:
            raise FormatError(path, "a tensor has an empty name")
        if not _is_utf8(name):
            raise FormatError(
                path, f"tensor name {_show(name)} is not valid Unicode (lone surrogate)"
            )
        entry = _tensor_entry(name, value, data_size, path)
        tensors.append(TensorInfo(name, entry[0], entry[1], entry[2], entry[3], data_offset))
    del root

    tensors.sort(key=attrgetter("start", "end", "name"))
    _check_tiling(tensors, data_size, path)
    return ShardLayout(
        path=path,
        header_len=header_len,
        data_offset=data_offset,
        file_size=file_size,
        tensors=tuple(tensors),
        metadata=metadata,
    )


def _tensor_entry(name: str, value: object, data_size: int, path: str) -> _Entry:
    if isinstance(value, tuple):
        return value
    if isinstance(value, _Bad):
        raise FormatError(path, f"tensor {_show(name)}: {value.reason}")
    if not isinstance(value, dict):
        raise FormatError(
            path,
            f"tensor {_show(name)}: entry must be an object with keys {_ENTRY_KEYS_TEXT}, "
            f"got {_kind(value)}",
        )
    for key in ("dtype", "shape", "data_offsets"):
        if key not in value:
            raise FormatError(path, f"tensor {_show(name)}: missing key {key!r}")
    for key in value:
        if key not in _ENTRY_KEYS:
            raise FormatError(
                path,
                f"tensor {_show(name)}: unknown key {_show(key)} "
                f"(a tensor entry has exactly {_ENTRY_KEYS_TEXT})",
            )
    checked = _check_entry(value["dtype"], value["shape"], value["data_offsets"], data_size)
    if isinstance(checked, _Bad):
        raise FormatError(path, f"tensor {_show(name)}: {checked.reason}")
    return checked


def _check_metadata(value: object, path: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise FormatError(
            path, f"__metadata__ must be an object of string to string, got {_kind(value)}"
        )
    for key, item in value.items():
        if type(item) is not str:
            raise FormatError(
                path,
                f"__metadata__[{_show(key)}] must be a string, got {_kind(item)} "
                "(__metadata__ maps strings to strings)",
            )
        if not (_is_utf8(key) and _is_utf8(item)):
            raise FormatError(
                path, f"__metadata__[{_show(key)}] is not valid Unicode (lone surrogate)"
            )
    return value


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
