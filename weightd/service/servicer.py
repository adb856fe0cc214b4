"""``weightd.v1.Weightd`` over the node, with one error table and one log line a request."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any, NoReturn

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
    WeightdError,
)
from weightd.metrics import Metrics
from weightd.node import Node, View
from weightd.store.mirror import Mirror
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc
from weightd_client.client import ERROR_KEY  # the one name both sides read and write
from weightd_client.client import TIER_BY_NAME as _TIERS
from weightd_client.client import TIER_NAMES as _TIER_NAMES

log = logging.getLogger("weightd.requests")

#: The one table from weightd's outcomes to gRPC status codes. The class name also
#: travels as trailing metadata ``weightd-error`` so the client re-raises the same class.
ERROR_CODES: dict[type[WeightdError], grpc.StatusCode] = {
    FormatError: grpc.StatusCode.INVALID_ARGUMENT,
    SourceNotFound: grpc.StatusCode.NOT_FOUND,
    SourceUnavailable: grpc.StatusCode.UNAVAILABLE,
    IntegrityError: grpc.StatusCode.DATA_LOSS,
    BudgetExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotPermitted: grpc.StatusCode.PERMISSION_DENIED,
    GpuUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    LeaseNotFound: grpc.StatusCode.FAILED_PRECONDITION,
    ModelInUse: grpc.StatusCode.FAILED_PRECONDITION,
    CacheLocked: grpc.StatusCode.UNAVAILABLE,
}

MAX_SOURCE_LEN = 4096
MAX_GLOBS = 256




def status_for(e: BaseException) -> grpc.StatusCode:
    for cls in type(e).__mro__:
        if cls in ERROR_CODES:
            return ERROR_CODES[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def _mirror_status(mirror: Mirror | None) -> pb.MirrorStatus | None:
    if mirror is None:
        return None
    return pb.MirrorStatus(
        url=mirror.url, endpoint=mirror.endpoint(), conditional_writes=mirror.conditional_text(),
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

    def __init__(self, context: grpc.ServicerContext, method: str, metrics: Metrics,
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

    def fail(self, e: BaseException) -> NoReturn:
        code = status_for(e)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed unexpectedly", self.method)
            message = f"internal error: {type(e).__name__}: {e}"
        else:
            message = str(e)
        self._log(f"{code.name} ({message})", logging.WARNING, {})
        self.metrics.error(self.method, code.name)
        name = type(e).__name__ if isinstance(e, WeightdError) else "WeightdError"
        if isinstance(e, _BadRequest):
            name = "FormatError"
        self.context.set_trailing_metadata(((ERROR_KEY, name),))
        self.context.abort(code, message)
        raise AssertionError("unreachable")  # pragma: no cover - abort raises


class _QueueCallback(Callback):  # type: ignore[misc]
    def __init__(self, q: queue.Queue[tuple[int, int] | None]) -> None:
        super().__init__()
        self.q = q

    def call(self, *args: Any, **kwargs: Any) -> None:
        self.q.put((self.value, self.size or 0))


class WeightdServicer(pb_grpc.WeightdServicer):  # type: ignore[misc]
    def __init__(self, node: Node) -> None:
        self.node = node
        # The shards / tensors / metadata part of an Acquire answer, per resident view:
        # built once and copied (in C) into each answer; gone with its view when the
        # model is unloaded or loaded again.
        self._answers: weakref.WeakKeyDictionary[View, pb.AcquireResponse] = (
            weakref.WeakKeyDictionary())
        self._answers_lock = threading.Lock()

    def _answer_template(self, model: str, view: View) -> pb.AcquireResponse:
        with self._answers_lock:
            template = self._answers.get(view)
        if template is None:
            template = pb.AcquireResponse(
                model=model, snapshot_path=view.snapshot_path, metadata=view.metadata,
                shards=[pb.Shard(relpath=s.relpath, digest=s.digest, size=s.size, path=s.path,
                                 ipc_handle=s.ipc_handle, device_uuid=s.device_uuid,
                                 device_offset=0)
                        for s in view.shards],
                tensors=[pb.TensorLayout(name=t.name, dtype=t.dtype, shape=t.shape,
                                         shard=t.shard, offset=t.offset, length=t.length)
                         for t in view.tensors])
            with self._answers_lock:
                self._answers[view] = template
        return template

    def Fetch(self, request: pb.FetchRequest,  # noqa: N802
              context: grpc.ServicerContext) -> Iterator[pb.FetchProgress]:
        calls = _Calls(context, "Fetch", self.node.metrics, source=request.source)
        try:
            _check_source(request.source)
            _check_globs(request.include, request.exclude)
        except WeightdError as e:
            calls.fail(e)
        q: queue.Queue[tuple[int, int] | None] = queue.Queue()
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["snap"] = self.node.fetch(
                    request.source, include=list(request.include) or None,
                    exclude=list(request.exclude), callback=_QueueCallback(q))
            except BaseException as e:  # handed to the streaming thread below
                outcome["error"] = e
            finally:
                q.put(None)

        threading.Thread(target=run, name="weightd-fetch-call", daemon=True).start()
        last_sent = 0.0
        while True:
            item = q.get()
            if item is None:
                break
            while not q.empty():  # coalesce: send only the latest state
                nxt = q.get()
                if nxt is None:
                    q.put(None)
                    break
                item = nxt
            now = time.monotonic()
            if now - last_sent >= 0.1 and context.is_active():
                last_sent = now
                yield pb.FetchProgress(bytes_done=item[0], bytes_total=item[1])
        if "error" in outcome:
            calls.fail(outcome["error"])
        snap = outcome["snap"]
        s = snap.stats
        calls.ok(model=snap.name, bytes=s.bytes_fetched, hits=s.hits)
        yield pb.FetchProgress(bytes_done=s.bytes_fetched, bytes_total=s.bytes_fetched, done=True,
                               model=snap.name, snapshot_path=snap.path, files=s.files,
                               hits=s.hits, bytes_fetched=s.bytes_fetched, seconds=s.seconds)

    def Acquire(self, request: pb.AcquireRequest,  # noqa: N802
                context: grpc.ServicerContext) -> pb.AcquireResponse:
        t0 = time.perf_counter()
        calls = _Calls(context, "Acquire", self.node.metrics, source=request.source,
                       device=request.device or "cpu", pid=request.client.pid)
        try:
            _check_source(request.source)
            _check_globs(request.include, request.exclude)
            if request.client.pid <= 0:
                raise _BadRequest("request", "client.pid must be the caller's process id")
            got = self.node.acquire(
                request.source, device=request.device or "cpu", pid=request.client.pid,
                start_time=request.client.start_time, client_name=request.client.name,
                include=list(request.include) or None, exclude=list(request.exclude))
        except Exception as e:
            calls.fail(e)
        calls.ok(model=got.model, tier=got.lease.tier, bytes=got.view.nbytes,
                 lease=got.lease.lease_id,
                 fetched=got.fetched, loaded=got.loaded)
        answer = pb.AcquireResponse()
        answer.CopyFrom(self._answer_template(got.model, got.view))
        answer.lease_id = got.lease.lease_id
        answer.tier = _TIERS[got.lease.tier]
        answer.device = got.lease.device
        answer.fetched = got.fetched
        answer.loaded = got.loaded
        answer.server_ms = (time.perf_counter() - t0) * 1000
        return answer

    def Release(self, request: pb.ReleaseRequest,  # noqa: N802
                context: grpc.ServicerContext) -> pb.ReleaseResponse:
        calls = _Calls(context, "Release", self.node.metrics, lease=request.lease_id)
        try:
            if not request.lease_id or len(request.lease_id) > 128:
                raise LeaseNotFound(f"no lease {request.lease_id[:128]!r}")
            lease = self.node.release(request.lease_id)
        except Exception as e:
            calls.fail(e)
        calls.ok(model=lease.model)
        return pb.ReleaseResponse()

    def List(self, request: pb.ListRequest,  # noqa: N802
             context: grpc.ServicerContext) -> pb.ListResponse:
        calls = _Calls(context, "List", self.node.metrics)
        try:
            leases = self.node.leases.all()
            resident: dict[str, list[pb.Residency]] = {}
            for name, device, nbytes, last_used in self.node.residency():
                resident.setdefault(name, []).append(pb.Residency(
                    tier=_TIERS["host" if device == "cpu" else "cuda"], device=device,
                    bytes=nbytes, last_used=last_used,
                    leases=sum(1 for x in leases if x.model == name and x.device == device)))
            models = [pb.ModelInfo(
                model=m.name, source=m.source,
                snapshot_path=str(self.node.store.snapshot_path(m.name)), bytes=m.size,
                files=len(m.files), resident=resident.get(m.name, []))
                for m in self.node.store.index.models()]
        except Exception as e:
            calls.fail(e)
        calls.ok(models=len(models))
        return pb.ListResponse(models=models)

    def Status(self, request: pb.StatusRequest,  # noqa: N802
               context: grpc.ServicerContext) -> pb.StatusResponse:
        calls = _Calls(context, "Status", self.node.metrics)
        try:
            node = self.node
            problems = node.problems()
            tiers = [
                pb.TierStatus(tier=pb.TIER_DISK, device="disk", available=True,
                              bytes_used=node.store.blob_bytes(),
                              bytes_budget=node.config.disk_budget or 0),
                pb.TierStatus(tier=pb.TIER_HOST, device="cpu", available=True,
                              reason=node.host.lock_problem, bytes_used=node.host.bytes_used,
                              bytes_budget=node.host_budget, locked=node.host.locked),
            ]
            if node.cuda.available:
                tiers += [pb.TierStatus(tier=pb.TIER_CUDA, device=f"cuda:{d.uuid}",
                                        available=True, bytes_used=node.cuda.bytes_used(d.uuid),
                                        bytes_budget=node.gpu_budget(d.uuid))
                          for d in node.cuda.devices()]
            else:
                tiers.append(pb.TierStatus(tier=pb.TIER_CUDA, available=False,
                                           reason=node.cuda.reason))
            pins = [pb.PinInfo(model=p.model, source=p.source, tier=_TIERS[p.tier],
                               device=p.device, state=p.state, since=p.since)
                    for p in node.pins()]
            leases = [pb.LeaseInfo(lease_id=lease.lease_id, model=lease.model,
                                   tier=_TIERS[lease.tier], device=lease.device, pid=lease.pid,
                                   client_name=lease.client_name, since=lease.since)
                      for lease in node.leases.all()]
            model_bytes = [pb.ModelBytes(model=m, origin=c["origin"], mirror=c["mirror"],
                                         cache=c["cache"])
                           for m, c in node.metrics.bytes_by_model().items()]
            mirror = _mirror_status(node.fetcher.mirror)
        except Exception as e:
            calls.fail(e)
        calls.ok()
        return pb.StatusResponse(version=__version__, pid=os.getpid(),
                                 uptime_seconds=time.time() - node.started,
                                 cache_dir=str(node.store.root), tiers=tiers, leases=leases,
                                 problems=problems, pins=pins, model_bytes=model_bytes,
                                 mirror=mirror)

    def Evict(self, request: pb.EvictRequest,  # noqa: N802
              context: grpc.ServicerContext) -> pb.EvictResponse:
        calls = _Calls(context, "Evict", self.node.metrics, source=request.source)
        try:
            _check_source(request.source)
            if request.tier == pb.TIER_DISK or request.tier not in _TIER_NAMES.keys() | {0}:
                raise _BadRequest("request", "evict takes the host or cuda tier (or none: "
                                             "both); the disk tier is `weightd gc`")
            freed = self.node.evict(request.source, tier=_TIER_NAMES.get(request.tier))
        except Exception as e:
            calls.fail(e)
        calls.ok(bytes=freed)
        return pb.EvictResponse(bytes_freed=freed)

    def _pin_args(self, request: pb.PinRequest | pb.UnpinRequest) -> tuple[str, str]:
        _check_source(request.source)
        tier = _TIER_NAMES.get(request.tier or pb.TIER_HOST)
        if tier is None:
            raise _BadRequest("request", f"unknown tier {request.tier}")
        return tier, request.device or ("cpu" if tier != "cuda" else "")

    def Pin(self, request: pb.PinRequest,  # noqa: N802
            context: grpc.ServicerContext) -> pb.PinResponse:
        calls = _Calls(context, "Pin", self.node.metrics, source=request.source)
        try:
            tier, device = self._pin_args(request)
            model = self.node.pin(request.source, tier=tier, device=device)
        except Exception as e:
            calls.fail(e)
        calls.ok(model=model, tier=tier)
        return pb.PinResponse(model=model)

    def Unpin(self, request: pb.UnpinRequest,  # noqa: N802
              context: grpc.ServicerContext) -> pb.UnpinResponse:
        calls = _Calls(context, "Unpin", self.node.metrics, source=request.source)
        try:
            tier, device = self._pin_args(request)
            removed = self.node.unpin(request.source, tier=tier, device=device)
        except Exception as e:
            calls.fail(e)
        calls.ok(was_pinned=removed)
        return pb.UnpinResponse(was_pinned=removed)
