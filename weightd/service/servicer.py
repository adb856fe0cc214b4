"""``weightd.v1.Weightd`` over the node, with one error table and one log line a request.

The servicer runs on grpc.aio's event loop. What it does there takes microseconds: a
lookup under the node's lock (a warm Acquire, Release, Status), or a wait that costs
no thread (a cold Acquire awaits the future of the node's cold work, a Fetch polls its
progress). So Release, Status, Health and warm Acquires are answered however many cold
Acquires and fetches are in flight: they never queue behind a thread that a download
or a load holds. An AcquireStream awaits the events of its model's download as the
fetch's threads queue them (:class:`~weightd.landing.Landing`), then the Acquire.
Short calls that touch SQLite or free memory (List, Pin, Unpin, Evict) run on a small
pool of threads; Verify and Gc on one of their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from fsspec.callbacks import Callback

from weightd import __version__
from weightd.errors import (
    BudgetExceeded,
    CacheLocked,
    FormatError,
    GpuUnavailable,
    IntegrityError,
    LeaseNotFound,
    ModelInUse,
    NotPermitted,
    SourceNotFound,
    SourceUnavailable,
    Unauthenticated,
    WeightdError,
)
from weightd.landing import Event, Landing, ShardLanding
from weightd.leases import Caller, new_lease_id
from weightd.metrics import Metrics
from weightd.node import Acquired, Node, Plan, View
from weightd.store.mirror import Mirror
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc
from weightd_client.client import (  # the names both sides read and write
    ERROR_KEY,
    LEASE_KEY,
)
from weightd_client.client import TIER_BY_NAME as _TIERS
from weightd_client.client import TIER_NAMES as _TIER_NAMES
from weightd_client.credentials import TOKEN_KEY

log = logging.getLogger("weightd.requests")

T = TypeVar("T")


class _Expired(WeightdError):
    """The caller's deadline passed before its answer could be given (no lease)."""


#: The one table from weightd's outcomes to gRPC status codes. The class name also
#: travels as trailing metadata ``weightd-error`` so the client re-raises the same class.
ERROR_CODES: dict[type[WeightdError], grpc.StatusCode] = {
    FormatError: grpc.StatusCode.INVALID_ARGUMENT,
    SourceNotFound: grpc.StatusCode.NOT_FOUND,
    SourceUnavailable: grpc.StatusCode.UNAVAILABLE,
    IntegrityError: grpc.StatusCode.DATA_LOSS,
    BudgetExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    NotPermitted: grpc.StatusCode.PERMISSION_DENIED,
    GpuUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    LeaseNotFound: grpc.StatusCode.FAILED_PRECONDITION,
    ModelInUse: grpc.StatusCode.FAILED_PRECONDITION,
    CacheLocked: grpc.StatusCode.UNAVAILABLE,
    _Expired: grpc.StatusCode.DEADLINE_EXCEEDED,
}

MAX_SOURCE_LEN = 4096
MAX_GLOBS = 256
#: The largest message the daemon sends or accepts (the server's and the client's limit).
MAX_MESSAGE = 64 * 1024 * 1024
#: An Acquire whose caller has less time left than this, plus its answer's size at
#: :data:`ANSWER_RATE`, gets no lease: its answer would arrive too late to be read.
MIN_TIME_LEFT = 0.005
#: Bytes per second an Acquire answer is counted to take from the check to the caller:
#: about half of what warm Acquires took end to end on a loaded 2-core VM (89 to 113 MB/s
#: for answers of 0.55 to 3.5 MB: 20,000 to 120,000 tensors; medians of 9).
ANSWER_RATE = 50 * 1024 * 1024
#: What an answer adds to its view's template: lease id, tier, device, flags, timing.
_ANSWER_OVERHEAD = 512


def status_for(e: BaseException) -> grpc.StatusCode:
    for cls in type(e).__mro__:
        if cls in ERROR_CODES:
            return ERROR_CODES[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def _mirror_status(mirror: Mirror | None) -> pb.MirrorStatus | None:
    if mirror is None:
        return None
    return pb.MirrorStatus(
        url=mirror.url, endpoint=mirror.endpoint_text(),
        conditional_writes=mirror.conditional_text(),
        locks=[pb.MirrorLock(source=a.source, state=a.state, holder=a.holder, since=a.since)
               for a in mirror.activity()],
        write_backs=mirror.pending_write_backs(), problems=mirror.problems,
        last_problem=mirror.last_problem)


class _BadRequest(FormatError):
    """A request with missing or absurd values (INVALID_ARGUMENT)."""


def _check_source(source: str) -> None:
    if not source.strip():
        raise _BadRequest("request", "source is empty")
    if len(source) > MAX_SOURCE_LEN or "\x00" in source:
        raise _BadRequest("request", f"source is not a plausible reference ({len(source)} chars)")


def _check_globs(*lists: Any) -> None:
    for globs in lists:
        if len(globs) > MAX_GLOBS or any(not g or len(g) > 1024 for g in globs):
            raise _BadRequest("request", "include/exclude globs are empty, too long or too many")


class _Calls:
    """Times a call and writes its one log line; turns errors into status codes."""

    def __init__(self, context: grpc.aio.ServicerContext, method: str, metrics: Metrics,
                 **fields: Any) -> None:
        self.context = context
        self.metrics = metrics
        self.method = method
        self.fields = fields
        self.start = time.perf_counter()

    def ok(self, **more: Any) -> None:
        self._log("OK", logging.INFO, more)

    def _log(self, outcome: str, level: int, more: dict[str, Any]) -> None:
        fields = {**self.fields, **more}
        text = " ".join(f"{k}={v}" for k, v in fields.items() if v not in (None, ""))
        log.log(level, "%s %s ms=%.1f outcome=%s", self.method, text,
                (time.perf_counter() - self.start) * 1000, outcome)

    async def fail(self, e: BaseException) -> NoReturn:
        code = status_for(e)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed unexpectedly", self.method, exc_info=e)
            message = f"internal error: {type(e).__name__}: {e}"
        else:
            message = str(e)
        self._log(f"{code.name} ({message})", logging.WARNING, {})
        self.metrics.error(self.method, code.name)
        name = type(e).__name__ if isinstance(e, WeightdError) else "WeightdError"
        if isinstance(e, _BadRequest):
            name = "FormatError"
        elif isinstance(e, _Expired):
            name = "WeightdError"
        await self.context.abort(code, message, ((ERROR_KEY, name),))
        raise AssertionError("unreachable")  # pragma: no cover - abort raises


async def drive(plan: Plan[T]) -> T:
    """Drive one of the node's plans on the event loop: await each future it yields
    (the node's cold work) without a thread; return its result.

    The futures are shared by every caller waiting for the same work, so a caller that
    goes away (its deadline, a cancel) stops waiting without cancelling the work.
    """
    try:
        future = next(plan)
        while True:
            waiting = asyncio.wrap_future(future)
            waiting.add_done_callback(_retrieve)
            await asyncio.shield(waiting)
            future = plan.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        plan.close()


def _retrieve(f: asyncio.Future[Any]) -> None:
    """Mark a shared future's outcome as seen (each waiter reports it on its own)."""
    if not f.cancelled():
        f.exception()


class _Progress(Callback):  # type: ignore[misc]
    """Bytes done and to do of one fetch, updated from the fetch's threads."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def set_size(self, size: int) -> None:
        with self._lock:
            self.size = size

    def relative_update(self, inc: int = 1) -> None:
        with self._lock:
            self.value += inc

    def read(self) -> tuple[int, int]:
        with self._lock:
            return int(self.value), int(self.size or 0)


class _Landed:
    """The messages of one AcquireStream from its landing's events: a shard's layout
    once (numbered in the order headers land), then its bytes written, only when they
    grew (of a batch of events, the last count of each shard)."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.ended = False

    def feed(self, events: list[Event]) -> list[pb.AcquireEvent]:
        """Messages for ``events``.

        Raises:
            The fetch's error, when it failed.
        """
        out = []
        written: dict[str, int] = {}
        for event in events:
            kind = event[0]
            if kind == "header" and event[1].relpath not in self.index:
                out.append(self._header(event[1]))
            elif kind == "written":
                written[event[1]] = max(written.get(event[1], 0), event[2])
            elif kind == "ready":
                self.ended = True
            elif kind == "failed":
                self.ended = True
                raise event[1]
        for rel, n in written.items():
            if rel in self.index and n > self.sent.get(rel, 0):
                self.sent[rel] = n
                out.append(pb.AcquireEvent(written=pb.BytesWritten(shard=self.index[rel],
                                                                   bytes=n)))
        return out

    def _header(self, landed: ShardLanding) -> pb.AcquireEvent:
        i = self.index[landed.relpath] = len(self.index)
        layout = landed.layout
        return pb.AcquireEvent(shard=pb.ShardLanded(
            shard=i, relpath=landed.relpath, size=landed.size, path=landed.path,
            metadata=layout.metadata,
            tensors=[pb.TensorLayout(name=t.name, dtype=t.dtype, shape=t.shape, shard=i,
                                     offset=t.offset, length=t.nbytes)
                     for t in layout.tensors]))


class WeightdServicer(pb_grpc.WeightdServicer):  # type: ignore[misc]
    def __init__(self, node: Node, *, max_message: int = MAX_MESSAGE) -> None:
        self.node = node
        self.max_message = max_message
        # The shards / tensors / metadata part of an Acquire answer, per resident view:
        # built once and copied (in C) into each answer; gone with its view when the
        # model is unloaded or loaded again.
        self._answers: weakref.WeakKeyDictionary[View, tuple[pb.AcquireResponse, int]] = (
            weakref.WeakKeyDictionary())
        self._answers_lock = threading.Lock()
        self._io = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="weightd-io")
        self._ops = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weightd-ops")

    def close(self) -> None:
        self._io.shutdown(wait=False, cancel_futures=True)
        self._ops.shutdown(wait=False, cancel_futures=True)

    async def _in(self, pool: concurrent.futures.Executor, fn: Callable[..., T],
                  *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller | None:
        """The process calling, from the token its credential handshake gave it."""
        token = next((v for k, v in context.invocation_metadata() or () if k == TOKEN_KEY),
                     None)
        return self.node.credentials.get(str(token)) if token else None

    def _proposed_lease(self, context: grpc.aio.ServicerContext) -> str | None:
        """The lease id the caller proposed for its Acquire (``weightd-lease-id``), if any:
        the one it releases when its side of the call fails (weightd_client does)."""
        value = next((v for k, v in context.invocation_metadata() or () if k == LEASE_KEY),
                     None)
        if value is None:
            return None
        text = str(value)
        if not 16 <= len(text) <= 64 or text.strip("0123456789abcdef"):
            raise _BadRequest("request", f"{LEASE_KEY} must be 16 to 64 lowercase hex digits")
        return text

    def _required(self, context: grpc.aio.ServicerContext) -> Caller:
        """The calling process; :class:`Unauthenticated` without valid credentials."""
        caller = self._caller(context)
        if caller is None:
            token = any(k == TOKEN_KEY for k, _ in context.invocation_metadata() or ())
            raise Unauthenticated(
                "this call needs the caller's credentials: connect to the daemon's "
                "credential socket (<socket>.cred) first and send its token as "
                "'weightd-token' metadata (weightd_client does both); a token from before "
                "a daemon restart is unknown" if token else
                "this call needs the caller's credentials (weightd-token metadata): see "
                "weightd_client.credentials")
        return caller

    def _operator(self, context: grpc.aio.ServicerContext, what: str) -> Caller:
        caller = self._required(context)
        if not caller.privileged():
            raise NotPermitted(f"{what} through the daemon is for the daemon's user or root, "
                               f"not uid {caller.uid}")
        return caller

    def _answer_template(self, model: str, view: View) -> tuple[pb.AcquireResponse, int]:
        """The part of an Acquire answer shared by every lease of ``view``, and its size."""
        with self._answers_lock:
            cached = self._answers.get(view)
        if cached is None:
            template = pb.AcquireResponse(
                model=model, snapshot_path=view.snapshot_path, metadata=view.metadata,
                shards=[pb.Shard(relpath=s.relpath, digest=s.digest, size=s.size, path=s.path,
                                 ipc_handle=s.ipc_handle, device_uuid=s.device_uuid,
                                 device_offset=0, pending_path=s.pending_path)
                        for s in view.shards],
                tensors=[pb.TensorLayout(name=t.name, dtype=t.dtype, shape=t.shape,
                                         shard=t.shard, offset=t.offset, length=t.length)
                         for t in view.tensors])
            cached = (template, template.ByteSize())
            with self._answers_lock:
                self._answers[view] = cached
        return cached

    # RPCs ----------------------------------------------------------------------------------

    async def Fetch(self, request: pb.FetchRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.FetchProgress]:
        calls = _Calls(context, "Fetch", self.node.metrics, source=request.source)
        progress = _Progress()
        task = None
        try:
            _check_source(request.source)
            _check_globs(request.include, request.exclude)
            task = asyncio.ensure_future(drive(self.node.fetching(
                request.source, include=list(request.include) or None,
                exclude=list(request.exclude), callback=progress)))
            sent = (0, 0)
            while not (await asyncio.wait({task}, timeout=0.1))[0]:
                now = progress.read()
                if now != sent:
                    sent = now
                    yield pb.FetchProgress(bytes_done=now[0], bytes_total=now[1])
            snap = task.result()
        except Exception as e:
            await calls.fail(e)
        finally:
            if task is not None and not task.done():
                task.cancel()  # stops this caller's waiting, not the fetch
        if snap is None:  # pragma: no cover - only pins ask for "fetch if absent"
            await calls.fail(SourceNotFound(f"{request.source}: nothing was fetched"))
        s = snap.stats
        calls.ok(model=snap.name, bytes=s.bytes_fetched, hits=s.hits)
        yield pb.FetchProgress(bytes_done=s.bytes_fetched, bytes_total=s.bytes_fetched, done=True,
                               model=snap.name, snapshot_path=snap.path, files=s.files,
                               hits=s.hits, bytes_fetched=s.bytes_fetched, seconds=s.seconds)

    def _checked_caller(self, request: pb.AcquireRequest,
                        context: grpc.aio.ServicerContext, calls: _Calls) -> Caller:
        """The caller of an Acquire (or AcquireStream), once its request is checked."""
        caller = self._required(context)
        calls.fields["pid"] = caller.pid
        _check_source(request.source)
        _check_globs(request.include, request.exclude)
        if request.client.pid < 0:
            raise _BadRequest("request", "client.pid cannot be negative")
        return caller

    def _deliverable(self, context: grpc.aio.ServicerContext) -> Callable[[str, View], None]:
        def deliverable(model: str, view: View) -> None:
            """What would leave a lease nobody can use is refused before leasing."""
            size = self._answer_template(model, view)[1] + _ANSWER_OVERHEAD
            if size > self.max_message:
                raise FormatError(model, f"its Acquire answer would be {size} bytes, over "
                                         f"the {self.max_message}-byte message limit "
                                         "(too many tensors, or too much metadata)")
            left = context.time_remaining()
            if left is not None and left < MIN_TIME_LEFT + size / ANSWER_RATE:
                raise _Expired(f"{model}: the caller's deadline passes before its answer "
                               f"of {size} bytes could reach it")

        return deliverable

    def _acquiring(self, request: pb.AcquireRequest, context: grpc.aio.ServicerContext,
                   caller: Caller, lease_id: str | None = None) -> Plan[Acquired | None]:
        return self.node.acquiring(
            request.source, device=request.device or "cpu", caller=caller,
            client_name=request.client.name, include=list(request.include) or None,
            exclude=list(request.exclude), check=self._deliverable(context),
            lease_id=lease_id)

    def _answer(self, got: Acquired, t0: float) -> pb.AcquireResponse:
        answer = pb.AcquireResponse()
        answer.CopyFrom(self._answer_template(got.model, got.view)[0])
        answer.lease_id = got.lease.lease_id
        answer.tier = _TIERS[got.lease.tier]
        answer.device = got.lease.device
        answer.fetched = got.fetched
        answer.loaded = got.loaded
        answer.server_ms = (time.perf_counter() - t0) * 1000
        return answer

    def _undelivered(self, context: grpc.aio.ServicerContext, lease_id: str,
                     caller: Caller) -> None:
        """When an Acquire call ends: its lease goes unless the answer was sent."""
        if not context.cancelled():
            return
        try:
            self.node.release(lease_id, caller)
        except LeaseNotFound:
            return  # ended already (released, or reaped)
        log.warning("Acquire lease=%s pid=%d: the call was cancelled before its answer was "
                    "delivered: lease released", lease_id, caller.pid)

    async def Acquire(self, request: pb.AcquireRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> pb.AcquireResponse:
        t0 = time.perf_counter()
        calls = _Calls(context, "Acquire", self.node.metrics, source=request.source,
                       device=request.device or "cpu")
        try:
            caller = self._checked_caller(request, context, calls)
            lease_id = self._proposed_lease(context)
            got = await drive(self._acquiring(request, context, caller, lease_id))
            if got is None:  # pragma: no cover - a caller always gets a lease or an error
                raise RuntimeError("no lease")
        except Exception as e:
            await calls.fail(e)
        # an answer the call did not deliver (cancelled: the caller or its connection went
        # away) leaves no lease; the caller's own deadline passing after the answer was
        # sent is the client's to clean up (it releases the id it proposed)
        context.add_done_callback(lambda ctx: self._undelivered(ctx, got.lease.lease_id, caller))
        calls.ok(model=got.model, tier=got.lease.tier, bytes=got.view.nbytes,
                 lease=got.lease.lease_id, fetched=got.fetched, loaded=got.loaded)
        return self._answer(got, t0)

    async def AcquireStream(self, request: pb.AcquireRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext,
                            ) -> AsyncIterator[pb.AcquireEvent]:
        """The lease's id; then, while the model lands (host tier), its shards' layouts
        and bytes written; then the Acquire answer (see the proto)."""
        t0 = time.perf_counter()
        calls = _Calls(context, "AcquireStream", self.node.metrics, source=request.source,
                       device=request.device or "cpu")
        landing: Landing | None = None
        started = False
        listener = None
        try:
            caller = self._checked_caller(request, context, calls)
            lease_id = new_lease_id()
            model, landing, started = await drive(self.node.landing(
                request.source, include=list(request.include) or None,
                exclude=list(request.exclude), stream=(request.device or "cpu") == "cpu"))
            yield pb.AcquireEvent(start=pb.StreamStart(lease_id=lease_id, model=model))
            if landing is not None:
                loop = asyncio.get_running_loop()
                events: asyncio.Queue[Event] = asyncio.Queue()

                def listener(event: Event) -> None:  # from the fetch's threads
                    with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                        loop.call_soon_threadsafe(events.put_nowait, event)

                stream = _Landed()
                for message in stream.feed(landing.subscribe(listener)):
                    yield message
                while not stream.ended:
                    batch = [await events.get()]
                    while not events.empty():  # what queued meanwhile, in one go
                        batch.append(events.get_nowait())
                    for message in stream.feed(batch):
                        yield message
                calls.fields["streamed"] = len(stream.index)
            got = await drive(self._acquiring(request, context, caller, lease_id))
            if got is None:  # pragma: no cover - a caller always gets a lease or an error
                raise RuntimeError("no lease")
            if started:  # this stream started the fetch its Acquire then waited for
                got = dataclasses.replace(got, fetched=True)
        except Exception as e:
            await calls.fail(e)
        finally:
            if landing is not None and listener is not None:
                landing.unsubscribe(listener)
        # as for Acquire: a stream cancelled before its end was delivered leaves no lease
        context.add_done_callback(lambda ctx: self._undelivered(ctx, got.lease.lease_id, caller))
        calls.ok(model=got.model, tier=got.lease.tier, bytes=got.view.nbytes,
                 lease=got.lease.lease_id, fetched=got.fetched, loaded=got.loaded)
        yield pb.AcquireEvent(end=self._answer(got, t0))

    async def Release(self, request: pb.ReleaseRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        calls = _Calls(context, "Release", self.node.metrics, lease=request.lease_id[:128])
        try:
            caller = self._required(context)
            if not request.lease_id or len(request.lease_id) > 128:
                raise LeaseNotFound(f"no lease {request.lease_id[:128]!r}")
            lease = self.node.release(request.lease_id, caller)
        except Exception as e:
            await calls.fail(e)
        calls.ok(model=lease.model, pid=caller.pid)
        return pb.ReleaseResponse()

    def _list(self) -> pb.ListResponse:
        resident: dict[str, list[pb.Residency]] = {}
        for r in self.node.residency():
            resident.setdefault(r.model, []).append(pb.Residency(
                tier=_TIERS[r.tier], device=r.device, bytes=r.bytes, last_used=r.last_used,
                leases=r.leases))
        models = [(m, str(self.node.store.snapshot_path(m.name)))
                  for m in self.node.store.index.models()]
        known = {m.name for m, _ in models}
        # served before it is durable: listed from its fetch until the index has it
        models += [(m, path) for m, path in self.node.not_durable() if m.name not in known]
        return pb.ListResponse(models=[pb.ModelInfo(
            model=m.name, source=m.source, snapshot_path=path, bytes=m.size,
            files=len(m.files), resident=resident.get(m.name, []),
            last_used=max([self.node.last_used(m.name, m.last_used),
                           *(r.last_used for r in resident.get(m.name, []))]))
            for m, path in sorted(models, key=lambda x: x[0].name)])

    async def List(self, request: pb.ListRequest,  # noqa: N802
                   context: grpc.aio.ServicerContext) -> pb.ListResponse:
        calls = _Calls(context, "List", self.node.metrics)
        try:
            answer = await self._in(self._io, self._list)
        except Exception as e:
            await calls.fail(e)
        calls.ok(models=len(answer.models))
        return answer

    async def Status(self, request: pb.StatusRequest,  # noqa: N802
                     context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        calls = _Calls(context, "Status", self.node.metrics)
        try:
            node = self.node
            caller = self._caller(context)
            tiers = [pb.TierStatus(tier=pb.TIER_DISK, device="disk", available=True,
                                   bytes_used=node.disk_bytes,
                                   bytes_budget=node.config.disk_budget or 0)]
            for tier, device in node.devices():
                tiers.append(pb.TierStatus(
                    tier=_TIERS[tier.name], device=device, available=True,
                    reason=node.host.lock_problem if tier is node.host else "",
                    bytes_used=tier.used(device), bytes_budget=node.budget(device),
                    locked=node.host.locked if tier is node.host else False))
            if not node.cuda.available:
                tiers.append(pb.TierStatus(tier=pb.TIER_CUDA, available=False,
                                           reason=node.cuda.reason))
            pins = [pb.PinInfo(model=p.model, source=p.source, tier=_TIERS[p.tier],
                               device=p.device, state=p.state, since=p.since)
                    for p in node.pins()]
            now = time.time()
            # a lease id is a capability: its owner sees it, and so does an operator (root
            # or the daemon's user, who may release any lease: `weightd release`)
            operator = caller is not None and caller.privileged()
            leases = [pb.LeaseInfo(
                lease_id=lease.lease_id if lease.owner is caller or operator else "",
                model=lease.model,
                tier=_TIERS[lease.tier], device=lease.device, pid=lease.pid,
                client_name=lease.client_name, since=lease.since, uid=lease.uid,
                age_seconds=now - lease.since)
                for lease in node.leases.all()]
            model_bytes = [pb.ModelBytes(model=m, origin=c["origin"], mirror=c["mirror"],
                                         cache=c["cache"])
                           for m, c in node.metrics.bytes_by_model().items()]
            mirror = _mirror_status(node.fetcher.mirror)
        except Exception as e:
            await calls.fail(e)
        calls.ok()
        return pb.StatusResponse(version=__version__, pid=os.getpid(),
                                 uptime_seconds=time.time() - node.started,
                                 cache_dir=str(node.store.root), tiers=tiers, leases=leases,
                                 problems=node.problems(), pins=pins,
                                 model_bytes=model_bytes, mirror=mirror)

    async def Evict(self, request: pb.EvictRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> pb.EvictResponse:
        calls = _Calls(context, "Evict", self.node.metrics, source=request.source)
        try:
            caller = self._required(context)  # any member; known and logged
            _check_source(request.source)
            if request.tier == pb.TIER_DISK or request.tier not in _TIER_NAMES.keys() | {0}:
                raise _BadRequest("request", "evict takes the host or cuda tier (or none: "
                                             "both); the disk tier is `weightd gc`")
            freed = await self._in(self._io, lambda: self.node.evict(
                request.source, tier=_TIER_NAMES.get(request.tier)))
        except Exception as e:
            await calls.fail(e)
        calls.ok(bytes=freed, pid=caller.pid, uid=caller.uid)
        return pb.EvictResponse(bytes_freed=freed)

    def _pin_args(self, request: pb.PinRequest | pb.UnpinRequest) -> tuple[str, str]:
        _check_source(request.source)
        tier = _TIER_NAMES.get(request.tier or pb.TIER_HOST)
        if tier is None:
            raise _BadRequest("request", f"unknown tier {request.tier}")
        return tier, request.device or ("cpu" if tier != "cuda" else "")

    async def Pin(self, request: pb.PinRequest,  # noqa: N802
                  context: grpc.aio.ServicerContext) -> pb.PinResponse:
        calls = _Calls(context, "Pin", self.node.metrics, source=request.source)
        try:
            caller = self._required(context)  # any member; known and logged
            tier, device = self._pin_args(request)
            model = await self._in(self._io, lambda: self.node.pin(
                request.source, tier=tier, device=device))
        except Exception as e:
            await calls.fail(e)
        calls.ok(model=model, tier=tier, pid=caller.pid, uid=caller.uid)
        return pb.PinResponse(model=model)

    async def Unpin(self, request: pb.UnpinRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> pb.UnpinResponse:
        calls = _Calls(context, "Unpin", self.node.metrics, source=request.source)
        try:
            caller = self._required(context)  # any member; known and logged
            tier, device = self._pin_args(request)
            removed = await self._in(self._io, lambda: self.node.unpin(
                request.source, tier=tier, device=device))
        except Exception as e:
            await calls.fail(e)
        calls.ok(was_pinned=removed, pid=caller.pid, uid=caller.uid)
        return pb.UnpinResponse(was_pinned=removed)

    async def Verify(self, request: pb.VerifyRequest,  # noqa: N802
                     context: grpc.aio.ServicerContext) -> pb.VerifyResponse:
        calls = _Calls(context, "Verify", self.node.metrics)
        try:
            caller = self._operator(context, "verify")
            calls.fields["pid"] = caller.pid
            result = await self._in(self._ops, self.node.verify)
        except Exception as e:
            await calls.fail(e)
        r = result.report
        calls.ok(blobs=r.checked, corrupt=len(r.corrupt), in_use=len(result.in_use))
        return pb.VerifyResponse(checked=r.checked, bytes=r.bytes, corrupt=r.corrupt,
                                 missing=r.missing, in_use=result.in_use,
                                 seconds=result.seconds,
                                 modes=[pb.ModeNarrowed(path=path, old_mode=old, new_mode=new)
                                        for path, old, new in r.modes])

    async def Gc(self, request: pb.GcRequest,  # noqa: N802
                 context: grpc.aio.ServicerContext) -> pb.GcResponse:
        calls = _Calls(context, "Gc", self.node.metrics, budget=request.max_bytes,
                       dry_run=request.dry_run)
        try:
            if request.max_bytes < 0:
                raise _BadRequest("request", "max_bytes cannot be negative")
            if not request.dry_run:
                self._operator(context, "gc")
            plan = await self._in(self._ops, lambda: self.node.gc(
                request.max_bytes, dry_run=request.dry_run))
        except Exception as e:
            await calls.fail(e)
        calls.ok(models=len(plan.models), bytes=plan.freed)
        return pb.GcResponse(budget=plan.budget, before=plan.before, after=plan.after,
                             models=plan.models,
                             blobs=[pb.GcBlob(digest=d, size=n) for d, n in plan.blobs],
                             revisions=[str(r) for r in plan.revisions],
                             dry_run=request.dry_run)
