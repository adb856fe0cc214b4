"""Tests for weightd.formats: the strict safetensors header parser and the HF index.

Valid files are written by the safetensors library itself and compared tensor by
tensor with what the library reads back. Malformed files are built by hand
(``struct.pack('<Q', n) + header + data``); each must be refused with a FormatError
that names the file and says what is wrong.
"""

from __future__ import annotations

import doctest
import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from safetensors import safe_open

from weightd.errors import FormatError
from weightd.formats import (
    DTYPE_BITS,
    MAX_HEADER_BYTES,
    IndexJson,
    ShardLayout,
    TensorInfo,
    header_length,
    hf_index,
    layout_from_bytes,
    parse_header,
    parse_index_json,
    read_layout,
)
from weightd.formats import safetensors as st_format

# --------------------------------------------------------------------------- helpers

TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def shard_bytes(header: dict[str, Any] | str | bytes, data: bytes = b"") -> bytes:
    """A safetensors file: 8-byte little-endian length, header, data."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    raw = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + data


def write(tmp_path: Path, content: bytes, name: str = "model.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def entry(dtype: str, shape: list[int], start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def torch_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def assert_matches_library(path: Path, layout: ShardLayout, framework: str) -> None:
    """Every tensor in ``layout`` agrees with what safetensors reads from ``path``."""
    raw = path.read_bytes()
    with safe_open(str(path), framework=framework) as f:
        assert sorted(layout.names()) == sorted(f.keys())
        assert layout.metadata == (f.metadata() or {})
        for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
            info = layout.tensor(name)
            tensor = f.get_tensor(name)
            if framework == "pt":
                assert info.dtype == TORCH_DTYPES[tensor.dtype]
                assert info.shape == tuple(tensor.shape)
                assert info.numel == tensor.numel()
                assert info.nbytes == tensor.numel() * tensor.element_size()
                expected = torch_bytes(tensor)
            else:
                assert info.shape == tensor.shape
                assert info.nbytes == tensor.nbytes
                expected = tensor.tobytes()
            assert raw[info.offset : info.offset + info.nbytes] == expected, name


# --------------------------------------------------------------------------- valid files


def test_torch_file_agrees_with_library(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "embed.weight": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "half": torch.randn(3, 3, generator=gen).half(),
        "f32": torch.randn(4, generator=gen),
        "f64": torch.randn(2, 3, generator=gen).double(),
        "fp8_e4m3": torch.randn(9, generator=gen).to(torch.float8_e4m3fn),
        "fp8_e5m2": torch.randn(3, 5, generator=gen).to(torch.float8_e5m2),
        "mask": torch.rand(11, generator=gen) > 0.5,
        "ids": torch.randint(-(2**40), 2**40, (6,), generator=gen, dtype=torch.int64),
        "i8": torch.randint(-128, 127, (5,), generator=gen, dtype=torch.int8),
        "u8": torch.randint(0, 255, (3, 1), generator=gen, dtype=torch.uint8),
        "i16": torch.randint(-1000, 1000, (2,), generator=gen, dtype=torch.int16),
        "i32": torch.randint(-1000, 1000, (2, 2), generator=gen, dtype=torch.int32),
        "c64": torch.randn(3, dtype=torch.complex64, generator=gen),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(2, 0, dtype=torch.bfloat16),
    }
    metadata = {"format": "pt", "note": "ünïcode ✓"}
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)

    layout = read_layout(path)

    assert layout.path == str(path)
    assert layout.file_size == path.stat().st_size
    assert layout.data_offset == 8 + layout.header_len
    assert layout.data_size == layout.file_size - layout.data_offset
    assert layout.metadata == metadata
    assert layout.aligned  # the library pads the header to a multiple of 8
    assert layout.tensor("scalar").shape == ()
    assert layout.tensor("scalar").numel == 1
    assert layout.tensor("empty").nbytes == 0
    assert layout.tensor("embed.weight").dtype == "BF16"
    assert_matches_library(path, layout, "pt")


def test_numpy_file_agrees_with_library(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "a": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float16),
        "c": rng.integers(0, 2**60, size=(2, 2), dtype=np.uint64),
        "d": rng.integers(-5, 5, size=7, dtype=np.int32),
        "e": np.array([True, False, True]),
        "f": np.zeros((0,), dtype=np.float64),
        "g": np.array(7, dtype=np.int16),
    }
    path = tmp_path / "np.safetensors"
    safetensors.numpy.save_file(arrays, str(path))

    layout = read_layout(path)

    assert layout.metadata == {}
    assert {t.dtype for t in layout.tensors} == {"F32", "F16", "U64", "I32", "BOOL", "F64", "I16"}
    assert_matches_library(path, layout, "np")


def test_tensors_are_sorted_by_offset_and_tile_the_data_section(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.zeros(i + 1, dtype=torch.float16) for i in range(20)}
    tensors["z_empty"] = torch.zeros(0)
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, str(path))

    layout = read_layout(path)

    starts = [t.start for t in layout.tensors]
    assert starts == sorted(starts)
    pos = 0
    for t in layout.tensors:
        assert t.start == pos
        assert t.nbytes == t.numel * DTYPE_BITS[t.dtype] // 8
        pos = t.end
    assert pos == layout.data_size
    assert set(layout.names()) == set(tensors)


def test_entry_points_agree(tmp_path: Path) -> None:
    content = shard_bytes({"w": entry("F32", [2], 0, 8), "__metadata__": {"k": "v"}}, b"\0" * 8)
    path = write(tmp_path, content)

    from_file = read_layout(path)
    from_pathlike_str = read_layout(str(path))
    with path.open("rb") as f:
        from_fileobj = read_layout("named.safetensors", fileobj=f)
    from_bytesio = read_layout("bio", fileobj=io.BytesIO(content))
    from_bytes = layout_from_bytes(content, path=str(path))
    from_view = layout_from_bytes(memoryview(content), path=str(path))
    n = header_length(content[:8], path="x", file_size=len(content))
    from_header = parse_header(content[8 : 8 + n], path=str(path), file_size=len(content))

    assert from_file == from_pathlike_str == from_bytes == from_view == from_header
    assert from_fileobj.path == "named.safetensors"
    assert from_fileobj.tensors == from_file.tensors == from_bytesio.tensors
    assert from_file.tensors == (TensorInfo("w", "F32", (2,), 0, 8, 8 + n),)
    assert from_file.tensor("w").offset == 8 + n
    with pytest.raises(KeyError):
        from_file.tensor("missing")


def test_read_layout_reads_only_the_header() -> None:
    header = json.dumps({"w": entry("U8", [1000], 0, 1000)}).encode()
    content = struct.pack("<Q", len(header)) + header + b"\x01" * 1000

    class Counting(io.BytesIO):
        read_total = 0

        def read(self, size: int | None = -1) -> bytes:
            chunk = super().read(size)
            Counting.read_total += len(chunk)
            return chunk

    layout = read_layout("c", fileobj=Counting(content))

    assert layout.tensor("w").nbytes == 1000
    assert Counting.read_total == 8 + len(header)


def test_key_order_whitespace_and_empty_header() -> None:
    header = (
        '\n{ "b" : { "shape" : [ 1 ] , "data_offsets" : [ 2 , 4 ] , "dtype" : "I16" } ,\r\n'
        '\t"a":{"data_offsets":[0,2],"dtype":"F16","shape":[]}, "__metadata__" : { } }   '
    )
    layout = layout_from_bytes(shard_bytes(header, b"abcd"))
    assert layout.names() == ["a", "b"]
    assert layout.tensor("b").shape == (1,)
    assert layout.metadata == {}

    empty = layout_from_bytes(shard_bytes("{}"))
    assert empty.tensors == ()
    assert empty.data_size == 0
    assert empty.names() == []


def test_zero_size_tensors_may_share_offsets() -> None:
    header = {
        "a": entry("F32", [0], 0, 0),
        "b": entry("U8", [2], 0, 2),
        "c": entry("BF16", [3, 0], 2, 2),
        "d": entry("I64", [0, 5], 2, 2),
    }
    layout = layout_from_bytes(shard_bytes(header, b"xy"))
    assert layout.names() == ["a", "b", "c", "d"]
    assert [t.nbytes for t in layout.tensors] == [0, 2, 0, 0]


def test_unaligned_files_parse_and_report_it() -> None:
    # A 2-byte tensor at data offset 1: valid, but not viewable in place as F16.
    header = {"a": entry("U8", [1], 0, 1), "b": entry("F16", [1], 1, 3)}
    content = shard_bytes(header, b"abc")
    layout = layout_from_bytes(content)
    assert not layout.aligned
    aligned_header = json.dumps(
        {"a": entry("U8", [2], 0, 2), "b": entry("F16", [1], 2, 4)}, separators=(",", ":")
    )
    padded = aligned_header + " " * (-len(aligned_header) % 8)
    assert layout_from_bytes(shard_bytes(padded, b"abcd")).aligned


@pytest.mark.parametrize("dtype", sorted(DTYPE_BITS))
def test_dtype_bits_agree_with_the_library(dtype: str) -> None:
    """The library accepts exactly numel * bits / 8 bytes for each of our dtypes."""
    bits = DTYPE_BITS[dtype]
    numel = 8
    nbytes = numel * bits // 8
    content = shard_bytes({"t": entry(dtype, [numel], 0, nbytes)}, b"\0" * nbytes)
    assert layout_from_bytes(content).tensor("t").nbytes == nbytes
    [(name, spec)] = safetensors.deserialize(content)
    assert (name, spec["dtype"], len(spec["data"])) == ("t", dtype, nbytes)
    wrong = shard_bytes({"t": entry(dtype, [numel], 0, nbytes + 1)}, b"\0" * (nbytes + 1))
    with pytest.raises(safetensors.SafetensorError):
        safetensors.deserialize(wrong)
    with pytest.raises(FormatError, match="needs"):
        layout_from_bytes(wrong)


def test_dtype_bits_cover_every_dtype_the_torch_bindings_know() -> None:
    known = set(safetensors.torch._TYPES)  # the library's own str -> torch.dtype table
    assert known <= set(DTYPE_BITS)


def test_many_tensors() -> None:
    n = 20_000
    header = {f"layer.{i}.weight": entry("BF16", [2, 2], 8 * i, 8 * i + 8) for i in range(n)}
    layout = layout_from_bytes(shard_bytes(header, b"\0" * (8 * n)))
    assert len(layout.tensors) == n
    assert layout.tensor("layer.123.weight").start == 8 * 123


# --------------------------------------------------------------------------- malformed files

DEEP = 100_000

# id -> (file content, reason substring)
MALFORMED: dict[str, tuple[bytes, str]] = {
    "under_8_bytes": (b"\x05\0\0\0\0", "shorter than the 8-byte header length"),
    "header_length_zero": (struct.pack("<Q", 0) + b"{}", "header length is 0"),
    "header_past_eof": (struct.pack("<Q", 1000) + b"{}", "reaches past the end of the file"),
    "header_over_100MB": (
        struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}",
        f"over the limit of {MAX_HEADER_BYTES}",
    ),
    "header_length_u64_max": (struct.pack("<Q", 2**64 - 1) + b"{}", "over the limit"),
    "header_not_utf8": (
        shard_bytes(b'{"\xff\xfe":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
        "not valid UTF-8",
    ),
    "not_json": (shard_bytes('{"a": {"dtype": "U8",'), "not valid JSON"),
    "trailing_garbage": (shard_bytes("{} {}"), "extra data after the top-level object"),
    "trailing_comma": (
        shard_bytes('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},}', b"x"),
        "expected a string (a tensor name)",
    ),
    "raw_control_char_in_name": (
        shard_bytes('{"a\nb":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
        "not valid JSON: Invalid control character",
    ),
    "json_array": (shard_bytes("[1, 2, 3]"), "must be a JSON object"),
    "json_string": (shard_bytes('"hello"'), "must be a JSON object"),
    "deep_nesting_array": (shard_bytes("[" * DEEP + "]" * DEEP), "must be a JSON object"),
    "deep_nesting_in_entry": (
        shard_bytes('{"a":{"dtype":"U8","shape":' + "[" * 5000 + "]" * 5000 + "}}"),
        "nested too deeply",
    ),
    "deep_nesting_objects": (
        shard_bytes('{"a":' * DEEP + "1" + "}" * DEEP),
        "entry holds a nested object",
    ),
    "duplicate_tensor_name": (
        shard_bytes(
            '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            '"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            b"x",
        ),
        "tensor name 'a' appears twice",
    ),
    "duplicate_key_in_entry": (
        shard_bytes('{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
        "tensor 'a': key 'dtype' appears twice",
    ),
    "duplicate_metadata": (
        shard_bytes('{"__metadata__":{},"__metadata__":{}}'),
        "two __metadata__ keys",
    ),
    "entry_not_object": (shard_bytes({"a": [1, 2]}), "tensor 'a': entry must be an object"),
    "entry_nested_object": (
        shard_bytes({"a": {**entry("U8", [1], 0, 1), "x": {}}}, b"x"),
        "entry holds a nested object",
    ),
    "missing_dtype": (
        shard_bytes({"a": {"shape": [1], "data_offsets": [0, 1]}}, b"x"),
        "tensor 'a': missing key 'dtype'",
    ),
    "extra_key": (
        shard_bytes({"a": {**entry("U8", [1], 0, 1), "foo": 1}}, b"x"),
        "tensor 'a': unknown key 'foo'",
    ),
    "unknown_dtype": (shard_bytes({"a": entry("F128", [1], 0, 16)}, b"x" * 16), "unknown dtype"),
    "dtype_not_string": (
        shard_bytes({"a": {"dtype": 4, "shape": [1], "data_offsets": [0, 4]}}, b"x" * 4),
        "dtype must be a string",
    ),
    "shape_negative": (shard_bytes({"a": entry("U8", [-1], 0, 1)}, b"x"), "negative dimension"),
    "shape_float": (
        shard_bytes({"a": entry("U8", [1.0], 0, 1)}, b"x"),  # type: ignore[list-item]
        "dimension 0 is a non-integer number",
    ),
    "shape_nan": (
        shard_bytes('{"a":{"dtype":"U8","shape":[NaN],"data_offsets":[0,1]}}', b"x"),
        "dimension 0 is a non-integer number",
    ),
    "shape_bool": (
        shard_bytes({"a": entry("U8", [True], 0, 1)}, b"x"),  # type: ignore[list-item]
        "dimension 0 is a boolean",
    ),
    "shape_not_list": (
        shard_bytes({"a": {"dtype": "U8", "shape": "1", "data_offsets": [0, 1]}}, b"x"),
        "shape must be a list of non-negative integers, got a string",
    ),
    "shape_dimension_over_int64": (
        shard_bytes({"a": entry("U8", [0, 2**64], 0, 0)}),
        "larger than 2**63-1",
    ),
    "shape_product_huge": (
        shard_bytes({"a": entry("U8", [2**62] * 40, 0, 1)}, b"x"),
        "needs more bytes than the whole data section",
    ),
    "shape_overflows_before_zero": (
        shard_bytes({"a": entry("U8", [2**62, 4, 0], 0, 0)}),
        "overflows 64 bits before its zero dimension",
    ),
    "negative_zero": (
        shard_bytes('{"a":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}'),
        "dimension 0 is a non-integer number (-0.0)",
    ),
    "offsets_three_items": (
        shard_bytes({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, b"x"),
        "exactly two non-negative integers, got 3 items",
    ),
    "offsets_negative": (shard_bytes({"a": entry("U8", [0], -1, -1)}), "are negative"),
    "offsets_reversed": (
        shard_bytes({"a.weight": entry("F32", [1], 8, 4)}, b"x" * 8),
        "tensor 'a.weight': data_offsets [8, 4] are reversed",
    ),
    "offsets_past_data_section": (
        shard_bytes({"a": entry("F32", [2], 0, 8)}, b"x" * 4),
        "data_offsets [0, 8] reach past the end of the data section (4 bytes)",
    ),
    "overlapping": (
        shard_bytes({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}, b"x" * 6),
        "tensor 'b': bytes [2, 6) overlap tensor 'a' at [0, 4)",
    ),
    "zero_size_inside_other": (
        shard_bytes({"a": entry("U8", [4], 0, 4), "b": entry("U8", [0], 2, 2)}, b"x" * 4),
        "tensor 'b': bytes [2, 2) overlap tensor 'a'",
    ),
    "gap_between_tensors": (
        shard_bytes({"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 4, 6)}, b"x" * 6),
        "gap in the data section: bytes [2, 4) after tensor 'a'",
    ),
    "gap_at_start": (
        shard_bytes({"a": entry("U8", [2], 2, 4)}, b"x" * 4),
        "gap in the data section: bytes [0, 2) at the start",
    ),
    "trailing_bytes": (
        shard_bytes({"a": entry("U8", [2], 0, 2)}, b"x" * 5),
        "its last 3 bytes [2, 5) after tensor 'a' belong to no tensor",
    ),
    "data_without_tensors": (shard_bytes("{}", b"xx"), "(no tensor holds any byte)"),
    "length_mismatch": (
        shard_bytes({"a": entry("F32", [2, 2], 0, 12)}, b"x" * 12),
        "data_offsets [0, 12] hold 12 bytes but shape [2, 2] of F32 needs 16 bytes",
    ),
    "sub_byte_not_whole_bytes": (
        shard_bytes({"a": entry("F4", [3], 0, 2)}, b"xx"),
        "is 12 bits, not a whole number of bytes",
    ),
    "metadata_non_string_value": (
        shard_bytes('{"__metadata__":{"format":"pt","epoch":1}}'),
        "__metadata__['epoch'] must be a string, got a number",
    ),
    "metadata_not_object": (
        shard_bytes('{"__metadata__":["pt"]}'),
        "__metadata__ must be an object of string to string, got an array",
    ),
    "metadata_null": (
        shard_bytes('{"__metadata__":null}'),
        "__metadata__ must be an object of string to string, got null",
    ),
    "empty_tensor_name": (shard_bytes({"": entry("U8", [1], 0, 1)}, b"x"), "empty name"),
    "lone_surrogate_name": (
        shard_bytes('{"\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
        "not valid Unicode",
    ),
    "int_too_long": (
        shard_bytes('{"a":{"dtype":"U8","shape":[' + "9" * 5000 + '],"data_offsets":[0,1]}}'),
        "not valid JSON",
    ),
}

# Cases the safetensors library (0.8) accepts; we refuse them on purpose.
LIBRARY_ACCEPTS = {
    "duplicate_tensor_name",  # the last entry silently wins
    "extra_key",  # unknown keys in a tensor entry are ignored
    "entry_nested_object",  # the same: an unknown key whose value is an object
    "metadata_null",  # read as "no metadata"
    "empty_tensor_name",
}


@pytest.mark.parametrize(("content", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_file_is_refused(tmp_path: Path, content: bytes, reason: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(FormatError) as excinfo:
        read_layout(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: ")
    assert reason in message
    assert excinfo.value.path == str(path)
    assert isinstance(excinfo.value, ValueError)
    # The in-memory entry point says the same.
    with pytest.raises(FormatError) as again:
        layout_from_bytes(content, path=str(path))
    assert str(again.value) == message


@pytest.mark.parametrize(("content", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_library_refuses_malformed_file_too(
    tmp_path: Path, content: bytes, reason: str, request: pytest.FixtureRequest
) -> None:
    """Informative: which of our refusals the safetensors library shares."""
    case = request.node.callspec.id
    path = write(tmp_path, content)
    try:
        with safe_open(str(path), framework="np") as f:
            list(f.keys())
    except Exception:  # noqa: BLE001 - any refusal by the library counts
        return
    if case in LIBRARY_ACCEPTS:
        pytest.skip(f"safetensors accepts {case}; weightd refuses it on purpose")
    pytest.skip(f"safetensors accepts {case} (not listed in LIBRARY_ACCEPTS)")


def test_a_fake_100mb_length_allocates_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, struct.pack("<Q", MAX_HEADER_BYTES) + b"{}")
    with pytest.raises(FormatError, match="reaches past the end of the file"):
        read_layout(path)


def test_header_length_rules() -> None:
    assert header_length(struct.pack("<Q", 2), path="p", file_size=10) == 2
    assert header_length(struct.pack("<Q", MAX_HEADER_BYTES), path="p", file_size=2**40) == (
        MAX_HEADER_BYTES
    )
    with pytest.raises(FormatError, match="file is 3 bytes"):
        header_length(b"abc", path="p", file_size=3)
    with pytest.raises(FormatError, match="reaches past the end"):
        header_length(struct.pack("<Q", 3), path="p", file_size=10)


def test_parse_header_checks_its_own_inputs() -> None:
    with pytest.raises(FormatError, match="header length is 0"):
        parse_header(b"", path="p", file_size=8)
    with pytest.raises(FormatError, match="does not fit"):
        parse_header(b"{}", path="p", file_size=9)


def test_truncated_while_reading(tmp_path: Path) -> None:
    class Shrinking(io.BytesIO):
        """Reports a size it cannot deliver, like a file truncated under us."""

        def seek(self, pos: int, whence: int = 0) -> int:
            return 100 if whence == io.SEEK_END else super().seek(pos, whence)

    content = struct.pack("<Q", 50) + b"{}"
    with pytest.raises(FormatError, match="file ended after 2 of 50 bytes"):
        read_layout("s", fileobj=Shrinking(content))


def test_metadata_entry_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st_format, "MAX_METADATA_ENTRIES", 3)
    ok = shard_bytes({"__metadata__": {str(i): "v" for i in range(3)}})
    assert len(layout_from_bytes(ok).metadata) == 3
    too_many = shard_bytes({"__metadata__": {str(i): "v" for i in range(4)}})
    with pytest.raises(FormatError, match="more than 3 entries"):
        layout_from_bytes(too_many)


def test_long_entry_is_refused_before_decoding() -> None:
    shape = ",".join(["1"] * 20_000)
    content = shard_bytes('{"a":{"dtype":"U8","shape":[' + shape + '],"data_offsets":[0,1]}}', b"x")
    with pytest.raises(FormatError, match="entry is longer than"):
        layout_from_bytes(content)


def test_messages_are_specific() -> None:
    content = shard_bytes({"a": entry("F32", [1], 0, 4), "b": entry("F32", [2], 4, 8)}, b"x" * 8)
    with pytest.raises(FormatError) as excinfo:
        layout_from_bytes(content, path="/models/x.safetensors")
    assert str(excinfo.value) == (
        "/models/x.safetensors: tensor 'b': data_offsets [4, 8] hold 4 bytes but shape [2] "
        "of F32 needs 8 bytes"
    )


# --------------------------------------------------------------------------- index json

VALID_INDEX = {
    "metadata": {"total_size": 48},
    "weight_map": {
        "lm_head.weight": "model-00002-of-00002.safetensors",
        "embed.weight": "model-00001-of-00002.safetensors",
        "norm.weight": "model-00002-of-00002.safetensors",
    },
}


def test_index_json_parses() -> None:
    index = parse_index_json(json.dumps(VALID_INDEX).encode(), path="model.safetensors.index.json")
    assert isinstance(index, IndexJson)
    assert index.path == "model.safetensors.index.json"
    assert index.metadata == {"total_size": 48}
    assert index.weight_map == VALID_INDEX["weight_map"]
    assert index.shards == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_index_json_without_metadata_and_with_subdirectories() -> None:
    data = json.dumps({"weight_map": {"w": "sub/dir/a.safetensors"}, "extra": 1}).encode()
    index = parse_index_json(data, path="i")
    assert index.metadata == {}
    assert index.shards == ["sub/dir/a.safetensors"]


def _index_with_shard(shard: object) -> bytes:
    return json.dumps({"metadata": {}, "weight_map": {"w": shard}}).encode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(_index_with_shard("../x"), "contains '..'", id="parent"),
        pytest.param(_index_with_shard("a/../../x"), "contains '..'", id="parent_inside"),
        pytest.param(_index_with_shard("/etc/passwd"), "absolute path", id="absolute"),
        pytest.param(_index_with_shard("a\\b"), "backslash", id="backslash"),
        pytest.param(_index_with_shard(""), "is empty", id="empty"),
        pytest.param(_index_with_shard("a//b"), "empty or '.' path component", id="double_slash"),
        pytest.param(_index_with_shard("./a"), "empty or '.' path component", id="dot"),
        pytest.param(_index_with_shard("a\x00b"), "control character", id="nul"),
        pytest.param(_index_with_shard(3), "must be a shard file name", id="not_string"),
        pytest.param(b"[1, 2]", "must be a JSON object", id="array"),
        pytest.param(b'"x"', "must be a JSON object", id="string"),
        pytest.param(b"\xff\xfe{}", "not valid UTF-8", id="not_utf8"),
        pytest.param(b'{"weight_map": {', "not valid JSON", id="not_json"),
        pytest.param(b'{"metadata": {}}', "no 'weight_map'", id="no_weight_map"),
        pytest.param(b'{"weight_map": []}', "'weight_map' must be an object", id="map_array"),
        pytest.param(b'{"weight_map": {}}', "is empty", id="map_empty"),
        pytest.param(
            b'{"metadata": 1, "weight_map": {"w": "a"}}', "'metadata' must be an object", id="meta"
        ),
        pytest.param(
            b'{"weight_map": {"w": "a", "w": "b"}}', "repeats the key 'w'", id="duplicate"
        ),
        pytest.param(b'{"weight_map": {"": "a"}}', "invalid tensor name", id="empty_name"),
        pytest.param(
            b'{"metadata": ' + b"[" * DEEP + b"]" * DEEP + b', "weight_map": {"w": "a"}}',
            "nested too deeply",
            id="deep",
        ),
    ],
)
def test_index_json_refusals(data: bytes, reason: str) -> None:
    with pytest.raises(FormatError) as excinfo:
        parse_index_json(data, path="idx.json")
    assert str(excinfo.value).startswith("idx.json: ")
    assert reason in str(excinfo.value)


# --------------------------------------------------------------------------- hygiene


@pytest.mark.parametrize("module", [st_format, hf_index], ids=["safetensors", "hf_index"])
def test_docstring_examples_run(module: Any) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0
    assert result.failed == 0


def test_formats_does_not_import_network_or_cache_modules() -> None:
    """formats must not touch the network or the cache (its errors included)."""
    import subprocess
    import sys

    code = (
        "import sys; before = set(sys.modules); import weightd.formats; "
        "bad = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in "
        "{'fsspec', 's3fs', 'aiohttp', 'grpc', 'sqlite3', 'socket', 'torch', 'numpy'} "
        "or m.startswith(('weightd.store', 'weightd.sources', 'weightd.tiers'))); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
