"""The cluster's mirror (weightd/store/mirror.py) against real servers: moto's S3 server
as the mirror (a bucket of its own per test), a local HTTP origin that counts the bytes
it serves. Each "node" is a Fetcher with a cache of its own, in this process; the tests
of daemons (separate processes) fetching at once are in tests/test_fleet.py."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightd.config import Config
from weightd.store import Fetcher, Store, hash_file
from weightd.store.mirror import Mirror, manifest_id
from weightd.testing import MotoS3Server, RangeHTTPServer, write_synthetic_model

MiB = 1024 * 1024


class Node:
    """A node of the cluster: its own cache, the shared mirror's settings."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store.open(config.cache_dir)
        self.fetcher = Fetcher(self.store, config)

    def fetch(self, ref: str):  # type: ignore[no-untyped-def]
        return self.fetcher.fetch(ref)

    def close(self) -> None:
        self.fetcher.close(timeout=60)
        self.store.close()


@pytest.fixture
def model(http_root: Path) -> Path:
    d = http_root / "org" / "m"
    write_synthetic_model(d, total_bytes=3 * MiB, tensors=12, shards=3, seed=5)
    return d


def model_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.iterdir())


def origin_bytes(server: RangeHTTPServer) -> int:
    """Body bytes of files the origin served (listings and HEADs count none)."""
    return server.log.bytes_served()


@pytest.fixture
def mirror_bucket(s3_server: MotoS3Server) -> Iterator[str]:
    s3_server.log.reset()
    s3_server.set_fault(None)
    s3_server.set_body(None)
    s3_server.set_conditions("honour")
    bucket = f"mirror-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    yield bucket
    s3_server.set_fault(None)
    s3_server.set_body(None)
    s3_server.set_conditions("honour")


@pytest.fixture
def cluster(tmp_path: Path, s3_server: MotoS3Server, mirror_bucket: str):  # type: ignore[no-untyped-def]
    """``cluster(name, **settings)``: a new node of the cluster (closed at the end)."""
    nodes: list[Node] = []

    def node(name: str, **settings: object) -> Node:
        base = dict(cache_dir=tmp_path / name, mirrors=(f"s3://{mirror_bucket}/cluster",),
                    mirror_endpoint_url=s3_server.endpoint_url,
                    mirror_access_key_id="mirror-key", mirror_secret_access_key="mirror-secret",
                    mirror_timeout=5.0, mirror_lock_timeout=2.0, mirror_wait=60.0,
                    chunk_size=512 * 1024)
        n = Node(Config(**{**base, **settings}))  # type: ignore[arg-type]
        nodes.append(n)
        return n

    yield node
    for n in nodes:
        n.close()


def mirror_keys(s3_server: MotoS3Server, bucket: str) -> list[str]:
    resp = s3_server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def assert_same_model(snapshot: str, model: Path) -> None:
    for f in sorted(model.iterdir()):
        got = Path(snapshot) / f.name
        assert hash_file(got) == hash_file(f), f.name
        if f.suffix == ".safetensors":  # the tensors a user loads are the origin's
            want, have = load_file(f), load_file(got)
            assert want.keys() == have.keys()
            assert all(want[k].view(torch.int16).equal(have[k].view(torch.int16)) for k in want)


def test_a_second_node_reads_the_model_from_the_mirror_not_the_origin(
        cluster, http_server, model, s3_server, mirror_bucket):
    url = f"{http_server.url}/org/m"
    a = cluster("a")
    snap = a.fetch(url)
    assert origin_bytes(http_server) == model_bytes(model)
    assert snap.stats.bytes_origin == snap.stats.bytes_fetched and snap.stats.bytes_mirror == 0
    a.fetcher.close()  # the write-back is done
    keys = mirror_keys(s3_server, mirror_bucket)
    assert sum(k.startswith("cluster/blobs/") for k in keys) == 5  # 3 shards, 2 json
    assert sum(k.startswith("cluster/manifests/") for k in keys) == 1
    assert not any(k.startswith("cluster/locks/") for k in keys)  # released

    http_server.log.reset()
    b = cluster("b")
    snap = b.fetch(url)
    assert origin_bytes(http_server) == 0 and http_server.log.count("GET") == 0
    assert snap.stats.bytes_mirror == snap.stats.bytes_fetched == model_bytes(model)
    assert_same_model(snap.path, model)


def test_blobs_are_written_back_before_the_manifest_and_all_requests_use_the_mirrors_key(
        cluster, http_server, model, s3_server, mirror_bucket):
    a = cluster("a")
    a.fetch(f"{http_server.url}/org/m")
    a.fetcher.close()
    puts = [(i, p) for i, (m, p) in enumerate(s3_server.log.order) if m == "PUT"]
    blobs = [i for i, p in puts if "/cluster/blobs/" in p]
    manifests = [i for i, p in puts if "/cluster/manifests/" in p]
    assert len(blobs) == 5 and len(manifests) == 1 and max(blobs) < manifests[0]
    signers = {key for (key, path) in s3_server.log.signers if f"/{mirror_bucket}/" in path}
    assert signers == {"mirror-key"}  # never the origin's AWS_ACCESS_KEY_ID ("testing")


# a mirror that fails costs a warning and the origin, never the load ---------------------


@pytest.fixture
def refused_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: refuses connections
        yield s.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung mirror)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield s.getsockname()[1]


def seed(cluster, url: str):  # type: ignore[no-untyped-def]
    """Node "seed" pulls the model and writes it back; the manifest's entries."""
    n = cluster("seed")
    snap = n.fetch(url)
    n.fetcher.close()
    return {f.relpath: f.digest for f in snap.files}


def _blob_key(bucket: str, digest: str) -> str:
    return f"cluster/blobs/{digest}"


@pytest.mark.parametrize("fault", ["down", "hung", "manifest 5xx", "blob 5xx", "corrupt blob",
                                   "manifest without its blob"])
def test_a_failing_mirror_falls_back_to_the_origin_and_serves_the_right_tensors(
        cluster, http_server, model, s3_server, mirror_bucket, caplog, fault, refused_port,
        silent_port):
    url = f"{http_server.url}/org/m"
    settings: dict[str, object] = {}
    shard = "model-00002-of-00003.safetensors"
    if fault == "down":
        settings["mirror_endpoint_url"] = f"http://127.0.0.1:{refused_port}"
    elif fault == "hung":
        settings.update(mirror_endpoint_url=f"http://127.0.0.1:{silent_port}",
                        mirror_timeout=0.5)
    else:
        digests = seed(cluster, url)
        s3c = s3_server.client()
        key = _blob_key(mirror_bucket, digests[shard])
        if fault == "manifest 5xx":
            s3_server.set_fault(lambda m, p: 503 if "/manifests/" in p else None)
        elif fault == "blob 5xx":
            s3_server.set_fault(lambda m, p: 500 if m == "GET" and p.endswith(key) else None)
        elif fault == "corrupt blob":  # the same size, other bytes
            s3c.put_object(Bucket=mirror_bucket, Key=key,
                           Body=bytes(reversed((model / shard).read_bytes())))
        else:
            s3c.delete_object(Bucket=mirror_bucket, Key=key)
    http_server.log.reset()
    caplog.set_level(logging.WARNING, logger="weightd.store.mirror")
    t0 = time.monotonic()
    node = cluster("node", **settings)
    snap = node.fetch(url)
    took = time.monotonic() - t0
    assert_same_model(snap.path, model)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("mirror" in w for w in warnings), warnings
    if fault in ("down", "hung", "manifest 5xx"):  # the whole model from the origin
        assert origin_bytes(http_server) == model_bytes(model)
        assert snap.stats.bytes_mirror == 0
    else:  # per file: only the one the mirror could not give
        assert origin_bytes(http_server) == (model / shard).stat().st_size
        assert snap.stats.bytes_mirror == model_bytes(model) - (model / shard).stat().st_size
        assert len(warnings) == 1 and shard in warnings[0]
    assert took < 20, took  # bounded: mirror_timeout, no retries of its own
    if fault in ("corrupt blob", "manifest without its blob"):
        # the node repaired the mirror with the origin's verified bytes
        node.fetcher.close()
        s3_server.set_fault(None)
        http_server.log.reset()
        again = cluster("again").fetch(url)
        assert origin_bytes(http_server) == 0
        assert_same_model(again.path, model)


def test_a_manifest_that_is_not_the_listings_is_ignored(
        cluster, http_server, model, s3_server, mirror_bucket, caplog):
    url = f"{http_server.url}/org/m"
    seed(cluster, url)
    s3c = s3_server.client()
    [key] = [k for k in mirror_keys(s3_server, mirror_bucket) if "/manifests/" in k]
    doc = json.loads(s3c.get_object(Bucket=mirror_bucket, Key=key)["Body"].read())
    doc["files"][0]["size"] += 1
    s3c.put_object(Bucket=mirror_bucket, Key=key, Body=json.dumps(doc).encode())
    http_server.log.reset()
    caplog.set_level(logging.WARNING, logger="weightd.store.mirror")
    snap = cluster("node").fetch(url)
    assert_same_model(snap.path, model)
    assert origin_bytes(http_server) == model_bytes(model)
    assert any("not a manifest of" in r.getMessage() for r in caplog.records)


def test_a_write_back_that_fails_writes_no_manifest_and_releases_the_lock(
        cluster, http_server, model, s3_server, mirror_bucket, caplog):
    url = f"{http_server.url}/org/m"
    shard = "model-00003-of-00003.safetensors"
    s3_server.set_fault(lambda m, p: 500 if m == "PUT" and "/blobs/" in p and
                        (model / shard).stat().st_size > 0 and p.endswith(
                            hash_file(model / shard)) else None)
    caplog.set_level(logging.WARNING, logger="weightd.store.mirror")
    n = cluster("a")
    snap = n.fetch(url)  # the load does not wait for the write-back, nor fail with it
    assert_same_model(snap.path, model)
    n.fetcher.close()
    keys = mirror_keys(s3_server, mirror_bucket)
    assert not any("/manifests/" in k or "/locks/" in k for k in keys), keys
    assert any("write-back" in r.getMessage() for r in caplog.records)


# one pull per cluster -------------------------------------------------------------------


def test_a_node_follows_the_one_that_pulls_and_shows_who_holds_the_lock(
        cluster, http_root, model, s3_server, mirror_bucket):
    # the origin holds back the shards' bytes until b is seen waiting (whatever the load
    # on the machine: a timed origin let a finish before b started); the json files come
    gate = threading.Event()
    with RangeHTTPServer(http_root, fault=lambda m, p: gate.wait(30) and None if m == "GET"
                         and p.endswith(".safetensors") else None) as origin:
        url = f"{origin.url}/org/m"
        a, b = cluster("a"), cluster("b")
        out: dict[str, object] = {}
        ta = threading.Thread(target=lambda: out.setdefault("a", a.fetch(url)))
        ta.start()
        lock_key = f"cluster/locks/{manifest_id_of(a, url)}.lock"
        wait_until(lambda: lock_key in mirror_keys(s3_server, mirror_bucket))
        tb = threading.Thread(target=lambda: out.setdefault("b", b.fetch(url)))
        tb.start()
        assert b.fetcher.mirror is not None and a.fetcher.mirror is not None
        try:
            wait_until(lambda: any(x.state == "waiting" for x in b.fetcher.mirror.activity()))
            [waiting] = b.fetcher.mirror.activity()
            [pulling] = a.fetcher.mirror.activity()
        finally:
            gate.set()
        assert waiting.holder == pulling.holder and pulling.state == "pulling from the origin"
        assert socket.gethostname() in waiting.holder
        ta.join(60)
        tb.join(60)
        assert origin.log.bytes_served() == model_bytes(model)  # once, for the cluster
        assert out["b"].stats.bytes_mirror == model_bytes(model)  # type: ignore[attr-defined]
        assert_same_model(out["b"].path, model)  # type: ignore[attr-defined]
        # b read the first blobs while a still pulled the others (the lock lists each blob
        # once it is in the mirror): before the manifest was written
        order = s3_server.log.order
        manifest_put = next(i for i, (m, p) in enumerate(order)
                            if m == "PUT" and "/manifests/" in p)
        assert any(m == "GET" and "/blobs/" in p for m, p in order[:manifest_put])


def manifest_id_of(node: Node, url: str) -> str:
    from weightd.sources import open_source

    with open_source(url, node.config) as source:
        return manifest_id(source.url, source.list_files())


def wait_until(cond, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_stale_lock_is_taken_over(cluster, http_server, model, s3_server, mirror_bucket,
                                    caplog):
    url = f"{http_server.url}/org/m"
    n = cluster("a", mirror_lock_timeout=1.0)
    lock_key = f"cluster/locks/{manifest_id_of(n, url)}.lock"
    s3_server.client().put_object(Bucket=mirror_bucket, Key=lock_key, Body=json.dumps(
        {"holder": "ghost pid 1 dead", "source": url, "since": time.time()}).encode())
    caplog.set_level(logging.INFO, logger="weightd.store.mirror")
    t0 = time.monotonic()
    snap = n.fetch(url)
    assert 1.0 <= time.monotonic() - t0 < 15
    assert_same_model(snap.path, model)
    assert any("took over the lock" in r.getMessage() and "ghost pid 1 dead" in r.getMessage()
               for r in caplog.records)
    n.fetcher.close()
    keys = mirror_keys(s3_server, mirror_bucket)
    assert lock_key not in keys and any("/manifests/" in k for k in keys)


def test_a_failed_pull_releases_the_lock(cluster, http_server, model, s3_server,
                                         mirror_bucket):
    url = f"{http_server.url}/org/m"
    http_server.set_fault(lambda m, p: 404 if m == "GET" and p.endswith("00002-of-00003"
                                                                        ".safetensors") else None)
    n = cluster("a")
    with pytest.raises(Exception, match="not found|404"):
        n.fetch(url)
    n.fetcher.close()
    assert not any("/locks/" in k or "/manifests/" in k
                   for k in mirror_keys(s3_server, mirror_bucket))


@pytest.mark.parametrize("mode", ["ignore", "refuse"])
def test_a_store_without_conditional_writes_is_detected_and_each_node_may_pull(
        cluster, http_server, model, s3_server, mirror_bucket, caplog, mode):
    s3_server.set_conditions(mode)
    url = f"{http_server.url}/org/m"
    caplog.set_level(logging.WARNING, logger="weightd.store.mirror")
    a = cluster("a")
    assert a.fetcher.mirror is not None
    assert a.fetcher.mirror.conditional_text().startswith("not checked yet")
    assert_same_model(a.fetch(url).path, model)
    text = a.fetcher.mirror.conditional_text()
    assert text.startswith("no: ") and "each node may pull" in text
    assert (("ignores If-None-Match" in text) if mode == "ignore" else ("501" in text)), text
    assert any("each node may pull" in r.getMessage() for r in caplog.records)
    a.fetcher.close()  # it still writes the model back, without a lock
    http_server.log.reset()
    snap = cluster("b").fetch(url)
    assert origin_bytes(http_server) == 0 and snap.stats.bytes_mirror == model_bytes(model)


# the mirror's own client ----------------------------------------------------------------


def test_the_mirror_never_takes_the_origins_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    cfg = Config(cache_dir=tmp_path / "c", mirrors=("s3://cluster-mirror/weights",),
                 s3_endpoint_url="http://127.0.0.1:3", mirror_region="eu-west-1")
    endpoint = Mirror(cfg.mirrors[0], cfg).endpoint()
    assert "amazonaws.com" in endpoint and "127.0.0.1" not in endpoint, endpoint
    cfg = cfg.replace(mirror_endpoint_url="http://127.0.0.1:9000")
    assert Mirror(cfg.mirrors[0], cfg).endpoint() == "http://127.0.0.1:9000"


def test_an_s3_origin_and_the_mirror_each_sign_with_their_own_credentials(
        cluster, s3, s3_server, tmp_path, mirror_bucket):
    src = tmp_path / "src"
    write_synthetic_model(src, total_bytes=MiB, tensors=4, seed=2)
    url = s3.upload_dir(src, "origin-creds", "org/m")  # AWS_* of the environment: "testing"
    cluster("a").fetch(url)
    cluster("a").fetcher.close()
    signers = s3_server.log.signers
    assert {k for k, p in signers if p.startswith("/origin-creds/")} == {"testing"}
    assert {k for k, p in signers if p.startswith(f"/{mirror_bucket}/")} == {"mirror-key"}


def test_a_mirror_that_lies_consistently_is_caught_by_the_hubs_own_digest(
        cluster, tmp_path, s3_server, mirror_bucket, caplog):
    # whoever can write to the mirror writes other bytes for a shard AND a manifest that
    # names their xxh3: the xxh3 then matches, but an hf:// file's sha256 (from the hub's
    # listing, not from the mirror) does not, and the origin's bytes are served
    import xxhash

    from weightd.testing import FakeHub

    src = tmp_path / "src"
    write_synthetic_model(src, total_bytes=2 * MiB, tensors=8, shards=2, seed=21)
    with FakeHub(tmp_path / "hub") as hub:
        hub.commit("org/model", {p.name: p for p in src.iterdir()})
        hf = dict(hf_endpoint=hub.url, hf_download_hosts=(hub.cdn_host,))
        digests = seed(lambda name, **kw: cluster(name, **hf, **kw), "hf://org/model")
        shard = "model-00001-of-00002.safetensors"
        # other bytes behind a valid header (a shard whose header does not parse is caught
        # before any digest is)
        real = (src / shard).read_bytes()
        fake = real[:-1] + bytes([real[-1] ^ 0xFF])
        fake_digest = xxhash.xxh3_128_hexdigest(fake)
        s3c = s3_server.client()
        s3c.put_object(Bucket=mirror_bucket, Key=f"cluster/blobs/{fake_digest}", Body=fake)
        [key] = [k for k in mirror_keys(s3_server, mirror_bucket) if "/manifests/" in k]
        doc = json.loads(s3c.get_object(Bucket=mirror_bucket, Key=key)["Body"].read())
        for f in doc["files"]:
            if f["relpath"] == shard:
                assert f["digest"] == digests[shard]
                f["digest"] = fake_digest
        s3c.put_object(Bucket=mirror_bucket, Key=key, Body=json.dumps(doc).encode())
        caplog.set_level(logging.WARNING, logger="weightd.store.mirror")
        node = cluster("node", **hf)
        snap = node.fetch("hf://org/model")
        assert_same_model(snap.path, src)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("sha256" in w and f"hf://org/model/{shard}" in w for w in warnings), warnings
        # the node found the manifest wrong (the origin's bytes have another xxh3) and
        # wrote it again, with their blob: the next node reads the right bytes from it
        node.fetcher.close()
        hub.log.reset()
        snap = cluster("third", **hf).fetch("hf://org/model")
        assert_same_model(snap.path, src)
        assert snap.stats.bytes_mirror == snap.stats.bytes_total


def test_a_follower_whose_fetch_fails_stops_waiting_for_the_others_files(
        cluster, http_server, model, s3_server, mirror_bucket):
    # another node holds the lock (fresh) and says it put the first shard in the mirror:
    # the follower reads it, the mirror lacks it, the origin refuses it; the fetch fails
    # then, not when mirror_wait is over for the files still waiting for their blobs
    url = f"{http_server.url}/org/m"
    n = cluster("a", mirror_lock_timeout=60.0, mirror_wait=30.0)
    from weightd.sources import open_source

    with open_source(url, n.config) as source:
        listed = source.list_files()
        mid = manifest_id(source.url, listed)
    first = next(f for f in listed if f.relpath.endswith("00001-of-00003.safetensors"))
    lock = {"holder": "other-node pid 7", "source": url, "since": time.time(),
            "files": [{"relpath": first.relpath, "size": first.size,
                       "identity": first.identity, "digest": hash_file(model / first.relpath)}]}
    s3_server.client().put_object(Bucket=mirror_bucket, Key=f"cluster/locks/{mid}.lock",
                                  Body=json.dumps(lock).encode())
    http_server.set_fault(lambda m, p: 404 if m == "GET" and p.endswith(first.relpath)
                          else None)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="not found|404"):
        n.fetch(url)
    assert time.monotonic() - t0 < 10  # not mirror_wait (30 s)


def test_two_nodes_finding_one_stale_lock_pull_from_the_origin_once(
        cluster, http_root, model, s3_server, mirror_bucket, caplog):
    # both see the ghost's lock go stale at about the same moment; the takeover is a
    # PutObject with If-Match the stale lock's ETag: one wins, the other follows it
    with RangeHTTPServer(http_root, rate=8 * MiB) as origin:
        url = f"{origin.url}/org/m"
        a, b = cluster("a", mirror_lock_timeout=1.0), cluster("b", mirror_lock_timeout=1.0)
        lock_key = f"cluster/locks/{manifest_id_of(a, url)}.lock"
        s3_server.client().put_object(Bucket=mirror_bucket, Key=lock_key, Body=json.dumps(
            {"holder": "ghost pid 1 dead", "source": url, "since": time.time()}).encode())
        caplog.set_level(logging.INFO, logger="weightd.store.mirror")
        out: dict[str, object] = {}
        threads = [threading.Thread(target=lambda n=n, k=k: out.setdefault(k, n.fetch(url)))
                   for k, n in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert set(out) == {"a", "b"}
        assert origin.log.bytes_served() == model_bytes(model)
        for snap in out.values():
            assert_same_model(snap.path, model)  # type: ignore[attr-defined]
        takeovers = [r for r in caplog.records if "took over the lock" in r.getMessage()]
        assert len(takeovers) == 1, [r.getMessage() for r in takeovers]


def test_a_mirror_read_that_fails_after_its_fetch_failed_starts_no_repair(
        cluster, http_server, model):
    # a fetch that fails aborts its pull while other files' mirror reads still run; one
    # of them failing then started a repair write-back that nothing would ever commit or
    # abort: a thread waiting forever, holding one of the mirror's write-back slots
    from weightd.sources import open_source
    from weightd.store.mirror import MirrorPull

    n = cluster("a")
    mirror = n.fetcher.mirror
    with open_source(f"{http_server.url}/org/m", n.config) as source:
        listed = source.list_files()
    pull = MirrorPull(mirror, source.url, listed, n.store.blob_path)
    pull.settle({})
    pull.abort()  # another file failed: the fetch is over
    pull.failed(listed[0], OSError("the mirror read broke"))
    assert mirror.pending_write_backs() == 0
