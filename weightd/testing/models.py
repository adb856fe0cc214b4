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
    per_tensor = max(itemsize, (total_bytes // tensors) // itemsize // 64 * 64 * itemsize)
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
