"""Faults: sources that fail, a daemon killed mid-work, a full disk, a damaged index.

Each test breaks one thing on purpose and then checks weightd's promises
(docs/reliability.md): a visible blob is complete and verified (its xxh3-128 is its
name), nothing half-done is visible, ``weightd verify`` is clean, the index agrees with
the blobs, and clients get a clear error and then work again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import run_cli
from tests.daemon import ClientError, ClientProcess, DaemonProcess, wait_for
from weightd.config import Config
from weightd.errors import SourceUnavailable
from weightd.sources import canonical_url, model_name
from weightd.store import Fetcher, Store, hash_file
from weightd.testing import write_synthetic_model
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb

MiB = 1024 * 1024

#: Settings that make a fetch slow and sequential, so a test can kill it midway.
SLOW_FETCH = {"WEIGHTD_CHUNK_SIZE": "64KiB", "WEIGHTD_CONCURRENCY": "1",
              "WEIGHTD_MAX_PARALLEL_FILES": "1"}


# helpers ---------------------------------------------------------------------------------


def fetch(config: Config, ref: str):  # type: ignore[no-untyped-def]
    with Store.open(config.cache_dir) as store:
        return Fetcher(store, config).fetch(ref)


def blobs(cache: Path) -> dict[str, Path]:
    """Every visible blob by its name."""
    return {p.name: p for p in (cache / "blobs").glob("*/*") if p.is_file()}


def assert_blobs_verify(cache: Path) -> None:
    """Every visible blob hashes to its name, and nothing is left in tmp/."""
    for digest, path in blobs(cache).items():
        assert hash_file(path) == digest, f"blob {path} does not hash to its name"
    assert not os.listdir(cache / "tmp"), os.listdir(cache / "tmp")


def cli_env(cache: Path) -> dict[str, str]:
    # no daemon socket: the commands work on the cache directly (they take its lock)
    return {"WEIGHTD_CACHE_DIR": str(cache), "WEIGHTD_SOCKET": str(cache / "no-daemon.sock")}


def assert_cache_clean(cache: Path) -> list[str]:
    """``weightd verify`` exits 0, ``weightd ls`` says every model is ok, every model's
    files have blobs in the index and on disk. Returns the model names."""
    res = run_cli("verify", env=cli_env(cache))
    assert res.returncode == 0, res.stdout + res.stderr
    ls = run_cli("ls", env=cli_env(cache), check=True).stdout
    assert "broken" not in ls, ls
    with Store.open(cache) as store:
        models = store.index.models()
        for m in models:
            assert m.files, m
            for f in m.files:
                assert store.has_blob(f.digest), (m.name, f)
            assert re.search(rf"^{re.escape(m.name)}\s.*\sok\s", ls, re.M), ls
    assert_blobs_verify(cache)
    return [m.name for m in models]


def acquire(d: DaemonProcess, source: str, timeout: float = 60) -> pb.AcquireResponse:
    return d.acquire(source, timeout=timeout)


def kill(d: DaemonProcess) -> None:
    """SIGKILL the daemon and reap it."""
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait(10)
    d.stop()


class Faults:
    """A thread-safe fault hook: answers ``answers[i]`` to the i-th matching request."""

    def __init__(self, answers: list[int], *, suffix: str = ".safetensors",
                 method: str = "GET") -> None:
        self.answers = list(answers)
        self.suffix = suffix
        self.method = method
        self.matched = 0
        self.given: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, method: str, path: str) -> int | None:
        if method != self.method or not path.endswith(self.suffix):
            return None
        with self.lock:
            self.matched += 1
            if self.answers:
                self.given.append(self.answers.pop(0))
                return self.given[-1]
        return None


@pytest.fixture
def http_model(http_root: Path) -> Path:
    d = http_root / "org" / "model"
    write_synthetic_model(d, total_bytes=3 * MiB, tensors=12, shards=2)
    return d


# sources that fail ----------------------------------------------------------------------


def test_http_dropped_connections_are_retried(config, http_server, http_model, cache_dir):
    # the first five ranged reads of shards: connection dropped without an answer
    faults = Faults([-1, -1, -1, -1, -1])
    http_server.set_fault(faults)
    snap = fetch(config.replace(chunk_size=512 * 1024), f"{http_server.url}/org/model")
    assert faults.given == [-1] * 5 and faults.matched > 5
    for f in snap.files:
        assert (Path(snap.path) / f.relpath).read_bytes() == (http_model / f.relpath).read_bytes()
    assert_cache_clean(cache_dir)


def test_s3_errors_on_ranged_reads_are_retried(config, s3, tmp_path, cache_dir):
    src = tmp_path / "src"
    write_synthetic_model(src, total_bytes=2 * MiB, tensors=8, shards=2)
    url = s3.upload_dir(src, "faults", "five-hundreds")
    faults = Faults([500, 503, 500, 503, 503, 500])
    s3.set_fault(faults)
    snap = fetch(config.replace(chunk_size=512 * 1024), url)
    assert len(faults.given) == 6 and faults.matched > 6
    for f in snap.files:
        assert (Path(snap.path) / f.relpath).read_bytes() == (src / f.relpath).read_bytes()
    assert_cache_clean(cache_dir)


def test_s3_dropped_connections_are_retried(config, s3, tmp_path, cache_dir):
    src = tmp_path / "src"
    write_synthetic_model(src, total_bytes=2 * MiB, tensors=8, shards=2)
    url = s3.upload_dir(src, "faults", "drops")
    faults = Faults([-1, -1, -1, -1])
    s3.set_fault(faults)
    snap = fetch(config.replace(chunk_size=512 * 1024), url)
    chunks = sum(-(-p.stat().st_size // (512 * 1024)) for p in src.glob("*.safetensors"))
    # every dropped read was tried again: the hook saw the chunks plus one per drop
    assert faults.given == [-1] * 4
    assert faults.matched >= chunks + 4, (
        f"{faults.matched} ranged reads for {chunks} chunks and 4 drops: the drops were "
        "served (MotoS3Server ignores -1?)")
    for f in snap.files:
        assert (Path(snap.path) / f.relpath).read_bytes() == (src / f.relpath).read_bytes()
    assert_cache_clean(cache_dir)


def _assert_nothing_of(cache: Path, model_dir: Path) -> None:
    """No blob of a model's shards, no snapshot, no temp file."""
    shard_digests = {hash_file(p) for p in model_dir.glob("*.safetensors")}
    assert not shard_digests & set(blobs(cache)), "a shard of the failed model is visible"
    assert [p.name for p in (cache / "snapshots").iterdir()] == [".revs"]
    assert not any((cache / "snapshots" / ".revs").iterdir())
    assert not os.listdir(cache / "tmp")


def test_http_source_that_keeps_dropping_fails_clearly_and_leaves_nothing(
        config, http_server, http_model, cache_dir):
    http_server.set_fault(lambda m, p: -1 if m == "GET" and p.endswith(".safetensors") else None)
    cfg = config.replace(retry_attempts=3, retry_max_seconds=2.0)
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailable, match=r"model-0000\d-of-00002\.safetensors"):
        fetch(cfg, f"{http_server.url}/org/model")
    assert time.monotonic() - t0 < 30
    _assert_nothing_of(cache_dir, http_model)
    assert run_cli("verify", env=cli_env(cache_dir)).returncode == 0


def test_s3_source_that_keeps_failing_fails_clearly_and_leaves_nothing(
        config, s3, tmp_path, cache_dir):
    src = tmp_path / "src"
    write_synthetic_model(src, total_bytes=MiB, tensors=4, shards=1)
    url = s3.upload_dir(src, "faults", "always-503")
    s3.set_fault(lambda m, p: 503 if m == "GET" and p.endswith(".safetensors") else None)
    cfg = config.replace(retry_attempts=2, retry_max_seconds=1.0)
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailable, match=r"model\.safetensors"):
        fetch(cfg, url)
    assert time.monotonic() - t0 < 60
    _assert_nothing_of(cache_dir, src)
    assert run_cli("verify", env=cli_env(cache_dir)).returncode == 0


# the daemon killed mid-work ---------------------------------------------------------------


def _slow(delay: float):  # type: ignore[no-untyped-def]
    def hook(method: str, path: str) -> None:
        if method == "GET" and path.endswith(".safetensors"):
            time.sleep(delay)
        return None
    return hook


def test_sigkill_of_the_daemon_during_a_fetch(tmp_path, http_server, http_root):
    torch = pytest.importorskip("torch")
    import weightd_client

    write_synthetic_model(http_root / "m", total_bytes=4 * MiB, tensors=16, shards=2)
    url = f"{http_server.url}/m"
    http_server.set_fault(_slow(0.03))
    d = DaemonProcess(tmp_path, env=SLOW_FETCH)
    cache = d.cache_dir
    errors: list[grpc.RpcError] = []

    def run_fetch() -> None:
        try:
            list(d.stub().Fetch(pb.FetchRequest(source=url), timeout=120))
        except grpc.RpcError as e:
            errors.append(e)

    t = threading.Thread(target=run_fetch)
    t.start()
    wait_for(lambda: http_server.log.count("GET", ".safetensors") >= 8, what="8 chunks")
    kill(d)
    t.join(30)
    assert [e.code() for e in errors] == [grpc.StatusCode.UNAVAILABLE]
    assert os.listdir(cache / "tmp"), "expected the killed download's temp file"
    assert not any((cache / "snapshots" / ".revs").iterdir())
    # with the daemon stopped: verify is clean (and removes the dead leftover)
    assert_cache_clean(cache)
    http_server.set_fault(None)
    d2 = DaemonProcess(tmp_path)
    try:
        with weightd_client.Client(d2.socket, timeout=120) as client:
            m = client.load(url, fallback=False)
            assert m.lease_id and len(m) == 16
            assert m["layers.0.weight"].dtype == torch.bfloat16
            m.release()
    finally:
        assert d2.stop() == 0, d2.log()
    assert assert_cache_clean(cache) == [model_name(url)]


def test_sigkill_during_a_pin_warm_up_then_clients_reconnect(tmp_path, http_server, http_root):
    write_synthetic_model(http_root / "big", total_bytes=8 * MiB, tensors=16, shards=2)
    big = f"{http_server.url}/big"
    small = tmp_path / "small"
    write_synthetic_model(small, total_bytes=MiB, tensors=4)
    http_server.set_fault(_slow(0.02))
    d = DaemonProcess(tmp_path, env=SLOW_FETCH)
    client = ClientProcess(d.socket)
    try:
        first = client.call("load", source=str(small), fallback=False)
        assert first["lease_id"] and first["tensors"] == 4
        d.stub().Pin(pb.PinRequest(source=big), timeout=10)
        wait_for(lambda: [p.state for p in d.status().pins] == ["warming"]
                 and http_server.log.count("GET", ".safetensors") >= 4, what="warming")
        kill(d)
        # the client's daemon is gone: a clear error, or the fallback straight from the source
        with pytest.raises(ClientError) as e:
            client.call("load", source=str(small), fallback=False)
        assert e.value.kind == "DaemonUnavailable"
        down_since = time.monotonic()
        direct = client.call("load", source=str(small))
        assert direct["lease_id"] is None and direct["checksum"] == first["checksum"]
        models = assert_cache_clean(d.cache_dir)
        assert models == [model_name(canonical_url(str(small)))]
        http_server.set_fault(None)
        # An outage of about 10 s, as when a daemon restarts after a crash: the client's
        # gRPC channel has been retrying the socket with a growing backoff by then, so a
        # client that waits for that backoff would fail its next call below.
        time.sleep(max(0.0, down_since + 10 - time.monotonic()))
        d2 = DaemonProcess(tmp_path)
        try:
            # the same client process, right after the new daemon is ready: its next load
            # goes through the daemon again (not a DaemonUnavailable, not the fallback)
            again = client.call("load", source=str(small), fallback=False)
            assert again["lease_id"] and again["checksum"] == first["checksum"]
            assert client.pid in {lease.pid for lease in d2.status().leases}
            client.call("release", source=str(small))
            # the pin was recorded before the kill: the new daemon warms it by itself
            wait_for(lambda: [p.state for p in d2.status().pins] == ["resident"],
                     what="the pin to be re-warmed")
        finally:
            assert d2.stop() == 0, d2.log()
    finally:
        client.close()
    assert len(assert_cache_clean(d.cache_dir)) == 2


# a full disk ------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_during_a_fetch(tmp_path):
    old_src, big_src = tmp_path / "old", tmp_path / "big"
    write_synthetic_model(old_src, total_bytes=8 * MiB, tensors=8, seed=1)
    write_synthetic_model(big_src, total_bytes=20 * MiB, tensors=8, seed=2)
    with tmpfs(tmp_path / "cache", "24m") as cache:
        env = cli_env(cache)
        run_cli("fetch", str(old_src), env=env, check=True)
        before = blobs(cache)
        assert len(before) == 2
        res = run_cli("fetch", str(big_src), env=env)
        assert res.returncode == 1
        assert "BudgetExceeded" in res.stderr and "Traceback" not in res.stderr, res.stderr
        big_digest = hash_file(big_src / "model.safetensors")
        d = DaemonProcess(tmp_path)
        try:
            with pytest.raises(grpc.RpcError) as e:
                acquire(d, str(big_src))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
            assert ("weightd-error", "BudgetExceeded") in tuple(e.value.trailing_metadata())
            assert str(cache) in e.value.details()
            # the older model is still served
            got = acquire(d, str(old_src))
            assert [s.digest for s in got.shards] == [hash_file(old_src / "model.safetensors")]
            d.stub().Release(pb.ReleaseRequest(lease_id=got.lease_id), timeout=10)
        finally:
            assert d.stop() == 0, d.log()
        after = blobs(cache)
        assert big_digest not in after
        assert set(before) <= set(after)
        # at most the big model's small config.json arrived, complete
        assert all(p.stat().st_size < 4096 for k, p in after.items() if k not in before)
        names = assert_cache_clean(cache)
        assert names == [model_name(canonical_url(str(old_src)))]


# a damaged index ---------------------------------------------------------------------------


def _flip_last_byte(path: Path) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    os.chmod(path, 0o444)


def _damage(cache: Path, how: str) -> None:
    index = cache / "index.sqlite3"
    if how == "deleted":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{index}{suffix}").unlink(missing_ok=True)
    elif how == "truncated":
        with open(index, "r+b") as f:
            f.truncate(5)
    else:
        index.write_bytes(os.urandom(64 * 1024))
        for suffix in ("-wal", "-shm"):
            Path(f"{index}{suffix}").unlink(missing_ok=True)


def _damaged_copies(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if re.fullmatch(r"index\.sqlite3\.damaged-\d+",
                                                             p.name))


@pytest.fixture
def three_models(config, http_server, http_root) -> dict[str, str]:
    """Three models fetched into the cache over HTTP; returns name -> url."""
    out = {}
    for i, name in enumerate(("one", "two", "three")):
        write_synthetic_model(http_root / name, total_bytes=MiB, tensors=4,
                              shards=2 if name == "one" else 1, seed=i)
        snap = fetch(config, f"{http_server.url}/{name}")
        out[snap.name] = f"{http_server.url}/{name}"
    return out


def test_every_snapshot_revision_carries_a_manifest(config, three_models, cache_dir):
    with Store.open(cache_dir) as store:
        models = {m.name: m for m in store.index.models()}
    assert set(models) == set(three_models)
    for name, m in models.items():
        # beside the revision directory (which stays a plain directory of the model's files)
        manifest = cache_dir / "snapshots" / ".revs" / name / f"{m.revision}.manifest.json"
        assert manifest.is_file(), manifest
        data = json.loads(manifest.read_text())
        text = json.dumps(data)
        assert three_models[name] in text  # the source URL
        for f in m.files:  # per file: url, relpath, digest, size, identity
            for value in (f.url, f.relpath, f.digest, str(f.size)):
                assert value in text, (value, data)
        assert text.count("identity") >= len(m.files), data


@pytest.mark.parametrize("how", ["deleted", "truncated", "garbage"])
def test_damaged_index_is_rebuilt_from_the_manifests(tmp_path, config, http_server,
                                                     three_models, cache_dir, how):
    names = sorted(three_models)
    gone = names[-1]
    with Store.open(cache_dir) as store:
        lost = store.index.model(gone)
        assert lost is not None
        for f in lost.files:
            if f.relpath.endswith(".safetensors"):
                store.blob_path(f.digest).unlink()  # this model cannot be registered
    _damage(cache_dir, how)
    t0 = int(time.time())
    d = DaemonProcess(tmp_path)
    try:
        log = d.log()
        moved = _damaged_copies(cache_dir)
        if how == "deleted":
            assert moved == []
        else:
            assert len(moved) == 1, sorted(p.name for p in cache_dir.iterdir())
            assert abs(int(moved[0].name.rsplit("-", 1)[1]) - t0) < 120
            errors = [line for line in log.splitlines()
                      if " ERROR " in line and "index.sqlite3" in line]
            assert errors, log
        listed = {m.model: m for m in d.stub().List(pb.ListRequest(), timeout=10).models}
        assert set(listed) == set(names) - {gone}, log
        http_server.log.reset()
        for name in set(names) - {gone}:
            done = list(d.stub().Fetch(pb.FetchRequest(source=three_models[name]),
                                       timeout=60))[-1]
            assert done.hits == done.files and done.bytes_fetched == 0
        assert http_server.log.count("GET") == 0  # the identities were restored
        got = acquire(d, three_models[names[0]])
        assert not got.fetched
    finally:
        assert d.stop() == 0, d.log()
    ls = run_cli("ls", env=cli_env(cache_dir), check=True).stdout
    assert all(n in ls for n in set(names) - {gone}) and gone not in ls


def test_blob_corrupted_before_the_index_was_damaged_is_never_served(
        tmp_path, config, http_server, three_models, cache_dir):
    name = sorted(three_models)[0]
    with Store.open(cache_dir) as store:
        rec = store.index.model(name)
        assert rec is not None
        shard = next(f for f in rec.files if f.relpath.endswith(".safetensors"))
        blob = store.blob_path(shard.digest)
    _flip_last_byte(blob)
    _damage(cache_dir, "garbage")
    d = DaemonProcess(tmp_path)
    try:
        assert name in {m.model for m in d.stub().List(pb.ListRequest(), timeout=10).models}
    finally:
        assert d.stop() == 0, d.log()
    res = run_cli("verify", env=cli_env(cache_dir))
    assert res.returncode == 1 and f"CORRUPT {shard.digest}" in res.stdout, res.stdout
    assert not blob.exists()
    http_server.log.reset()
    d = DaemonProcess(tmp_path)
    try:
        got = acquire(d, three_models[name])
        assert got.fetched
        served = {s.digest: s.path for s in got.shards}
        assert shard.digest in served and hash_file(served[shard.digest]) == shard.digest
        assert http_server.log.bytes_served() == shard.size  # only the corrupt file again
    finally:
        assert d.stop() == 0, d.log()
    assert_cache_clean(cache_dir)


def test_daemon_refuses_to_start_when_the_index_cannot_be_rebuilt(tmp_path, config,
                                                                 three_models, cache_dir):
    if os.geteuid() != 0 or subprocess.run(["which", "chattr"],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and chattr to make the damaged index immovable")
    index = cache_dir / "index.sqlite3"
    _damage(cache_dir, "garbage")
    if subprocess.run(["chattr", "+i", str(index)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable attribute")
    try:
        env = {**os.environ, "WEIGHTD_CACHE_DIR": str(cache_dir),
               "WEIGHTD_SOCKET": str(tmp_path / "run" / "weightd.sock")}
        res = subprocess.run([sys.executable, "-m", "weightd.cli", "serve"], env=env,
                             capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["chattr", "-i", str(index)], capture_output=True)
    assert res.returncode != 0
    assert "index.sqlite3" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "run" / "weightd.sock").exists()


def test_index_of_a_clean_cache_is_consistent(config, three_models, cache_dir):
    """The baseline the damage tests compare against: a fetched cache is clean."""
    assert sorted(assert_cache_clean(cache_dir)) == sorted(three_models)
    with contextlib.closing(sqlite3.connect(cache_dir / "index.sqlite3")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
