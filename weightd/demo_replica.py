"""One replica of ``make demo`` (weightd/demo.py): a model server's start, measured.

    python -m weightd.demo_replica weightd SOURCE NAME
    python -m weightd.demo_replica load_file MODEL_DIR NAME

Driven over stdin/stdout, one JSON line per event, so that the demo can read this
process's memory at the right moments: it imports torch and the loaders, says
``imported`` and waits for a line on stdin; then it loads the model (through the daemon,
or with ``safetensors.torch.load_file`` from the model's own files), reads every page of
every tensor, says ``ready`` (time to ready, time until every page was read, a checksum
of the bytes), and keeps the
weights until the next line (or EOF) on stdin. Needs the client's ``torch`` extra.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PAGE = 4096


def _say(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def read_every_page(tensors: Mapping[str, Any]) -> tuple[int, int]:
    """Read one byte of every page of every tensor (so that this process maps all of
    them: its PSS then counts every page); return (bytes, a checksum of those bytes)."""
    import torch

    nbytes = checksum = 0
    for name in sorted(tensors):
        flat = tensors[name].reshape(-1).view(torch.uint8)  # a view: nothing is copied
        if flat.numel():
            checksum += int(flat[::PAGE].sum(dtype=torch.int64)) + int(flat[-1])
        nbytes += flat.numel()
    return nbytes, checksum


def main(argv: list[str]) -> int:
    how, where, name = argv
    import safetensors.torch
    import torch  # noqa: F401

    import weightd_client

    # A full collection over torch's objects (~60 ms alone, ~200 ms with 4 replicas on 2
    # cores) would land in whichever loader allocates first: start both from the state a
    # preforking model server has (the same as bench/replica.py).
    gc.collect()
    gc.freeze()
    _say(event="imported", pid=os.getpid())
    if not sys.stdin.readline():
        return 0  # the demo went away before the start
    t0 = time.perf_counter()
    if how == "weightd":
        client = weightd_client.Client(name=name)
        tensors: Mapping[str, Any] = client.load(where, device="cpu", fallback=False)
    else:
        loaded: dict[str, Any] = {}
        for shard in sorted(Path(where).glob("*.safetensors")):
            loaded.update(safetensors.torch.load_file(shard))
        tensors = loaded
    ready = time.perf_counter() - t0
    nbytes, checksum = read_every_page(tensors)
    read = time.perf_counter() - t0
    _say(event="ready", ready_ms=ready * 1000, read_ms=read * 1000, tensors=len(tensors),
         bytes=nbytes, checksum=checksum)
    sys.stdin.readline()  # hold the weights while the demo reads our memory
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
