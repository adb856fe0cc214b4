"""The node: what the daemon does, independent of how it is asked (gRPC is in service/).

It composes the store (disk tier), the host tier and the lease table, and owns the
decisions between them: fetch a model once however many replicas ask at the same time,
make it resident, evict the least recently used models that nobody leases when a budget
needs room, and describe a resident model's layout so that a client can build tensors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from fsspec.callbacks import Callback

from weightd.config import Config, format_size
from weightd.errors import BudgetExceeded, GpuUnavailable, ModelInUse, SourceNotFound
from weightd.formats import ShardLayout, read_layout
from weightd.leases import Lease, LeaseTable
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
class _Residency:
    last_used: float = field(default_factory=time.time)


class Node:
    """The daemon's state and decisions. Thread-safe; one per cache."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.fetcher = Fetcher(store, config)
        self.host = HostTier(lock=config.host_mlock)
        self.host_budget = config.host_budget or psutil.virtual_memory().total // 2
        self.leases = LeaseTable(on_end=self._lease_ended)
        self.started = time.time()
        self._flights: dict[str, threading.Lock] = {}
        self._flights_guard = threading.Lock()
        self._residency = threading.RLock()
        self._host_models: dict[str, _Residency] = {}
        self._layouts: dict[str, ShardLayout] = {}

    def start(self) -> None:
        self.leases.start()

    def close(self) -> None:
        self.leases.stop()
        self.host.close()

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
            return self.fetcher.fetch(source, include=include, exclude=exclude,
                                      callback=callback)

    def _ensure_cached(self, source: str, name: str, include: Sequence[str] | None,
                       exclude: Sequence[str]) -> tuple[ModelRecord, bool]:
        record = self.store.index.model(name)
        if record is not None and self.store.model_complete(record):
            return record, False
        self.fetcher.fetch(source, include=include, exclude=exclude)
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
        with self._flight(name):
            record, fetched = self._ensure_cached(source, name, include, exclude)
            shards = [f for f in record.files if f.relpath.endswith(".safetensors")]
            layouts = [self._layout(f.digest) for f in shards]
            with self._residency:
                loaded = False
                if not self.host.resident(name):
                    need = sum(f.size for f in shards)
                    self._make_room(need, exclude=name)
                    self.host.load(name, [(f.digest, self.store.blob_path(f.digest))
                                          for f in shards])
                    loaded = True
                self._host_models.setdefault(name, _Residency()).last_used = time.time()
                lease = self.leases.add(name, "host", device, pid, start_time, client_name)
        self.store.index.touch_model(name)
        infos = tuple(ShardInfo(f.relpath, f.digest, f.size, str(self.store.blob_path(f.digest)))
                      for f in shards)
        tensors: list[TensorEntry] = []
        metadata: dict[str, str] = {}
        for i, layout in enumerate(layouts):
            metadata.update(layout.metadata)
            tensors.extend(TensorEntry(t.name, t.dtype, t.shape, i, t.offset, t.nbytes)
                           for t in layout.tensors)
        return Acquired(lease, name, str(self.store.snapshot_path(name)), infos, tuple(tensors),
                        metadata, fetched, loaded)

    def _layout(self, digest: str) -> ShardLayout:
        layout = self._layouts.get(digest)
        if layout is None:
            layout = read_layout(self.store.blob_path(digest))
            self._layouts[digest] = layout
        return layout

    def release(self, lease_id: str) -> Lease:
        return self.leases.release(lease_id)

    def _lease_ended(self, lease: Lease, why: str) -> None:
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
            if name != exclude and not self.leases.held(name) and self.host.resident(name))
        for _, name in candidates:
            freed = self.host.unload(name)
            self._host_models.pop(name, None)
            log.info("evicted %s from host memory (%s) to make room", name, format_size(freed))
            if self.host.bytes_used + need <= self.host_budget:
                return
        free = max(0, self.host_budget - self.host.bytes_used)
        raise BudgetExceeded(
            f"host tier: need {need} bytes ({format_size(need)}), {free} bytes free of a "
            f"{format_size(self.host_budget)} budget; the rest is leased")

    def evict(self, source_or_name: str) -> int:
        """Drop a model from host memory (never while leased); return the bytes freed."""
        name = source_or_name
        if name not in self._host_models:
            _, name = self.resolve(source_or_name)
        with self._residency:
            if self.leases.held(name):
                raise ModelInUse(f"{name}: leased by {self.leases.count(name)} process(es)")
            self._host_models.pop(name, None)
            return self.host.unload(name)

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

    def blob_path(self, digest: str) -> Path:
        return self.store.blob_path(digest)
