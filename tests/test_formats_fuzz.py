"""Fuzz tests for the safetensors header parser.

Whatever the bytes, the parser returns a layout whose tensors tile the data section
exactly, or raises FormatError; nothing else. When it accepts a file, the safetensors
library accepts it too and reads the same tensors (weightd is the stricter of the two).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightd.errors import FormatError
from weightd.formats import DTYPE_BITS, ShardLayout, layout_from_bytes, parse_index_json

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check_invariants(layout: ShardLayout, size: int) -> None:
    """What every accepted layout promises."""
    assert layout.file_size == size
    assert layout.data_offset == 8 + layout.header_len
    assert 0 <= layout.data_size == size - layout.data_offset
    assert all(type(k) is str and type(v) is str for k, v in layout.metadata.items())
    names = layout.names()
    assert len(set(names)) == len(names)
    assert all(names)
    pos = 0
    for t in layout.tensors:
        assert t.dtype in DTYPE_BITS
        assert all(type(d) is int and d >= 0 for d in t.shape)
        assert t.start == pos, "tensors must tile the data section"
        assert t.data_offset == layout.data_offset
        assert t.offset == layout.data_offset + t.start
        assert t.numel == math.prod(t.shape)
        assert t.nbytes * 8 == t.numel * DTYPE_BITS[t.dtype]
        assert layout.tensor(t.name) is t
        pos = t.end
    assert pos == layout.data_size
    keys = [(t.start, t.end, t.name) for t in layout.tensors]
    assert keys == sorted(keys)


def parse_or_refuse(content: bytes) -> ShardLayout | None:
    try:
        layout = layout_from_bytes(content, path="fuzz.safetensors")
    except FormatError as e:
        assert str(e).startswith("fuzz.safetensors: ")
        return None
    check_invariants(layout, len(content))
    return layout


def assert_library_agrees(content: bytes, layout: ShardLayout) -> None:
    tensors = dict(safetensors.deserialize(content))
    assert sorted(tensors) == sorted(layout.names())
    for t in layout.tensors:
        spec = tensors[t.name]
        assert spec["dtype"] == t.dtype
        assert tuple(spec["shape"]) == t.shape
        assert bytes(spec["data"]) == content[t.offset : t.offset + t.nbytes]


# --------------------------------------------------------------------------- raw bytes


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes(content: bytes) -> None:
    parse_or_refuse(content)


@FUZZ
@given(st.binary(max_size=300), st.binary(max_size=40))
def test_arbitrary_header_bytes_with_a_valid_length(header: bytes, data: bytes) -> None:
    parse_or_refuse(struct.pack("<Q", len(header)) + header + data)


JSONISH = st.text(alphabet='{}[]":, \n0123456789-.eEtruefalsnNI\\abdhpypo_F', max_size=200)


@FUZZ
@given(JSONISH, st.integers(0, 16))
def test_jsonish_text(header: str, data_len: int) -> None:
    raw = header.encode()
    parse_or_refuse(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)


# --------------------------------------------------------------------------- plausible headers

DTYPES = st.one_of(
    st.sampled_from(sorted(DTYPE_BITS)),
    st.sampled_from(["F128", "bf16", "", "I4", "float32"]),
    st.integers(0, 3),
    st.none(),
)
DIM = st.one_of(
    st.integers(0, 5),
    st.integers(-3, -1),
    st.sampled_from([2**62, 2**63, 2**64, 1.0, True, "2", None]),
)
SHAPE = st.one_of(st.lists(DIM, max_size=4), st.lists(st.integers(0, 4), max_size=3), st.none())
NAMES = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["", "__metadata__", "w", "layer.0.weight", "\ud800"]),
)
METADATA_VALUE: st.SearchStrategy[Any] = st.one_of(
    st.text(max_size=5), st.integers(0, 3), st.none(), st.just([])
)


@st.composite
def plausible_files(draw: st.DrawFn) -> bytes:
    """A header that is often valid and otherwise a little wrong, with its data."""
    count = draw(st.integers(0, 5))
    pairs: list[tuple[str, Any]] = []
    pos = 0
    for _ in range(count):
        name = draw(NAMES)
        dtype = draw(DTYPES)
        shape = draw(SHAPE)
        tiled = draw(st.booleans()) or draw(st.booleans())
        if (
            tiled
            and isinstance(dtype, str)
            and dtype in DTYPE_BITS
            and isinstance(shape, list)
            and all(type(d) is int and 0 <= d <= 5 for d in shape)
        ):
            dims: list[int] = [d for d in shape if type(d) is int]  # all of them
            nbits = math.prod(dims) * DTYPE_BITS[dtype]
            nbytes = nbits // 8 + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
            start = pos + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
            offsets: Any = [start, start + nbytes]
        else:
            offsets = draw(
                st.one_of(
                    st.lists(st.integers(-2, 40), min_size=2, max_size=2),
                    st.lists(st.integers(0, 40), max_size=3),
                    st.just("0,1"),
                )
            )
        if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
            pos = max(pos, offsets[1])
        fields: dict[str, Any] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        keys = draw(st.permutations(list(fields)))
        drop = draw(st.sampled_from([None, None, None, None, None, "dtype", "shape"]))
        entry = {k: fields[k] for k in keys if k != drop}
        if draw(st.integers(0, 9)) == 0:
            entry["extra"] = 1
        value: Any = entry if draw(st.integers(0, 19)) else draw(st.sampled_from([[], 1, "x"]))
        pairs.append((name, value))
    if draw(st.booleans()):
        metadata = draw(
            st.dictionaries(
                st.text(max_size=4), st.one_of(st.text(max_size=4), METADATA_VALUE), max_size=3
            )
        )
        pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", metadata))
    if pairs and draw(st.integers(0, 9)) == 0:
        pairs.append(pairs[0])  # a duplicate key
    separator = draw(st.sampled_from([",", ", ", ",\n  "]))
    header = "{" + separator.join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"
    header += " " * draw(st.integers(0, 7))
    raw = header.encode("utf-8", "surrogatepass")
    data_len = min(4096, max(0, pos + draw(st.sampled_from([0, 0, 0, 0, 1, -1, 3]))))
    data = draw(st.binary(min_size=data_len, max_size=data_len))
    return struct.pack("<Q", len(raw)) + raw + data


@FUZZ
@given(plausible_files())
def test_plausible_headers(content: bytes) -> None:
    layout = parse_or_refuse(content)
    if layout is not None:
        assert_library_agrees(content, layout)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_valid_headers_are_accepted(data: st.DataObject) -> None:
    """Well-formed files built from random tensors always parse, as the library says."""
    count = data.draw(st.integers(0, 6))
    names = data.draw(
        st.lists(
            st.text(min_size=1, max_size=6), min_size=count, max_size=count, unique=True
        ).filter(lambda ns: "__metadata__" not in ns)
    )
    header: dict[str, Any] = {}
    pos = 0
    for name in names:
        dtype = data.draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = data.draw(st.lists(st.integers(0, 4), max_size=3))
        nbits = math.prod(shape) * DTYPE_BITS[dtype]
        if nbits % 8:
            shape = [*shape, 8]
            nbits *= 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + nbits // 8]}
        pos += nbits // 8
    header["__metadata__"] = data.draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
    raw = json.dumps(header).encode()
    content = (
        struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * (pos // 256) + bytes(pos % 256)
    )
    layout = parse_or_refuse(content)
    assert layout is not None
    assert sorted(layout.names()) == sorted(names)
    assert_library_agrees(content, layout)


# --------------------------------------------------------------------------- index json


@FUZZ
@given(st.one_of(st.binary(max_size=200), JSONISH.map(str.encode)))
def test_index_json_arbitrary_bytes(data: bytes) -> None:
    try:
        index = parse_index_json(data, path="idx.json")
    except FormatError:
        return
    for shard in index.shards:
        assert shard and not shard.startswith("/") and "\\" not in shard
        assert ".." not in shard.split("/")


@settings(FUZZ, max_examples=200)
@given(
    st.dictionaries(
        st.text(max_size=5),
        st.one_of(st.text(alphabet="ab./\\\0", max_size=8), st.integers()),
        max_size=4,
    )
)
def test_index_json_shard_names(weight_map: dict[str, Any]) -> None:
    data = json.dumps({"weight_map": weight_map}).encode("utf-8", "surrogatepass")
    try:
        index = parse_index_json(data, path="idx.json")
    except FormatError:
        return
    for shard in index.shards:
        parts = shard.split("/")
        assert "\\" not in shard and "\0" not in shard
        assert all(p not in ("", ".", "..") for p in parts)
