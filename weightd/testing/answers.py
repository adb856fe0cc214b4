"""Checking what the daemon served against the source's files, for tests and benchmarks.

An Acquire answer names each shard's file (host tier) and every tensor's byte range in
it; :func:`answer_mismatches` compares every range with the same range of the source
file that has the shard's digest, and checks that every file and the snapshot directory
the answer names exist.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from weightd.store import hash_file
from weightd_client.tensors import open_shard

__all__ = ["answer_mismatches", "references"]


def references(*directories: str | os.PathLike[str]) -> dict[str, str]:
    """digest -> file of every ``*.safetensors`` under the directories (one source
    revision each)."""
    return {hash_file(p): str(p) for d in directories
            for p in sorted(Path(d).rglob("*.safetensors"))}


def answer_mismatches(answer: Any, refs: Mapping[str, str]) -> list[str]:
    """What is wrong with an ``AcquireResponse`` (empty: nothing).

    Args:
        answer: the daemon's ``AcquireResponse`` (host tier).
        refs: digest -> the source file with that content (see :func:`references`).
    """
    wrong = []
    if not os.path.isdir(answer.snapshot_path):
        wrong.append(f"snapshot {answer.snapshot_path} is missing")
    for i, shard in enumerate(answer.shards):
        ref = refs.get(shard.digest)
        if ref is None:
            wrong.append(f"{shard.relpath}: digest {shard.digest} is no revision's")
            continue
        try:  # (its temporary file while it is not durable, as a client opens it)
            f = os.fdopen(open_shard(shard.path, shard.pending_path), "rb")
        except FileNotFoundError:
            wrong.append(f"{shard.path}: held blob missing")
            continue
        with f, open(ref, "rb") as r, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as got, \
                mmap.mmap(r.fileno(), 0, prot=mmap.PROT_READ) as want:
            if len(got) != len(want):
                wrong.append(f"{shard.relpath}: {len(got)} bytes, {len(want)} in the source")
                continue
            wrong += [f"{t.name}: bytes differ from the source" for t in answer.tensors
                      if t.shard == i and got[t.offset:t.offset + t.length]
                      != want[t.offset:t.offset + t.length]]
    return wrong
