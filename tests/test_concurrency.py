"""Many models at once: the node under concurrent cold and warm work (issue 13).

Each test reproduces, with a real daemon process and real clients, one way in which one
request used to hurt another: a warm Acquire that waited for another model's load, RPC
threads taken by cold work, gc deleting blobs that a fetch, a load or a lease still
needed, views that named the moving snapshot link, leases left behind by answers that
never arrived, and layouts that were never dropped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.conftest import run_cli
from tests.daemon import DaemonProcess, wait_for
from weightd.store import hash_file
from weightd.testing import write_synthetic_model
from weightd.testing.answers import answer_mismatches, references
from weightd.testing.procfs import drop_page_cache, smaps_rollup
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb

MiB = 1024 * 1024


def blob_files(d: DaemonProcess) -> list[Path]:
    return sorted(p for p in (d.cache_dir / "blobs").glob("*/*") if p.is_file())


def leases(d: DaemonProcess) -> list[pb.LeaseInfo]:
    return list(d.status().leases)


class Gate:
    """An HTTP fault hook that holds GETs of matching paths until :meth:`open`."""

    def __init__(self, match: str) -> None:
        self.match = match
        self._open = threading.Event()
        self.held = 0
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str) -> int | None:
        if method == "GET" and self.match in path:
            with self._lock:
                self.held += 1
            self._open.wait(120)
        return None

    def open(self) -> None:
        self._open.set()


def revision(directory: Path, n: int, *, seed: int) -> None:
    """Write revision ``n`` of a small model: its weights and a config.json that says n."""
    write_synthetic_model(directory, total_bytes=2 * MiB, tensors=4, seed=seed)
    (directory / "config.json").write_text(json.dumps({"revision": n}))


# head-of-line blocking -------------------------------------------------------------------------


def test_a_warm_acquire_does_not_wait_for_another_models_load(tmp_path):
    small, big = tmp_path / "small", tmp_path / "big"
    write_synthetic_model(small, total_bytes=8 * MiB, tensors=8)
    write_synthetic_model(big, total_bytes=512 * MiB, tensors=16, shards=2)
    with DaemonProcess(tmp_path / "d") as d:
        list(d.stub().Fetch(pb.FetchRequest(source=str(big)), timeout=300))
        d.release(d.acquire(small).lease_id)  # small is resident now
        drop_page_cache(blob_files(d))  # big's load has to read the disk
        big_at: dict[str, float] = {}

        def load_big() -> None:
            big_at["start"] = time.monotonic()
            got = d.acquire(big, timeout=300)
            big_at["end"] = time.monotonic()
            d.release(got.lease_id)

        loader = threading.Thread(target=load_big)
        loader.start()
        warm: list[tuple[float, float]] = []  # (started, seconds) of each warm acquire
        while loader.is_alive() and len(warm) < 20_000:
            t0 = time.monotonic()
            d.release(d.acquire(small).lease_id)
            warm.append((t0, time.monotonic() - t0))
        loader.join(300)
    took = big_at["end"] - big_at["start"]
    # what started while the big model was being loaded (its acquire reads the headers
    # first: leave it 50 ms to get to the load itself)
    during = [s for t0, s in warm if big_at["start"] + 0.05 < t0 < big_at["end"]]
    assert took > 0.15, f"the big model loaded in {took:.3f}s: too fast to show anything"
    assert len(during) >= 3, (took, len(during), max((s for _, s in warm), default=None))
    assert max(during) < max(0.05, took / 5), (took, sorted(during)[-3:])


def test_a_load_of_a_cached_model_does_not_queue_behind_fetches(tmp_path, http_server,
                                                                 http_root):
    for name in ("slow1", "slow2"):
        write_synthetic_model(http_root / name, total_bytes=2 * MiB, tensors=4)
    cached = tmp_path / "cached"
    write_synthetic_model(cached, total_bytes=2 * MiB, tensors=4)
    gate = Gate("/slow")
    http_server.set_fault(gate)
    with DaemonProcess(tmp_path / "d", env={"WEIGHTD_FETCH_WORKERS": "2"}) as d:
        list(d.stub().Fetch(pb.FetchRequest(source=str(cached)), timeout=60))
        try:
            fetches = [d.stub().Fetch(pb.FetchRequest(source=f"{http_server.url}/{name}"),
                                      timeout=120) for name in ("slow1", "slow2")]
            pullers = [threading.Thread(target=list, args=(f,)) for f in fetches]
            for t in pullers:
                t.start()
            wait_for(lambda: gate.held >= 2, what="both fetches to reach their source")
            t0 = time.monotonic()
            got = d.acquire(cached, timeout=10)  # with every fetch worker taken
            took = time.monotonic() - t0
            assert got.loaded and not got.fetched
            d.release(got.lease_id)
        finally:
            gate.open()
        for t in pullers:
            t.join(120)
    assert took < 5, f"the load waited {took:.1f}s"


# cold work off the RPC threads -------------------------------------------------------------------


def test_status_release_health_and_warm_acquires_answer_during_64_cold_acquires(
        tmp_path, http_server, http_root):
    write_synthetic_model(http_root / "slow", total_bytes=2 * MiB, tensors=4)
    warm_model = tmp_path / "warm"
    write_synthetic_model(warm_model, total_bytes=1 * MiB, tensors=2)
    gate = Gate("/slow/model.safetensors")
    http_server.set_fault(gate)
    url = f"{http_server.url}/slow"
    with DaemonProcess(tmp_path / "d") as d:
        d.release(d.acquire(warm_model).lease_id)
        stub = d.stub()
        me = pb.ClientInfo(pid=os.getpid())
        try:
            calls = [stub.Acquire.future(pb.AcquireRequest(source=url, client=me), timeout=120)
                     for _ in range(64)]
            wait_for(lambda: gate.held, what="the fetch to reach the slow source")
            time.sleep(0.5)  # every Acquire is in the daemon now
            t0 = time.monotonic()
            st = stub.Status(pb.StatusRequest(), timeout=5)
            assert st.pid == d.pid
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            with grpc.insecure_channel(f"unix://{d.socket}") as ch:
                health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as e:
                stub.Release(pb.ReleaseRequest(lease_id="0" * 24), timeout=5)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            warm = d.acquire(warm_model, timeout=5)
            assert not warm.loaded
            d.release(warm.lease_id, timeout=5)
            answered = time.monotonic() - t0
            assert not any(c.done() for c in calls), "the cold acquires were not held"
        finally:
            gate.open()
        results = [c.result(timeout=120) for c in calls]
        assert answered < 5
        assert sum(r.fetched for r in results) == 1
        for r in results:
            d.release(r.lease_id)
        assert http_server.log.bytes_served("/slow/model.safetensors") == (
            http_root / "slow" / "model.safetensors").stat().st_size


# gc and the disk budget never delete a held blob -------------------------------------------------


def test_the_disk_budget_never_deletes_the_blobs_of_a_fetch_in_progress(
        tmp_path, http_server, http_root):
    slow = http_root / "b"
    write_synthetic_model(slow, total_bytes=8 * MiB, tensors=8, shards=2)
    other = tmp_path / "c"
    write_synthetic_model(other, total_bytes=6 * MiB, tensors=4)
    gate = Gate("/b/model-00002-of-00002.safetensors")
    http_server.set_fault(gate)
    with DaemonProcess(tmp_path / "d", env={"WEIGHTD_DISK_BUDGET": "9MiB"}) as d:
        try:
            loading = d.stub().Acquire.future(pb.AcquireRequest(
                source=f"{http_server.url}/b", client=pb.ClientInfo(pid=os.getpid())),
                timeout=120)
            # side files are committed as they land (shards wait in tmp/ until every
            # file is verified: serve before durable)
            digest = hash_file(slow / "config.json")
            wait_for(lambda: (d.cache_dir / "blobs" / digest[:2] / digest).exists(),
                     what="the config's blob")
            wait_for(lambda: gate.held, what="the second shard to be held")
            # another model's fetch runs the disk budget: the config of b is in no
            # model record yet
            list(d.stub().Fetch(pb.FetchRequest(source=str(other)), timeout=60))
        finally:
            gate.open()
        got = loading.result()
        assert answer_mismatches(got, references(slow)) == [] and len(got.tensors) == 8
        assert "INTERNAL" not in d.log()


def write_shard(path: Path, tensors: int, *, size: int = 1) -> None:
    """A safetensors file of ``tensors`` U8 tensors of ``size`` bytes each, named after
    the file."""
    header = {f"{path.stem}.{i}": {"dtype": "U8", "shape": [size], "data_offsets": [i * size,
                                                                          (i + 1) * size]}
              for i in range(tensors)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + os.urandom(tensors * size))


def test_gc_never_deletes_a_cached_model_while_it_is_being_acquired(tmp_path):
    a = tmp_path / "a"
    # the first shard's header is large, so reading its layout takes a while
    write_shard(a / "a.safetensors", 100_000)
    write_shard(a / "b.safetensors", 1, size=4 * MiB)
    other = tmp_path / "c"
    write_synthetic_model(other, total_bytes=6 * MiB, tensors=4)
    with DaemonProcess(tmp_path / "d", env={"WEIGHTD_DISK_BUDGET": "8MiB"}) as d:
        list(d.stub().Fetch(pb.FetchRequest(source=str(a)), timeout=120))
        loading = d.stub().Acquire.future(pb.AcquireRequest(
            source=str(a), client=pb.ClientInfo(pid=os.getpid())), timeout=120)
        time.sleep(0.2)  # a is being acquired: its headers are being read
        list(d.stub().Fetch(pb.FetchRequest(source=str(other)), timeout=60))
        got = loading.result()
        assert answer_mismatches(got, references(a)) == []
        assert "INTERNAL" not in d.log()


# views name their own revision, which stays while leased ---------------------------------------


def test_a_leased_revision_keeps_its_own_files_and_directory(tmp_path):
    src = tmp_path / "changing"
    revision(src, 1, seed=1)
    keep = tmp_path / "r1"  # revision 1's bytes, kept: the source is rewritten below
    shutil.copytree(src, keep)
    r1 = references(keep)
    with DaemonProcess(tmp_path / "d", env={"WEIGHTD_DISK_BUDGET": "3MiB"}) as d:
        a = d.acquire(src)  # a lease on revision 1
        revision(src, 2, seed=2)  # the source changes
        r2 = references(src)
        list(d.stub().Fetch(pb.FetchRequest(source=str(src)), timeout=60))  # the budget runs
        b = d.acquire(src)
        assert answer_mismatches(b, r1) == [] and len(b.tensors) == 4  # revision 1, whole
        snap = Path(b.snapshot_path)
        assert json.loads((snap / "config.json").read_text()) == {"revision": 1}
        # an operator's gc, through the daemon, keeps what the leases hold
        res = run_cli("gc", "--max-bytes", "0", env={"WEIGHTD_SOCKET": str(d.socket),
                                                     "WEIGHTD_CACHE_DIR": str(d.cache_dir)})
        assert res.returncode == 0, res.stderr
        assert json.loads((snap / "config.json").read_text()) == {"revision": 1}
        third = d.acquire(src)
        assert answer_mismatches(third, r1) == []
        for got in (a, b, third):
            d.release(got.lease_id)
        # nothing holds revision 1 any more: the next load is revision 2
        fresh = d.acquire(src)
        assert fresh.loaded and answer_mismatches(fresh, r2) == []
        assert json.loads((Path(fresh.snapshot_path) / "config.json").read_text()) == {
            "revision": 2}
        d.release(fresh.lease_id)


# answers that were not delivered leave no lease -------------------------------------------------


def test_an_acquire_whose_deadline_passed_leaves_no_lease(tmp_path, http_server, http_root):
    write_synthetic_model(http_root / "slow", total_bytes=2 * MiB, tensors=4)
    gate = Gate("/slow/model.safetensors")
    http_server.set_fault(gate)
    url = f"{http_server.url}/slow"
    with DaemonProcess(tmp_path / "d") as d:
        try:
            with pytest.raises(grpc.RpcError) as e:
                d.acquire(url, timeout=1.0)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            gate.open()
        # the fetch goes on without the caller (others may wait for it): the model is
        # cached, and nobody holds a lease on it
        wait_for(lambda: d.stub().List(pb.ListRequest(), timeout=10).models,
                 what="the model to be cached")
        time.sleep(0.5)
        assert leases(d) == []
        got = d.acquire(url)  # the next caller gets it without a fetch
        assert not got.fetched
        d.release(got.lease_id)
        assert leases(d) == []


TIGHT_LOADS = r"""
import json, os, sys, time
import grpc
import weightd_client
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from tests.daemon import raw_stub
sock, source = sys.argv[1], sys.argv[2]
stub, took = raw_stub(sock), []
for _ in range(5):  # how long an Acquire of this model takes, to aim the deadlines at it
    t0 = time.perf_counter()
    got = stub.Acquire(pb.AcquireRequest(source=source, client=pb.ClientInfo(
        pid=os.getpid())), timeout=60)
    took.append(time.perf_counter() - t0)
    stub.Release(pb.ReleaseRequest(lease_id=got.lease_id), timeout=10)
rpc = sorted(took)[2]
client = weightd_client.Client(sock)
failed = ok = 0
for i in range(40):  # deadlines from a fifth of an Acquire to one and a half
    try:
        client.load(source, fallback=False, timeout=rpc * (0.2 + 1.3 * i / 40)).release()
        ok += 1
    except weightd_client.errors.WeightdError:
        failed += 1
print(json.dumps({"rpc_s": rpc, "failed": failed, "ok": ok}), flush=True)
sys.stdin.readline()  # alive, and its leases with it, until the test has looked
"""


def test_loads_whose_deadline_passes_during_the_answer_leave_no_lease(tmp_path):
    # A resident model of 20,000 tensors (an answer of about a megabyte) loaded with
    # deadlines around the time an Acquire takes: some pass while the answer is on its
    # way. The client process stays alive (its leases would end with it otherwise).
    model = tmp_path / "wide"
    write_shard(model / "model.safetensors", 20_000)
    with DaemonProcess(tmp_path / "d") as d:
        proc = subprocess.Popen(
            [sys.executable, "-c", TIGHT_LOADS, str(d.socket), str(model)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parent.parent)
        try:
            out = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            assert out["failed"] > 0, out  # some deadlines did pass
            wait_for(lambda: not leases(d), timeout=5,
                     what=f"no lease left by {out['failed']} failed loads ({out})")
        finally:
            proc.kill()
            proc.wait(10)


def test_an_answer_over_the_message_limit_leaves_no_lease(tmp_path):
    from weightd.testing.models import write_synthetic_model as write

    big = tmp_path / "big-metadata"
    write(big, total_bytes=64 * 1024, tensors=2)
    # one shard whose metadata alone is over the 64 MiB limit of an answer
    shard = big / "model.safetensors"
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["padding"] = "x" * (65 * MiB)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    good = tmp_path / "good"
    write_synthetic_model(good, total_bytes=1 * MiB, tensors=2)
    with DaemonProcess(tmp_path / "d") as d:
        with pytest.raises(grpc.RpcError) as e:
            d.acquire(big, timeout=120)
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED), e.value.details()
        time.sleep(0.3)
        assert leases(d) == []
        d.release(d.acquire(good).lease_id)
        assert leases(d) == []


CLAIM_PID_1 = r"""
import os, sys
import grpc
sys.path.insert(0, sys.argv[2])
from tests.daemon import raw_stub
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd.leases import process_start_time
got = raw_stub(sys.argv[1]).Acquire(pb.AcquireRequest(source=sys.argv[3], client=pb.ClientInfo(
    pid=1, start_time=process_start_time(1) or 0, name="claims pid 1")), timeout=60)
print(os.getpid(), got.lease_id)
"""


def test_a_lease_is_in_the_name_of_the_caller_not_of_the_pid_it_claims(tmp_path):
    model = tmp_path / "m"
    write_synthetic_model(model, total_bytes=1 * MiB, tensors=2)
    with DaemonProcess(tmp_path / "d") as d:
        res = subprocess.run([sys.executable, "-c", CLAIM_PID_1, str(d.socket),
                              str(Path(__file__).resolve().parent.parent), str(model)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        pid = int(res.stdout.split()[0])
        # the caller has exited: its lease goes with it, whatever pid it claimed
        wait_for(lambda: not leases(d), timeout=5, what=f"the lease of {pid} to be reaped")
        ev = d.stub().Evict(pb.EvictRequest(source=str(model)), timeout=10)
        assert ev.bytes_freed > 0


# layouts go with their model ------------------------------------------------------------------


def test_layouts_are_dropped_when_their_model_is_unloaded(tmp_path):
    sources = []
    for i in range(9):
        src = tmp_path / f"m{i}"
        write_synthetic_model(src, total_bytes=4 * MiB, tensors=30_000, seed=i, dtype="U8")
        sources.append(src)
    with DaemonProcess(tmp_path / "d") as d:

        def cycle(src: Path) -> None:
            d.release(d.acquire(src, timeout=120).lease_id)
            d.stub().Evict(pb.EvictRequest(source=str(src)), timeout=30)

        cycle(sources[0])
        base = smaps_rollup(d.pid)["Pss_Anon"]
        for src in sources[1:]:
            cycle(src)
        grown = (smaps_rollup(d.pid)["Pss_Anon"] - base) * 1024
    # each layout of 30,000 tensors takes about 10 MiB as Python objects: 8 kept would be
    # 80 MiB; with every one dropped the heap still grew 5-19 MiB here (the allocator's
    # arenas), so 5 cycles under 16 MiB failed now and then on either side of a change
    assert grown < 32 * MiB, f"the daemon's anonymous memory grew {grown / MiB:.0f} MiB"


# a fetch with other globs does not join the running one -----------------------------------------


def test_a_fetch_with_other_globs_does_not_join_the_running_one(tmp_path, http_server, http_root):
    src = http_root / "m1"
    write_synthetic_model(src, total_bytes=2 * MiB, tensors=20, shards=2)
    gate = Gate("/m1/model-00001-of-00002.safetensors")
    http_server.set_fault(gate)
    url = f"{http_server.url}/m1"
    with DaemonProcess(tmp_path / "d") as d:
        partial: dict[str, pb.FetchProgress] = {}

        def fetch_partial() -> None:
            *_, last = d.stub().Fetch(pb.FetchRequest(
                source=url, include=["model-00001*", "*.json"]), timeout=120)
            partial["last"] = last

        first = threading.Thread(target=fetch_partial)
        first.start()
        try:
            wait_for(lambda: gate.held, what="the partial fetch to reach its shard")
            whole = d.stub().Fetch(pb.FetchRequest(source=url), timeout=120)
            acquiring = d.stub().Acquire.future(pb.AcquireRequest(
                source=url, client=pb.ClientInfo(pid=os.getpid())), timeout=120)
            time.sleep(0.3)  # the plain fetch and the Acquire are in the daemon now
        finally:
            gate.open()
        *_, last = whole
        first.join(120)
        assert partial["last"].files == 3  # what it asked for: one shard, two json files
        assert last.files == 4, last  # what this one asked for: every file
        got = acquiring.result()
        assert len(got.tensors) == 20  # not the 10 of the partial fetch
        d.release(got.lease_id)
        (model,) = d.stub().List(pb.ListRequest(), timeout=10).models
        assert model.files == 4


# A daemon whose file system hangs on one path (as a stuck NFS or FUSE mount does): the
# first link resolution there sleeps.
HUNG_FS_DAEMON = r"""
import os.path, sys, threading, time
real, first = os.path.realpath, threading.Event()
def realpath(path, *args, **kwargs):
    if "hung-mount" in os.fspath(path) and not first.is_set():
        first.set()
        time.sleep(4)
    return real(path, *args, **kwargs)
os.path.realpath = realpath
from weightd.cli import main
sys.exit(main(["serve"]))
"""


def _stream_whole(d: DaemonProcess, source: Path) -> None:
    """An AcquireStream of ``source``, read to its end (its lease is reaped with us)."""
    from tests.daemon import raw_stub

    for _ in raw_stub(d.socket).AcquireStream(pb.AcquireRequest(source=str(source)),
                                              timeout=60):
        pass


@pytest.mark.parametrize("call", ["Acquire", "AcquireStream"])
def test_a_local_source_on_a_hung_file_system_does_not_stall_other_calls(tmp_path, call):
    # resolving a local path (links, ..) touches the file system; done on the event
    # loop, one Acquire (or AcquireStream) of a path on a hung mount stalled Status,
    # Release and Health of every client until the mount answered (review 1, defect 12)
    hung = tmp_path / "hung-mount" / "m"
    write_synthetic_model(hung, total_bytes=MiB // 4, tensors=2, seed=3)
    with DaemonProcess(tmp_path / "d", launcher=(sys.executable, "-c", HUNG_FS_DAEMON)) as d:
        work = d.acquire if call == "Acquire" else lambda src: _stream_whole(d, src)
        slow = threading.Thread(target=work, args=(hung,), daemon=True)
        slow.start()
        time.sleep(0.5)  # the Acquire is resolving its source
        t0 = time.monotonic()
        d.status()
        took = time.monotonic() - t0
        slow.join(60)
        assert took < 2, f"Status took {took:.1f}s while an {call} resolved a hung path"
        assert d.proc.poll() is None
