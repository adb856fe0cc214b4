"""Hostile input through a running daemon: malformed shards, sources that try to leave
their allowed roots, and absurd requests.

One daemon serves the whole module (``allowed_sources`` = a local models directory and a
prefix of an HTTP server whose listings lie). Each refusal must be the right gRPC code,
name what is wrong, leave nothing behind (no blob, no snapshot, no temp file, no resident
byte) and keep the daemon serving a good model.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.daemon import DaemonProcess, raw_stub
from tests.hostile_corpus import HostileCase, build_corpus, case_names
from weightd.sources import canonical_url, model_name
from weightd.store import hash_file
from weightd.testing import RangeHTTPServer, write_synthetic_model
from weightd.testing.servers import _Handler
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc

MiB = 1024 * 1024

#: Links a lying directory listing adds to the model's own files: every one of them
#: names a file outside the model's directory (some outside allowed_sources too).
HOSTILE_LINKS = (
    "../secret.json",
    "/secret.json",
    "sub/../../secret.json",
    "%2e%2e/secret.json",
    "%2e%2e/%2e%2e/secret.json",
    "%2E%2E/%2E%2E/top.json",
    "..%2fsecret.json",
    "sub%2f..%2f..%2f..%2ftop.json",
    "http://{host}/top.json",
    "http://{host}/allowed/secret.json",
)


class _LyingListing(_Handler):
    """The test server's handler, whose listings of ``.../listing`` add HOSTILE_LINKS."""

    def _links(self, target: Path, rel: str) -> list[tuple[str, str]]:
        links = super()._links(target, rel)
        if rel.rstrip("/").endswith("/listing"):
            host = f"127.0.0.1:{self.server.server_address[1]}"
            links += [(href, href) for href in (link.format(host=host)
                                                for link in HOSTILE_LINKS)]
        return links


@dataclass
class World:
    root: Path
    models: Path            # the allowed local directory
    outside: Path           # a directory outside allowed_sources
    corpus: dict[str, HostileCase]
    good: Path              # a good model, under models/
    http: RangeHTTPServer
    daemon: DaemonProcess
    host_baseline: int = 0

    @property
    def cache(self) -> Path:
        return self.daemon.cache_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("hostile")
    models = root / "models"
    outside = root / "outside"
    outside.mkdir()
    (outside / "leak.json").write_text('{"secret": "outside the allowed roots"}')
    corpus = {c.name: c for c in build_corpus(models / "corpus")}
    write_synthetic_model(models / "good", total_bytes=2 * MiB, tensors=8)
    www = root / "www"
    write_synthetic_model(www / "allowed" / "listing", total_bytes=MiB, tensors=4)
    write_synthetic_model(www / "secret-model", total_bytes=MiB, tensors=4, seed=3)
    (www / "secret.json").write_text('{"secret": "root"}')
    (www / "top.json").write_text('{"secret": "top"}')
    (www / "allowed" / "secret.json").write_text('{"secret": "beside the model"}')
    http = RangeHTTPServer(www)
    http._server.RequestHandlerClass = _LyingListing  # type: ignore[attr-defined]
    allowed = f"{models},{http.url}/allowed"
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(("WEIGHTD_", "AWS_")):
                mp.delenv(key)
        (root / "run").mkdir()
        mp.setenv("XDG_RUNTIME_DIR", str(root / "run"))
        mp.setenv("XDG_CACHE_HOME", str(root / "xdg-cache"))
        daemon = DaemonProcess(root, env={"WEIGHTD_ALLOWED_SOURCES": allowed})
    w = World(root, models, outside, corpus, models / "good", http, daemon)
    try:
        got = acquire(w, w.good)
        release(w, got.lease_id)
        w.host_baseline = host_bytes(w)
        assert w.host_baseline >= 2 * MiB
        yield w
    finally:
        code = daemon.stop()
        http.stop()
        assert code == 0, daemon.log()


def stub(w: World) -> pb_grpc.WeightdStub:
    return raw_stub(w.daemon.socket)


def client_info() -> pb.ClientInfo:
    return pb.ClientInfo(name="test_hostile")


def acquire(w: World, source: str | Path, **kw: Any) -> pb.AcquireResponse:
    return stub(w).Acquire(pb.AcquireRequest(source=str(source), client=client_info(), **kw),
                           timeout=120)


def release(w: World, lease_id: str) -> None:
    stub(w).Release(pb.ReleaseRequest(lease_id=lease_id), timeout=10)


def evict(w: World, source: str | Path) -> None:
    """Drop a model this module loaded on purpose, so host bytes return to the baseline."""
    stub(w).Evict(pb.EvictRequest(source=str(source)), timeout=10)


def host_bytes(w: World) -> int:
    st = stub(w).Status(pb.StatusRequest(), timeout=10)
    return next(t.bytes_used for t in st.tiers if t.tier == pb.TIER_HOST)


def refused(call: Any, code: grpc.StatusCode, w: World | None = None) -> grpc.RpcError:
    """Run ``call()``; it must fail with ``code``. Returns the error.

    When it succeeds instead, a lease it got is released and the model evicted (so that
    the module's other tests still see the daemon as it was) before the test fails.
    """
    try:
        out = call()
        if hasattr(out, "__iter__") and not isinstance(out, str | bytes):
            out = list(out)  # a streaming call fails when read
    except grpc.RpcError as e:
        assert e.code() == code, (e.code(), e.details())
        assert e.details()
        return e
    if w is not None and isinstance(out, pb.AcquireResponse):
        release(w, out.lease_id)
        stub(w).Evict(pb.EvictRequest(source=out.model), timeout=10)
    pytest.fail(f"expected {code.name}, the call succeeded: {str(out)[:300]}")


def error_class(e: grpc.RpcError) -> str | None:
    return dict(e.trailing_metadata() or ()).get("weightd-error")  # type: ignore[arg-type]


def assert_still_serving(w: World) -> None:
    """The good model is acquired and released; nothing more is resident than before."""
    got = acquire(w, w.good)
    assert len(got.tensors) == 8 and not got.fetched
    release(w, got.lease_id)
    assert host_bytes(w) == w.host_baseline
    assert not os.listdir(w.cache / "tmp")


def blob_names(w: World) -> set[str]:
    return {p.name for p in (w.cache / "blobs").glob("*/*")}


def snapshot_names(w: World) -> set[str]:
    return {p.name for p in (w.cache / "snapshots").iterdir() if not p.name.startswith(".")}


# malformed shards ---------------------------------------------------------------------------


def test_the_corpus_is_big_enough():
    assert len(case_names()) >= 20


@pytest.mark.parametrize("name", case_names())
def test_malformed_shard_is_invalid_argument_and_leaves_nothing(world, name):
    case = world.corpus[name]
    t0 = time.monotonic()
    e = refused(lambda: acquire(world, case.path), grpc.StatusCode.INVALID_ARGUMENT,
                world)
    took = time.monotonic() - t0
    details = e.details()
    assert "model.safetensors" in details and name in details, details
    assert any(word in details.lower() for word in case.reason), details
    assert error_class(e) == "FormatError"
    # the largest cases (up to 66 MB of header) are refused in seconds, not minutes
    assert took < (90 if case.big else 15), f"{name}: refused after {took:.1f}s"
    assert hash_file(case.shard) not in blob_names(world)
    assert model_name(canonical_url(str(case.path))) not in snapshot_names(world)
    assert_still_serving(world)


def test_malformed_shard_is_refused_again_without_being_cached(world):
    case = world.corpus["overlapping-offsets"]
    before = blob_names(world)
    for _ in range(2):
        refused(lambda: list(stub(world).Fetch(pb.FetchRequest(source=str(case.path)),
                                               timeout=60)), grpc.StatusCode.INVALID_ARGUMENT)
    assert blob_names(world) == before
    assert_still_serving(world)


def test_shards_that_share_a_tensor_name_are_refused_at_fetch_time(world):
    # a directory of two models (listed recursively): every client refused the lease it
    # got ("tensor 'layers.0.weight' appears twice"); the daemon now refuses the model
    # before anything of it is resident or named by a snapshot (review 1, defect 13)
    twice = world.models / "two-models"
    write_synthetic_model(twice / "first", total_bytes=MiB // 2, tensors=4, seed=11)
    write_synthetic_model(twice / "second", total_bytes=MiB // 2, tensors=4, seed=12)
    e = refused(lambda: acquire(world, twice), grpc.StatusCode.INVALID_ARGUMENT, world)
    details = e.details()
    assert "first/model.safetensors" in details and "second/model.safetensors" in details, \
        details
    assert "appears in both" in details and error_class(e) == "FormatError", details
    assert model_name(canonical_url(str(twice))) not in snapshot_names(world)
    assert host_bytes(world) == world.host_baseline
    assert_still_serving(world)


def test_the_daemons_own_cache_is_never_a_source(tmp_path):
    # with allowed_sources empty, an Acquire of a directory above the cache listed (and
    # fetched) the daemon's own blobs; one inside the cache served its files as a model
    model = tmp_path / "m"
    write_synthetic_model(model, total_bytes=MiB // 4, tensors=2, seed=13)
    with DaemonProcess(tmp_path / "d") as d:
        d.acquire(model)  # the cache now holds blobs and a snapshot
        stub_ = raw_stub(d.socket)
        inside = next((d.cache_dir / "snapshots").glob("*/"))
        for source in (tmp_path, tmp_path / "d", d.cache_dir, inside, d.cache_dir / "blobs"):
            e = refused(lambda s=source: stub_.Acquire(pb.AcquireRequest(
                source=str(s), client=client_info()), timeout=60),
                grpc.StatusCode.PERMISSION_DENIED)
            assert "cache" in e.details() and str(d.cache_dir) in e.details(), e.details()
            assert error_class(e) == "NotPermitted", e.details()
        assert [m.source for m in stub_.List(pb.ListRequest(), timeout=10).models] == \
            [f"file://{model}"]
        assert d.proc.poll() is None


# sources that leave their allowed roots ------------------------------------------------------


def _outside_refs(w: World) -> list[str]:
    sibling = Path(f"{w.models}-private")
    write_synthetic_model(sibling, total_bytes=MiB, tensors=4)
    link = w.models / "etc-link"
    if not link.is_symlink():
        os.symlink("/etc", link)
    return ["file:///etc/passwd", "/etc", "file:///etc/../etc/hostname", f"{w.models}/../outside",
            f"file://{w.models}/good/../../outside/leak.json", str(sibling), str(link),
            str(w.outside), f"{w.http.url}/secret-model", f"{w.http.url}/top.json",
            "s3://models/x"]


def test_allowed_sources_are_enforced_by_the_daemon(world):
    s = stub(world)
    world.http.log.reset()
    for ref in _outside_refs(world):
        for call in (lambda r=ref: s.Acquire(pb.AcquireRequest(source=r, client=client_info()),
                                             timeout=30),
                     lambda r=ref: s.Fetch(pb.FetchRequest(source=r), timeout=30),
                     lambda r=ref: s.Pin(pb.PinRequest(source=r), timeout=30)):
            e = refused(call, grpc.StatusCode.PERMISSION_DENIED)
            assert error_class(e) == "NotPermitted"
            assert "allowed_sources" in e.details(), e.details()
    assert list(s.Status(pb.StatusRequest(), timeout=10).pins) == []
    assert world.http.log.count(path_contains="secret") == 0
    assert world.http.log.count(path_contains="top") == 0
    assert_still_serving(world)


@pytest.mark.parametrize("trick", ["..", "%2e%2e", "%2E%2E", "sub/../..", ".%2e"])
def test_http_reference_with_dot_segments_cannot_leave_the_allowed_prefix(world, trick):
    # http://host/allowed/../secret-model/model.safetensors is http://host/secret-model/...
    ref = f"{world.http.url}/allowed/{trick}/secret-model/model.safetensors"
    world.http.log.reset()
    before = blob_names(world)
    e = refused(lambda: acquire(world, ref), grpc.StatusCode.PERMISSION_DENIED, world)
    assert error_class(e) == "NotPermitted"
    assert world.http.log.count(path_contains="secret-model") == 0
    assert blob_names(world) == before
    assert_still_serving(world)


def test_http_listing_links_out_of_the_model_are_never_followed(world):
    ref = f"{world.http.url}/allowed/listing"
    world.http.log.reset()
    try:
        got = acquire(world, ref)
    except grpc.RpcError as e:  # refusing the whole model is fine too
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e.details()
        snapshot = None
    else:
        release(world, got.lease_id)
        evict(world, ref)
        snapshot = Path(got.snapshot_path)
    requested = {path for (_, path) in world.http.log.requests}
    outside = sorted(p for p in requested if not p.startswith("/allowed/listing"))
    assert outside == [], f"the daemon read outside the model: {outside}"
    if snapshot is not None:
        files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
                       if not p.is_dir())
        assert files == ["config.json", "model.safetensors"], files
    for secret in ("secret.json", "top.json"):
        digest = hash_file(world.http._server.root / secret)  # type: ignore[attr-defined]
        assert digest not in blob_names(world)
    assert_still_serving(world)


@pytest.mark.parametrize("shard", ["../escape.safetensors", "/etc/escape.safetensors",
                                   "sub/../../escape.safetensors", "a\\..\\escape.safetensors"])
def test_index_json_naming_a_file_out_of_the_model_is_refused(world, shard):
    d = world.models / "index-escape"
    shutil.rmtree(d, ignore_errors=True)
    write_synthetic_model(d, total_bytes=MiB, tensors=4, shards=2)
    index = d / "model.safetensors.index.json"
    text = index.read_text().replace('"model-00002-of-00002.safetensors"', f'"{shard}"'
                                     .replace("\\", "\\\\"), 1)
    index.write_text(text)
    # the file it names exists (models/escape.safetensors), so only the name can stop it
    shutil.copyfile(world.good / "model.safetensors", world.models / "escape.safetensors")
    e = refused(lambda: acquire(world, index), grpc.StatusCode.INVALID_ARGUMENT, world)
    assert error_class(e) == "FormatError"
    assert "model.safetensors.index.json" in e.details(), e.details()
    assert model_name(canonical_url(str(index))) not in snapshot_names(world)
    assert_still_serving(world)


def test_a_link_out_of_an_allowed_model_directory_is_refused(world):
    m = world.models / "evil"
    write_synthetic_model(m, total_bytes=MiB, tensors=4, seed=9)
    os.symlink("/etc/passwd", m / "evil.json")
    e = refused(lambda: acquire(world, m), grpc.StatusCode.PERMISSION_DENIED, world)
    assert error_class(e) == "NotPermitted"
    assert "evil.json" in e.details(), e.details()
    assert hash_file("/etc/passwd") not in blob_names(world)
    assert model_name(canonical_url(str(m))) not in snapshot_names(world)
    # a linked directory that leads out is refused the same way
    m2 = world.models / "evil-dir"
    write_synthetic_model(m2, total_bytes=MiB, tensors=4, seed=10)
    os.symlink(world.outside, m2 / "sub")
    e = refused(lambda: acquire(world, m2), grpc.StatusCode.PERMISSION_DENIED, world)
    assert "sub" in e.details() and error_class(e) == "NotPermitted", e.details()
    assert hash_file(world.outside / "leak.json") not in blob_names(world)
    # a single-file reference through a link that leads out
    os.symlink(world.outside / "leak.json", world.models / "leak.safetensors")
    refused(lambda: acquire(world, world.models / "leak.safetensors"),
            grpc.StatusCode.PERMISSION_DENIED, world)
    assert_still_serving(world)


def test_a_link_that_stays_inside_the_allowed_roots_is_served(world):
    m = world.models / "linked-inside"
    write_synthetic_model(m, total_bytes=MiB, tensors=4, seed=11)
    os.symlink(world.good / "config.json", m / "tokenizer_config.json")
    got = acquire(world, m)
    release(world, got.lease_id)
    evict(world, m)
    snap = Path(got.snapshot_path)
    assert (snap / "tokenizer_config.json").read_bytes() == (world.good / "config.json"
                                                              ).read_bytes()
    assert_still_serving(world)


# absurd requests -------------------------------------------------------------------------------


def _absurd(w: World) -> dict[str, tuple[str, Any]]:
    good = str(w.good)
    me = client_info()
    many = [f"*.x{i}" for i in range(10_000)]
    return {
        "acquire-empty-source": ("Acquire", pb.AcquireRequest(source="", client=me)),
        "acquire-blank-source": ("Acquire", pb.AcquireRequest(source=" \t\n", client=me)),
        "acquire-5000-chars": ("Acquire", pb.AcquireRequest(source="/" + "x" * 5000, client=me)),
        "acquire-nul": ("Acquire", pb.AcquireRequest(source=good + "\x00/etc", client=me)),
        "acquire-pid-negative": ("Acquire", pb.AcquireRequest(
            source=good, client=pb.ClientInfo(pid=-7))),
        "acquire-10000-includes": ("Acquire", pb.AcquireRequest(source=good, client=me,
                                                                include=many)),
        "acquire-10000-excludes": ("Acquire", pb.AcquireRequest(source=good, client=me,
                                                                exclude=many)),
        "acquire-empty-glob": ("Acquire", pb.AcquireRequest(source=good, client=me,
                                                            include=[""])),
        "acquire-huge-glob": ("Acquire", pb.AcquireRequest(source=good, client=me,
                                                           exclude=["*" * 5000])),
        "fetch-empty-source": ("Fetch", pb.FetchRequest(source="")),
        "fetch-5000-chars": ("Fetch", pb.FetchRequest(source="x" * 5000)),
        "fetch-nul": ("Fetch", pb.FetchRequest(source="\x00")),
        "fetch-10000-includes": ("Fetch", pb.FetchRequest(source=good, include=many)),
        "pin-empty-source": ("Pin", pb.PinRequest(source="")),
        "pin-nul": ("Pin", pb.PinRequest(source=good + "\x00")),
        "pin-unknown-tier": ("Pin", pb.PinRequest(source=good, tier=99)),
        "pin-cuda-without-device": ("Pin", pb.PinRequest(source=good, tier=pb.TIER_CUDA)),
        "unpin-5000-chars": ("Unpin", pb.UnpinRequest(source="y" * 5000)),
        "evict-empty-source": ("Evict", pb.EvictRequest(source="")),
        "evict-nul": ("Evict", pb.EvictRequest(source="\x00\x00")),
        "evict-disk-tier": ("Evict", pb.EvictRequest(source=good, tier=pb.TIER_DISK)),
    }


_ABSURD = ["acquire-empty-source", "acquire-blank-source", "acquire-5000-chars", "acquire-nul",
           "acquire-pid-negative",
           "acquire-10000-includes", "acquire-10000-excludes", "acquire-empty-glob",
           "acquire-huge-glob", "fetch-empty-source", "fetch-5000-chars", "fetch-nul",
           "fetch-10000-includes", "pin-empty-source", "pin-nul", "pin-unknown-tier",
           "pin-cuda-without-device", "unpin-5000-chars", "evict-empty-source", "evict-nul",
           "evict-disk-tier"]


@pytest.mark.parametrize("name", _ABSURD)
def test_absurd_request_is_invalid_argument(world, name):
    method, request = _absurd(world)[name]
    s = stub(world)
    e = refused(lambda: getattr(s, method)(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    assert error_class(e) == "FormatError"
    assert len(e.details()) < 2000  # the answer does not echo the absurd value back whole
    assert s.Status(pb.StatusRequest(), timeout=10).pid == world.daemon.proc.pid


def test_absurd_request_list_is_complete(world):
    assert sorted(_absurd(world)) == sorted(_ABSURD)


@pytest.mark.parametrize("lease_id", ["", "nope", "0" * 24, "x" * 129, "x" * 100_000, "\x00"])
def test_unknown_lease_ids_are_refused(world, lease_id):
    e = refused(lambda: stub(world).Release(pb.ReleaseRequest(lease_id=lease_id), timeout=10),
                grpc.StatusCode.FAILED_PRECONDITION)
    assert error_class(e) == "LeaseNotFound"
    assert len(e.details()) < 1000


def test_a_lease_released_twice_is_refused_the_second_time(world):
    got = acquire(world, world.good)
    release(world, got.lease_id)
    e = refused(lambda: release(world, got.lease_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert error_class(e) == "LeaseNotFound"


def test_oversized_message_is_refused_by_the_transport(world):
    huge = "/" + "x" * (100 * MiB)
    s = stub(world)
    with pytest.raises(grpc.RpcError) as e:
        s.Acquire(pb.AcquireRequest(source=huge, client=client_info()), timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    del huge
    # the same channel and a new one keep working
    assert s.Status(pb.StatusRequest(), timeout=10).pid == world.daemon.proc.pid
    assert_still_serving(world)


def test_daemon_is_healthy_after_everything(world):
    assert world.daemon.proc.poll() is None
    st = stub(world).Status(pb.StatusRequest(), timeout=10)
    assert list(st.leases) == [] and list(st.pins) == []
    assert host_bytes(world) == world.host_baseline
    assert not os.listdir(world.cache / "tmp")
    assert "Traceback" not in world.daemon.log()
    assert "INTERNAL" not in world.daemon.log()
