"""A stand-in for a model server: loads models through weightd_client on command.

Reads one JSON command a line on stdin, answers one JSON line on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Mapping

t_import = time.perf_counter()
import torch  # noqa: E402
from smaps import smaps_for  # noqa: E402  (tests/ is this script's sys.path[0])

import weightd_client  # noqa: E402

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def compare(loaded: Mapping[str, torch.Tensor], reference: str) -> list[str]:
    """Names of the tensors whose bytes differ from the reference's safetensors files (or
    that one side lacks)."""
    from pathlib import Path

    from safetensors.torch import load_file

    ref = Path(reference)
    want: dict[str, torch.Tensor] = {}
    for shard in ([ref] if ref.is_file() else sorted(ref.rglob("*.safetensors"))):
        want.update(load_file(shard))
    bad = sorted(set(want) ^ set(loaded))
    bad += [name for name, t in want.items()
            if name in loaded and not torch.equal(_bytes(loaded[name]), _bytes(t))]
    return bad


def main() -> None:
    client = weightd_client.Client()
    models: dict[str, weightd_client.LoadedModel] = {}
    streams: list[weightd_client.StreamedModel] = []
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        try:
            if cmd == "load":
                t0 = time.perf_counter()
                m = client.load(req["source"], device=req.get("device", "cpu"),
                                fallback=req.get("fallback", True))
                ready = time.perf_counter() - t0
                touched = 0.0
                checksum = 0
                if req.get("touch", True):
                    t1 = time.perf_counter()
                    for t in m.values():
                        if t.numel():
                            checksum ^= int(t.view(-1)[:64].view(torch.uint8).sum())
                            t.view(torch.uint8).sum() if t.dtype != torch.bool else t.sum()
                    touched = time.perf_counter() - t1
                models[req["source"]] = m
                out = {"lease_id": m.lease_id, "tensors": len(m), "ready_s": ready,
                       "touch_s": touched, "checksum": checksum,
                       "snapshot_path": m.snapshot_path}
            elif cmd == "compare":
                # load, then compare every tensor byte for byte with the reference files
                m = client.load(req["source"], fallback=False)
                models[req["source"]] = m
                out = {"lease_id": m.lease_id, "tensors": len(m),
                       "snapshot_path": m.snapshot_path,
                       "mismatches": compare(m, req["reference"])}
            elif cmd == "stream":
                # the tensors as they land, compared with the reference; the lease is
                # kept (with its stream) when "hold" is set
                stream = client.stream(req["source"])
                got = dict(stream)
                out = {"lease_id": stream.lease_id, "tensors": len(got),
                       "mismatches": compare(got, req["reference"])}
                if req.get("hold"):
                    streams.append(stream)
                else:
                    stream.release()
            elif cmd == "read":
                m = models[req["source"]]
                t = m[req["name"]]
                out = {"bytes": t.contiguous().view(torch.uint8).view(-1)[:16].tolist()}
            elif cmd == "write":
                m = models[req["source"]]
                t = m[req["name"]]
                t.view(torch.uint8).view(-1)[:16] = req["value"]
                out = {"ok": True}
            elif cmd == "smaps":
                out = smaps_for(os.getpid(), req["path"])
            elif cmd == "release":
                models.pop(req["source"]).release()
                out = {"ok": True}
            elif cmd == "ping":  # answered once torch and the client are imported
                out = {"ok": True}
            elif cmd == "fetch":
                out = {"path": client.fetch(req["source"])}
            else:
                out = {"error": f"unknown command {cmd}", "type": "ValueError"}
        except Exception as e:
            out = {"error": str(e), "type": type(e).__name__, "trace": traceback.format_exc()}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
