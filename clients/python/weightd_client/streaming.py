"""A model's tensors as they land: the client side of the daemon's AcquireStream.

:meth:`weightd_client.Client.stream` returns a :class:`StreamedModel`, an iterator over
``(name, tensor)`` in the order their bytes complete. The daemon says, for each shard,
where its bytes land (its temporary file, 0440) once its header has landed, then how many
of its leading bytes are written; this module maps the file once (see Note [lifetime of
host tensors] in :mod:`weightd_client.tensors`: the same private, copy-on-write mapping)
and yields each tensor whose whole byte range is written. The last event is the Acquire
answer, sent once every file is written and every digest checked: its lease is this
process's from then on, and the tensors not yielded yet (a model that was resident: all
of them) come from it.

Note [streamed tensors are verified at the end]
-----------------------------------------------
A tensor yielded before the end is made of bytes that were written, not yet verified:
the whole-file digest (xxh3-128, and the source's own where it gives one) is known only
when the file is complete. If one does not match, the iterator raises
:class:`~weightd_client.errors.IntegrityError` where it would have finished; an engine
that loads from the iterator then fails its load, and nothing is cached. The bytes of a
tensor never change once yielded: the daemon writes each byte once, and the file
becomes the blob by a rename (the same inode, the same pages).
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Generator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client.errors import LeaseNotFound, SourceUnavailable, WeightdError
from weightd_client.tensors import checked_tensors, host_tensor, map_shard, require_torch

if TYPE_CHECKING:
    import torch

    from weightd_client.client import Client, LoadedModel

__all__ = ["StreamedModel"]

log = logging.getLogger(__name__)


class _Shard:
    """A shard whose header has landed: its mapping and its tensors not yet yielded,
    last byte first out (sorted by where they end, reversed)."""

    def __init__(self, landed: pb.ShardLanded, model: str) -> None:
        self.relpath = landed.relpath
        self.written = 0
        try:
            self.mm: mmap.mmap | None = map_shard(landed.path)
        except FileNotFoundError:  # committed already: the end names its blob
            self.mm = None
        one = pb.AcquireResponse(model=model)
        for t in landed.tensors:
            one.tensors.add().CopyFrom(t)
            one.tensors[-1].shard = 0
        size = len(self.mm) if self.mm is not None else landed.size
        self.todo = sorted(checked_tensors(one, [size], [landed.relpath], unit="file"),
                           key=lambda c: c[0].offset + c[0].length, reverse=True)

    def landed(self, written: int) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors whose bytes are all among the first ``written``."""
        self.written = max(self.written, written)
        if self.mm is None:
            return
        th = require_torch()
        while self.todo and self.todo[-1][0].offset + self.todo[-1][0].length <= self.written:
            t, dtype, shape, numel = self.todo.pop()
            yield t.name, host_tensor(th, self.mm, dtype, shape, numel, t.offset)


class StreamedModel(Iterator[tuple[str, "torch.Tensor"]]):
    """A model's ``(name, tensor)`` pairs as their bytes land, and the lease that keeps
    them resident once the last one came. Built by :meth:`Client.stream`; iterate it
    once.

    Attributes:
        lease_id: the lease (named by the daemon's first event; granted with the end).
        model: the model's name in the daemon.
        snapshot_path: its snapshot directory (side files), once the iteration ended.
        metadata: the shards' merged ``__metadata__``, once the iteration ended.
        fetched, loaded: what the daemon had to do (once the iteration ended).
    """

    def __init__(self, client: Client, request: pb.AcquireRequest, device: torch.device, *,
                 timeout: float) -> None:
        self._client = client
        self._request = request
        self._device = device
        self._timeout = timeout
        self._call: Any = None
        self._pairs = self._run()
        self._model: LoadedModel | None = None
        self._done = False
        self.lease_id: str | None = None
        self.model = ""
        self.snapshot_path = ""
        self.metadata: dict[str, str] = {}
        self.fetched = self.loaded = False

    def __repr__(self) -> str:
        return f"StreamedModel({self.model or self._request.source!r}, lease_id={self.lease_id!r})"

    def __iter__(self) -> StreamedModel:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        return next(self._pairs)

    def _events(self) -> Iterator[pb.AcquireEvent]:
        """The daemon's events; credentials from before a daemon restart are renewed
        once, before the first event."""
        from weightd_client.client import error_from_rpc

        for attempt in range(2):
            self._call = self._client._stream_call(self._request, self._timeout)
            first = True
            try:
                for event in self._call:
                    first = False
                    yield event
                return
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                if attempt == 0 and first and code == grpc.StatusCode.UNAUTHENTICATED:
                    self._client._credential.forget()
                    continue
                raise error_from_rpc(e, socket=self._client.socket,
                                     method="AcquireStream") from e

    def _run(self) -> Generator[tuple[str, torch.Tensor], None, None]:
        shards: dict[int, _Shard] = {}
        given: set[str] = set()
        for event in self._events():
            kind = event.WhichOneof("event")
            if kind == "start":
                self.lease_id, self.model = event.start.lease_id, event.start.model
                # ended by this process from now on, whatever happens to the stream
                with self._client._lock:
                    self._client._leases.add(self.lease_id)
            elif kind == "shard":
                if event.shard.shard not in shards:
                    shards[event.shard.shard] = _Shard(event.shard, self.model)
            elif kind == "written":
                shard = shards.get(event.written.shard)
                for name, tensor in shard.landed(event.written.bytes) if shard else ():
                    given.add(name)
                    yield name, tensor
            elif kind == "end":
                yield from self._end(event.end, given)
                return
        raise SourceUnavailable(f"{self._request.source}: weightd ended the stream before "
                                "its end")

    def _end(self, answer: pb.AcquireResponse,
             given: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The lease is granted: the tensors not yielded yet, from the Acquire answer."""
        model = self._client._leased(answer, self._request.source, self._device)
        self._model = model
        self.lease_id = answer.lease_id
        self.model, self.snapshot_path = answer.model, answer.snapshot_path
        self.metadata = dict(answer.metadata)
        self.fetched, self.loaded = answer.fetched, answer.loaded
        self._done = True
        for name, tensor in model.items():
            if name not in given:
                yield name, tensor

    def release(self) -> None:
        """End the stream (if it runs) and the lease (idempotent). Tensors already
        yielded stay valid on the host (see Note [lifetime of host tensors]); CUDA ones
        are invalid after it."""
        if self._call is not None and not self._done:
            self._call.cancel()
        self._pairs.close()
        lease, self.lease_id = self.lease_id, None
        if self._model is not None:
            self._model.release()
        elif lease:
            # named but maybe never granted (or granted as the stream was cancelled)
            try:
                self._client.release(lease)
            except LeaseNotFound:
                pass
            except WeightdError as e:
                log.warning("could not release lease %s (it ends with this process): %s",
                            lease, e)

    def __enter__(self) -> StreamedModel:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
