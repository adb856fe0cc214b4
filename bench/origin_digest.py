#!/usr/bin/env python3
"""What checking the origin's digest costs a fetch (weightd/sources/digests.py).

    python bench/origin_digest.py [--size 512MiB] [--runs 5] [--out bench/out/origin_digest.json]

Two measurements, each as a ratio against a baseline run in the same script, median of
``--runs`` alternated runs:

1. S3 on moto (a child process, 127.0.0.1): weightd fetches of the same model uploaded
   single-part (so that S3 vouches for it) with a stored CRC32 checksum, and without any
   checksum (the ETag, an MD5, is what is checked), against fetches of those very objects
   with the origin's digest not checked (``from_s3_head`` replaced by ``None`` in this
   process: the baseline).
2. The writer's work alone, in memory (no network, no disk): xxh3-128 of 1 GiB in 16 MiB
   chunks, against xxh3 plus each origin digest computed beside it as the fetch does it
   (``_SideHash``, a thread one chunk behind). This is the bound when the network and
   the disk are faster than the digest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch import MotoProcess, machine, weightd_fetch  # noqa: E402

import weightd.sources.s3 as s3_source  # noqa: E402
from weightd.config import parse_size  # noqa: E402
from weightd.sources.digests import OriginDigest  # noqa: E402
from weightd.store.fetch import _SideHash  # noqa: E402
from weightd.testing import write_synthetic_model  # noqa: E402

MiB = 1024 * 1024


def upload_single_part(endpoint: str, local: Path, bucket: str, prefix: str, *,
                       checksum: bool) -> str:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config as BotoConfig

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing",
                      config=BotoConfig(request_checksum_calculation="when_supported"
                                        if checksum else "when_required"))
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    single = TransferConfig(multipart_threshold=8 * 1024 * MiB)
    for p in sorted(local.iterdir()):
        s3.upload_file(str(p), bucket, f"{prefix}/{p.name}", Config=single)
    return f"s3://{bucket}/{prefix}"


def s3_ratios(size: int, runs: int, work: Path) -> dict[str, Any]:
    model = work / "model"
    write_synthetic_model(model, total_bytes=size, tensors=64, shards=4)
    out: dict[str, Any] = {}
    real = s3_source.from_s3_head
    with MotoProcess() as moto:
        urls = {"crc32": upload_single_part(moto.endpoint_url, model, "bench", "crc32",
                                            checksum=True),
                "md5": upload_single_part(moto.endpoint_url, model, "bench", "md5",
                                          checksum=False)}
        for kind, url in urls.items():
            checked, unchecked = [], []
            for run in range(runs):
                for check in (True, False):
                    s3_source.from_s3_head = real if check else (lambda head: None)
                    dest = work / f"cache-{kind}-{run}-{check}"
                    sample = weightd_fetch(url, dest, run=run, s3_endpoint=moto.endpoint_url)
                    (checked if check else unchecked).append(sample.gbps)
                    shutil.rmtree(dest, ignore_errors=True)
            s3_source.from_s3_head = real
            out[kind] = {"checked_gbps": statistics.median(checked),
                         "unchecked_gbps": statistics.median(unchecked),
                         "ratio": statistics.median(checked) / statistics.median(unchecked),
                         "runs": runs}
    return out


def writer_ratios(runs: int) -> dict[str, Any]:
    block = os.urandom(16 * MiB)
    chunks = 64  # 1 GiB
    digests = {"crc32": OriginDigest("crc32", "0" * 8, "bench"),
               "md5": OriginDigest("md5", "0" * 32, "bench"),
               "sha256": OriginDigest("sha256", "0" * 64, "bench")}

    def once(digest: OriginDigest | None) -> float:
        h = xxhash.xxh3_128()
        side = _SideHash(digest) if digest is not None else None
        t0 = time.perf_counter()
        for _ in range(chunks):
            h.update(block)
            if side is not None:
                side.add([block])
        if side is not None:
            if side.pending is not None:
                side.pending.result()
            side.close()
        return time.perf_counter() - t0

    base = [once(None) for _ in range(runs)]
    out: dict[str, Any] = {"xxh3_only_s_per_gib": statistics.median(base)}
    for name, digest in digests.items():
        with_digest = [once(digest) for _ in range(runs)]
        out[name] = {"s_per_gib": statistics.median(with_digest),
                     "ratio_to_xxh3_only": statistics.median(with_digest)
                     / statistics.median(base)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--size", default="512MiB")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default="bench/out/origin_digest.json")
    ap.add_argument("--workdir", default="/var/tmp")
    args = ap.parse_args(argv)
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="weightd-digest-") as tmp:
        result = {"machine": machine(Path(tmp)), "size": parse_size(args.size),
                  "writer": writer_ratios(args.runs),
                  "s3": s3_ratios(parse_size(args.size), args.runs, Path(tmp))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
