"""The node: what the daemon does, independent of how it is asked (gRPC is in service/).

It composes the store (disk tier), the host tier and the lease table, and owns the
decisions between them: fetch a model once however many replicas ask at the same time,
make it resident, evict the least recently used models that nobody leases when a budget
needs room, and describe a resident model's layout so that a client can build tensors.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import psutil
from fsspec.callbacks import Callback

from weightd.config import Config, format_size
from weightd.errors import FormatError, GpuUnavailable, ModelInUse, SourceNotFound
from weightd.formats import ShardLayout
from weightd.leases import Lease, LeaseTable
from weightd.metrics import Metrics
from weightd.sources import canonical_url, check_allowed, model_name, open_source
from weightd.store import Fetcher, ModelFile, ModelRecord, Snapshot, Store
from weightd.tiers import HostTier
from weightd.tiers.budget import parse_gpu_budget, plan_eviction
from weightd.tiers.cuda import CudaTier, device_uuid

log = logging.getLogger(__name__)

#: How long a stopping daemon waits for each write-back to the mirror in progress (its
#: lock is then left to go stale and be taken over).
MIRROR_CLOSE_SECONDS = 10.0

#: Seconds between writes of the models' last-used times to the index (see
#: :meth:`Node.flush_touches`): the disk tier's LRU needs seconds, not every Acquire.
TOUCH_FLUSH_INTERVAL = 5.0


@dataclass(frozen=True)
class ShardInfo:
    relpath: str
    digest: str
    size: int
    path: str
    ipc_handle: bytes = b""
    device_uuid: str = ""


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
    it derives from it (its answer message) on the view itself."""

    revision: str
    snapshot_path: str
    shards: tuple[ShardInfo, ...]
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.shards)


@dataclass
class _Residency:
    view: View
    last_used: float = field(default_factory=time.time)
    stale: bool = False  # a newer revision was fetched: reload once no lease holds this one


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
        self.leases = LeaseTable(on_end=self._lease_ended)
        self.metrics.count_leases(self.leases.on_tier)
        self.metrics.set_budget("host", "cpu", self.host_budget)
        if config.disk_budget is not None:
            self.metrics.set_budget("disk", "disk", config.disk_budget)
        self.started = time.time()
        self._flights: dict[str, threading.Lock] = {}
        self._flights_guard = threading.Lock()
        self._residency = threading.RLock()
        # (model, device) -> when it was last used; device is "cpu" or "cuda:<uuid>"
        self._resident: dict[tuple[str, str], _Residency] = {}
        self._pins: dict[tuple[str, str, str], PinState] = {}
        self._warm_queue: queue.Queue[tuple[str, str, str] | None] = queue.Queue()
        self._warmer: threading.Thread | None = None
        self._touch_lock = threading.Lock()
        self._touched: dict[str, float] = {}  # model -> last used, not yet in the index
        self._touches_flushed = 0.0  # the first touch writes at once

    def start(self) -> None:
        """Start the lease reaper, the GPU tier (if any) and re-warm the recorded pins."""
        self.leases.start()
        ok, why = self.cuda.start()
        log.info("cuda tier: %s", why if not ok else "available")
        if ok:
            for d in self.cuda.devices():
                self.metrics.set_budget("cuda", d.uuid, self.gpu_budget(d.uuid))
        for pin in self.store.index.pins():
            state = PinState(pin.source, pin.tier, pin.device, model_name(pin.source))
            self._pins[state.key] = state
            self._warm_queue.put(state.key)
        self._warmer = threading.Thread(target=self._warm_loop, name="weightd-warm",
                                        daemon=True)
        self._warmer.start()

    def close(self) -> None:
        self._warm_queue.put(None)
        if self._warmer is not None:
            self._warmer.join(timeout=5)
        self.leases.stop()
        self.fetcher.close(timeout=MIRROR_CLOSE_SECONDS)
        self.flush_touches()
        self.cuda.close()
        self.host.close()

    # pins (the warm pool) ---------------------------------------------------------------

    def pin(self, source: str, *, tier: str = "host", device: str = "cpu") -> str:
        """Keep a model on a tier ("disk", "host" or "cuda" with ``device``
        "cuda:<uuid>"); recorded in the index, warmed in the background."""
        device = _check_pin_device(tier, device)
        if tier == "cuda":
            self._check_device(device)
        url, name = self._resolve_known(source)
        record = self.store.index.model(name)
        if record is None or not self.store.model_complete(record):
            # a reference that resolves to nothing fails now, with the reason (not found,
            # cannot connect, no credentials), and no pin is recorded
            open_source(url, self.config).list_files()
        state = PinState(url, tier, device, name)
        self.store.index.add_pin(url, tier, device)
        with self._residency:
            self._pins.setdefault(state.key, state)
        self._warm_queue.put(state.key)
        return name

    def unpin(self, source: str, *, tier: str = "host", device: str = "cpu") -> bool:
        device = _check_pin_device(tier, device)
        url, _ = self._resolve_known(source)
        removed = self.store.index.remove_pin(url, tier, device)
        with self._residency:
            removed = self._pins.pop((url, tier, device), None) is not None or removed
        return removed

    def _resolve_known(self, source: str) -> tuple[str, str]:
        """:meth:`resolve`, where a model's name as List shows it stands for the source it
        was fetched from (as :meth:`evict` takes names)."""
        record = self.store.index.model(source) if "://" not in source else None
        return self.resolve(record.source if record is not None else source)

    def pins(self) -> list[PinState]:
        with self._residency:
            return sorted(self._pins.values(), key=lambda p: p.since)

    def _pinned(self, name: str, device: str | None = None) -> bool:
        """Whether a pin holds the model on ``device`` (on any tier when None)."""
        return any(p.model == name and (device is None or p.device == device)
                   for p in list(self._pins.values()))

    def _warm_loop(self) -> None:
        while (key := self._warm_queue.get()) is not None:
            with self._residency:
                state = self._pins.get(key)
            if state is None:
                continue  # unpinned meanwhile
            state.state = "warming"
            try:
                if state.tier == "disk":
                    with self._flight(state.model):
                        self._ensure_cached(state.source, state.model, None, ())
                else:
                    self._make_resident(state.source, state.model, None, (), state.device,
                                        None)
                state.state = "resident"
                log.info("pinned %s is resident on the %s tier", state.model, state.tier)
            except Exception as e:  # a pin that cannot warm is reported, not fatal
                state.state = f"failed: {e}"
                log.warning("pin of %s on %s failed: %s", state.source, state.tier, e)

    # disk budget --------------------------------------------------------------------------

    def _enforce_disk_budget(self, fetched: str) -> None:
        budget = self.config.disk_budget
        if budget is None:
            return
        self.flush_touches()  # rank models by when they were really last used
        with self._residency:
            keep = ({fetched} | {n for n, _ in self._resident}
                    | {p.model for p in self._pins.values()}
                    | {lease.model for lease in self.leases.all()})
        plan = self.store.plan_gc(budget, keep=keep)
        if plan.models or plan.blobs:
            log.info("disk budget %s: evicting %s (%s)", format_size(budget),
                     ", ".join(plan.models) or "orphan blobs", format_size(plan.freed))
            self.store.run_gc(plan)
            self.metrics.evicted("disk", len(plan.models))

    # single flight per model ------------------------------------------------------------

    def _flight(self, name: str) -> threading.Lock:
        with self._flights_guard:
            return self._flights.setdefault(name, threading.Lock())

    def resolve(self, source: str) -> tuple[str, str]:
        """Canonical URL and model name of a reference, checked against allowed_sources."""
        url = canonical_url(source)
        check_allowed(url, self.config.allowed_sources)
        return url, model_name(url)

    def fetch(self, source: str, *, include: Sequence[str] | None = None,
              exclude: Sequence[str] = (), callback: Callback | None = None) -> Snapshot:
        """Fetch (or refresh) a model into the cache; concurrent calls fetch once."""
        _, name = self.resolve(source)
        with self._flight(name):
            snap = self._fetch(source, include, exclude, callback)
        return snap

    def _fetch(self, source: str, include: Sequence[str] | None, exclude: Sequence[str],
               callback: Callback | None = None) -> Snapshot:
        snap = self.fetcher.fetch(source, include=include, exclude=exclude, callback=callback)
        self._mark_stale(snap.name)
        s = snap.stats
        self.metrics.fetched(snap.source.split("://", 1)[0], s.bytes_origin, s.seconds)
        self.metrics.model_fetched(snap.name, origin=s.bytes_origin, mirror=s.bytes_mirror,
                                   cache=s.bytes_total - s.bytes_fetched)
        self._enforce_disk_budget(snap.name)
        self.metrics.set_resident("disk", "disk", self.store.blob_bytes())
        return snap

    def _mark_stale(self, name: str) -> None:
        """After a fetch: where the model is resident in another revision than the index
        now records, the next Acquire that finds no lease there loads the new one."""
        record = self.store.index.model(name)
        if record is None:
            return
        with self._residency:
            for (n, _), res in self._resident.items():
                if n == name and res.view.revision != record.revision:
                    res.stale = True

    def _ensure_cached(self, source: str, name: str, include: Sequence[str] | None,
                       exclude: Sequence[str]) -> tuple[ModelRecord, bool]:
        record = self.store.index.model(name)
        if record is not None and self.store.model_complete(record):
            self.metrics.model_fetched(name, cache=record.size)
            return record, False
        self._fetch(source, include, exclude)
        record = self.store.index.model(name)
        if record is None:  # pragma: no cover - fetch records the model or raises
            raise SourceNotFound(f"{source}: nothing was fetched")
        return record, True

    # acquire / release ------------------------------------------------------------------

    def _check_device(self, device: str) -> str | None:
        """The GPU UUID of a ``cuda:<uuid>`` device (None for ``cpu``), refused early with
        the reason when the CUDA tier cannot serve it."""
        if device == "cpu":
            return None
        uuid = device_uuid(device)
        if not self.cuda.available:
            raise GpuUnavailable(f"{device}: the CUDA tier is unavailable: {self.cuda.reason}")
        self.cuda.resolve(uuid)
        return uuid

    def acquire(self, source: str, *, device: str, pid: int, start_time: int,
                client_name: str = "", include: Sequence[str] | None = None,
                exclude: Sequence[str] = ()) -> Acquired:
        """Make a model resident on ``device`` ("cpu" or "cuda:<GPU UUID>") and lease it
        to process ``pid``.

        Raises:
            GpuUnavailable: a CUDA device the tier cannot serve (with the reason).
            BudgetExceeded: the model does not fit even after evicting unleased models.
            SourceNotFound, SourceUnavailable, NotPermitted, FormatError: from the fetch.
        """
        device = _device_name(device or "cpu")
        self._check_device(device)  # before any fetch: fail fast
        _, name = self.resolve(source)
        t0 = time.perf_counter()
        lease_args = (pid, start_time, client_name)
        fetched = loaded = False
        got: tuple[View, Lease | None] | None = self._lease_resident(name, device, lease_args)
        if got is None:  # not resident here (or a newer revision waits): the full path
            fetched, loaded, got = self._make_resident(source, name, include, exclude, device,
                                                       lease_args)
        view, maybe_lease = got
        lease = cast(Lease, maybe_lease)  # leased: lease_args were given
        self.metrics.observe_acquire(lease.tier, time.perf_counter() - t0, hit=not loaded)
        self.metrics.lookup("disk", hit=not fetched)
        self._touch(name)
        return Acquired(lease, name, view, fetched, loaded)

    def _lease_resident(self, name: str, device: str, lease_args: tuple[int, int, str],
                        ) -> tuple[View, Lease] | None:
        """The fast path of a warm Acquire: lease the resident model's view, without the
        single-flight lock (a fetch or load of it may be under way)."""
        with self._residency:
            res = self._resident.get((name, device))
            if res is None or res.stale:
                return None
            res.last_used = time.time()
            return res.view, self.leases.add(name, _tier(device), device, *lease_args)

    def _make_resident(
        self, source: str, name: str, include: Sequence[str] | None, exclude: Sequence[str],
        device: str, lease_args: tuple[int, int, str] | None,
    ) -> tuple[bool, bool, tuple[View, Lease | None]]:
        """Fetch if needed, load onto ``device`` if needed, and lease if asked, all under
        the model's single-flight lock; the lease is taken under the residency lock so
        that no eviction can slip in between the load and the lease. Returns (fetched,
        loaded, (view, lease))."""
        with self._flight(name):
            record, fetched = self._ensure_cached(source, name, include, exclude)
            shards = [f for f in record.files if f.relpath.endswith(".safetensors")]
            # validates every shard before it becomes resident; held here, so that the
            # view below never parses one again under the residency lock
            layouts = {f.digest: self._layout(f.digest) for f in shards}
            blobs = [(f.digest, self.store.blob_path(f.digest), f.size) for f in shards]
            with self._residency:
                res = self._resident.get((name, device))
                if res is not None and res.stale and not self.leases.held(name, device):
                    self._unload(name, device)  # switch to the revision fetched since
                    res = None
                loaded = False
                if res is None:
                    uuid = self._check_device(device)
                    if uuid is None:
                        self._make_room(device, self.host.missing_bytes(
                            [(d, size) for d, _, size in blobs]), exclude=name)
                        self.host.load(name, [(d, p) for d, p, _ in blobs])
                    else:
                        self._make_room(device, self.cuda.missing_bytes(uuid, blobs),
                                        exclude=name)
                        self.cuda.load(name, uuid, blobs)
                    loaded = True
                    self._update_resident_metric(device)
                    res = self._resident[(name, device)] = _Residency(
                        self._view(name, record.revision, shards, uuid, layouts))
                res.last_used = time.time()
                lease = None
                if lease_args is not None:
                    lease = self.leases.add(name, _tier(device), device, *lease_args)
        return fetched, loaded, (res.view, lease)

    def _view(self, name: str, revision: str, shards: Sequence[ModelFile],
              uuid: str | None, layouts: dict[str, ShardLayout]) -> View:
        """The answer's shards, tensors and metadata for a model just made resident."""
        exports = {e.digest: e for e in self.cuda.export(name, uuid)} if uuid else {}
        infos = tuple(
            ShardInfo(f.relpath, f.digest, f.size,
                      "" if uuid else str(self.store.blob_path(f.digest)),
                      exports[f.digest].ipc_handle if uuid else b"", uuid or "")
            for f in shards)
        tensors: list[TensorEntry] = []
        metadata: dict[str, str] = {}
        for i, f in enumerate(shards):
            layout = layouts[f.digest]
            metadata.update(layout.metadata)
            tensors.extend(TensorEntry(t.name, t.dtype, t.shape, i, t.offset, t.nbytes)
                           for t in layout.tensors)
        return View(revision, str(self.store.snapshot_path(name)), infos, tuple(tensors),
                     metadata)

    def _layout(self, digest: str) -> ShardLayout:
        # parsed once, by the fetch, and kept within a byte budget (weightd.formats.cache)
        return self.fetcher.layout(digest)

    def release(self, lease_id: str) -> Lease:
        return self.leases.release(lease_id)

    def _lease_ended(self, lease: Lease, why: str) -> None:
        with self._residency:
            res = self._resident.get((lease.model, lease.device))
            if res is not None:
                res.last_used = time.time()

    # when models were last used, for the disk tier's LRU ------------------------------

    def _touch(self, name: str) -> None:
        """Note that ``name`` was used now. The index learns it in batches (see
        :meth:`flush_touches`): a warm Acquire writes nothing to SQLite."""
        now = time.time()
        with self._touch_lock:
            self._touched[name] = now
            due = now - self._touches_flushed >= TOUCH_FLUSH_INTERVAL
        if due:
            self.flush_touches()

    def flush_touches(self) -> None:
        """Write the pending last-used times to the index: at most once a
        ``TOUCH_FLUSH_INTERVAL`` from Acquire, before the disk budget ranks models, and
        at close. A crash loses at most that interval of LRU precision, nothing else."""
        with self._touch_lock:
            touched, self._touched = self._touched, {}
            self._touches_flushed = time.time()
        for name, when in touched.items():
            self.store.index.touch_model(name, when)

    # budgets and eviction ---------------------------------------------------------------

    def gpu_budget(self, uuid: str) -> int:
        return parse_gpu_budget(self.config.gpu_budget, self.cuda.total_bytes(uuid))

    def _used(self, device: str) -> int:
        return self.host.bytes_used if device == "cpu" else self.cuda.bytes_used(
            device_uuid(device))

    def _budget(self, device: str) -> int:
        return self.host_budget if device == "cpu" else self.gpu_budget(device_uuid(device))

    def _freeable(self, name: str, device: str) -> int:
        if device == "cpu":
            return self.host.freeable_bytes(name)
        return self.cuda.freeable_bytes(name, device_uuid(device))

    def _unload(self, name: str, device: str) -> int:
        """Drop a model from a device. Caller holds the residency lock."""
        res = self._resident.pop((name, device), None)
        for shard in res.view.shards if res is not None else ():
            self.fetcher.layouts.drop(shard.digest)  # parsed again if it is loaded again
        if device == "cpu":
            freed = self.host.unload(name)
        else:
            freed = self.cuda.unload(name, device_uuid(device))
        if freed:
            self.metrics.evicted(_tier(device))
        self._update_resident_metric(device)
        return freed

    def _update_resident_metric(self, device: str) -> None:
        self.metrics.set_resident(_tier(device), device if device == "cpu"
                                  else device_uuid(device), self._used(device))

    def _make_room(self, device: str, need: int, *, exclude: str) -> None:
        """Evict models with no lease and no pin from ``device``, least recently used
        first, until ``need`` more bytes fit in its budget (or raise BudgetExceeded with
        what was needed and what is free). Caller holds the residency lock."""
        candidates = [
            (res.last_used, name, self._freeable(name, device),
             self.leases.held(name, device) or self._pinned(name, device))
            for (name, dev), res in self._resident.items() if dev == device and name != exclude]
        for name in plan_eviction(need, self._used(device), self._budget(device), candidates,
                                  what=f"{_tier(device)} tier ({device})"):
            freed = self._unload(name, device)
            log.info("evicted %s from %s (%s) to make room", name, device, format_size(freed))

    def evict(self, source_or_name: str, *, tier: str | None = None) -> int:
        """Drop a model from host memory and/or GPUs (never while leased or pinned there);
        ``tier`` None means every tier but disk. Returns the bytes freed."""
        name = source_or_name
        with self._residency:
            known = any(n == name for n, _ in self._resident)
        if not known:
            _, name = self.resolve(source_or_name)
        freed = 0
        with self._residency:
            devices = [d for n, d in self._resident if n == name
                       and (tier is None or _tier(d) == tier)]
            for device in devices:
                if self.leases.held(name, device):
                    raise ModelInUse(f"{name}: leased on {device} by "
                                     f"{self.leases.count(name, device)} process(es)")
                if self._pinned(name, device):
                    raise ModelInUse(f"{name}: pinned on {device} (unpin it first)")
            for device in devices:
                freed += self._unload(name, device)
        return freed

    # introspection ----------------------------------------------------------------------

    def residency(self) -> list[tuple[str, str, int, float]]:
        """(model, device, bytes, last used) for every model resident in memory."""
        with self._residency:
            return [(n, d, self.host.model_bytes(n) if d == "cpu"
                     else self.cuda.model_bytes(n, device_uuid(d)), r.last_used)
                    for (n, d), r in sorted(self._resident.items())]

    def problems(self) -> list[str]:
        out = []
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


def _tier(device: str) -> str:
    return "host" if device == "cpu" else "cuda"
