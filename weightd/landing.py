"""How a model's shards land while it is fetched: what streaming replicas are told.

A :class:`Landing` follows one model fetch (it is the fetch's
:class:`~weightd.store.fetch.FetchEvents`): for each shard, where its bytes land (its
temporary file, or its blob when it was in the cache already), its layout once its header
has landed and been validated, and how many of its leading bytes are written; then that
the model is ready (every file written and every digest checked) or that the fetch
failed. A subscriber is given what happened so far, then every change as it happens,
from the fetch's threads. The node makes one per fetch and shares it with every
AcquireStream that waits for that fetch (weightd/service/servicer.py).

Events are tuples, in the order they happened for each shard:

``("header", ShardLanding)``
    a shard's path and layout are known (once per shard; a late subscriber may get it
    twice, once replayed and once live: it is idempotent);
``("written", relpath, nbytes)``
    ``nbytes`` leading bytes of the shard are written (absolute and growing: a repeat is
    harmless);
``("ready", Ready)``, ``("failed", exception)``
    the end: nothing follows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightd.formats import ShardLayout
from weightd.sources import RemoteFile
from weightd.store.fetch import FetchEvents, Ready

__all__ = ["Event", "Landing", "Listener", "ShardLanding"]

#: One change (see the module's docstring).
Event = tuple[Any, ...]
#: Told of each event, from the fetch's threads: it must return at once.
Listener = Callable[[Event], None]


@dataclass(frozen=True)
class ShardLanding:
    """A shard whose header has landed: where its bytes are and what they hold."""

    relpath: str
    size: int
    path: str
    layout: ShardLayout


class Landing(FetchEvents):
    """The shards of one model fetch as they land, for every subscriber.

    Args:
        layout_of: the layout of a shard blob that was in the cache already (by digest);
            None for a fetch nobody may stream (a refresh): the cached shards' headers are
            then not read.
        blob_path: where a cached blob is.
        on_ready: told first when the model is ready, before any subscriber (the node
            records that the model may be served; a replica told "ready" then finds it so).
    """

    def __init__(self, layout_of: Callable[[str], ShardLayout] | None,
                 blob_path: Callable[[str], Path], on_ready: Callable[[Ready], None]) -> None:
        self._layout_of = layout_of
        self._blob_path = blob_path
        self._on_ready = on_ready
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._paths: dict[str, str] = {}            # relpath -> where its bytes land
        self._shards: dict[str, ShardLanding] = {}  # relpath -> header landed
        self._written: dict[str, int] = {}          # relpath -> leading bytes written
        self._end: Event | None = None

    # subscribers ------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> list[Event]:
        """Follow the landing: returns what happened so far (to handle first), then
        ``listener`` is told of every change (it may be told again of one of those)."""
        with self._lock:
            self._listeners.append(listener)
            past: list[Event] = [("header", s) for s in self._shards.values()]
            past += [("written", rel, n) for rel, n in self._written.items()
                     if rel in self._shards]
            if self._end is not None:
                past.append(self._end)
        return past

    def unsubscribe(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _emit(self, event: Event) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:  # outside the lock: a listener only queues the event
            listener(event)

    # what the fetch says ------------------------------------------------------------------

    def listed(self, hits: Sequence[tuple[RemoteFile, str]], todo: Sequence[RemoteFile],
               ) -> None:
        if self._layout_of is None:  # nobody streams this fetch: no header is read
            return
        for f, digest in hits:  # in the cache: all its bytes are there
            if f.relpath.endswith(".safetensors"):
                landing = ShardLanding(f.relpath, f.size, str(self._blob_path(digest)),
                                       self._layout_of(digest))
                with self._lock:
                    self._shards[f.relpath] = landing
                    self._written[f.relpath] = f.size
                self._emit(("header", landing))
                self._emit(("written", f.relpath, f.size))

    def opened(self, rf: RemoteFile, path: Path) -> None:
        with self._lock:
            self._paths[rf.relpath] = str(path)

    def header(self, rf: RemoteFile, layout: ShardLayout) -> None:
        with self._lock:
            landing = ShardLanding(rf.relpath, rf.size, self._paths[rf.relpath], layout)
            self._shards[rf.relpath] = landing
        self._emit(("header", landing))

    def written(self, rf: RemoteFile, offset: int, nbytes: int) -> None:
        with self._lock:
            if rf.relpath not in self._shards:  # a side file, or a header not landed yet
                return
            self._written[rf.relpath] = offset + nbytes
        self._emit(("written", rf.relpath, offset + nbytes))

    def ready(self, ready: Ready) -> None:
        self._on_ready(ready)
        self._finish(("ready", ready))

    def failed(self, error: BaseException) -> None:
        """The fetch failed (the node says so: the fetch itself only raises)."""
        self._finish(("failed", error))

    def _finish(self, event: Event) -> None:
        with self._lock:
            if self._end is not None:
                return
            self._end = event
            # a subscriber from now on is told only the end (the model is whole, or
            # failed): the layouts go with the fetch
            self._paths.clear()
            self._shards.clear()
            self._written.clear()
        self._emit(event)
