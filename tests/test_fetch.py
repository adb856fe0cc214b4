"""Fetching models into the cache from real endpoints on 127.0.0.1 (HTTP, moto S3, file)."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import run_cli
from weightd.config import Config
from weightd.errors import FormatError, NotPermitted, SourceNotFound, SourceUnavailable
from weightd.sources import canonical_url, model_name
from weightd.store import Fetcher, Store, hash_file
from weightd.testing import write_synthetic_model

MiB = 1024 * 1024


def fetch(config: Config, ref: str, **kw: object):  # type: ignore[no-untyped-def]
    with Store.open(config.cache_dir) as store:
        return Fetcher(store, config).fetch(ref, **kw)  # type: ignore[arg-type]


def assert_same_tree(snapshot: str, source: Path) -> None:
    snap = Path(snapshot)
    wanted = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    got = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*")
                 if p.is_file() or p.is_symlink())
    assert got == wanted
    for rel in wanted:
        assert (snap / rel).read_bytes() == (source / rel).read_bytes(), rel


@pytest.fixture
def model_dir(http_root: Path) -> Path:
    d = http_root / "org" / "model"
    write_synthetic_model(d, total_bytes=6 * MiB, tensors=30, shards=3)
    (d / "tokenizer.json").write_text('{"vocab": {}}')
    (d / "pooling").mkdir()
    (d / "pooling" / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"not brought by default")
    return d


def test_http_directory_fetch_makes_a_plain_snapshot(config, http_server, model_dir):
    small = config.replace(chunk_size=256 * 1024, concurrency=4)
    snap = fetch(small, f"{http_server.url}/org/model")
    (model_dir / "pytorch_model.bin").unlink()
    assert_same_tree(snap.path, model_dir)
    tensors = load_file(os.path.join(snap.path, "model-00002-of-00003.safetensors"))
    assert len(tensors) == 10
    # every blob is named by its content and read-only
    for f in snap.files:
        blob = Path(small.cache_dir) / "blobs" / f.digest[:2] / f.digest
        assert hash_file(blob) == f.digest
        assert not os.access(blob, os.W_OK) or os.geteuid() == 0
        assert blob.stat().st_mode & 0o222 == 0
    assert not os.listdir(small.cache_dir / "tmp")


def test_repeat_fetch_of_unchanged_model_reads_no_data(config, http_server, model_dir):
    first = fetch(config, f"{http_server.url}/org/model")
    assert first.stats.bytes_fetched == first.stats.bytes_total > 6 * MiB
    http_server.log.reset()
    again = fetch(config, f"{http_server.url}/org/model")
    assert again.stats.hits == again.stats.files
    assert http_server.log.count("GET") == 0
    assert http_server.log.bytes_served() == 0
    assert again.path == first.path


def test_repeat_fetch_of_unchanged_model_rewrites_neither_manifest_nor_link(
        config, http_server, model_dir):
    first = fetch(config, f"{http_server.url}/org/model")
    link = Path(first.path)
    manifests = sorted((link.parent / ".revs" / first.name).glob("*.manifest.json"))
    before = [(m.stat().st_ino, m.stat().st_mtime_ns) for m in manifests]
    link_before = link.lstat().st_ino
    fetch(config, f"{http_server.url}/org/model")
    assert [(m.stat().st_ino, m.stat().st_mtime_ns) for m in manifests] == before
    assert link.lstat().st_ino == link_before


def test_changed_object_is_refetched_and_snapshot_switches(config, http_server, model_dir):
    first = fetch(config, f"{http_server.url}/org/model")
    old_target = os.path.realpath(first.path)
    cfg = model_dir / "config.json"
    time.sleep(0.01)
    cfg.write_text('{"model_type": "synthetic", "changed": true}')
    http_server.log.reset()
    second = fetch(config, f"{http_server.url}/org/model")
    assert http_server.log.bytes_served() == cfg.stat().st_size  # only the changed file
    assert second.stats.hits == second.stats.files - 1
    assert (Path(second.path) / "config.json").read_text() == cfg.read_text()
    assert os.path.realpath(second.path) != old_target
    # the old revision stays readable for whoever holds it until gc
    assert '"changed"' not in (Path(old_target) / "config.json").read_text()


def test_include_exclude(config, http_server, model_dir):
    snap = fetch(config, f"{http_server.url}/org/model", include=["*.safetensors", "*.bin"],
                 exclude=["model-00003-*"])
    names = sorted(f.relpath for f in snap.files)
    assert names == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "pytorch_model.bin"]


def test_index_json_reference_brings_its_shards_and_side_files(config, http_server, model_dir):
    snap = fetch(config, f"{http_server.url}/org/model/model.safetensors.index.json")
    names = sorted(f.relpath for f in snap.files)
    assert "model-00003-of-00003.safetensors" in names
    assert "model.safetensors.index.json" in names
    assert "tokenizer.json" in names and "pytorch_model.bin" not in names


def test_single_file_reference(config, tmp_path):
    write_synthetic_model(tmp_path / "m", total_bytes=MiB, tensors=4)
    snap = fetch(config, str(tmp_path / "m" / "model.safetensors"))
    assert [f.relpath for f in snap.files] == ["model.safetensors"]


def test_file_url_and_plain_path_are_the_same_model(config, tmp_path):
    write_synthetic_model(tmp_path / "m", total_bytes=2 * MiB, tensors=8, shards=2)
    a = fetch(config, str(tmp_path / "m"))
    b = fetch(config, f"file://{tmp_path}/m/")
    assert a.name == b.name and b.stats.hits == b.stats.files
    assert_same_tree(a.path, tmp_path / "m")


def test_s3_fetch_repeat_and_change(config, s3, tmp_path):
    src = tmp_path / "src"
    write_synthetic_model(src, total_bytes=3 * MiB, tensors=12, shards=2)
    url = s3.upload_dir(src, "models", "team/model-a")
    snap = fetch(config.replace(chunk_size=512 * 1024), url)
    assert_same_tree(snap.path, src)
    gets = s3.log.count("GET", "/models/team/model-a/model-")
    assert gets >= 6  # ranged reads of 512 KiB
    s3.log.reset()
    again = fetch(config, url)
    assert again.stats.hits == again.stats.files
    assert s3.log.count("GET", "/models/team/model-a/model-") == 0
    # change one shard at the source: a new blob, the snapshot switches
    write_synthetic_model(tmp_path / "v2", total_bytes=3 * MiB, tensors=12, shards=2, seed=7)
    s3.client().upload_file(str(tmp_path / "v2" / "model-00001-of-00002.safetensors"), "models",
                            "team/model-a/model-00001-of-00002.safetensors")
    third = fetch(config, url)
    assert third.stats.hits == third.stats.files - 1
    assert (Path(third.path) / "model-00001-of-00002.safetensors").read_bytes() == (
        tmp_path / "v2" / "model-00001-of-00002.safetensors").read_bytes()


def test_missing_source_is_source_not_found(config, http_server, s3, tmp_path):
    with pytest.raises(SourceNotFound):
        fetch(config, f"{http_server.url}/nothing/here.safetensors")
    with pytest.raises(SourceNotFound):
        fetch(config, str(tmp_path / "nope"))
    s3.client().create_bucket(Bucket="empty")
    with pytest.raises(SourceNotFound):
        fetch(config, "s3://empty/none")


def test_malformed_shard_never_becomes_visible(config, http_server, http_root):
    bad = http_root / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}" * 8)
    with pytest.raises(FormatError, match="model.safetensors"):
        fetch(config, f"{http_server.url}/bad")
    cache = config.cache_dir
    assert not any((cache / "blobs").rglob("*.*")) and not list((cache / "blobs").rglob("*/*"))
    assert not os.listdir(cache / "tmp")
    assert not os.path.lexists(cache / "snapshots" / "http--bad")


def test_transient_errors_are_retried(config, http_server, model_dir):
    failures = {"n": 0}
    lock = threading.Lock()

    def flaky(method: str, path: str) -> int | None:
        with lock:
            if method == "GET" and path.endswith(".safetensors") and failures["n"] < 5:
                failures["n"] += 1
                return 503
        return None

    http_server.set_fault(flaky)
    snap = fetch(config.replace(chunk_size=1 * MiB), f"{http_server.url}/org/model")
    assert failures["n"] == 5
    (model_dir / "pytorch_model.bin").unlink()
    assert_same_tree(snap.path, model_dir)


def test_source_that_keeps_failing_leaves_nothing(config, http_server, model_dir):
    http_server.set_fault(lambda m, p: 503 if m == "GET" and p.endswith(".safetensors") else None)
    cfg = config.replace(retry_attempts=3, retry_max_seconds=2.0)
    with pytest.raises(SourceUnavailable, match="safetensors"):
        fetch(cfg, f"{http_server.url}/org/model")
    cache = config.cache_dir
    # side files that did arrive are complete blobs; no shard, no snapshot, no temp file
    assert all(p.stat().st_size < 4096 for p in (cache / "blobs").rglob("*/*"))
    assert [p.name for p in (cache / "snapshots").iterdir()] == [".revs"]
    assert not os.listdir(cache / "tmp")


def _until(cond: Callable[[], object], seconds: float = 10) -> None:
    """Wait for ``cond`` in an origin's hook, bounded, then let it answer whatever
    happened (raising there would only drop the connection)."""
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_listing_that_fails_after_its_first_shard_was_read_leaves_nothing(
        config, http_server, model_dir):
    """The first shard is read while the listing still asks the other files' sizes (an
    index page names files only); when one of them then fails, the fetch fails whole:
    no blob, no temporary file, no snapshot, and the next fetch is whole."""
    first, last = (sorted(model_dir.glob("*.safetensors"))[i] for i in (0, -1))
    size = first.stat().st_size

    def fault(method: str, path: str) -> int | None:
        if not path.endswith(last.name):
            return None
        # answered once the first shard's bytes are out (bounded: the old code never
        # read them before the listing was done)
        _until(lambda: http_server.log.bytes_served(first.name) >= size)
        return 404

    http_server.set_fault(fault)
    with pytest.raises(SourceNotFound, match=last.name):
        fetch(config, f"{http_server.url}/org/model")
    assert http_server.log.bytes_served(first.name) == size  # it was read, ahead
    cache = config.cache_dir
    assert not list((cache / "blobs").rglob("*/*"))
    assert [p.name for p in (cache / "snapshots").iterdir()] == [".revs"]
    assert not os.listdir(cache / "tmp")
    http_server.set_fault(None)
    snap = fetch(config, f"{http_server.url}/org/model")
    (model_dir / "pytorch_model.bin").unlink()
    assert_same_tree(snap.path, model_dir)


def test_a_first_shard_refused_while_the_model_is_listed_stops_the_fetch_before_the_rest(
        config, http_server, model_dir):
    """The first shard, read ahead of the listing, is refused (403): the fetch fails with
    that, once the listing is done, without starting any other file."""
    first, last = (sorted(model_dir.glob("*.safetensors"))[i] for i in (0, -1))

    def fault(method: str, path: str) -> int | None:
        if method == "GET" and path.endswith(first.name):
            return 403
        if method == "HEAD" and path.endswith(last.name):  # listed after the refusal
            _until(lambda: http_server.log.count("FAULT", first.name))
        return None

    http_server.set_fault(fault)
    with pytest.raises(NotPermitted, match=first.name):
        fetch(config.replace(retry_attempts=1), f"{http_server.url}/org/model")
    gets = [p for m, p in http_server.log.order if m in ("GET", "FAULT")]
    assert gets and all(p.endswith(first.name) for p in gets[1:]), gets  # [0]: the index
    assert not os.listdir(config.cache_dir / "tmp")


def test_one_file_at_a_time_holds_with_the_first_shard_read_ahead(config, http_server,
                                                                 model_dir):
    """``max_parallel_files = 1``: the first shard, read while the model is listed, is
    the one file in flight: no other file's bytes are asked for before its last."""
    one = config.replace(chunk_size=256 * 1024, concurrency=4, max_parallel_files=1)
    fetch(one, f"{http_server.url}/org/model")
    first = sorted(model_dir.glob("*.safetensors"))[0].name
    gets = [p for m, p in http_server.log.order if m == "GET" and not p.endswith("/")]
    last_of_first = max(i for i, p in enumerate(gets) if p.endswith(first))
    assert all(p.endswith(first) for p in gets[:last_of_first + 1]), gets


def test_single_flight_locks_taken_ahead_of_their_order_never_wait_in_a_cycle(cache_dir):
    """A fetch holds its first shard's lock ahead of the sorted order; when a lock it
    still needs is held by a fetch that waits for that first one, it lets go and waits in
    the sorted order: both fetches end (waiting ahead of the order would hang both)."""
    from weightd.store.fetch import _Flights

    with Store.open(cache_dir) as store:
        ahead, behind = _Flights(store), _Flights(store)
        assert ahead.hold("b", wait=False)   # the first shard's, taken early
        assert behind.hold("a")              # another fetch's, in order
        assert not _Flights(store).hold("b", wait=False)  # busy: not waited for
        done: list[str] = []

        def take(flights: _Flights, keys: list[str], name: str) -> None:
            flights.take(keys)
            done.append(name)
            flights.release()

        threads = [threading.Thread(target=take, args=(ahead, ["b", "a", "c"], "ahead")),
                   threading.Thread(target=take, args=(behind, ["a", "b"], "behind"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert sorted(done) == ["ahead", "behind"], done
        after = _Flights(store)
        assert after.hold("a", wait=False) and after.hold("b", wait=False)  # all let go
        after.release()


def test_allowed_sources_are_enforced(config, tmp_path, http_server, model_dir):
    cfg = config.replace(allowed_sources=(f"{http_server.url}/org", "s3://models"))
    assert fetch(cfg, f"{http_server.url}/org/model").stats.files > 0
    for ref in ("/etc", "file:///etc/passwd", f"file://{tmp_path}/../..", "s3://models-private/x",
                f"{http_server.url}/organisation"):
        with pytest.raises(NotPermitted):
            fetch(cfg, ref)


def test_two_threads_fetching_one_model_download_once(config, http_server, model_dir):
    results = []
    with Store.open(config.cache_dir) as store:
        fetcher = Fetcher(store, config.replace(chunk_size=256 * 1024))
        threads = [threading.Thread(target=lambda: results.append(
            fetcher.fetch(f"{http_server.url}/org/model"))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(results) == 4
    total = sum(f.stat().st_size for f in model_dir.iterdir()
                if f.is_file() and f.suffix != ".bin") + 2  # + pooling/config.json
    assert http_server.log.bytes_served() == total
    assert sum(r.stats.bytes_fetched for r in results) == total


def test_two_processes_fetching_one_model_download_once(cache_dir, http_server, model_dir):
    env = {"WEIGHTD_CACHE_DIR": str(cache_dir), "WEIGHTD_CHUNK_SIZE": "256KiB"}
    procs = [subprocess.Popen([sys.executable, "-m", "weightd.cli", "fetch",
                               f"{http_server.url}/org/model"], env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert len({o[0] for o in outs}) == 1
    total = sum(f.stat().st_size for f in model_dir.rglob("*")
                if f.is_file() and f.suffix != ".bin")
    assert http_server.log.bytes_served() == total
    assert len(list((cache_dir / "blobs").rglob("*/*"))) == 7  # 3 shards, 4 side files
    assert not os.listdir(cache_dir / "tmp")


def test_sigkill_mid_download_leaves_no_visible_blob(cache_dir, http_server, model_dir):
    def slow(method: str, path: str) -> None:
        if method == "GET" and path.endswith(".safetensors"):
            time.sleep(0.05)
        return None

    http_server.set_fault(slow)
    env = {**os.environ, "WEIGHTD_CACHE_DIR": str(cache_dir), "WEIGHTD_CHUNK_SIZE": "64KiB",
           "WEIGHTD_CONCURRENCY": "1", "WEIGHTD_MAX_PARALLEL_FILES": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "weightd.cli", "fetch",
                             f"{http_server.url}/org/model"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and http_server.log.count("GET", ".safetensors") < 10:
        time.sleep(0.02)
    assert proc.poll() is None, "the fetch finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert os.listdir(cache_dir / "tmp"), "expected the dead download's temp file"
    shard_blobs = [p for p in (cache_dir / "blobs").rglob("*/*") if p.stat().st_size > MiB]
    assert shard_blobs == []
    http_server.set_fault(None)
    out = run_cli("fetch", f"{http_server.url}/org/model",
                  env={"WEIGHTD_CACHE_DIR": str(cache_dir)}, check=True)
    (model_dir / "pytorch_model.bin").unlink()
    assert_same_tree(out.stdout.strip(), model_dir)
    assert not os.listdir(cache_dir / "tmp")  # the leftover was removed at start
    assert run_cli("verify", env={"WEIGHTD_CACHE_DIR": str(cache_dir)}).returncode == 0


def test_verify_catches_a_flipped_byte(cache_dir, tmp_path):
    write_synthetic_model(tmp_path / "m", total_bytes=2 * MiB, tensors=8)
    env = {"WEIGHTD_CACHE_DIR": str(cache_dir)}
    path = run_cli("fetch", str(tmp_path / "m"), env=env, check=True).stdout.strip()
    blob = Path(os.path.realpath(Path(path) / "model.safetensors"))
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(blob.stat().st_size - 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    res = run_cli("verify", env=env)
    assert res.returncode == 1
    assert f"CORRUPT {blob.name}" in res.stdout
    assert not blob.exists()
    assert len(list((cache_dir / "quarantine").iterdir())) == 1
    assert run_cli("ls", env=env).stdout.count("broken") == 1
    # the next fetch downloads it again and the cache verifies clean
    run_cli("fetch", str(tmp_path / "m"), env=env, check=True)
    assert blob.exists()
    assert run_cli("verify", env=env).returncode == 0


def test_cli_fetch_prints_only_the_snapshot_path(cache_dir, http_server, model_dir):
    res = run_cli("fetch", f"{http_server.url}/org/model", "--cache-dir", str(cache_dir),
                  check=True)
    lines = res.stdout.splitlines()
    assert len(lines) == 1 and Path(lines[0]).is_dir()
    assert Path(lines[0]).parent == cache_dir / "snapshots"
    assert "fetched" in res.stderr
    ls = run_cli("ls", "--cache-dir", str(cache_dir), check=True).stdout
    assert "http--127.0.0.1" in ls and " ok " in ls


def test_cli_errors_are_one_clear_line(cache_dir, tmp_path):
    res = run_cli("fetch", str(tmp_path / "missing"), "--cache-dir", str(cache_dir))
    assert res.returncode == 1
    assert "SourceNotFound" in res.stderr and str(tmp_path / "missing") in res.stderr
    assert "Traceback" not in res.stderr


def test_gc_evicts_least_recently_used_models(cache_dir, tmp_path):
    env = {"WEIGHTD_CACHE_DIR": str(cache_dir)}
    for i, name in enumerate(["a", "b", "c"]):
        write_synthetic_model(tmp_path / name, total_bytes=MiB, tensors=4, seed=i)
        run_cli("fetch", str(tmp_path / name), env=env, check=True)
        time.sleep(0.05)
    run_cli("fetch", str(tmp_path / "a"), env=env, check=True)  # a is now the most recent
    plan = run_cli("gc", "--max-bytes", "2.5MiB", "--dry-run", env=env, check=True)
    # three shards and one config.json that all three share (deduplicated)
    assert "evict model" in plan.stdout and len(list((cache_dir / "blobs").rglob("*/*"))) == 4
    run_cli("gc", "--max-bytes", "2.5MiB", env=env, check=True)
    ls = run_cli("ls", env=env, check=True).stdout
    names = {n: model_name(canonical_url(str(tmp_path / n))) for n in "abc"}
    # (by whole names: a name's hash part may hold "--b", 1 run in 16)
    assert names["b"] not in ls and names["a"] in ls and names["c"] in ls
    assert not (cache_dir / "snapshots" / names["b"]).exists()
    assert run_cli("verify", env=env).returncode == 0


def test_cache_owned_by_daemon_is_refused(cache_dir, tmp_path):
    with Store.open(cache_dir, exclusive=True):
        res = run_cli("ls", "--cache-dir", str(cache_dir))
    assert res.returncode == 1 and "in use" in res.stderr


def test_startup_removes_dead_leftovers(cache_dir):
    Store.open(cache_dir).close()
    leftover = cache_dir / "tmp" / "123-456.incomplete"
    leftover.write_bytes(b"x" * 100)
    with Store.open(cache_dir):
        assert not leftover.exists()


def test_startup_keeps_a_live_writers_temp_file_and_no_descriptor(cache_dir):
    Store.open(cache_dir).close()
    live = cache_dir / "tmp" / "789-012.incomplete"
    live.write_bytes(b"x" * 100)
    fd = os.open(live, os.O_RDONLY)  # a writer in another process holds its lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        fds = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            Store.open(cache_dir).close()
        assert live.exists()
        assert len(os.listdir("/proc/self/fd")) == fds  # nothing left open per start
    finally:
        os.close(fd)


def test_snapshot_dir_outlives_source(config, tmp_path):
    write_synthetic_model(tmp_path / "m", total_bytes=MiB, tensors=4)
    snap = fetch(config, str(tmp_path / "m"))
    shutil.rmtree(tmp_path / "m")
    assert len(load_file(os.path.join(snap.path, "model.safetensors"))) == 4


def test_a_link_out_of_the_allowed_roots_is_refused(config, tmp_path):
    models = tmp_path / "models"
    write_synthetic_model(models / "m", total_bytes=MiB, tensors=4)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "token.json").write_text('{"token": "do not serve"}')
    os.symlink(secret / "token.json", models / "m" / "tokenizer_config.json")
    cfg = config.replace(allowed_sources=(str(models),))
    with pytest.raises(NotPermitted, match="tokenizer_config.json"):
        fetch(cfg, str(models / "m"))
    assert not list((config.cache_dir / "blobs").rglob("*/*"))
    # a link that stays inside the allowed roots is fine
    os.unlink(models / "m" / "tokenizer_config.json")
    (models / "shared.json").write_text("{}")
    os.symlink(models / "shared.json", models / "m" / "tokenizer_config.json")
    assert fetch(cfg, str(models / "m")).stats.files == 3


def test_lost_or_damaged_index_is_rebuilt_from_manifests(cache_dir, http_server, model_dir):
    env = {"WEIGHTD_CACHE_DIR": str(cache_dir)}
    url = f"{http_server.url}/org/model"
    first = run_cli("fetch", url, env=env, check=True).stdout.strip()
    for damage in ("delete", "garbage"):
        index = cache_dir / "index.sqlite3"
        if damage == "delete":
            for p in cache_dir.glob("index.sqlite3*"):
                p.unlink()
        else:
            index.write_bytes(b"this is not a database" * 10)
        # a shared-lock command refuses, and says how to rebuild
        res = run_cli("ls", env=env)
        assert res.returncode == 1
        assert ("damaged" if damage == "garbage" else "missing") in res.stderr
        # verify (exclusive) rebuilds and finds everything clean
        res = run_cli("verify", env=env)
        assert res.returncode == 0, res.stderr
        if damage == "garbage":
            assert list(cache_dir.glob("index.sqlite3.damaged-*"))
        assert " ok " in run_cli("ls", env=env, check=True).stdout
        http_server.log.reset()
        assert run_cli("fetch", url, env=env, check=True).stdout.strip() == first
        assert http_server.log.count("GET") == 0  # identities restored: no data read


def _count_header_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import weightd.store.fetch as fetch_module

    parsed: list[str] = []
    # a header is parsed from a file (read_layout) or, as a download lands, from the
    # bytes read back from its temporary file (parse_header)
    for name in ("read_layout", "parse_header"):
        real = getattr(fetch_module, name)

        def counting(what, *args, _real=real, **kwargs):  # type: ignore[no-untyped-def]
            parsed.append(str(kwargs.get("path", what)))
            return _real(what, *args, **kwargs)

        monkeypatch.setattr(fetch_module, name, counting)
    return parsed


def test_a_warm_fetch_parses_no_shard_header(tmp_path, monkeypatch):
    # the answer-size check of each fetch read every shard header its bounded layout
    # cache did not hold (after a restart: all of them; 0.75-1.24 s a warm fetch of
    # 120,000-tensor shards); what it needs is recorded per blob when the blob is first
    # checked (review 1, gap G3). A fresh Fetcher is a restarted daemon.
    src = tmp_path / "m"
    write_synthetic_model(src, total_bytes=MiB, tensors=30, shards=3)
    config = Config(cache_dir=tmp_path / "cache")
    parsed = _count_header_parses(monkeypatch)
    with Store.open(config.cache_dir) as store:
        Fetcher(store, config).fetch(str(src))
        assert len(parsed) == 3  # each shard validated once, as it was downloaded
        del parsed[:]
        again = Fetcher(store, config).fetch(str(src))
        assert again.stats.hits == again.stats.files and parsed == []


def test_a_warm_fetch_through_the_node_parses_no_shard_header(tmp_path, monkeypatch):
    # the node's fetch tells a Landing of the files (for streaming replicas); for a
    # refresh of a cached model (never streamed) it read every cached shard's header
    # (3 parses after a restart), undoing the recorded answer sizes
    from weightd.node import Node

    src = tmp_path / "m"
    write_synthetic_model(src, total_bytes=MiB, tensors=30, shards=3)
    config = Config(cache_dir=tmp_path / "cache", host_mlock=False)
    with Store.open(config.cache_dir, exclusive=True) as store:
        node = Node(config, store)
        node.start()
        try:
            node.fetch(str(src))
        finally:
            node.close()
    parsed = _count_header_parses(monkeypatch)
    with Store.open(config.cache_dir, exclusive=True) as store:
        node = Node(config, store)  # a restarted daemon
        node.start()
        try:
            snap = node.fetch(str(src))
        finally:
            node.close()
    assert snap.stats.hits == snap.stats.files and parsed == []


def test_a_load_while_its_fetch_commits_reads_the_renamed_blobs(tmp_path, monkeypatch):
    # a load from a ready fetch reads each shard's layout from its temporary file; once
    # the commit renamed it, that path is gone: with the layout no longer in the bounded
    # cache, the Acquire failed with FileNotFoundError (INTERNAL) instead of reading the
    # blob
    import weightd.store.fetch as fetch_module
    from weightd.formats import LayoutCache
    from weightd.node import Node

    src = tmp_path / "m"
    write_synthetic_model(src, total_bytes=MiB, tensors=30, shards=3)
    config = Config(cache_dir=tmp_path / "cache", host_mlock=False)
    reached, go = threading.Event(), threading.Event()

    def pause(point: str) -> None:
        if point == "renamed":  # every shard renamed, the fetch not ended yet
            reached.set()
            go.wait(30)

    monkeypatch.setattr(fetch_module, "pause_at", pause)
    with Store.open(config.cache_dir, exclusive=True) as store:
        node = Node(config, store)
        node.fetcher.layouts = LayoutCache(budget=1)  # keeps nothing, as under pressure
        node.start()
        try:
            fetch = threading.Thread(target=node.fetch, args=(str(src),))
            fetch.start()
            assert reached.wait(30)
            try:
                got = node.acquire(str(src), device="cpu", caller=node.credentials.local())
            finally:
                go.set()
                fetch.join(30)
            assert len(got.view.tensors) == 30
        finally:
            node.close()


def test_an_index_of_the_previous_schema_is_migrated_and_learns_the_answer_sizes(
        tmp_path, monkeypatch):
    # an index written before the answer sizes were recorded (schema 1: no shard_answers
    # table) opens, keeps its models, parses each shard header once more and never again
    import sqlite3

    src = tmp_path / "m"
    write_synthetic_model(src, total_bytes=MiB, tensors=30, shards=3)
    config = Config(cache_dir=tmp_path / "cache")
    with Store.open(config.cache_dir) as store:
        Fetcher(store, config).fetch(str(src))
    with sqlite3.connect(config.cache_dir / "index.sqlite3") as db:  # as schema 1 left it
        db.execute("DROP TABLE shard_answers")
        db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    parsed = _count_header_parses(monkeypatch)
    with Store.open(config.cache_dir) as store:
        assert [m.source for m in store.index.models()] == [f"file://{src}"]
        for expect in (3, 0):
            del parsed[:]
            snap = Fetcher(store, config).fetch(str(src))
            assert snap.stats.hits == 5 and len(parsed) == expect, (expect, parsed)
    with sqlite3.connect(config.cache_dir / "index.sqlite3") as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("2",)
        assert db.execute("SELECT COUNT(*) FROM shard_answers").fetchone() == (3,)


def test_a_synthetic_model_too_small_for_its_tensors_is_refused(tmp_path):
    # it wrote shards of shape [0, 64] with 2 data bytes each, which no parser accepts
    with pytest.raises(ValueError, match="cannot hold 100 BF16 tensors"):
        write_synthetic_model(tmp_path / "m", total_bytes=1000, tensors=100)
    assert not list(tmp_path.glob("m/*.safetensors"))


def test_chunks_are_hashed_and_written_in_pieces_that_straddle_their_blocks(tmp_path):
    # a chunk arrives as blocks of any size (one buffer, or a reader's list of bytes);
    # they are hashed and written a piece at a time: the file and the digest must be those
    # of the blocks back to back, wherever the pieces and the blocks end
    import xxhash

    from weightd.store.fetch import WRITE_PIECE, _hash_and_write

    rng = __import__("random").Random(7)
    # and many small blocks, as S3's body comes, gathered into one write
    sizes = ([1, WRITE_PIECE - 1, WRITE_PIECE, WRITE_PIECE + 1, 3 * WRITE_PIECE + 17, 0, 5]
             + [65536] * 40 + [1000] * 7)
    blocks = [rng.randbytes(n) for n in sizes]
    whole = b"".join(blocks)
    path = tmp_path / "blob"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"\xaa" * 100, 0)  # the chunk lands after the file's first 100 bytes
        hasher = xxhash.xxh3_128()
        _hash_and_write(hasher, fd, [memoryview(b) if i % 2 else b
                                     for i, b in enumerate(blocks)], 100)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\xaa" * 100 + whole
    assert hasher.hexdigest() == xxhash.xxh3_128(whole).hexdigest()
