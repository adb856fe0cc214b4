"""The life of a model on the node: one small state machine per (model, device). Pure.

This module decides; it does nothing. No I/O, no threads, no clocks of its own: the node
(weightd/node.py) calls it under its lock, then does the work the decision names (a
fetch, a load, an unload) outside the lock, and comes back to record the outcome. Every
transition is one entry of :data:`TRANSITIONS`; anything else raises
:class:`IllegalTransition`. The tests drive it with random sequences of events
(tests/test_lifecycle.py).

A model has two halves. Its **disk** half is shared by every device (a model is fetched
once, whatever device asks for it); its **residency** half is one per device::

    disk (one per model)                      residency (one per model and device)

    ABSENT --fetch--> FETCHING                (not resident) --load--> LOADING
      ^                 |  |                    ^   ^                    |   |
      |        fetched  |  | failed             |   +-------failed-------+   | loaded
      |                 v  v (back)             |                            v
    REMOVING <--remove-- CACHED                 +--unloaded-- UNLOADING <--unload-- RESIDENT
      (gc)     ^---fetch (refresh)---+                  |  (reload)
                                                        +----------------> LOADING

The state of (model, device), as the issue names it (absent, fetching, cached, loading,
resident, unloading), is the residency half's when the model is loading, resident or
unloading on that device, else the disk half's (:meth:`Lifecycle.state`).

Rules the decisions keep (see :meth:`Lifecycle.plan_acquire`):

* A lease is granted only on a RESIDENT slot that is not corrupt; a slot with leases is
  never unloaded (so a leased revision stays resident, and its blobs with it).
* A slot that acquirers are waiting for is never chosen for eviction.
* A resident slot of an older revision than the disk's (``stale``) keeps serving while a
  lease holds it; the first Acquire that finds it unleased reloads it. A ``corrupt``
  slot (``weightd verify`` found one of its blobs damaged) gets no new lease.
* A model is removed from disk (gc) only when no slot of it is busy or wanted.
* A fetch whose bytes are all written and verified is *ready* before it is durable
  (:meth:`Lifecycle.fetch_ready`): Acquires load it then, from its temporary files. If
  its commit then fails, the residencies made from it are marked ``corrupt`` (no new
  lease; reloaded, so fetched again, once unleased).

Blob holders (:class:`BlobHolds`) are bookkeeping of the same kind: which digests and
which snapshot revisions a fetch, a load or a residency holds, so that gc deletes only
what nobody holds.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Collection, Hashable, Iterable
from dataclasses import dataclass, field

__all__ = [
    "TRANSITIONS",
    "BlobHolds",
    "Disk",
    "IllegalTransition",
    "Lifecycle",
    "Slot",
    "State",
    "Step",
]


class State(enum.Enum):
    """Where a model stands on one device."""

    ABSENT = "absent"
    FETCHING = "fetching"
    CACHED = "cached"
    REMOVING = "removing"  # gc is deleting it from disk
    LOADING = "loading"
    RESIDENT = "resident"
    UNLOADING = "unloading"


#: Every allowed transition: (state, event) -> new state. The disk half uses ABSENT,
#: FETCHING, CACHED and REMOVING; the residency half uses CACHED for "not resident".
TRANSITIONS: dict[tuple[State, str], State] = {
    # disk
    (State.ABSENT, "fetch"): State.FETCHING,
    (State.CACHED, "fetch"): State.FETCHING,
    (State.FETCHING, "fetched"): State.CACHED,
    (State.CACHED, "remove"): State.REMOVING,
    (State.REMOVING, "removed"): State.ABSENT,
    (State.REMOVING, "kept"): State.CACHED,  # only old revisions went (or: as it was)
    # residency
    (State.CACHED, "load"): State.LOADING,
    (State.LOADING, "loaded"): State.RESIDENT,
    (State.LOADING, "load_failed"): State.CACHED,
    (State.RESIDENT, "unload"): State.UNLOADING,
    (State.UNLOADING, "unloaded"): State.CACHED,
    (State.UNLOADING, "reload"): State.LOADING,
}
# (FETCHING, "fetch_failed") goes back to where the fetch started (ABSENT or CACHED):
# see Lifecycle.end_fetch.


class IllegalTransition(RuntimeError):
    """An event that the state machine does not allow in the current state (a bug)."""


def _next(state: State, event: str) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event!r} is not allowed in state {state.value}") from None


class Step(enum.Enum):
    """What an Acquire of (model, device) should do next (:meth:`Lifecycle.plan_acquire`)."""

    LEASE = "lease"                # resident: lease the view now
    REFUSE = "refuse"              # resident but corrupt and still leased: no new lease
    FETCH = "fetch"                # start the model's fetch, then plan again
    LOAD = "load"                  # start loading on the device, then plan again
    RELOAD = "reload"              # unload the resident (stale/corrupt) slot, then load
    WAIT_FETCH = "wait_fetch"      # the model's fetch is running: wait for it
    WAIT_SLOT = "wait_slot"        # the device's load or unload is running: wait for it
    WAIT_REMOVAL = "wait_removal"  # gc is removing the model: wait, then fetch


@dataclass
class Disk:
    """The disk half of one model."""

    state: State = State.ABSENT
    revision: str = ""  # the revision the index records ("" until fetched)
    before_fetch: State = State.ABSENT  # where a failed fetch returns to
    before_remove: State = State.CACHED  # where a gc that kept the model returns to
    ready: str = ""  # FETCHING: the revision whose bytes are verified, not yet durable

    @property
    def latest(self) -> str:
        """The newest revision a load can find: the fetch's when it is ready."""
        return self.ready or self.revision


@dataclass
class Slot:
    """The residency half of one (model, device)."""

    state: State = State.CACHED  # CACHED: not resident on this device
    revision: str = ""       # the revision resident (or being loaded)
    leases: int = 0
    waiting: int = 0         # acquirers interested in this slot right now
    stale: bool = False      # the disk holds a newer revision
    corrupt: bool = False    # verify found a damaged blob in it
    last_used: float = 0.0
    view: object = None      # the node's answer for this residency (opaque here)

    @property
    def busy(self) -> bool:
        return self.state in (State.LOADING, State.RESIDENT, State.UNLOADING)


@dataclass
class Lifecycle:
    """The disk and residency halves of every model the node knows. Not thread-safe:
    the node calls it under its lock."""

    disk: dict[str, Disk] = field(default_factory=dict)
    slots: dict[tuple[str, str], Slot] = field(default_factory=dict)

    # reading ------------------------------------------------------------------------------

    def state(self, model: str, device: str) -> State:
        slot = self.slots.get((model, device))
        if slot is not None and slot.busy:
            return slot.state
        return self.disk_of(model).state

    def disk_of(self, model: str) -> Disk:
        return self.disk.get(model) or Disk()

    def slot(self, model: str, device: str) -> Slot:
        """The slot, created (not resident) if it does not exist."""
        return self.slots.setdefault((model, device), Slot())

    def resident(self, device: str | None = None) -> list[tuple[tuple[str, str], Slot]]:
        """Every RESIDENT slot (on one device, or all), sorted by key."""
        return sorted(((k, s) for k, s in self.slots.items() if s.state is State.RESIDENT
                       and (device is None or k[1] == device)), key=lambda kv: kv[0])

    def in_use(self, model: str) -> bool:
        """Whether a slot of the model is loading, resident, unloading or wanted, or its
        disk half is busy: gc must not remove it."""
        if self.disk_of(model).state in (State.FETCHING, State.REMOVING):
            return True
        return any(s.busy or s.waiting or s.leases
                   for (m, _), s in self.slots.items() if m == model)

    # the plan of an Acquire -----------------------------------------------------------

    def plan_acquire(self, model: str, device: str) -> Step:
        """The next step of an Acquire of ``model`` on ``device``."""
        slot = self.slots.get((model, device))
        disk = self.disk_of(model)
        if slot is not None and slot.state is State.RESIDENT:
            if slot.corrupt:
                return Step.REFUSE if slot.leases else Step.RELOAD
            if slot.stale and not slot.leases:
                return Step.RELOAD
            return Step.LEASE
        if slot is not None and slot.state in (State.LOADING, State.UNLOADING):
            return Step.WAIT_SLOT
        if disk.state is State.REMOVING:
            return Step.WAIT_REMOVAL
        if disk.state is State.FETCHING:
            # a refresh of a cached model does not hold up its loads: they load what is
            # cached, and the refresh marks them stale when it lands; a fetch that is
            # ready is loaded from its verified temporary files, before it is durable
            ready = disk.before_fetch is State.CACHED or disk.ready
            return Step.LOAD if ready else Step.WAIT_FETCH
        return Step.LOAD if disk.state is State.CACHED else Step.FETCH

    # disk ---------------------------------------------------------------------------

    def cached(self, model: str, revision: str) -> None:
        """What the index says at start: ``model`` is cached in ``revision``."""
        self.disk[model] = Disk(State.CACHED, revision)

    def begin_fetch(self, model: str) -> None:
        disk = self.disk.setdefault(model, Disk())
        before = disk.state
        disk.state = _next(disk.state, "fetch")
        disk.before_fetch = before
        disk.ready = ""

    def fetch_ready(self, model: str, revision: str) -> None:
        """The running fetch's bytes are written and verified (``revision``), not yet
        durable: loads may take them from now on."""
        disk = self.disk.get(model)
        if disk is None or disk.state is not State.FETCHING:
            raise IllegalTransition(f"{model}: ready outside a fetch")
        disk.ready = revision

    def end_fetch(self, model: str, revision: str | None) -> list[str]:
        """A fetch ended: with the revision it recorded, or None when it failed.

        Returns the devices where the model is resident in another revision (now stale);
        after a failure, the devices where it was made resident from the fetch's
        verified bytes, which never became durable (now corrupt: no new lease).
        """
        disk = self.disk[model]
        if disk.state is not State.FETCHING:
            raise IllegalTransition(f"{model}: a fetch ended in state {disk.state.value}")
        served, disk.ready = disk.ready, ""
        if revision is None:
            disk.state = disk.before_fetch
            broken = []
            for (m, device), slot in self.slots.items():
                if served and m == model and slot.busy and slot.revision == served:
                    slot.corrupt = True
                    broken.append(device)
            return broken
        disk.state = _next(disk.state, "fetched")
        disk.revision = revision
        stale = []
        for (m, device), slot in self.slots.items():
            if m == model and slot.busy and slot.revision != revision:
                slot.stale = True
                stale.append(device)
        return stale

    def begin_remove(self, model: str) -> None:
        """gc is about to delete the model, or only old revisions of it."""
        if self.in_use(model):
            raise IllegalTransition(f"{model}: cannot remove a model in use")
        disk = self.disk.setdefault(model, Disk())
        disk.before_remove = disk.state
        if disk.state is State.ABSENT:  # on disk, unknown to the index (leftovers)
            disk.state = State.CACHED
        disk.state = _next(disk.state, "remove")

    def end_remove(self, model: str, *, removed: bool = True) -> None:
        """gc is done: the model is gone, or (only old revisions went) as it was."""
        disk = self.disk[model]
        _next(disk.state, "removed" if removed else "kept")  # checks the state
        disk.state = State.ABSENT if removed else disk.before_remove
        if removed:
            disk.revision = ""

    def forget_cached(self, model: str) -> None:
        """The model's blobs turned out to be missing (gc, quarantine): it must be
        fetched again before it can load."""
        disk = self.disk.get(model)
        if disk is not None and disk.state is State.CACHED:
            disk.state = State.ABSENT

    # residency --------------------------------------------------------------------------

    def want(self, model: str, device: str) -> None:
        self.slot(model, device).waiting += 1

    def unwant(self, model: str, device: str) -> None:
        slot = self.slots[(model, device)]
        if slot.waiting <= 0:
            raise IllegalTransition(f"{model} on {device}: nobody was waiting")
        slot.waiting -= 1
        self._tidy(model, device)

    def begin_load(self, model: str, device: str) -> None:
        slot = self.slot(model, device)
        slot.state = _next(slot.state, "load")
        slot.stale = slot.corrupt = False
        slot.view = None

    def end_load(self, model: str, device: str, *, revision: str | None,
                 view: object = None, now: float = 0.0) -> None:
        """A load ended, with the revision it made resident, or None when it failed."""
        slot = self.slots[(model, device)]
        if revision is None:
            slot.state = _next(slot.state, "load_failed")
            slot.view = None
            self._tidy(model, device)
            return
        slot.state = _next(slot.state, "loaded")
        slot.revision = revision
        slot.view = view
        slot.last_used = now
        # a fetch may have landed a newer revision while this one was loading
        slot.stale = revision != self.disk_of(model).latest

    def begin_unload(self, model: str, device: str) -> None:
        slot = self.slots[(model, device)]
        if slot.leases:
            raise IllegalTransition(f"{model} on {device}: cannot unload a leased model")
        slot.state = _next(slot.state, "unload")
        slot.view = None

    def end_unload(self, model: str, device: str, *, reload: bool = False) -> None:
        slot = self.slots[(model, device)]
        slot.state = _next(slot.state, "reload" if reload else "unloaded")
        slot.revision = ""
        slot.stale = slot.corrupt = False
        if not reload:
            self._tidy(model, device)

    def mark_corrupt(self, model: str, device: str) -> None:
        self.slots[(model, device)].corrupt = True

    # leases -------------------------------------------------------------------------------

    def lease(self, model: str, device: str, now: float) -> object:
        """Grant a lease on the resident slot; returns its view."""
        slot = self.slots.get((model, device))
        if slot is None or slot.state is not State.RESIDENT or slot.corrupt:
            raise IllegalTransition(f"{model} on {device}: no lease outside RESIDENT")
        slot.leases += 1
        slot.last_used = now
        return slot.view

    def unlease(self, model: str, device: str, now: float) -> None:
        slot = self.slots.get((model, device))
        if slot is None or slot.leases <= 0:
            raise IllegalTransition(f"{model} on {device}: no lease to end")
        slot.leases -= 1
        slot.last_used = now

    # eviction -----------------------------------------------------------------------------

    def evictable(self, device: str, *, exclude: str = "",
                  pinned: Collection[str] = ()) -> list[tuple[float, str]]:
        """(last used, model) of every RESIDENT slot on ``device`` that may be evicted: no
        lease, nobody waiting for it, not pinned there, not ``exclude``."""
        return [(s.last_used, m) for (m, d), s in self.slots.items()
                if d == device and m != exclude and s.state is State.RESIDENT
                and not s.leases and not s.waiting and m not in pinned]

    def blocked(self, device: str, *, exclude: str = "",
                pinned: Collection[str] = ()) -> list[str]:
        """Models resident (or loading) on ``device`` that cannot be evicted now."""
        free = {m for _, m in self.evictable(device, exclude=exclude, pinned=pinned)}
        return sorted(m for (m, d), s in self.slots.items()
                      if d == device and m != exclude and s.busy and m not in free)

    def _tidy(self, model: str, device: str) -> None:
        slot = self.slots.get((model, device))
        if slot is not None and not slot.busy and not slot.waiting and not slot.leases:
            del self.slots[(model, device)]


class BlobHolds:
    """Who holds which blobs and which snapshot revisions (a fetch, a load, a residency).

    A holder is any hashable key; each holds a set of digests and at most a few revisions
    (``(model, revision)``). gc deletes only blobs and revision directories that nobody
    holds. Not thread-safe: the node calls it under its lock.

    Example:
        >>> holds = BlobHolds()
        >>> holds.hold(("load", "m", "cpu"), ["d1", "d2"], revision=("m", "r1"))
        >>> holds.hold(("fetch", "n"), ["d2"])
        >>> sorted(holds.digests()), sorted(holds.revisions())
        (['d1', 'd2'], [('m', 'r1')])
        >>> holds.release(("load", "m", "cpu"))  # what nobody holds any more
        {'d1'}
        >>> sorted(holds.digests())
        ['d2']
    """

    def __init__(self) -> None:
        self._digests: dict[Hashable, set[str]] = {}
        self._revisions: dict[Hashable, set[tuple[str, str]]] = {}
        self._count: Counter[str] = Counter()
        self._rev_count: Counter[tuple[str, str]] = Counter()

    def hold(self, holder: Hashable, digests: Iterable[str],
             revision: tuple[str, str] | None = None) -> None:
        """Add ``digests`` (and ``revision``) to what ``holder`` holds."""
        mine = self._digests.setdefault(holder, set())
        for d in digests:
            if d not in mine:
                mine.add(d)
                self._count[d] += 1
        if revision is not None:
            revs = self._revisions.setdefault(holder, set())
            if revision not in revs:
                revs.add(revision)
                self._rev_count[revision] += 1

    def move(self, old: Hashable, new: Hashable) -> None:
        """Hand what ``old`` holds to ``new`` (a load that became a residency)."""
        digests = self._digests.pop(old, set())
        revisions = self._revisions.pop(old, set())
        for d in digests:
            self._count[d] -= 1
        for r in revisions:
            self._rev_count[r] -= 1
        self.hold(new, digests)
        for r in revisions:
            self.hold(new, (), revision=r)
        self._prune()

    def release(self, holder: Hashable) -> set[str]:
        """Drop everything ``holder`` holds (nothing happens for an unknown holder).
        Returns the digests that nobody holds any more."""
        mine = self._digests.pop(holder, set())
        for d in mine:
            self._count[d] -= 1
        for r in self._revisions.pop(holder, ()):
            self._rev_count[r] -= 1
        self._prune()
        return {d for d in mine if not self.held(d)}

    def _prune(self) -> None:
        for key in [k for k, n in self._count.items() if n <= 0]:
            del self._count[key]
        for rev in [k for k, n in self._rev_count.items() if n <= 0]:
            del self._rev_count[rev]

    def held(self, digest: str) -> bool:
        return self._count.get(digest, 0) > 0

    def holders(self, digest: str) -> list[Hashable]:
        return [h for h, ds in self._digests.items() if digest in ds]

    def digests(self) -> set[str]:
        return set(self._count)

    def revisions(self) -> set[tuple[str, str]]:
        return set(self._rev_count)
