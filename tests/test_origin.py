"""What the fetch checks of what an origin serves, beyond the nine attacks of
tests/test_trust.py: the origin's own digests (moto's S3 server), range answers, listings
that a snapshot cannot hold, bounded index files, and the bounds on parsed layouts; and
the runtime directory rules on their own (CPU, no other user needed)."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from botocore.config import Config as BotoConfig

from weightd.config import Config
from weightd.errors import FormatError, IntegrityError
from weightd.formats import (
    MAX_INDEX_BYTES,
    PARSE_SLOTS,
    LayoutCache,
    layout_bytes,
    layout_from_bytes,
)
from weightd.formats import safetensors as st_format
from weightd.rundir import UnsafeRuntimeDir, prepare_runtime_dir
from weightd.sources.base import _BadRange
from weightd.sources.digests import OriginDigest, from_hf_info, from_s3_head
from weightd.sources.http import _check_range
from weightd.store import Fetcher, Store
from weightd.store.fetch import MAX_ANSWER_BYTES
from weightd.testing import write_synthetic_model
from weightd_client.errors import DaemonUnavailable
from weightd_client.rundir import check_socket

MiB = 1024 * 1024


def fetch(config: Config, ref: str):  # type: ignore[no-untyped-def]
    with Store.open(config.cache_dir) as store:
        return Fetcher(store, config).fetch(ref)


def leftovers(cache: Path) -> list[str]:
    """What a failed fetch must not leave: temp files, snapshots, staging dirs, manifests."""
    revs = cache / "snapshots" / ".revs"
    return sorted([*(p.name for p in (cache / "tmp").iterdir()),
                   *(p.name for p in (cache / "snapshots").iterdir() if p.name != ".revs"),
                   *(str(p.relative_to(revs)) for p in revs.rglob("*"))])


# the origin's digests (S3) ------------------------------------------------------------------


def _flip_one_byte(method: str, path: str):  # type: ignore[no-untyped-def]
    if method == "GET" and path.endswith("model.safetensors"):
        return lambda chunk: chunk[:-1] + bytes([chunk[-1] ^ 1])
    return None


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
@pytest.mark.parametrize("upload", ["crc32", "sha256", "etag-md5"])
def test_s3_bytes_that_do_not_match_the_origins_digest_are_integrity_error(
        config, s3, tmp_path, upload, chunked):
    # chunked: ranged reads, the digest computed beside the writer; whole: one read of
    # the whole object, which botocore checks itself against a stored checksum
    config = config.replace(chunk_size=256 * 1024 if chunked else None)
    src = tmp_path / "m"
    write_synthetic_model(src, total_bytes=MiB, tensors=4)
    s3c = s3.client()
    if upload == "etag-md5":  # no checksum stored: only the ETag (an MD5) vouches
        s3c = __import__("boto3").client(
            "s3", endpoint_url=s3.endpoint_url, region_name="us-east-1",
            config=BotoConfig(request_checksum_calculation="when_required"))
    s3c.create_bucket(Bucket="digests")
    extra = {"ChecksumAlgorithm": "SHA256"} if upload == "sha256" else {}
    prefix = f"case-{upload.upper()}-{chunked}"
    for name in ("config.json", "model.safetensors"):
        s3c.put_object(Bucket="digests", Key=f"{prefix}/{name}",
                       Body=(src / name).read_bytes(), **extra)
    head = s3c.head_object(Bucket="digests", Key=f"{prefix}/model.safetensors",
                           ChecksumMode="ENABLED")
    want = {"crc32": "crc32", "sha256": "sha256", "etag-md5": "md5"}[upload]
    assert from_s3_head(head).algorithm == want  # type: ignore[union-attr]
    url = f"s3://digests/{prefix}"
    s3.set_body(_flip_one_byte)
    with pytest.raises(IntegrityError) as e:
        fetch(config, url)
    assert "model.safetensors" in str(e.value), e.value
    if chunked or want == "md5":  # weightd's own check (botocore checks no ETag)
        assert f"have {want} " in str(e.value), e.value
    else:
        assert "checksum" in str(e.value), e.value
    assert leftovers(config.cache_dir) == []
    shard_size = (src / "model.safetensors").stat().st_size
    assert [b for b in (config.cache_dir / "blobs").glob("*/*")
            if b.stat().st_size == shard_size] == [], "the corrupt shard became a blob"
    s3.set_body(None)
    snap = fetch(config, url)  # the honest origin is served, digests checked
    assert (Path(snap.path) / "model.safetensors").read_bytes() == (
        src / "model.safetensors").read_bytes()


def test_s3_digest_from_head(tmp_path):
    data = os.urandom(1000)
    md5 = hashlib.md5(data).hexdigest()
    assert from_s3_head({"ETag": f'"{md5}"'}) == OriginDigest(
        "md5", md5, "S3 ETag (the MD5 of a single-part object)")
    # SSE-KMS and SSE-C ETags are not MD5s; multipart ETags carry a part count
    assert from_s3_head({"ETag": f'"{md5}"', "ServerSideEncryption": "aws:kms"}) is None
    assert from_s3_head({"ETag": f'"{md5}"', "SSECustomerAlgorithm": "AES256"}) is None
    assert from_s3_head({"ETag": f'"{md5}"', "ServerSideEncryption": "AES256"}) is not None
    assert from_s3_head({"ETag": f'"{md5}-4"'}) is None
    # a composite checksum (of part checksums) is not the file's; a multipart object's
    # checksum is composite unless S3 says FULL_OBJECT (moto says nothing)
    assert from_s3_head({"ChecksumCRC32": "AAAAAA==-3", "ChecksumType": "COMPOSITE"}) is None
    assert from_s3_head({"ETag": f'"{md5}-3"', "ChecksumCRC32": "lzW38g=="}) is None
    assert from_s3_head({"ETag": f'"{md5}-3"', "ChecksumCRC32": "lzW38g==",
                         "ChecksumType": "FULL_OBJECT"}).algorithm == "crc32"  # type: ignore
    assert from_hf_info({"lfs": {"sha256": "ab" * 32}}) == OriginDigest(
        "sha256", "ab" * 32, "Hugging Face LFS sha256")
    assert from_hf_info({"lfs": None}) is None


# range answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "content_range", "length", "start", "end", "size", "ok"), [
    (206, "bytes 100-199/1000", 100, 100, 200, 1000, True),
    (206, "bytes 0-99/1000", 100, 100, 200, 1000, False),     # another range
    (206, "bytes 100-199/2000", 100, 100, 200, 1000, False),  # another file
    (206, "bytes 100-199/*", 100, 100, 200, 1000, True),
    (206, None, 100, 100, 200, 1000, False),
    (206, "bytes 100-199", 100, 100, 200, 1000, False),
    (200, None, 1000, 0, 1000, 1000, True),                    # the whole file, asked for
    (200, None, 200, 0, 200, 1000, False),                     # a 200 to a ranged request
    (200, None, 1000, 100, 200, 1000, False),
    (416, None, 0, 100, 200, 1000, False),
])
def test_a_range_answer_must_be_the_range_asked_for(status, content_range, length, start,
                                                     end, size, ok):
    if ok:
        _check_range("u", status, content_range, length, start, end, size)
    else:
        with pytest.raises(_BadRange):
            _check_range("u", status, content_range, length, start, end, size)


# listings a snapshot cannot hold; bounded index files ------------------------------------------


def test_a_listing_with_a_file_under_a_file_is_refused_and_leaves_nothing(config, s3, tmp_path):
    src = tmp_path / "m"
    write_synthetic_model(src, total_bytes=MiB // 4, tensors=2)
    s3c = s3.client()
    s3c.create_bucket(Bucket="nested")
    s3c.put_object(Bucket="nested", Key="m/model.safetensors",
                   Body=(src / "model.safetensors").read_bytes())
    s3c.put_object(Bucket="nested", Key="m/x.json", Body=b"{}")
    s3c.put_object(Bucket="nested", Key="m/x.json/y.json", Body=b"{}")
    with pytest.raises(FormatError) as e:
        fetch(config, "s3://nested/m")
    assert "'x.json'" in str(e.value) and "'x.json/y.json'" in str(e.value), e.value
    assert leftovers(config.cache_dir) == []
    with Store.open(config.cache_dir) as store:
        assert store.index.models() == []


def test_an_index_json_is_read_with_a_bound(config, http_server, http_root):
    d = http_root / "big-index"
    write_synthetic_model(d, total_bytes=MiB // 4, tensors=4, shards=2)
    index = d / "model.safetensors.index.json"
    text = index.read_text()
    index.write_text(text[:-1] + " " * (MAX_INDEX_BYTES + 10) + "}")
    http_server.log.reset()
    with pytest.raises(FormatError) as e:
        fetch(config, f"{http_server.url}/big-index/model.safetensors.index.json")
    assert "larger than" in str(e.value), e.value
    assert http_server.log.bytes_served("index.json") <= MAX_INDEX_BYTES + 4 * MiB


# layouts: parsed once, bounded -------------------------------------------------------------------


def _wide(n: int, tag: str = "") -> bytes:
    import struct

    header = b"{" + b",".join(b'"%s%x":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}'
                              % (tag.encode(), i, i, i + 1) for i in range(n)) + b"}"
    return struct.pack("<Q", len(header)) + header + b"\0" * n


def test_layout_cache_keeps_within_its_budget():
    small, big = layout_from_bytes(_wide(1000)), layout_from_bytes(_wide(20_000))
    cache = LayoutCache(budget=layout_bytes(big) + layout_bytes(small) // 2)
    cache.put("big", big)
    cache.put("small", small)  # over the budget: the least recently used goes
    assert "big" not in cache and cache.get("small") is small
    cache.put("big", big)
    assert "small" not in cache and cache.nbytes == layout_bytes(big)
    cache.drop("big")
    assert len(cache) == 0 and cache.nbytes == 0
    LayoutCache(budget=10).put("x", small)  # alone over the budget: not kept, no error


def test_fetch_parses_each_shard_once_and_the_layout_is_reused(config, tmp_path, monkeypatch):
    src = tmp_path / "m"
    write_synthetic_model(src, total_bytes=MiB // 2, tensors=8, shards=2)
    calls = []
    real = st_format._parse_paused

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(kw.get("path"))
        return real(*a, **kw)

    monkeypatch.setattr(st_format, "_parse_paused", counting)
    with Store.open(config.cache_dir) as store:
        fetcher = Fetcher(store, config)
        snap = fetcher.fetch(str(src))
        shards = [f for f in snap.files if f.relpath.endswith(".safetensors")]
        assert len(calls) == len(shards) == 2
        assert [len(fetcher.layout(f.digest).tensors) for f in shards] == [4, 4]
        assert len(calls) == 2  # the node's layouts are the fetch's


def test_at_most_PARSE_SLOTS_large_headers_are_parsed_at_once(monkeypatch):
    data = [_wide(40_000, tag=f"t{i}-") for i in range(6)]
    inside = peak = 0
    lock = threading.Lock()
    real = st_format._parse_header

    def tracking(*a, **kw):  # type: ignore[no-untyped-def]
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        try:
            time.sleep(0.05)
            return real(*a, **kw)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(st_format, "_parse_header", tracking)
    threads = [threading.Thread(target=layout_from_bytes, args=(d,)) for d in data]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert peak == PARSE_SLOTS


def test_a_model_whose_answer_would_not_fit_a_message_is_refused(config, tmp_path):
    # 70,000 tensors (under the per-shard cap) whose names of 1,000 characters make an
    # Acquire answer of about 70 MiB, over what a gRPC message may hold
    model = tmp_path / "too-wide"
    model.mkdir()
    (model / "model.safetensors").write_bytes(_wide(70_000, tag="w" * 995))
    with pytest.raises(FormatError) as e:
        fetch(config, str(model))
    assert "70000 tensors" in str(e.value) and "MiB" in str(e.value), e.value
    assert leftovers(config.cache_dir) == []
    from weightd.server import MAX_MESSAGE

    assert MAX_MESSAGE - MiB == MAX_ANSWER_BYTES  # the server's limit, less a margin


# the runtime directory, on its own ----------------------------------------------------------------


def test_the_daemon_creates_a_missing_runtime_directory_0700(tmp_path):
    run = tmp_path / "a" / "rundir"
    prepare_runtime_dir(run)
    assert stat.S_IMODE(run.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_the_daemon_refuses_a_runtime_directory_others_can_write(tmp_path, mode):
    run = tmp_path / "rundir"
    run.mkdir()
    os.chmod(run, mode)
    with pytest.raises(UnsafeRuntimeDir) as e:
        prepare_runtime_dir(run)
    assert str(run) in str(e.value) and "writable" in str(e.value)


def test_the_daemon_refuses_a_runtime_directory_that_is_a_link_to_an_open_one(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    os.symlink(open_dir, tmp_path / "rundir")
    with pytest.raises(UnsafeRuntimeDir):
        prepare_runtime_dir(tmp_path / "rundir")


def test_the_client_refuses_what_is_not_a_socket_and_a_missing_one(tmp_path):
    (tmp_path / "weightd.sock").write_text("")
    with pytest.raises(DaemonUnavailable, match="not a socket"):
        check_socket(tmp_path / "weightd.sock")
    with pytest.raises(DaemonUnavailable, match="no such socket"):
        check_socket(tmp_path / "gone.sock")
