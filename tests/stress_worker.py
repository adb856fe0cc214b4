"""A light model-server stand-in for tests/test_stress.py (gRPC and mmap, no torch).

Until ``--until`` (a monotonic deadline passed as a wall-clock time), picks a model at
random, acquires it, checks what it was served, holds it a moment, releases it. Every
cycle prints one JSON line: the model, the outcome, and what was wrong if anything:

* every tensor's bytes equal the bytes at the same place in the reference file of the
  shard's digest (``--refs``: a JSON map source -> digest -> file);
* every shard file and the snapshot directory named in the answer exist (a held blob,
  a held revision);
* the answer's shards are the ones of one revision the source really had.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import grpc

from weightd.testing.answers import answer_mismatches
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc
from weightd_client.credentials import CredentialInterceptor


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("--refs", required=True)
    ap.add_argument("--until", type=float, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ns = ap.parse_args()
    with open(ns.refs) as f:
        refs: dict[str, dict[str, str]] = json.load(f)
    rng = random.Random(ns.seed)
    channel = grpc.intercept_channel(grpc.insecure_channel(f"unix://{ns.socket}"),
                                     CredentialInterceptor(ns.socket))
    stub = pb_grpc.WeightdStub(channel)
    print(json.dumps({"started": os.getpid()}), flush=True)
    while time.time() < ns.until:
        source = rng.choice(sorted(refs))
        t0 = time.monotonic()
        out: dict[str, object] = {"source": source}
        try:
            resp = stub.Acquire(pb.AcquireRequest(source=source,
                                                  client=pb.ClientInfo(name="stress")),
                                timeout=60)
            out.update(ms=(time.monotonic() - t0) * 1000, loaded=resp.loaded,
                       fetched=resp.fetched, wrong=answer_mismatches(resp, refs[source]))
            time.sleep(rng.uniform(0, 0.15))
            stub.Release(pb.ReleaseRequest(lease_id=resp.lease_id), timeout=30)
            out["ok"] = True
        except grpc.RpcError as e:
            out.update(code=e.code().name, details=(e.details() or "")[:300])
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
