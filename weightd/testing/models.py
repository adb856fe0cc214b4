"""Synthetic safetensors models with a known layout, written without torch."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np


def write_synthetic_model(
    directory: str | os.PathLike[str],
    *,
    total_bytes: int,
    tensors: int = 200,
    shards: int = 1,
    seed: int = 0,
    dtype: str = "BF16",
) -> list[Path]:
    """Write a model of ``shards`` safetensors files with ``tensors`` tensors in all.

    Tensor bytes are pseudo-random (so compression or dedup cannot cheat a benchmark);
    with ``shards > 1`` an HF ``model.safetensors.index.json`` and a ``config.json`` are
    written too. Returns the shard paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    itemsize = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}[dtype]
    per_tensor = (total_bytes // tensors) // itemsize // 64 * 64 * itemsize
    if per_tensor < 64 * itemsize:
        raise ValueError(f"{directory}: {total_bytes} bytes cannot hold {tensors} {dtype} "
                         f"tensors of shape [n, 64] (at least {64 * itemsize * tensors} bytes)")
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    weight_map: dict[str, str] = {}
    per_shard = -(-tensors // shards)
    for s in range(shards):
        name = ("model.safetensors" if shards == 1
                else f"model-{s + 1:05d}-of-{shards:05d}.safetensors")
        header: dict[str, object] = {"__metadata__": {"format": "pt", "weightd": "synthetic"}}
        offset = 0
        names = [f"layers.{i}.weight" for i in range(s * per_shard,
                                                      min(tensors, (s + 1) * per_shard))]
        for t in names:
            n = per_tensor // itemsize
            header[t] = {"dtype": dtype, "shape": [n // 64, 64],
                         "data_offsets": [offset, offset + n * itemsize]}
            offset += n * itemsize
            weight_map[t] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path = directory / name
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            remaining = offset
            while remaining:
                n = min(remaining, 64 << 20)
                f.write(rng.bytes(n))
                remaining -= n
        paths.append(path)
    if shards > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(p.stat().st_size for p in paths)},
             "weight_map": weight_map}, indent=1))
    (directory / "config.json").write_text(json.dumps({"model_type": "synthetic",
                                                       "tensors": tensors}))
    return paths



#: A Llama small enough to start in vLLM's CPU build in seconds and large enough for its
#: CPU attention (head_dim 64: hidden 256 over 4 heads; head_dim 16 is refused).
TINY_LLAMA_CONFIG: dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def _llama_shapes(config: dict[str, object]) -> dict[str, tuple[int, ...]]:
    c = {k: v for k, v in config.items() if isinstance(v, int)}
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, q),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_tiny_llama(directory: str | os.PathLike[str], *, seed: int = 0, shards: int = 1,
                     **config: object) -> Path:
    """Write a randomly initialised :data:`TINY_LLAMA_CONFIG` Llama (BF16 safetensors,
    ``config.json``, ``generation_config.json``; an HF index when ``shards > 1``),
    without torch. The same seed writes the same bytes (about 3 MiB).

    Args:
        directory: where to write it.
        seed: of the random weights.
        shards: how many safetensors files.
        config: entries that replace the tiny config's (``hidden_size=1024``,
            ``num_hidden_layers=8``...: a larger Llama of the same shape).

    Returns:
        The model directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full = {**TINY_LLAMA_CONFIG, **config}
    shapes = _llama_shapes(full)
    rng = np.random.default_rng(seed)
    names = list(shapes)
    per_shard = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(shards):
        fname = ("model.safetensors" if shards == 1
                 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors")
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        blobs: list[bytes] = []
        offset = 0
        for name in names[s * per_shard:(s + 1) * per_shard]:
            shape = shapes[name]
            if len(shape) == 1:  # norms around 1, as trained ones are
                values = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                values = rng.standard_normal(shape) / np.sqrt(shape[-1])
            raw = _bf16_bits(values).tobytes()
            header[name] = {"dtype": "BF16", "shape": list(shape),
                            "data_offsets": [offset, offset + len(raw)]}
            blobs.append(raw)
            offset += len(raw)
            weight_map[name] = fname
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(directory / fname, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for raw in blobs:
                f.write(raw)
        total += offset
    if shards > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (directory / "config.json").write_text(json.dumps(full, indent=1))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": full["bos_token_id"], "eos_token_id": full["eos_token_id"]}))
    return directory
