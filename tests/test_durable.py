"""Serve before durable (issue 16): a fetched model is served from its verified temporary
files while their fsync and rename into ``blobs/`` follow in the background, and a daemon
killed at any step of that path leaves nothing unverified visible.

The kill points are the daemon's test-only pauses (``WEIGHTDTEST_PAUSE_AT``, see
weightd/testhooks.py): the daemon logs that it reached the point and sleeps there, the test
SIGKILLs it, then checks the cache with the daemon stopped (``weightd verify`` clean, the
index consistent, ``tmp/`` emptied at the next open) and that a restarted daemon serves the
source's bytes.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
from pathlib import Path

import grpc
import pytest

from tests.daemon import DaemonProcess, wait_for
from tests.test_faults import assert_cache_clean, blobs, kill
from weightd.config import Config
from weightd.errors import IntegrityError
from weightd.node import Node
from weightd.sources import model_name
from weightd.store import Fetcher, Store, hash_file
from weightd.testing import write_synthetic_model
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client.tensors import open_shard

MiB = 1024 * 1024
#: The daemon's test-only pause points (weightd/testhooks.py), by their documented name.
PAUSE_ENV = "WEIGHTDTEST_PAUSE_AT"
POINTS = ["downloading", "ready", "fsynced", "renamed"]


@pytest.fixture
def model(http_root: Path) -> Path:
    d = http_root / "m"
    write_synthetic_model(d, total_bytes=4 * MiB, tensors=16, shards=2)
    return d


def paused(d: DaemonProcess, point: str) -> bool:
    return f"test pause at {point!r}" in d.log()


def source_tensors(model: Path) -> dict[str, bytes]:
    """name -> raw bytes of every tensor of the model's source files."""
    from weightd.formats import read_layout

    out = {}
    for shard in sorted(model.glob("*.safetensors")):
        data = shard.read_bytes()
        for t in read_layout(shard).tensors:
            out[t.name] = data[t.offset:t.offset + t.nbytes]
    return out


def served_tensors(answer: pb.AcquireResponse) -> dict[str, bytes]:
    """name -> the bytes a client reads at the places the answer names (the final path,
    else the pending one, as weightd_client maps them)."""
    out = {}
    for t in answer.tensors:
        shard = answer.shards[t.shard]
        fd = open_shard(shard.path, shard.pending_path)
        try:
            out[t.name] = os.pread(fd, t.length, t.offset)
        finally:
            os.close(fd)
    return out


def staged_without_manifest(cache: Path) -> list[Path]:
    """Revision directories that no manifest names (a revision that never committed)."""
    revs = cache / "snapshots" / ".revs"
    return [r for m in revs.iterdir() if m.is_dir() for r in m.iterdir()
            if r.is_dir() and not r.name.startswith(".")
            and not (m / f"{r.name}.manifest.json").exists()]


def test_a_replica_is_served_while_its_blobs_are_not_yet_durable(tmp_path, http_server, model):
    url = f"{http_server.url}/m"
    shard_digests = {hash_file(p) for p in model.glob("*.safetensors")}
    d = DaemonProcess(tmp_path, env={PAUSE_ENV: "ready"})
    try:
        answer = d.acquire(url, timeout=60)
        # the daemon is paused before the first fsync, and the model is served
        assert paused(d, "ready"), "served, but not while its blobs were not yet durable"
        assert answer.fetched and answer.loaded
        assert len(answer.shards) == 2
        for s in answer.shards:
            assert not os.path.exists(s.path), "the blob is visible before its fsync"
            assert s.pending_path.startswith(str(d.cache_dir / "tmp") + "/")
            st = os.stat(s.pending_path)
            assert stat.S_IMODE(st.st_mode) == 0o440, oct(st.st_mode)
        assert served_tensors(answer) == source_tensors(model)
        # listed (resident, leased) while the index does not know it yet
        listed = d.stub().List(pb.ListRequest(), timeout=10).models
        assert [(m.model, [r.leases for r in m.resident]) for m in listed] == [
            (model_name(url), [1])]
        assert Path(listed[0].snapshot_path, "config.json").is_file()
        d.release(answer.lease_id)
    finally:
        kill(d)
    # no shard was durable: none is visible (side files are committed as they land)
    assert not shard_digests & set(blobs(d.cache_dir))
    assert_cache_clean(d.cache_dir)  # (and the dead temp files are gone)
    with DaemonProcess(tmp_path) as d2:
        again = d2.acquire(url)
        assert again.fetched, "the next request fetches the model again"
        assert served_tensors(again) == source_tensors(model)
        wait_for(lambda: all(os.path.exists(s.path) for s in again.shards), timeout=30,
                 what="the blobs durable in the background")
        d2.release(again.lease_id)
    assert assert_cache_clean(d.cache_dir) == [model_name(url)]


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_each_step_leaves_nothing_unverified(tmp_path, http_server, model, point):
    url = f"{http_server.url}/m"
    shard_digests = {hash_file(p) for p in model.glob("*.safetensors")}
    env = {PAUSE_ENV: point, "WEIGHTD_CHUNK_SIZE": "256KiB", "WEIGHTD_CONCURRENCY": "1",
           "WEIGHTD_MAX_PARALLEL_FILES": "1"}
    d = DaemonProcess(tmp_path, env=env)
    answers: list[pb.AcquireResponse] = []
    errors: list[grpc.RpcError] = []

    def acquire() -> None:
        try:
            answers.append(d.acquire(url, timeout=60))
        except grpc.RpcError as e:
            errors.append(e)

    t = threading.Thread(target=acquire)
    t.start()
    try:
        wait_for(lambda: paused(d, point), timeout=60, what=f"the pause at {point}")
        if point != "downloading":
            # verified and served: the replica has the source's bytes before the crash
            t.join(60)
            assert answers, errors
            assert served_tensors(answers[0]) == source_tensors(model)
    finally:
        kill(d)
        t.join(30)
    if point == "downloading":
        assert not answers and [e.code() for e in errors] == [grpc.StatusCode.UNAVAILABLE]
    cache = d.cache_dir
    # before any restart: every visible blob is verified (it hashes to its name, checked
    # by assert_cache_clean below) and the index names no model (nothing was recorded)
    if point == "renamed":
        assert shard_digests <= set(blobs(cache))  # both shards renamed, then it died
    else:
        assert not shard_digests & set(blobs(cache))
    with Store.open(cache, exclusive=True) as store:  # what a restart does first
        assert store.index.models() == []
        assert not os.listdir(cache / "tmp")
        assert staged_without_manifest(cache) == [] or point == "renamed"
    assert assert_cache_clean(cache) == []
    with DaemonProcess(tmp_path) as d2:
        again = d2.acquire(url)
        assert served_tensors(again) == source_tensors(model)
        d2.release(again.lease_id)
    assert assert_cache_clean(cache) == [model_name(url)]
    assert staged_without_manifest(cache) == []


def test_a_second_fetch_of_a_file_between_ready_and_durable_waits_and_reads_nothing(
        tmp_path, http_server, model):
    """Two sources share a file (the directory, and that one shard): the second fetch
    starts while the first is served but not yet durable; it waits for the first's commit
    and finds the blob (the file is read once)."""
    from weightd.store.fetch import FetchEvents, Ready

    config = Config(cache_dir=tmp_path / "cache")
    shard = sorted(model.glob("*.safetensors"))[0]
    at_ready = threading.Event()
    go_on = threading.Event()

    class Hold(FetchEvents):
        def ready(self, ready: Ready) -> None:
            at_ready.set()
            assert go_on.wait(30)

    with Store.open(config.cache_dir) as store:
        fetcher = Fetcher(store, config)
        first = threading.Thread(target=fetcher.fetch, args=(f"{http_server.url}/m",),
                                 kwargs={"events": Hold()})
        first.start()
        assert at_ready.wait(30)
        served = http_server.log.bytes_served(shard.name)
        second: list[object] = []
        t2 = threading.Thread(target=lambda: second.append(
            fetcher.fetch(f"{http_server.url}/m/{shard.name}")))
        t2.start()
        t2.join(0.5)
        assert t2.is_alive(), "the second fetch did not wait for the first one's commit"
        go_on.set()
        first.join(30)
        t2.join(30)
        assert second and second[0].stats.hits == 1  # type: ignore[attr-defined]
        assert http_server.log.bytes_served(shard.name) == served == shard.stat().st_size


def test_fsync_failure_after_serving_keeps_leases_refuses_new_ones_and_refetches(
        tmp_path, http_server, model, monkeypatch):
    """The disk fails the fsync of a blob that is already served: the lease granted keeps
    its verified pages, Status says what happened, no new lease is granted on that
    residency, nothing is recorded, and the first Acquire once no lease holds it fetches
    the model again. (The kernel's answer is injected: os.fsync raises EIO for the
    cache's shard temp files.)"""
    url = f"{http_server.url}/m"
    shard_digests = {hash_file(p) for p in model.glob("*.safetensors")}
    config = Config(cache_dir=tmp_path / "cache", host_mlock=False)
    tmp_dir = str(config.cache_dir / "tmp") + "/"
    real_fsync = os.fsync
    failing = {"on": True}
    mapped = threading.Event()

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        # a shard's temp file (side files are committed as they land, before serving)
        shard = target.startswith(tmp_dir) and target.endswith(".safetensors.incomplete")
        if failing["on"] and shard:
            mapped.wait(30)  # the test maps the served files first, as a replica would
            raise OSError(errno.EIO, "Input/output error (injected)")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with Store.open(config.cache_dir, exclusive=True) as store:
        node = Node(config, store)
        node.start()
        try:
            caller = node.credentials.local()
            got = node.acquire(url, device="cpu", caller=caller)  # served before the fsync
            maps = map_view(got.view)
            mapped.set()
            wait_for(lambda: any("not durable" in p for p in node.problems()),
                     what="the commit's failure in the problems")
            assert not any(os.path.exists(s.pending_path) for s in got.view.shards)
            assert tensors_of(got.view, maps) == source_tensors(model)  # pages intact
            with pytest.raises(IntegrityError, match="not durable"):
                node.acquire(url, device="cpu", caller=caller)
            assert node.store.index.model(model_name(url)) is None
            assert not shard_digests & set(blobs(config.cache_dir))
            node.release(got.lease.lease_id, caller)
            failing["on"] = False
            again = node.acquire(url, device="cpu", caller=caller)
            assert again.fetched and again.view is not got.view
            assert tensors_of(again.view, map_view(again.view)) == source_tensors(model)
            node.release(again.lease.lease_id, caller)
            wait_for(lambda: not any("not durable" in p for p in node.problems()),
                     what="the problem cleared once the new fetch is durable")
        finally:
            node.close()


def map_view(view: object) -> dict[str, mmap.mmap]:
    """Map each shard of a node's view as a replica does (final path, else pending)."""
    maps = {}
    for s in view.shards:  # type: ignore[attr-defined]
        fd = open_shard(s.path, s.pending_path)
        try:
            maps[s.digest] = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
    return maps


def tensors_of(view: object, maps: dict[str, mmap.mmap]) -> dict[str, bytes]:
    return {t.name: maps[view.shards[t.shard].digest][t.offset:t.offset + t.length]  # type: ignore[attr-defined]
            for t in view.tensors}  # type: ignore[attr-defined]
