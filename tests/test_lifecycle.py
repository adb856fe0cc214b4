"""The state machine of a model on the node (weightd.lifecycle), on its own: pure, so it
is tested by driving it with random sequences of events, as the node drives it."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from weightd.lifecycle import TRANSITIONS, BlobHolds, IllegalTransition, Lifecycle, State, Step

MODELS = ["a", "b", "c"]
DEVICES = ["cpu", "cuda:GPU-1"]


def test_an_absent_model_is_fetched_then_loaded_then_leased():
    life = Lifecycle()
    life.want("m", "cpu")
    assert life.state("m", "cpu") is State.ABSENT
    assert life.plan_acquire("m", "cpu") is Step.FETCH
    life.begin_fetch("m")
    assert life.state("m", "cpu") is State.FETCHING
    assert life.plan_acquire("m", "cuda:GPU-1") is Step.WAIT_FETCH  # one fetch for both
    assert life.end_fetch("m", "r1") == []
    assert life.plan_acquire("m", "cpu") is Step.LOAD
    life.begin_load("m", "cpu")
    assert life.plan_acquire("m", "cpu") is Step.WAIT_SLOT
    life.end_load("m", "cpu", revision="r1", view="view-1", now=1.0)
    assert life.plan_acquire("m", "cpu") is Step.LEASE
    assert life.lease("m", "cpu", 2.0) == "view-1"
    life.unwant("m", "cpu")
    assert life.state("m", "cpu") is State.RESIDENT
    assert life.evictable("cpu") == []  # leased
    life.unlease("m", "cpu", 3.0)
    assert life.evictable("cpu") == [(3.0, "m")]
    assert life.evictable("cpu", pinned={"m"}) == []


def leased_on_cpu() -> Lifecycle:
    """A lifecycle where model "m" (revision r1) is resident on "cpu", with one lease."""
    life = Lifecycle()
    life.cached("m", "r1")
    life.begin_load("m", "cpu")
    life.end_load("m", "cpu", revision="r1", view="v1")
    life.lease("m", "cpu", 1.0)
    return life


def test_a_refresh_keeps_serving_the_leased_revision_and_reloads_once_free():
    life = leased_on_cpu()
    life.begin_fetch("m")
    # a cached revision loads at once on another device, the refresh does not hold it up
    assert life.plan_acquire("m", "cuda:GPU-1") is Step.LOAD
    assert life.end_fetch("m", "r2") == ["cpu"]
    assert life.plan_acquire("m", "cpu") is Step.LEASE  # the lease holds r1: serve it
    life.unlease("m", "cpu", 2.0)
    assert life.plan_acquire("m", "cpu") is Step.RELOAD
    life.begin_unload("m", "cpu")
    life.end_unload("m", "cpu", reload=True)
    assert life.state("m", "cpu") is State.LOADING


def test_a_load_that_lands_after_a_refresh_is_stale_at_once():
    life = Lifecycle()
    life.cached("m", "r1")
    life.begin_load("m", "cpu")  # loading r1 ...
    life.begin_fetch("m")
    life.end_fetch("m", "r2")    # ... while r2 lands
    life.end_load("m", "cpu", revision="r1", view="v1")
    assert life.slots[("m", "cpu")].stale
    assert life.plan_acquire("m", "cpu") is Step.RELOAD


def test_a_corrupt_residency_gets_no_new_lease_and_is_reloaded_once_free():
    life = leased_on_cpu()
    life.mark_corrupt("m", "cpu")
    assert life.plan_acquire("m", "cpu") is Step.REFUSE
    with pytest.raises(IllegalTransition):
        life.lease("m", "cpu", 2.0)
    life.unlease("m", "cpu", 2.0)
    assert life.plan_acquire("m", "cpu") is Step.RELOAD


def test_a_ready_fetch_is_loaded_before_it_is_durable():
    life = Lifecycle()
    life.want("m", "cpu")
    life.begin_fetch("m")
    assert life.plan_acquire("m", "cpu") is Step.WAIT_FETCH
    life.fetch_ready("m", "r1")  # every file verified, not yet fsynced
    assert life.plan_acquire("m", "cpu") is Step.LOAD
    life.begin_load("m", "cpu")
    life.end_load("m", "cpu", revision="r1", view="v1")
    assert not life.slots[("m", "cpu")].stale  # the revision being committed
    assert life.plan_acquire("m", "cpu") is Step.LEASE
    life.lease("m", "cpu", 1.0)
    assert life.end_fetch("m", "r1") == []  # durable: nothing is stale
    assert life.plan_acquire("m", "cpu") is Step.LEASE
    with pytest.raises(IllegalTransition):
        life.fetch_ready("m", "r1")  # no fetch runs


def test_a_served_fetch_whose_commit_fails_gets_no_new_lease_and_is_refetched_once_free():
    life = Lifecycle()
    life.want("m", "cpu")
    life.begin_fetch("m")
    life.fetch_ready("m", "r1")
    life.begin_load("m", "cpu")
    life.end_load("m", "cpu", revision="r1", view="v1")
    life.lease("m", "cpu", 1.0)
    assert life.end_fetch("m", None) == ["cpu"]  # the fsync failed after serving
    assert life.disk_of("m").state is State.ABSENT
    assert life.plan_acquire("m", "cpu") is Step.REFUSE
    life.unlease("m", "cpu", 2.0)
    assert life.plan_acquire("m", "cpu") is Step.RELOAD  # its load finds no record: fetch


def test_gc_removes_only_what_nobody_uses():
    life = Lifecycle()
    life.cached("m", "r1")
    life.want("m", "cpu")
    assert life.in_use("m")
    with pytest.raises(IllegalTransition):
        life.begin_remove("m")
    life.unwant("m", "cpu")
    life.begin_remove("m")
    assert life.plan_acquire("m", "cpu") is Step.WAIT_REMOVAL
    with pytest.raises(IllegalTransition):
        life.begin_fetch("m")
    life.end_remove("m")
    assert life.plan_acquire("m", "cpu") is Step.FETCH


def test_illegal_transitions_raise():
    life = Lifecycle()
    life.begin_load("m", "cpu")
    with pytest.raises(IllegalTransition):
        life.begin_load("m", "cpu")  # loading twice
    life.end_load("m", "cpu", revision="r", view=1)
    life.lease("m", "cpu", 0.0)
    with pytest.raises(IllegalTransition, match="leased"):
        life.begin_unload("m", "cpu")
    with pytest.raises(IllegalTransition):
        life.unlease("x", "cpu", 0.0)
    life.cached("n", "r")
    with pytest.raises(IllegalTransition):
        life.end_fetch("n", "r")  # no fetch running
    assert all(isinstance(a, State) and isinstance(b, State)
               for (a, _), b in TRANSITIONS.items())


def test_blob_holds_count_every_holder():
    holds = BlobHolds()
    holds.hold("fetch", ["x", "y"])
    holds.hold("load", ["y", "z"], revision=("m", "r1"))
    assert holds.digests() == {"x", "y", "z"} and holds.revisions() == {("m", "r1")}
    holds.move("load", "resident")
    assert holds.holders("y") == ["fetch", "resident"]
    holds.release("fetch")
    assert holds.digests() == {"y", "z"} and holds.held("y") and not holds.held("x")
    holds.release("resident")
    assert holds.digests() == set() and holds.revisions() == set()
    holds.release("nobody")  # nothing happens


class NodeLike(RuleBasedStateMachine):
    """Drives the lifecycle as the node does: plans, starts work, ends it (well or not),
    leases, releases, evicts, removes, finds corruption; checks the rules after each."""

    @initialize()
    def start(self) -> None:
        self.life = Lifecycle()
        self.waiting: dict[tuple[str, str], int] = {}
        self.reloading: set[tuple[str, str]] = set()
        self.pinned: set[str] = set()

    @rule(m=st.sampled_from(MODELS), d=st.sampled_from(DEVICES))
    def want(self, m: str, d: str) -> None:
        self.life.want(m, d)
        self.waiting[(m, d)] = self.waiting.get((m, d), 0) + 1

    @rule(m=st.sampled_from(MODELS), d=st.sampled_from(DEVICES))
    def give_up(self, m: str, d: str) -> None:
        if self.waiting.get((m, d)):
            self.waiting[(m, d)] -= 1
            self.life.unwant(m, d)

    @rule(m=st.sampled_from(MODELS), d=st.sampled_from(DEVICES))
    def step(self, m: str, d: str) -> None:
        if not self.waiting.get((m, d)):
            return
        step = self.life.plan_acquire(m, d)
        if step is Step.FETCH:
            self.life.begin_fetch(m)
        elif step is Step.LOAD:
            self.life.begin_load(m, d)
        elif step is Step.RELOAD:
            self.life.begin_unload(m, d)
            self.reloading.add((m, d))
        elif step is Step.LEASE:
            slot = self.life.slots[(m, d)]
            assert slot.state is State.RESIDENT and not slot.corrupt
            assert not (slot.stale and slot.leases == 0)
            self.life.lease(m, d, 1.0)

    @rule(m=st.sampled_from(MODELS), ok=st.booleans(), rev=st.sampled_from(["r1", "r2"]))
    def fetch_ends(self, m: str, ok: bool, rev: str) -> None:
        disk = self.life.disk_of(m)
        if disk.state is State.FETCHING:
            served = disk.ready
            ended = self.life.end_fetch(m, rev if ok else None)
            for d in ended:
                slot = self.life.slots[(m, d)]
                if ok:  # stale: resident in another revision
                    assert slot.revision != rev
                else:  # served from the fetch's bytes, never durable: no new lease
                    assert slot.revision == served and slot.corrupt

    @rule(m=st.sampled_from(MODELS), rev=st.sampled_from(["r1", "r2"]))
    def fetch_is_ready(self, m: str, rev: str) -> None:
        disk = self.life.disk_of(m)
        if disk.state is State.FETCHING and not disk.ready:
            self.life.fetch_ready(m, rev)

    @rule(m=st.sampled_from(MODELS), d=st.sampled_from(DEVICES), ok=st.booleans())
    def load_ends(self, m: str, d: str, ok: bool) -> None:
        slot = self.life.slots.get((m, d))
        if slot is not None and slot.state is State.LOADING:
            rev = self.life.disk_of(m).latest or "r0"
            self.life.end_load(m, d, revision=rev if ok else None, view=object())

    @rule(m=st.sampled_from(MODELS), d=st.sampled_from(DEVICES))
    def unload_ends(self, m: str, d: str) -> None:
        slot = self.life.slots.get((m, d))
        if slot is not None and slot.state is State.UNLOADING:
            reload = (m, d) in self.reloading
            self.reloading.discard((m, d))
            self.life.end_unload(m, d, reload=reload)

    @rule(m=st.sampled_from(MODELS), d=st.sampled_from(DEVICES))
    def release(self, m: str, d: str) -> None:
        slot = self.life.slots.get((m, d))
        if slot is not None and slot.leases:
            self.life.unlease(m, d, 2.0)

    @rule(d=st.sampled_from(DEVICES))
    def evict_oldest(self, d: str) -> None:
        free = self.life.evictable(d, pinned=self.pinned)
        for _, m in free:
            slot = self.life.slots[(m, d)]
            assert slot.leases == 0 and slot.waiting == 0 and m not in self.pinned
        if free:
            self.life.begin_unload(min(free)[1], d)

    @rule(m=st.sampled_from(MODELS))
    def pin(self, m: str) -> None:
        self.pinned ^= {m}

    @rule(m=st.sampled_from(MODELS), d=st.sampled_from(DEVICES))
    def verify_finds_it_corrupt(self, m: str, d: str) -> None:
        slot = self.life.slots.get((m, d))
        if slot is not None and slot.state is State.RESIDENT:
            self.life.mark_corrupt(m, d)

    @rule(m=st.sampled_from(MODELS), removed=st.booleans())
    def gc(self, m: str, removed: bool) -> None:
        if self.life.disk_of(m).state is State.CACHED and not self.life.in_use(m):
            self.life.begin_remove(m)
            self.life.end_remove(m, removed=removed)

    @precondition(lambda self: hasattr(self, "life"))
    @invariant()
    def rules_hold(self) -> None:
        for (m, d), slot in self.life.slots.items():
            if slot.leases:
                assert slot.state is State.RESIDENT, (m, d, slot)
            assert slot.waiting == self.waiting.get((m, d), 0)
            assert slot.busy or slot.waiting or slot.leases, "an idle slot is kept"
            if slot.busy:
                assert self.life.disk_of(m).state is not State.REMOVING
        for disk in self.life.disk.values():
            assert disk.state in (State.ABSENT, State.FETCHING, State.CACHED, State.REMOVING)


TestNodeLike = NodeLike.TestCase
TestNodeLike.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
