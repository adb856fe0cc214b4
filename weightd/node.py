"""The node: what the daemon does, independent of how it is asked (gRPC is in service/).

It composes the store (disk tier), the residency tiers (host memory, CUDA devices: one
:class:`~weightd.tiers.base.Tier` interface, keyed by device) and the lease table, and
owns the decisions between them: fetch a model once however many replicas ask for it,
make it resident, evict the least recently used models that nobody leases when a
budget needs room, keep on disk every blob something still holds, and describe a
resident model's layout so that a client can build tensors.

How it stays fast and right under concurrency (docs/architecture.md):

* Each (model, device) is a small state machine (:mod:`weightd.lifecycle`, pure). The
  node's one lock guards the transitions and the table lookups: microseconds. Every
  fetch, load, unload and hash runs outside it, on a bounded executor of cold work;
  whoever needs that work waits for that work's future alone. A warm Acquire takes the
  lock once, leases the resident view and returns: it never waits for another model's
  fetch, load, eviction or gc.
* Every blob has holders (:class:`~weightd.lifecycle.BlobHolds`): a fetch in progress,
  a load in progress, a residency (which a lease pins). gc, the disk budget and verify
  delete or quarantine only what nobody holds; a holder that arrives while gc deletes
  its blob waits for gc, then finds it gone and fetches it again.
* A view names its own revision's snapshot directory (``snapshots/.revs/<model>/<rev>``),
  which stays on disk while the revision is resident.
* Serve before durable: a fetch whose files are all written and verified is *ready*
  (:meth:`Node._fetch_ready`); Acquires waiting for it load the model from the
  temporary files at once (same inodes, in the page cache) while the fetch fsyncs and
  renames them; a view names each shard's blob path and, until it is durable, its
  temporary path (a client opens one, then the other). The index knows the model only
  once it is durable. A commit that fails after serving keeps the leases granted (their
  pages are verified), refuses new ones, reports it in Status, and the model is fetched
  again once no lease holds it.

Work that has to wait is written once, as a *plan*: a generator that yields the futures
it waits for and returns its result (:meth:`Node.acquiring`, :meth:`Node.fetching`).
:func:`run_sync` drives one in a thread; the gRPC service drives the same plan on its
event loop without blocking it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import psutil
from fsspec.callbacks import Callback

from weightd.config import Config, format_size
from weightd.errors import (
    FormatError,
    GpuUnavailable,
    IntegrityError,
    ModelInUse,
    SourceNotFound,
    SourceUnavailable,
)
from weightd.formats import ShardLayout
from weightd.landing import Landing
from weightd.leases import Caller, Credentials, Lease, LeaseTable
from weightd.lifecycle import BlobHolds, IllegalTransition, Lifecycle, State, Step
from weightd.metrics import Metrics
from weightd.sources import (
    canonical_url,
    check_allowed,
    check_not_cache,
    model_name,
    open_source,
)
from weightd.store import Fetcher, GcPlan, ModelFile, ModelRecord, Snapshot, Store, VerifyReport
from weightd.store.fetch import Ready
from weightd.tiers import Blob, CudaTier, HostTier, ShardExport, Tier
from weightd.tiers.base import Detached, Reservation
from weightd.tiers.budget import parse_gpu_budget, plan_eviction
from weightd.tiers.cuda import device_uuid

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A piece of work that may wait: yields the futures it waits for, returns its result.
Plan = Generator["concurrent.futures.Future[Any]", None, T]

#: How long a stopping daemon waits for each write-back to the mirror in progress (its
#: lock is then left to go stale and be taken over).
MIRROR_CLOSE_SECONDS = 10.0

#: Seconds between writes of the models' last-used times to the index (see
#: :meth:`Node.flush_touches`): the disk tier's LRU needs seconds, not every Acquire.
TOUCH_FLUSH_INTERVAL = 5.0

#: Threads that resolve local sources' links (see :meth:`Node._resolving`): as many
#: Acquires of paths on hung mounts as this wait at once before others queue behind them.
NAME_WORKERS = 4

#: Rounds of plan → wait → plan again one Acquire may take (a round ends when the work
#: it waited for ends: a fetch, a load, an eviction, a gc). Far more than any real
#: sequence needs; a model that keeps changing under its acquirer fails instead.
MAX_ROUNDS = 32


def _is_local(source: str) -> bool:
    """Whether a reference names a local path (a plain path, file:// or local://)."""
    scheme, sep, _ = source.strip().partition("://")
    return not sep or scheme.lower() in ("file", "local")


def _started_pool(workers: int, name: str) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool whose threads all run from the start. ThreadPoolExecutor starts them
    one at a time, whenever a task finds none idle: under load the count creeps up to
    ``workers`` (each a stack mapping more: a leak to whoever counts the daemon's maps).
    Each of ``workers`` tasks waits at a barrier until all run, so each needs a thread."""
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=name)
    gate = threading.Barrier(workers)
    for started in [pool.submit(gate.wait, 30.0) for _ in range(workers)]:
        started.result()
    return pool


def _record_of(ready: Ready) -> ModelRecord:
    """The index's record-to-be of a ready fetch."""
    now = time.time()
    files = tuple(ready.files[rel] for rel in sorted(ready.files))
    return ModelRecord(ready.name, ready.source, ready.revision, now, now, files)


def _ended(future: concurrent.futures.Future[Any]) -> concurrent.futures.Future[None]:
    """A future done (with None) once ``future`` is, whether it succeeded or not."""
    ended: concurrent.futures.Future[None] = concurrent.futures.Future()
    future.add_done_callback(lambda _: ended.set_result(None))
    return ended


def run_sync(plan: Plan[T]) -> T:
    """Drive a plan in this thread: wait for each future it yields; return its result."""
    try:
        future = next(plan)
        while True:
            future.result()
            future = plan.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        plan.close()


@dataclass(frozen=True)
class ShardInfo(ShardExport):
    """One shard of a view: where a client finds it (the tier's export) and its place in
    the model's snapshot. ``pending_path``: while the blob is not durable yet, its
    temporary file (renamed to ``path`` once it is: open one, then the other)."""

    relpath: str = ""
    pending_path: str = ""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int
    offset: int
    length: int


@dataclass(frozen=True)
class Acquired:
    """The answer to an acquire: a lease and where every tensor lives (the view)."""

    lease: Lease
    model: str
    view: View
    fetched: bool
    loaded: bool


@dataclass
class PinState:
    """A pin and how its warm-up is going."""

    source: str
    tier: str
    device: str
    model: str
    state: str = "pending"
    since: float = field(default_factory=time.time)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.source, self.tier, self.device)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one per residency
class View:
    """What every Acquire of a model resident on one device answers: built once, when
    the model is made resident there, from the revision that was loaded. The same
    object is handed out until the model is loaded again, so the service may key what
    it derives from it (its answer message) on the view itself. ``snapshot_path`` is
    that revision's own directory, not the model's moving link."""

    revision: str
    snapshot_path: str
    shards: tuple[ShardInfo, ...]
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def durable(self) -> bool:
        return not any(s.pending_path for s in self.shards)

    def settled(self) -> View:
        """This view once its blobs are durable: the same, without temporary paths."""
        if self.durable:
            return self
        return dataclasses.replace(self, shards=tuple(
            dataclasses.replace(s, pending_path="") for s in self.shards))


@dataclass(frozen=True)
class Resident:
    """A model resident on one device (what List shows)."""

    model: str
    device: str
    tier: str
    bytes: int
    last_used: float
    leases: int


@dataclass(frozen=True)
class VerifyResult:
    """``weightd verify`` through the daemon: the store's report, plus the corrupt blobs
    left in place because something holds them (quarantined once nothing does)."""

    report: VerifyReport
    in_use: tuple[str, ...]
    seconds: float


class _Fanout(Callback):  # type: ignore[misc]
    """Progress of one fetch, for every caller that waits for it (each joins late or
    early: the last size and value are replayed to a new listener)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._listeners: list[Callback] = []

    def subscribe(self, cb: Callback) -> None:
        with self._lock:
            self._listeners.append(cb)
            size, value = self.size, self.value
        if size is not None:
            cb.set_size(size)
        if value:
            cb.relative_update(value)

    def unsubscribe(self, cb: Callback) -> None:
        with self._lock:
            if cb in self._listeners:
                self._listeners.remove(cb)

    def set_size(self, size: int) -> None:
        with self._lock:
            self.size = size
            listeners = list(self._listeners)
        for cb in listeners:
            cb.set_size(size)

    def relative_update(self, inc: int = 1) -> None:
        with self._lock:
            self.value += inc
            listeners = list(self._listeners)
        for cb in listeners:
            cb.relative_update(inc)


@dataclass(eq=False)
class _Job:
    """Cold work in progress (a fetch, a load, an unload) and its future. A fetch also
    names the files it asked for (:func:`_globs`): only a fetch of the same files joins
    it; it has its progress, its :class:`~weightd.landing.Landing` and ``ready``, a future
    done once the model may be served (every file verified; before it is durable), or
    with the fetch's error."""

    future: concurrent.futures.Future[Any]
    progress: _Fanout | None = None
    globs: tuple[Any, ...] | None = None
    landing: Landing | None = None
    ready: concurrent.futures.Future[None] | None = None

    @property
    def servable(self) -> concurrent.futures.Future[Any]:
        """What an Acquire waits for: the model ready to serve (a fetch), or the end."""
        return self.ready if self.ready is not None else self.future


def _globs(include: Sequence[str] | None, exclude: Sequence[str]) -> tuple[Any, ...]:
    """The files a fetch asks for, as a key: two fetches with the same key list the
    same files."""
    return (tuple(include) if include else None, tuple(exclude))


class ColdWork:
    """A bounded pool of threads for the node's cold work: at most ``workers`` run at
    once, the rest wait in order. The node has two, one for fetches and one for loads and
    unloads, so that a load of a cached model never queues behind slow downloads. The
    RPC threads (or the service's event loop) only wait for the futures.

    Its threads are daemon threads, unlike ``ThreadPoolExecutor``'s, which the
    interpreter joins at exit: a fetch from a stalled source must not hold up a SIGTERM
    for its retries' worth of minutes (see :meth:`shutdown`).
    """

    def __init__(self, workers: int, *, name: str = "weightd-cold") -> None:
        if workers < 1:
            raise ValueError(f"cold work needs at least one worker, got {workers}")
        self.workers = workers
        self.name = name
        self._queue: queue.SimpleQueue[tuple[concurrent.futures.Future[Any],
                                             Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue())
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, work: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the node is closing")
            self._queue.put((future, work, args))
            if len(self._threads) < self.workers:
                thread = threading.Thread(target=self._run, daemon=True,
                                          name=f"{self.name}-{len(self._threads)}")
                self._threads.append(thread)
                thread.start()
        return future

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, work, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work(*args))
            except BaseException as e:  # handed to whoever waits for the future
                future.set_exception(e)
            # an idle worker keeps nothing of its last job alive (a fetch's landing holds
            # its shards' layouts: tens of MiB for a model of 100,000 tensors)
            item = future = work = args = None  # type: ignore[assignment]

    def shutdown(self, timeout: float) -> bool:
        """Cancel what has not started; wait up to ``timeout`` seconds for what runs.
        Returns whether every worker finished."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)


class _NeedsFetch(Exception):
    """A load found a blob of its record missing: the model must be fetched again."""


class Node:
    """The daemon's state and decisions. Thread-safe; one per cache."""

    def __init__(self, config: Config, store: Store, metrics: Metrics | None = None) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics or Metrics(process=False)
        self.fetcher = Fetcher(store, config)
        self.host = HostTier(lock=config.host_mlock)
        self.host_budget = config.host_budget or psutil.virtual_memory().total // 2
        self.cuda = CudaTier(staging_buffers=config.staging_buffers,
                             staging_buffer_size=config.staging_buffer_size,
                             register_host=config.gpu_register_host)
        self.credentials = Credentials()
        self.leases = LeaseTable(self.credentials, on_end=self._lease_ended)
        self.metrics.count_leases(self.leases.on_tier)
        self.metrics.set_budget("host", "cpu", self.host_budget)
        if config.disk_budget is not None:
            self.metrics.set_budget("disk", "disk", config.disk_budget)
        self.started = time.time()
        # One lock for every decision below; never held while anything waits on I/O.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # gc or verify let blobs go
        self._life = Lifecycle()
        self._holds = BlobHolds()
        self._deleting: set[str] = set()   # digests gc or verify is removing right now
        self._corrupt: set[str] = set()    # digests verify found damaged while held
        self._jobs: dict[tuple[str, ...], _Job] = {}
        self._gc_done: concurrent.futures.Future[None] | None = None
        self._gc_guard = threading.Lock()      # one gc at a time (it plans, then deletes)
        self._verify_guard = threading.Lock()  # one verify at a time
        # cold work: fetches on one pool, loads and unloads on another (a load of a
        # cached model must not wait for downloads)
        self._cold = {"fetch": ColdWork(config.fetch_workers, name="weightd-fetches"),
                      "slot": ColdWork(config.load_workers, name="weightd-loads")}
        # a local source's links are resolved here, off the caller's thread (the event
        # loop): a path on a hung NFS or FUSE mount stalls only the Acquires of such paths
        self._names = _started_pool(NAME_WORKERS, "weightd-names")
        self._ids = itertools.count(1)
        self._tiers: dict[str, Tier] = {HostTier.DEVICE: self.host}
        self._budgets: dict[str, int] = {HostTier.DEVICE: self.host_budget}
        self._ready: dict[str, Ready] = {}  # model -> its fetch's verified, not durable bytes
        self._not_durable: dict[str, str] = {}  # model -> why its served bytes are not
        self._pins: dict[tuple[str, str, str], PinState] = {}
        self._warm_queue: queue.Queue[tuple[str, str, str] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._touch_lock = threading.Lock()
        self._touched: dict[str, float] = {}  # model -> last used, not yet in the index
        for record in store.index.models():
            self._life.cached(record.name, record.revision)
        self.disk_bytes = 0
        self._count_disk()

    def start(self) -> None:
        """Start the lease reaper, the GPU tier (if any), the housekeeping, and re-warm
        the recorded pins."""
        self.leases.start()
        ok, why = self.cuda.start()
        log.info("cuda tier: %s", why if not ok else "available")
        if ok:
            for d in self.cuda.devices():
                device = "cuda:" + d.uuid
                self._tiers[device] = self.cuda
                self._budgets[device] = self.gpu_budget(d.uuid)
                self.metrics.set_budget("cuda", d.uuid, self._budgets[device])
        for pin in self.store.index.pins():
            state = PinState(pin.source, pin.tier, pin.device, model_name(pin.source))
            self._pins[state.key] = state
            self._warm_queue.put(state.key)
        for target, name in ((self._warm_loop, "weightd-warm"),
                             (self._housekeeping, "weightd-housekeeping")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self._stop.set()
        self._warm_queue.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        deadline = time.monotonic() + 10.0
        finished = all([pool.shutdown(timeout=max(0.0, deadline - time.monotonic()))
                        for pool in self._cold.values()])
        self._names.shutdown(wait=False, cancel_futures=True)
        self.leases.stop()
        self.fetcher.close(timeout=MIRROR_CLOSE_SECONDS)
        self.flush_touches()
        if finished:
            self.cuda.close()
            self.host.close()
        else:  # a load may still write into them: the process's exit frees them
            log.warning("cold work still running at close: leaving its memory to the exit")
        self.credentials.close()

    def _housekeeping(self) -> None:
        """Write last-used times to the index now and then (never on a warm Acquire)."""
        while not self._stop.wait(TOUCH_FLUSH_INTERVAL):
            try:
                self.flush_touches()
            except Exception:  # noqa: BLE001 - a failed write is retried next round
                log.exception("writing last-used times to the index failed")

    # devices ------------------------------------------------------------------------------

    def _tier_of(self, device: str) -> Tier:
        """The tier serving ``device`` ("cpu" or "cuda:<uuid>").

        Raises:
            GpuUnavailable: a CUDA device the daemon cannot serve (with the reason).
        """
        tier = self._tiers.get(device)
        if tier is not None:
            return tier
        if not self.cuda.available:
            raise GpuUnavailable(f"{device}: the CUDA tier is unavailable: {self.cuda.reason}")
        self.cuda.resolve(device_uuid(device))  # names the devices it does see
        raise GpuUnavailable(f"{device}: not served by this daemon")

    def gpu_budget(self, uuid: str) -> int:
        return parse_gpu_budget(self.config.gpu_budget, self.cuda.total_bytes(uuid))

    def budget(self, device: str) -> int:
        return self._budgets[device]

    def devices(self) -> list[tuple[Tier, str]]:
        """Every (tier, device) the node serves."""
        return [(tier, device) for device, tier in self._tiers.items()]

    # pins (the warm pool) ---------------------------------------------------------------

    def pin(self, source: str, *, tier: str = "host", device: str = "cpu") -> str:
        """Keep a model on a tier ("disk", "host" or "cuda" with ``device``
        "cuda:<uuid>"); recorded in the index, warmed in the background."""
        device = _check_pin_device(tier, device)
        if tier == "cuda":
            self._tier_of(device)
        url, name = self._resolve_known(source)
        record = self.store.index.model(name)
        if record is None or not self.store.model_complete(record):
            # a reference that resolves to nothing fails now, with the reason (not found,
            # cannot connect, no credentials), and no pin is recorded
            with open_source(url, self.config) as src:
                src.list_files()
        state = PinState(url, tier, device, name)
        self.store.index.add_pin(url, tier, device)
        with self._lock:
            self._pins.setdefault(state.key, state)
        self._warm_queue.put(state.key)
        return name

    def unpin(self, source: str, *, tier: str = "host", device: str = "cpu") -> bool:
        device = _check_pin_device(tier, device)
        url, _ = self._resolve_known(source)
        removed = self.store.index.remove_pin(url, tier, device)
        with self._lock:
            removed = self._pins.pop((url, tier, device), None) is not None or removed
        return removed

    def pins(self) -> list[PinState]:
        with self._lock:
            return sorted(self._pins.values(), key=lambda p: p.since)

    def _pinned_on(self, device: str) -> set[str]:
        """Models a pin keeps resident on ``device``. Caller holds the lock."""
        return {p.model for p in self._pins.values() if p.tier != "disk" and p.device == device}

    def _warm_loop(self) -> None:
        while (key := self._warm_queue.get()) is not None:
            with self._lock:
                state = self._pins.get(key)
            if state is None:
                continue  # unpinned meanwhile
            state.state = "warming"
            try:
                if state.tier == "disk":
                    run_sync(self.fetching(state.source, only_if_absent=True))
                else:
                    run_sync(self.acquiring(state.source, device=state.device))
                state.state = "resident"
                log.info("pinned %s is resident on the %s tier", state.model, state.tier)
            except Exception as e:  # a pin that cannot warm is reported, not fatal
                state.state = f"failed: {e}"
                log.warning("pin of %s on %s failed: %s", state.source, state.tier, e)

    # names --------------------------------------------------------------------------------

    def resolve(self, source: str) -> tuple[str, str]:
        """Canonical URL and model name of a reference, checked against allowed_sources
        (and never the cache itself)."""
        url = canonical_url(source)
        check_allowed(url, self.config.allowed_sources)
        check_not_cache(url, self.config.cache_dir)
        return url, model_name(url)

    def _resolving(self, source: str) -> Plan[tuple[str, str]]:
        """:meth:`resolve` as a plan: a local path's (which reads the file system to
        resolve its links) on the names pool, so that the plan's driver (the event loop)
        never waits on a hung mount; any other reference's at once. Never cached: a link
        may change between two calls, and allowed_sources is checked on what it is now."""
        if not _is_local(source):
            return self.resolve(source)
        future = self._names.submit(self.resolve, source)
        yield future
        return future.result()

    def _resolve_known(self, source: str) -> tuple[str, str]:
        """:meth:`resolve`, where a model's name as List shows it stands for the source it
        was fetched from (as :meth:`evict` takes names)."""
        record = self.store.index.model(source) if "://" not in source else None
        return self.resolve(record.source if record is not None else source)

    # cold work: the executor and its jobs ---------------------------------------------------

    def _submit(self, key: tuple[str, ...], work: Callable[..., Any], *args: Any,
                progress: _Fanout | None = None, landing: Landing | None = None,
                ready: concurrent.futures.Future[None] | None = None) -> _Job:
        """Start ``work`` as the job ``key``, on the pool of its kind (``key[0]``: "fetch"
        or "slot"). Caller holds the lock and has made the transition that says the work
        is under way; ``work`` makes the one that says it ended, and drops the job, under
        the lock, before it returns."""
        job = _Job(self._cold[key[0]].submit(work, key, *args), progress, landing=landing,
                   ready=ready)
        self._jobs[key] = job
        return job

    def _end_job(self, key: tuple[str, ...]) -> None:
        """Caller holds the lock."""
        self._jobs.pop(key, None)

    # fetch --------------------------------------------------------------------------------

    def fetch(self, source: str, *, include: Sequence[str] | None = None,
              exclude: Sequence[str] = (), callback: Callback | None = None) -> Snapshot:
        """Fetch (or refresh) a model into the cache; concurrent calls fetch once."""
        snap = run_sync(self.fetching(source, include=include, exclude=exclude,
                                      callback=callback))
        if snap is None:  # pragma: no cover - only "fetch if absent" answers None
            raise SourceNotFound(f"{source}: nothing was fetched")
        return snap

    def fetching(self, source: str, *, include: Sequence[str] | None = None,
                 exclude: Sequence[str] = (), callback: Callback | None = None,
                 only_if_absent: bool = False) -> Plan[Snapshot | None]:
        """The plan of a fetch: start it (or join the one running) and wait for it.

        With ``only_if_absent``, a model already cached is not fetched again (returns
        None).
        """
        _, name = yield from self._resolving(source)
        for _ in range(MAX_ROUNDS):
            with self._lock:
                disk = self._life.disk_of(name)
                if disk.state is State.REMOVING:
                    wait: concurrent.futures.Future[Any] | None = self._gc_done
                    job = None
                elif disk.state is State.CACHED and only_if_absent:
                    return None
                else:
                    job = self._jobs.get(("fetch", name))
                    if (job is not None and not only_if_absent and job.ready is not None
                            and job.ready.done()):
                        # it read the source's listing before it was ready (served, now
                        # committing): a Fetch asked now wants what the source holds now,
                        # so it waits for that one's end (whatever it was), then fetches
                        wait, job = _ended(job.future), None
                    else:
                        wait, job = self._fetch_for(name, source, include, exclude)
            if job is None:
                if wait is not None:
                    yield wait
                continue
            if callback is not None and job.progress is not None:
                job.progress.subscribe(callback)
            try:
                yield job.future
            finally:
                if callback is not None and job.progress is not None:
                    job.progress.unsubscribe(callback)
            return job.future.result()  # type: ignore[no-any-return]
        raise SourceUnavailable(f"{source}: gc kept removing the model; try again")

    def _fetch_for(self, name: str, source: str, include: Sequence[str] | None,
                   exclude: Sequence[str]) -> tuple[concurrent.futures.Future[Any], _Job | None]:
        """The fetch of these files and the future to wait for (the model servable): the
        one running when it asks for the same files (joined), a new one when none runs;
        when one runs for other files (other include/exclude globs), no job yet: the
        future to wait for before asking again (its outcome is not this caller's). Caller
        holds the lock."""
        job = self._jobs.get(("fetch", name))
        if job is None:
            job = self._start_fetch(name, source, include, exclude)
        elif job.globs != _globs(include, exclude):
            return _ended(job.future), None
        return job.servable, job

    def _start_fetch(self, name: str, source: str, include: Sequence[str] | None,
                     exclude: Sequence[str], *, streamed: bool = False) -> _Job:
        """Caller holds the lock. ``streamed``: a replica streams the model as it lands
        (an AcquireStream starts the fetch): its first tensor is fetched first (see
        ``Fetcher.fetch``)."""
        # a refresh of a cached model is never streamed (see :meth:`landing`): its landing
        # then reads no layout of the files in the cache (a warm fetch parses no header)
        streamable = self._life.disk_of(name).state is not State.CACHED
        self._life.begin_fetch(name)
        progress = _Fanout()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        landing = Landing(self.fetcher.layout if streamable else None, self.store.blob_path,
                          lambda r: self._fetch_ready(name, r, ready))
        job = self._submit(("fetch", name), self._fetch_job, name, source, include,
                           tuple(exclude), progress, landing, ready, streamed,
                           progress=progress,
                           landing=landing, ready=ready)
        job.globs = _globs(include, exclude)
        return job

    def landing(self, source: str, *, include: Sequence[str] | None = None,
                exclude: Sequence[str] = (), stream: bool = True,
                ) -> Plan[tuple[str, Landing | None, bool]]:
        """The plan that finds the model's name and the landing of its download, to
        stream it as it lands: the running fetch's (started now when the model is
        nowhere: then the third value is True), or None when nothing lands (it is cached,
        resident, being refreshed or removed, or the running fetch asks for other files:
        an Acquire serves it whole), or when ``stream`` is False (the name only). A plan,
        so that a local path is resolved off the event loop (see :meth:`_resolving`)."""
        _, name = yield from self._resolving(source)
        if not stream:
            return name, None, False
        with self._lock:
            disk = self._life.disk_of(name)
            if disk.state is State.ABSENT:
                started = self._start_fetch(name, source, include, exclude, streamed=True)
                return name, started.landing, True
            job = self._jobs.get(("fetch", name))
            if (disk.state is State.FETCHING and disk.before_fetch is not State.CACHED
                    and job is not None and job.globs == _globs(include, exclude)):
                return name, job.landing, False
        return name, None, False

    def _fetch_ready(self, name: str, ready: Ready,
                     future: concurrent.futures.Future[None]) -> None:
        """Every file of the fetch is verified: it may be served from its temporary files
        (the fetch makes them durable next). From the fetch's thread."""
        with self._lock:
            self._ready[name] = ready
            self._life.fetch_ready(name, ready.revision)
        log.info("%s: every file verified; served from %d temporary file(s) until they are "
                 "durable", name, len(ready.pending))
        future.set_result(None)

    def _fetch_job(self, key: tuple[str, ...], name: str, source: str,
                   include: Sequence[str] | None, exclude: Sequence[str],
                   progress: _Fanout, landing: Landing,
                   ready: concurrent.futures.Future[None], streamed: bool) -> Snapshot:
        holder = ("fetch", name, next(self._ids))
        try:
            snap = self.fetcher.fetch(source, include=include, exclude=exclude,
                                      callback=progress,
                                      hold=lambda digest: self._hold(holder, [digest]),
                                      events=landing, streamed=streamed)
            record = self.store.index.model(snap.name)
            if record is None:  # pragma: no cover - a fetch records the model or raises
                raise SourceNotFound(f"{source}: nothing was fetched")
        except BaseException as e:
            with self._lock:
                broken = self._life.end_fetch(name, None)
                self._ready.pop(name, None)
                if broken:
                    self._not_durable[name] = str(e)
                self._holds.release(holder)
                self._end_job(key)
            if broken:
                log.error("%s: served on %s from verified bytes that could not be made "
                          "durable (%s); its leases stay valid, it gets no new lease, and it "
                          "is fetched again once none holds it", name, ", ".join(broken), e)
            landing.failed(e)
            if not ready.done():
                ready.set_exception(e)
            raise
        with self._lock:
            stale = self._life.end_fetch(name, record.revision)
            self._ready.pop(name, None)
            self._not_durable.pop(name, None)
            for (m, _), slot in self._life.slots.items():
                if m == name and isinstance(slot.view, View):
                    slot.view = slot.view.settled()  # durable: no temporary path any more
            self._holds.release(holder)
            self._end_job(key)
        if not ready.done():  # pragma: no cover - a fetch says "ready" before it commits
            ready.set_result(None)
        if stale:
            log.info("%s: a new revision was fetched; resident on %s in an older one (it is "
                     "reloaded once no lease holds it)", name, ", ".join(stale))
        s = snap.stats
        self.metrics.fetched(snap.source.split("://", 1)[0], s.bytes_origin, s.seconds)
        self.metrics.model_fetched(snap.name, origin=s.bytes_origin, mirror=s.bytes_mirror,
                                   cache=s.bytes_total - s.bytes_fetched)
        self._count_disk()
        self._enforce_disk_budget(keep={name})
        return snap

    def _count_disk(self) -> None:
        """What the blobs take now (Status reads it without touching the disk)."""
        self.disk_bytes = self.store.blob_bytes()
        self.metrics.set_resident("disk", "disk", self.disk_bytes)

    def _hold(self, holder: tuple[Any, ...], digests: Sequence[str],
              revision: tuple[str, str] | None = None) -> None:
        """Add blobs to what ``holder`` holds; waits while gc or verify removes one of
        them (then the caller finds it gone and fetches it again)."""
        with self._changed:
            while self._deleting.intersection(digests):
                self._changed.wait(1.0)
            self._holds.hold(holder, digests, revision)

    # acquire ------------------------------------------------------------------------------

    def acquire(self, source: str, *, device: str, caller: Caller, client_name: str = "",
                include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> Acquired:
        """Make a model resident on ``device`` ("cpu" or "cuda:<GPU UUID>") and lease it
        to ``caller``, waiting in this thread (the service drives :meth:`acquiring`).

        Raises:
            GpuUnavailable: a CUDA device the tier cannot serve (with the reason).
            BudgetExceeded: the model does not fit even after evicting unleased models.
            IntegrityError: the resident copy is known to be damaged and still leased.
            SourceNotFound, SourceUnavailable, NotPermitted, FormatError: from the fetch.
        """
        got = run_sync(self.acquiring(source, device=device, caller=caller,
                                      client_name=client_name, include=include,
                                      exclude=exclude))
        if got is None:  # pragma: no cover - a caller always gets a lease or an error
            raise RuntimeError("no lease")
        return got

    def acquiring(self, source: str, *, device: str, caller: Caller | None = None,
                  client_name: str = "", include: Sequence[str] | None = None,
                  exclude: Sequence[str] = (),
                  check: Callable[[str, View], None] | None = None,
                  lease_id: str | None = None) -> Plan[Acquired | None]:
        """The plan of an Acquire: until the model is resident on ``device``, start (or
        join) the work it needs and wait for it; then lease its view to ``caller`` (none:
        only make it resident, as a pin's warm-up does), as ``lease_id`` when the caller
        proposed one or an AcquireStream named it first (see
        :meth:`~weightd.leases.LeaseTable.add`).

        ``check(model, view)`` runs before the lease is granted (the service checks the
        answer's size there): what it raises leaves no lease.
        """
        device = _device_name(device or "cpu")
        tier = self._tier_of(device)  # before any fetch: fail fast
        _, name = yield from self._resolving(source)
        t0 = time.perf_counter()
        fetched = loaded = wanted = False
        refetch = False  # the fetch it waited for brought other files than it asks for
        try:
            for _ in range(MAX_ROUNDS):
                with self._lock:
                    step = self._life.plan_acquire(name, device)
                    if step is not Step.LEASE and not wanted:
                        # from now on nothing evicts the slot under this Acquire (a warm
                        # one needs no such care: it leases at once, or plans again)
                        self._life.want(name, device)
                        wanted = True
                    view: Any = None
                    wait: concurrent.futures.Future[Any] | None = None
                    if step is Step.LEASE:
                        view = self._life.slots[(name, device)].view
                    elif step is Step.REFUSE:
                        why = self._not_durable.get(name)
                        raise IntegrityError(
                            f"{name}: its resident copy on {device} is not durable ({why}): "
                            "leases granted keep its verified pages; it is fetched again "
                            "once no lease holds it" if why else
                            f"{name}: a blob of its resident copy on {device} is damaged "
                            "(weightd verify); it is fetched again once no lease holds it")
                    elif step is Step.WAIT_SLOT:
                        wait = self._jobs[("slot", name, device)].future
                    elif step is Step.WAIT_REMOVAL:
                        wait = self._gc_done
                    elif step in (Step.FETCH, Step.WAIT_FETCH) or (step is Step.LOAD
                                                                   and refetch):
                        started = ("fetch", name) not in self._jobs
                        wait, job = self._fetch_for(name, source, include, exclude)
                        fetched = fetched or (started and job is not None)
                        refetch = job is None
                    else:  # LOAD or RELOAD
                        wait = self._start_load(name, device, reload=step is Step.RELOAD)
                        loaded = True
                if view is None:
                    if wait is not None:
                        yield wait
                    continue
                if caller is None:
                    return None
                if check is not None:
                    check(name, view)
                got = self._lease(name, device, tier, view, caller, client_name,
                                  fetched, loaded, lease_id)
                if got is not None:
                    self.metrics.observe_acquire(tier.name, time.perf_counter() - t0,
                                                 hit=not loaded)
                    self.metrics.lookup("disk", hit=not fetched)
                    self._touch(name)
                    return got
            raise SourceUnavailable(f"{name}: it kept changing while being acquired on "
                                    f"{device}; try again")
        finally:
            if wanted:
                with self._lock:
                    self._life.unwant(name, device)

    def _lease(self, name: str, device: str, tier: Tier, view: View, caller: Caller,
               client_name: str, fetched: bool, loaded: bool,
               lease_id: str | None = None) -> Acquired | None:
        """Lease ``view`` if it is still the resident one (None: plan again)."""
        with self._lock:
            slot = self._life.slots.get((name, device))
            if (slot is None or slot.state is not State.RESIDENT or slot.view is not view
                    or slot.corrupt):
                return None
            lease = self.leases.add(name, tier.name, device, caller, client_name,
                                    view.revision, lease_id=lease_id)
            self._life.lease(name, device, time.time())
        return Acquired(lease, name, view, fetched, loaded)

    def release(self, lease_id: str, caller: Caller) -> Lease:
        """End a lease (see :meth:`~weightd.leases.LeaseTable.release` for who may)."""
        return self.leases.release(lease_id, caller)

    def _lease_ended(self, lease: Lease, why: str) -> None:
        with self._lock:
            try:
                self._life.unlease(lease.model, lease.device, time.time())
            except IllegalTransition:  # pragma: no cover - a leased slot never goes
                log.error("lease %s ended on %s (%s), which has no lease", lease.lease_id,
                          lease.model, lease.device)

    # load and unload ----------------------------------------------------------------------

    def _start_load(self, name: str, device: str, *,
                    reload: bool) -> concurrent.futures.Future[Any]:
        """Caller holds the lock."""
        if reload:
            self._life.begin_unload(name, device)
        else:
            self._life.begin_load(name, device)
        return self._submit(("slot", name, device), self._load_job, name, device,
                            reload).future

    def _load_job(self, key: tuple[str, ...], name: str, device: str, reload: bool) -> None:
        tier = self._tiers[device]
        holder = ("load", name, device)
        reservation = None
        try:
            if reload:
                with self._lock:
                    detached = tier.detach(name, device)
                self._finish_unload(name, device, detached, reload=True)
            record, pending = self._record_to_load(name)
            if record is None:
                raise _NeedsFetch(name)
            self._hold(holder, [f.digest for f in record.files], (name, record.revision))
            self._drop_corrupt(holder, record)
            if not all(f.digest in pending or self.store.has_blob(f.digest)
                       for f in record.files):
                raise _NeedsFetch(name)
            shards = [f for f in record.files if f.relpath.endswith(".safetensors")]
            # every shard validated before it becomes resident: the layouts its fetch
            # parsed (the fetcher's bounded cache), else parsed now (from the blob, or its
            # temporary file while it is not durable), outside the lock; kept only until
            # the view is built
            layouts = [self.fetcher.layout(f.digest, pending.get(f.digest)) for f in shards]
            blobs = [Blob(f.digest, self.store.blob_path(f.digest), f.size,
                          pending.get(f.digest)) for f in shards]
            with self._lock:
                reservation, victims = self._make_room(tier, device, name, blobs)
            for victim, detached in victims:
                self._finish_unload(victim, device, detached)
                log.info("evicted %s from %s (%s) to make room", victim, device,
                         format_size(detached.nbytes))
            tier.fill(reservation)
            reservation = None
            view = self._view(name, record.revision, shards, layouts, tier, device, pending)
            del layouts  # the view has what the answer needs
        except _NeedsFetch:
            with self._lock:
                self._life.end_load(name, device, revision=None)
                self._life.forget_cached(name)
                self._drop_layouts(self._holds.release(holder))
                self._end_job(key)
            log.info("%s: some of its blobs are gone (gc or quarantine): fetching it again",
                     name)
            return
        except BaseException:
            if reservation is not None:
                tier.cancel(reservation)
            with self._lock:
                detached = tier.detach(name, device)  # what a fill made, if it got so far
                self._life.end_load(name, device, revision=None)
                self._drop_layouts(self._holds.release(holder))
                self._end_job(key)
            tier.free(detached)
            raise
        with self._lock:
            lost = False
            ready = self._ready.get(name)
            if pending and (ready is None or ready.revision != record.revision):
                # its fetch ended while this loaded: durable (the index has the revision),
                # or its commit failed (verified pages, not durable: no new lease)
                lost = self._life.disk_of(name).revision != record.revision
                if lost:
                    self._not_durable.setdefault(name, "its fetch failed to commit it")
                else:
                    view = view.settled()
            self._holds.move(holder, ("resident", name, device))
            self._life.end_load(name, device, revision=record.revision, view=view,
                                now=time.time())
            if lost or self._corrupt.intersection(s.digest for s in view.shards):
                self._life.mark_corrupt(name, device)
            self._end_job(key)
        self._update_resident_metric(tier, device)

    def _record_to_load(self, name: str) -> tuple[ModelRecord | None, dict[str, Path]]:
        """What a load makes resident: the running fetch's verified revision when it is
        ready (with the temporary file of each blob not yet durable), else the index's."""
        with self._lock:
            ready = self._ready.get(name)
        if ready is None:
            return self.store.index.model(name), {}
        return _record_of(ready), dict(ready.pending)

    def not_durable(self) -> list[tuple[ModelRecord, str]]:
        """The models whose fetch is ready and not yet durable (served from their temp
        files; the index does not name them, or names an older revision), each with its
        revision's snapshot directory."""
        with self._lock:
            readies = list(self._ready.values())
        return [(_record_of(r), r.snapshot) for r in readies]

    def _drop_corrupt(self, holder: tuple[Any, ...], record: ModelRecord) -> None:
        """Quarantine the blobs of ``record`` that verify found damaged, now that only
        this load holds them; then the load needs a fetch."""
        with self._lock:
            bad = [f.digest for f in record.files if f.digest in self._corrupt]
            free = [d for d in bad if self._holds.holders(d) == [holder]]
            self._deleting.update(free)
        if bad and len(free) < len(bad):
            raise IntegrityError(f"{record.name}: damaged blobs still in use elsewhere: "
                                 + ", ".join(d[:16] for d in bad if d not in free))
        try:
            for digest in free:
                try:
                    dest: object = self.store.quarantine(digest)
                except FileNotFoundError:  # gone already: forgetting it is enough
                    self.store.index.forget_blob(digest)
                    dest = "it was gone"
                log.warning("%s: damaged blob %s quarantined (%s); fetching it again",
                            record.name, digest[:16], dest)
        finally:
            with self._changed:
                self._deleting.difference_update(free)
                self._corrupt.difference_update(free)
                self._changed.notify_all()
        if free:
            self._count_disk()
            raise _NeedsFetch(record.name)

    def _make_room(self, tier: Tier, device: str, name: str, blobs: Sequence[Blob],
                   ) -> tuple[Reservation, list[tuple[str, Detached]]]:
        """Reserve model ``name``'s ``blobs`` on the device, after choosing the models to
        evict so that they fit its budget (least recently used first, never leased,
        wanted or pinned ones); detach those: they are UNLOADING now, freed by the
        caller outside the lock. A blob the load shares with a victim is neither needed
        nor freed: it is reserved before the victims are detached, so it stays mapped.
        Caller holds the lock.

        Raises:
            BudgetExceeded: even evicting every evictable model would not make room.
        """
        pinned = self._pinned_on(device)
        keep = {b.digest for b in blobs}
        candidates = [(last, m, tier.freeable_bytes(m, device, keep=keep), False)
                      for last, m in self._life.evictable(device, exclude=name,
                                                          pinned=pinned)]
        candidates += [(0.0, m, tier.freeable_bytes(m, device, keep=keep), True)
                       for m in self._life.blocked(device, exclude=name, pinned=pinned)]
        chosen = plan_eviction(tier.missing_bytes(device, blobs), tier.used(device),
                               self._budgets[device], candidates,
                               what=f"{tier.name} tier ({device})")
        reservation = tier.reserve(name, device, blobs)
        return reservation, [(m, self._begin_unload(m, device)) for m in chosen]

    def _begin_unload(self, name: str, device: str) -> Detached:
        """Move a resident slot to UNLOADING (no new lease) and detach its blobs; waiters
        wait for :meth:`_finish_unload`. Caller holds the lock."""
        self._life.begin_unload(name, device)
        self._jobs[("slot", name, device)] = _Job(concurrent.futures.Future())
        return self._tiers[device].detach(name, device)

    def _finish_unload(self, name: str, device: str, detached: Detached, *,
                       reload: bool = False) -> None:
        """Free what an unload detached (I/O), then record it. With ``reload`` the slot
        goes on to LOADING (the caller is the load job, which owns the slot's job)."""
        tier = self._tiers[device]
        try:
            tier.free(detached)
        finally:
            with self._lock:
                self._life.end_unload(name, device, reload=reload)
                self._drop_layouts(self._holds.release(("resident", name, device)))
                job = None if reload else self._jobs.pop(("slot", name, device), None)
            if job is not None:
                job.future.set_result(None)
        if detached.blobs:
            self.metrics.evicted(tier.name)
        self._update_resident_metric(tier, device)

    def _view(self, name: str, revision: str, shards: Sequence[ModelFile],
              layouts: Sequence[ShardLayout], tier: Tier, device: str,
              pending: dict[str, Path]) -> View:
        """The answer's shards, tensors and metadata for a model just made resident
        (``layouts``: the shards' parsed headers, in order; ``pending``: the temporary
        files of its blobs that are not durable yet)."""
        exports = {e.digest: e for e in tier.export(name, device)}
        infos = tuple(ShardInfo(**dataclasses.asdict(exports[f.digest]), relpath=f.relpath,
                                pending_path=str(pending.get(f.digest, "")))
                      for f in shards)
        tensors: list[TensorEntry] = []
        metadata: dict[str, str] = {}
        for i, layout in enumerate(layouts):
            metadata.update(layout.metadata)
            tensors.extend(TensorEntry(t.name, t.dtype, t.shape, i, t.offset, t.nbytes)
                           for t in layout.tensors)
        return View(revision, str(self.store.revision_path(name, revision)), infos,
                    tuple(tensors), metadata)

    def _drop_layouts(self, digests: Collection[str]) -> None:
        """Drop from the fetcher's layout cache (the one place parsed layouts live) those
        of blobs nothing holds any more (parsed again if the model is loaded again).
        Caller holds the lock."""
        for digest in digests:
            self.fetcher.layouts.drop(digest)

    def _update_resident_metric(self, tier: Tier, device: str) -> None:
        self.metrics.set_resident(tier.name, tier.label(device), tier.used(device))

    # evict --------------------------------------------------------------------------------

    def evict(self, source_or_name: str, *, tier: str | None = None) -> int:
        """Drop a model from host memory and/or GPUs (never while leased, pinned or being
        acquired there); ``tier`` None means every tier but disk. Returns the bytes freed."""
        name = source_or_name
        with self._lock:
            known = any(m == name for m, _ in self._life.slots)
        if not known:
            _, name = self.resolve(source_or_name)
        with self._lock:
            slots = [(d, s) for (m, d), s in self._life.slots.items() if m == name and s.busy
                     and (tier is None or self._tiers[d].name == tier)]
            for device, slot in slots:
                if slot.leases:
                    raise ModelInUse(f"{name}: leased on {device} by {slot.leases} "
                                     "process(es)")
                if name in self._pinned_on(device):
                    raise ModelInUse(f"{name}: pinned on {device} (unpin it first)")
                if slot.state is not State.RESIDENT or slot.waiting:
                    raise ModelInUse(f"{name}: being loaded or acquired on {device}")
            unloads = [(device, self._begin_unload(name, device)) for device, _ in slots]
        freed = 0
        for device, detached in unloads:
            self._finish_unload(name, device, detached)
            freed += detached.nbytes
        return freed

    # gc and the disk budget ---------------------------------------------------------------

    def _enforce_disk_budget(self, *, keep: Collection[str] = ()) -> None:
        budget = self.config.disk_budget
        if budget is None:
            return
        plan = self.gc(budget, keep=keep)
        if plan.models or plan.blobs:
            log.info("disk budget %s: evicted %s (%s)", format_size(budget),
                     ", ".join(plan.models) or "orphan blobs", format_size(plan.freed))
            self.metrics.evicted("disk", len(plan.models))

    def gc(self, budget: int, *, dry_run: bool = False, keep: Collection[str] = ()) -> GcPlan:
        """Remove least recently used models and orphan blobs until the blobs take at
        most ``budget`` bytes, never what something holds or uses.

        The plan is made outside the lock from the holds of the moment, then claimed
        under it (planned again if something took hold of a part meanwhile); while its
        blobs are deleted, whoever wants one waits, then finds it gone.
        """
        with self._gc_guard:
            self.flush_touches()  # rank models by when they were really last used
            for _ in range(3):
                with self._lock:
                    keep_now = self._kept_models(keep)
                    held, revisions = self._holds.digests(), self._holds.revisions()
                plan = self.store.plan_gc(budget, keep=keep_now, held=held,
                                          held_revisions=revisions)
                if dry_run or not (plan.models or plan.blobs or plan.revisions):
                    return plan
                with self._lock:
                    if self._claim(plan, keep):
                        done: concurrent.futures.Future[None] = concurrent.futures.Future()
                        self._gc_done = done
                        break
            else:
                log.info("gc: what it planned kept being taken; trying again later")
                return GcPlan(budget, plan.before, (), (), ())
            try:
                self.store.run_gc(plan)
            finally:
                with self._changed:
                    for name in set(plan.models) | {r.parent.name for r in plan.revisions}:
                        self._life.end_remove(name, removed=name in plan.models)
                    # only gc's own claims: verify's and _drop_corrupt's stay theirs
                    self._deleting.difference_update(d for d, _ in plan.blobs)
                    self._gc_done = None
                    self._changed.notify_all()
                done.set_result(None)
                self._count_disk()
        return plan

    def _kept_models(self, keep: Collection[str]) -> set[str]:
        """Models gc must not remove: in use on any device, being fetched, pinned, or
        named by the caller. Caller holds the lock."""
        return (set(keep) | {m for m in self._life.disk if self._life.in_use(m)}
                | {m for m, _ in self._life.slots} | {p.model for p in self._pins.values()})

    def _claim(self, plan: GcPlan, keep: Collection[str]) -> bool:
        """Take a plan for deletion if nothing it names is held or used now: its models,
        and the models whose old revisions it deletes, go to REMOVING (no fetch or load
        of them starts until gc is done). Caller holds the lock."""
        kept = self._kept_models(keep)
        held, revisions = self._holds.digests(), self._holds.revisions()
        touched = set(plan.models) | {r.parent.name for r in plan.revisions}
        if (kept.intersection(touched) or held.intersection(d for d, _ in plan.blobs)
                or any((r.parent.name, r.name) in revisions for r in plan.revisions)):
            return False
        for name in touched:
            self._life.begin_remove(name)
        self._deleting.update(d for d, _ in plan.blobs)
        return True

    # verify -------------------------------------------------------------------------------

    def verify(self) -> VerifyResult:
        """Rehash every blob (``weightd verify`` through the daemon).

        A corrupt blob that nothing holds is quarantined at once (the next fetch brings
        it again). One that something holds stays where it is: clients map it by path
        and a running model's pages stay valid, so it is not moved under them; no new
        lease is granted on a residency that uses it, and it is quarantined (and fetched
        again) by the first load that finds it held by nothing else.

        Raises:
            ModelInUse: another verify is running.
        """
        if not self._verify_guard.acquire(blocking=False):
            raise ModelInUse("a verify is running already")
        try:
            in_use: list[str] = []
            t0 = time.monotonic()
            report = self.store.verify(claim=lambda d: self._verify_claim(d, in_use))
            self._count_disk()
            return VerifyResult(report, tuple(in_use), time.monotonic() - t0)
        finally:
            self._verify_guard.release()

    @contextlib.contextmanager
    def _verify_claim(self, digest: str, in_use: list[str]) -> Iterator[bool]:
        """Whether verify may quarantine a corrupt blob now (nothing holds it); while it
        does, whoever wants the blob waits."""
        with self._lock:
            free = not self._holds.held(digest) and digest not in self._deleting
            if free:
                self._deleting.add(digest)
            else:
                in_use.append(digest)
                self._corrupt.add(digest)
                for holder in self._holds.holders(digest):
                    kind, *key = cast(tuple[str, ...], holder)
                    if kind == "resident":
                        self._life.mark_corrupt(key[0], key[1])
        try:
            yield free
        finally:
            if free:
                with self._changed:
                    self._deleting.discard(digest)
                    self._changed.notify_all()
            else:
                log.error("corrupt blob %s is in use: left in place; no new lease uses it, "
                          "and it is fetched again once nothing holds it", digest)

    # when models were last used, for the disk tier's LRU ------------------------------

    def _touch(self, name: str) -> None:
        """Note that ``name`` was used now. The index learns it in batches (see
        :meth:`flush_touches`): a warm Acquire writes nothing to SQLite."""
        now = time.time()
        with self._touch_lock:
            self._touched[name] = now

    def last_used(self, name: str, recorded: float) -> float:
        """When model ``name`` was last used: ``recorded`` (the index's) or a use the
        index has not learnt yet (see :meth:`_touch`), whichever is later."""
        with self._touch_lock:
            return max(recorded, self._touched.get(name, 0.0))

    def flush_touches(self) -> None:
        """Write the pending last-used times to the index: every ``TOUCH_FLUSH_INTERVAL``
        from the housekeeping thread, before the disk budget ranks models, and at close.
        A crash loses at most that interval of LRU precision, nothing else."""
        with self._touch_lock:
            touched, self._touched = self._touched, {}
        for name, when in touched.items():
            self.store.index.touch_model(name, when)

    # introspection ----------------------------------------------------------------------

    def residency(self) -> list[Resident]:
        """Every model resident in memory, on each device."""
        with self._lock:
            resident = [(m, d, s.last_used, s.leases) for (m, d), s in self._life.resident()]
        return [Resident(m, d, self._tiers[d].name, self._tiers[d].model_bytes(m, d), last, n)
                for m, d, last, n in resident]

    def problems(self) -> list[str]:
        with self._lock:
            out = [f"{name}: served from memory, not durable on disk ({why}); fetched again "
                   "once no lease holds it" for name, why in sorted(self._not_durable.items())]
        if self.host.lock_problem:
            out.append(f"host tier: {self.host.lock_problem}")
        if not self.cuda.available:
            out.append(f"cuda tier: {self.cuda.reason}")
        return out


def _check_pin_device(tier: str, device: str) -> str:
    """A pin's device must be the tier's: "cpu" for disk and host, "cuda:<uuid>" for
    cuda (a host pin naming a GPU would otherwise warm the model onto that GPU).
    Returns the device's one name (see :func:`_device_name`)."""
    if tier == "cuda" and not device.startswith("cuda:"):
        raise FormatError("request", "a CUDA pin needs device 'cuda:<GPU UUID>'")
    if tier != "cuda" and device != "cpu":
        raise FormatError("request", f"a {tier} pin takes device 'cpu', not {device!r}")
    return _device_name(device)


def _device_name(device: str) -> str:
    """One name per device, the key of residency, leases and pins: "cpu" or
    "cuda:GPU-…" (``cuda:MIG-x``, as nvidia-smi names a MIG instance, is ``cuda:GPU-x``).

    Raises:
        FormatError: a CUDA device not named by UUID.
    """
    return device if device == "cpu" else "cuda:" + device_uuid(device)
