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
from weightd.errors import BudgetExceeded, GpuUnavailable, ModelInUse, SourceNotFound
from weightd.formats import ShardLayout, read_layout
from weightd.leases import Lease, LeaseTable
from weightd.metrics import Metrics
from weightd.sources import canonical_url, check_allowed, model_name
from weightd.store import Fetcher, ModelRecord, Snapshot, Store
from weightd.tiers import HostTier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    relpath: str
    digest: str
    size: int
    path: str


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
    """The answer to an acquire: a lease and where every tensor lives."""

    lease: Lease
    model: str
    snapshot_path: str
    shards: tuple[ShardInfo, ...]
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str]
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


@dataclass
class _Residency:
    last_used: float = field(default_factory=time.time)


class Node:
    """The daemon's state and decisions. Thread-safe; one per cache."""

    def __init__(self, config: Config, store: Store, metrics: Metrics | None = None) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics or Metrics(process=False)
        self.fetcher = Fetcher(store, config)
        self.host = HostTier(lock=config.host_mlock)
        self.host_budget = config.host_budget or psutil.virtual_memory().total // 2
        self.leases = LeaseTable(on_end=self._lease_ended)
        self.metrics.set_budget("host", "cpu", self.host_budget)
        if config.disk_budget is not None:
            self.metrics.set_budget("disk", "disk", config.disk_budget)
        self.started = time.time()
        self._flights: dict[str, threading.Lock] = {}
        self._flights_guard = threading.Lock()
        self._residency = threading.RLock()
        self._host_models: dict[str, _Residency] = {}
        self._layouts: dict[str, ShardLayout] = {}
        self._pins: dict[tuple[str, str, str], PinState] = {}
        self._warm_queue: queue.Queue[tuple[str, str, str] | None] = queue.Queue()
        self._warmer: threading.Thread | None = None

    def start(self) -> None:
        """Start the lease reaper and re-warm the pins recorded in the index."""
        self.leases.start()
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
        self.host.close()

    # pins (the warm pool) ---------------------------------------------------------------

    def pin(self, source: str, *, tier: str = "host", device: str = "cpu") -> str:
        """Keep a model on a tier ("disk" or "host"); recorded, warmed in the background."""
        if tier == "cuda":
            raise GpuUnavailable(f"{device}: the CUDA tier is not available in this build")
        url, name = self.resolve(source)
        state = PinState(url, tier, device, name)
        self.store.index.add_pin(url, tier, device)
        with self._residency:
            self._pins.setdefault(state.key, state)
        self._warm_queue.put(state.key)
        return name

    def unpin(self, source: str, *, tier: str = "host", device: str = "cpu") -> bool:
        url, _ = self.resolve(source)
        removed = self.store.index.remove_pin(url, tier, device)
        with self._residency:
            removed = self._pins.pop((url, tier, device), None) is not None or removed
        return removed

    def pins(self) -> list[PinState]:
        with self._residency:
            return sorted(self._pins.values(), key=lambda p: p.since)

    def _pinned(self, name: str, tier: str | None = None) -> bool:
        """Whether a pin holds the model on ``tier`` (any tier when None: disk keeps it)."""
        return any(p.model == name and (tier is None or p.tier == tier)
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
                    self._make_resident(state.source, state.model, None, (), None)
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
        with self._residency:
            keep = ({fetched} | set(self._host_models) | {p.model for p in self._pins.values()}
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
        self.metrics.fetched(snap.source.split("://", 1)[0], snap.stats.bytes_fetched,
                             snap.stats.seconds)
        self._enforce_disk_budget(snap.name)
        self.metrics.set_resident("disk", "disk", self.store.blob_bytes())
        return snap

    def _ensure_cached(self, source: str, name: str, include: Sequence[str] | None,
                       exclude: Sequence[str]) -> tuple[ModelRecord, bool]:
        record = self.store.index.model(name)
        if record is not None and self.store.model_complete(record):
            return record, False
        self._fetch(source, include, exclude)
        record = self.store.index.model(name)
        if record is None:  # pragma: no cover - fetch records the model or raises
            raise SourceNotFound(f"{source}: nothing was fetched")
        return record, True

    # acquire / release ------------------------------------------------------------------

    def acquire(self, source: str, *, device: str, pid: int, start_time: int,
                client_name: str = "", include: Sequence[str] | None = None,
                exclude: Sequence[str] = ()) -> Acquired:
        """Make a model resident on ``device`` and lease it to process ``pid``.

        Raises:
            GpuUnavailable: a CUDA device was asked for (the GPU tier is not in this build).
            BudgetExceeded: the model does not fit even after evicting unleased models.
            SourceNotFound, SourceUnavailable, NotPermitted, FormatError: from the fetch.
        """
        device = device or "cpu"
        if device != "cpu":
            raise GpuUnavailable(
                f"{device}: this daemon serves the disk and host tiers only "
                "(the CUDA tier is not available: no GPU support in this build)")
        _, name = self.resolve(source)
        t0 = time.perf_counter()
        lease_args = (pid, start_time, client_name)
        record, fetched, loaded, lease = self._make_resident(source, name, include, exclude,
                                                             lease_args)
        lease = cast(Lease, lease)  # _make_resident leases when given lease_args
        self.metrics.observe_acquire("host", time.perf_counter() - t0, hit=not loaded)
        self.metrics.lookup("disk", hit=not fetched)
        self.metrics.set_leases("host", len(self.leases.all()))
        self.store.index.touch_model(name)
        shards = [f for f in record.files if f.relpath.endswith(".safetensors")]
        infos = tuple(ShardInfo(f.relpath, f.digest, f.size, str(self.store.blob_path(f.digest)))
                      for f in shards)
        tensors: list[TensorEntry] = []
        metadata: dict[str, str] = {}
        for i, f in enumerate(shards):
            layout = self._layout(f.digest)
            metadata.update(layout.metadata)
            tensors.extend(TensorEntry(t.name, t.dtype, t.shape, i, t.offset, t.nbytes)
                           for t in layout.tensors)
        return Acquired(lease, name, str(self.store.snapshot_path(name)), infos, tuple(tensors),
                        metadata, fetched, loaded)

    def _make_resident(
        self, source: str, name: str, include: Sequence[str] | None, exclude: Sequence[str],
        lease_args: tuple[int, int, str] | None,
    ) -> tuple[ModelRecord, bool, bool, Lease | None]:
        """Fetch if needed, load into the host tier if needed, and lease if asked, all
        under the model's single-flight lock; the lease is taken under the residency lock
        so that no eviction can slip in between the load and the lease."""
        with self._flight(name):
            record, fetched = self._ensure_cached(source, name, include, exclude)
            shards = [f for f in record.files if f.relpath.endswith(".safetensors")]
            for f in shards:
                self._layout(f.digest)  # validates every shard before it becomes resident
            with self._residency:
                loaded = False
                if not self.host.resident(name):
                    self._make_room(sum(f.size for f in shards), exclude=name)
                    self.host.load(name, [(f.digest, self.store.blob_path(f.digest))
                                          for f in shards])
                    self.metrics.set_resident("host", "cpu", self.host.bytes_used)
                    loaded = True
                self._host_models.setdefault(name, _Residency()).last_used = time.time()
                lease = None
                if lease_args is not None:
                    lease = self.leases.add(name, "host", "cpu", *lease_args)
        return record, fetched, loaded, lease

    def _layout(self, digest: str) -> ShardLayout:
        layout = self._layouts.get(digest)
        if layout is None:
            layout = read_layout(self.store.blob_path(digest))
            self._layouts[digest] = layout
        return layout

    def release(self, lease_id: str) -> Lease:
        return self.leases.release(lease_id)

    def _lease_ended(self, lease: Lease, why: str) -> None:
        self.metrics.set_leases("host", len(self.leases.all()))
        with self._residency:
            res = self._host_models.get(lease.model)
            if res is not None:
                res.last_used = time.time()

    # budgets and eviction ---------------------------------------------------------------

    def _make_room(self, need: int, *, exclude: str) -> None:
        """Evict unleased host-resident models, least recently used first, until ``need``
        more bytes fit in the host budget. Caller holds the residency lock."""
        if self.host.bytes_used + need <= self.host_budget:
            return
        candidates = sorted(
            (res.last_used, name) for name, res in self._host_models.items()
            if name != exclude and not self.leases.held(name) and self.host.resident(name)
            and not self._pinned(name, "host"))
        for _, name in candidates:
            freed = self.host.unload(name)
            self._host_models.pop(name, None)
            self.metrics.evicted("host")
            self.metrics.set_resident("host", "cpu", self.host.bytes_used)
            log.info("evicted %s from host memory (%s) to make room", name, format_size(freed))
            if self.host.bytes_used + need <= self.host_budget:
                return
        free = max(0, self.host_budget - self.host.bytes_used)
        raise BudgetExceeded(
            f"host tier: need {need} bytes ({format_size(need)}), {free} bytes free of a "
            f"{format_size(self.host_budget)} budget; the rest is leased or pinned")

    def evict(self, source_or_name: str) -> int:
        """Drop a model from host memory (never while leased); return the bytes freed."""
        name = source_or_name
        if name not in self._host_models:
            _, name = self.resolve(source_or_name)
        with self._residency:
            if self.leases.held(name):
                raise ModelInUse(f"{name}: leased by {self.leases.count(name)} process(es)")
            if self._pinned(name, "host"):
                raise ModelInUse(f"{name}: pinned on the host tier (unpin it first)")
            self._host_models.pop(name, None)
            freed = self.host.unload(name)
            if freed:
                self.metrics.evicted("host")
            self.metrics.set_resident("host", "cpu", self.host.bytes_used)
            return freed

    # introspection ----------------------------------------------------------------------

    def host_models(self) -> dict[str, float]:
        """Host-resident models and when each was last used."""
        with self._residency:
            return {n: r.last_used for n, r in self._host_models.items()}

    def problems(self) -> list[str]:
        out = []
        if self.host.lock_problem:
            out.append(f"host tier: {self.host.lock_problem}")
        out.append("cuda tier: not available (no GPU support in this build)")
        return out
