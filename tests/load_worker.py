"""A light model-server stand-in for load tests: no torch, just gRPC and mmap.

    python tests/load_worker.py SOCKET SOURCE [--go FILE] [--ready DIR] [--cycles N]
                                [--hold SECONDS]

Each cycle: Acquire the model (with this process's pid and start time), map every shard
read-only at the path the daemon gave, check the safetensors header length and read the
first and last byte of every tensor, then Release. With ``--ready``/``--go`` the worker
first imports everything, touches ``DIR/<pid>`` and waits (at most 120 s) until ``FILE``
exists, so that many workers call at the same moment. Prints one JSON line: what it saw
(``ok``, ``fetched``, ``loaded``, ``digests``, ``checksum``, seconds) or the error.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc
from weightd_client.credentials import CredentialInterceptor
from weightd_client.tensors import open_shard


def check_shards(resp: pb.AcquireResponse) -> int:
    """Map each shard read-only, check its header length and touch every tensor's first
    and last byte. Returns a checksum of the bytes read."""
    checksum = 0
    for i, shard in enumerate(resp.shards):
        # (while the blob is not durable, its temporary file: as weightd_client opens it)
        with os.fdopen(open_shard(shard.path, shard.pending_path), "rb") as f, \
                mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            if len(m) != shard.size:
                raise RuntimeError(f"{shard.path}: {len(m)} bytes, the daemon said {shard.size}")
            (header_len,) = struct.unpack("<Q", m[:8])
            data_start = 8 + header_len
            for t in resp.tensors:
                if t.shard != i or not t.length:
                    continue
                if t.offset < data_start or t.offset + t.length > len(m):
                    raise RuntimeError(f"{t.name}: [{t.offset}, +{t.length}) is outside "
                                       f"the data section of {shard.path}")
                checksum = (checksum * 31 + m[t.offset] + m[t.offset + t.length - 1]) % 2**61
    return checksum


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("source")
    ap.add_argument("--go")
    ap.add_argument("--ready")
    ap.add_argument("--cycles", type=int, default=1)
    ap.add_argument("--hold", type=float, default=0.0)
    ns = ap.parse_args()
    me = os.getpid()
    client = pb.ClientInfo(name="load_worker")  # the daemon leases in the kernel's pid
    out: dict[str, Any] = {"pid": me, "ok": False, "fetched": 0, "loaded": 0}
    with grpc.insecure_channel(f"unix://{ns.socket}") as raw:
        channel = grpc.intercept_channel(raw, CredentialInterceptor(ns.socket))
        stub = pb_grpc.WeightdStub(channel)
        if ns.ready:
            Path(ns.ready, str(me)).touch()
        if ns.go:
            deadline = time.monotonic() + 120
            while not os.path.exists(ns.go):
                if time.monotonic() > deadline:
                    out["error"] = "no go signal"
                    print(json.dumps(out), flush=True)
                    return 2
                time.sleep(0.005)
        t0 = time.monotonic()
        try:
            for _ in range(ns.cycles):
                resp = stub.Acquire(pb.AcquireRequest(source=ns.source, device="cpu",
                                                      client=client), timeout=300)
                out["fetched"] += resp.fetched
                out["loaded"] += resp.loaded
                out["digests"] = sorted(s.digest for s in resp.shards)
                out["checksum"] = check_shards(resp)
                if ns.hold:
                    time.sleep(ns.hold)
                stub.Release(pb.ReleaseRequest(lease_id=resp.lease_id), timeout=30)
            out["ok"] = True
        except grpc.RpcError as e:
            out["error"] = f"{e.code().name}: {e.details()}"
        except Exception as e:  # reported to the test, which fails on it
            out["error"] = f"{type(e).__name__}: {e}"
        out["seconds"] = time.monotonic() - t0
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
