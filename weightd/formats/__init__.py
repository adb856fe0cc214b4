"""File formats weightd reads: safetensors shard headers and Hugging Face index json.

This package owns parsing and validating them: the 8-byte header length, the JSON
header, dtypes, shapes, byte offsets and their bounds (``safetensors``), and the
``*.safetensors.index.json`` that maps tensors to shards (``hf_index``). Every
rejection is a :class:`~weightd.errors.FormatError` naming the file and the reason.

It must not touch the network or the cache: it reads local files or bytes it is
given, and nothing else.
"""

from weightd.formats.cache import DEFAULT_LAYOUT_BUDGET, LayoutCache, layout_bytes
from weightd.formats.hf_index import MAX_INDEX_BYTES, IndexJson, parse_index_json
from weightd.formats.safetensors import (
    DTYPE_BITS,
    MAX_HEADER_BYTES,
    MAX_METADATA_ENTRIES,
    MAX_TENSORS,
    PARSE_SLOTS,
    ShardLayout,
    TensorInfo,
    header_length,
    layout_from_bytes,
    parse_header,
    read_layout,
)

__all__ = [
    "DEFAULT_LAYOUT_BUDGET",
    "DTYPE_BITS",
    "MAX_HEADER_BYTES",
    "MAX_INDEX_BYTES",
    "MAX_METADATA_ENTRIES",
    "MAX_TENSORS",
    "PARSE_SLOTS",
    "IndexJson",
    "LayoutCache",
    "ShardLayout",
    "TensorInfo",
    "header_length",
    "layout_bytes",
    "layout_from_bytes",
    "parse_header",
    "parse_index_json",
    "read_layout",
]
