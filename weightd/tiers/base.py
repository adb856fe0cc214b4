"""One interface for the residency tiers, and their shared-blob bookkeeping, written once.

A tier keeps shard blobs resident on its devices ("cpu" for the host tier,
``cuda:<GPU UUID>`` for the CUDA tier) for the models that name them. A blob that several
models name is resident once per device and counted once; it goes when the last model
using it there goes. That bookkeeping is :class:`BlobTier`'s; a tier implements only
how one blob is made resident, exported and freed (:meth:`BlobTier._make`,
:meth:`BlobTier._export`, :meth:`BlobTier._free`) and what it really costs
(:meth:`BlobTier._charge`: the CUDA tier's 2 MiB granules).

Every operation comes in two halves, so that the node can decide under its lock and
do the I/O outside it (weightd/node.py):

* :meth:`BlobTier.reserve` (bookkeeping, microseconds): the model's blobs are counted as
  used from now on, so that concurrent decisions see them; then :meth:`BlobTier.fill`
  (I/O, no lock held) makes the reserved blobs resident. A blob that another
  reservation is making is waited for, not made twice. :meth:`BlobTier.cancel` undoes
  a reservation that will not be filled.
* :meth:`BlobTier.detach` (bookkeeping): the model no longer uses its blobs, and those
  nobody else uses stop counting; then :meth:`BlobTier.free` (I/O) lets them go.

:meth:`BlobTier.load` and :meth:`BlobTier.unload` do both halves at once.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from weightd_client.tensors import open_shard

log = logging.getLogger(__name__)

__all__ = ["Blob", "BlobTier", "Detached", "Reservation", "ShardExport", "Tier", "open_blob"]


class Blob(NamedTuple):
    """A shard blob to make resident: its digest, its file in the cache, its size, and,
    while it is not durable yet, the temporary file its bytes are in (``pending``: renamed
    to ``path`` at any moment)."""

    digest: str
    path: Path
    size: int
    pending: Path | None = None


def open_blob(blob: Blob) -> int:
    """Open a blob's file read-only: its path in the cache, else (not durable yet) its
    temporary file, else its path again (the rename happened in between); one inode
    whichever name opened it.

    Raises:
        FileNotFoundError: none of them exists.
    """
    return open_shard(str(blob.path), str(blob.pending or ""))  # as a client opens it


@dataclass(frozen=True)
class ShardExport:
    """How a client reaches one resident blob: a file to map (host) or an IPC handle of
    a device buffer (CUDA); byte 0 of the buffer is byte 0 of the file."""

    digest: str
    size: int
    path: str = ""
    ipc_handle: bytes = b""
    device_uuid: str = ""


def _unique(blobs: Sequence[Blob] | Sequence[tuple[str, Path, int]]) -> tuple[Blob, ...]:
    """The blobs as :class:`Blob`, each digest once, in order."""
    out: dict[str, Blob] = {}
    for b in blobs:
        blob = Blob(*b)
        out.setdefault(blob.digest, blob)
    return tuple(out.values())


class _State(enum.Enum):
    PENDING = "pending"  # reserved; its maker is making it resident
    READY = "ready"


@dataclass(eq=False)
class _Resident:
    digest: str
    device: str
    path: Path
    size: int
    charged: int  # what it really costs on the device (the budget counts this)
    users: set[str] = field(default_factory=set)
    state: _State = _State.PENDING
    maker: int | None = None  # the reservation making it; None: anyone waiting may
    payload: Any = None
    ready: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class Reservation:
    """A model's blobs on a device, counted as used, not yet (all) resident."""

    key: str
    device: str
    blobs: tuple[Blob, ...]
    id: int


@dataclass(eq=False)
class Detached:
    """Blobs that no model uses any more on a device, to be freed (:meth:`BlobTier.free`)."""

    key: str
    device: str
    blobs: list[_Resident]

    @property
    def nbytes(self) -> int:
        return sum(b.charged for b in self.blobs)


class Tier(Protocol):
    """What the node needs of a residency tier (host memory, CUDA devices)."""

    name: str

    def device_names(self) -> list[str]: ...

    def label(self, device: str) -> str: ...

    def missing_bytes(self, device: str, blobs: Sequence[Blob]) -> int: ...

    def freeable_bytes(self, key: str, device: str, *, keep: Collection[str] = ()) -> int: ...

    def model_bytes(self, key: str, device: str) -> int: ...

    def used(self, device: str) -> int: ...

    def reserve(self, key: str, device: str, blobs: Sequence[Blob]) -> Reservation: ...

    def fill(self, reservation: Reservation) -> int: ...

    def cancel(self, reservation: Reservation) -> int: ...

    def detach(self, key: str, device: str) -> Detached: ...

    def free(self, detached: Detached) -> int: ...

    def load(self, key: str, device: str, blobs: Sequence[Blob]) -> int: ...

    def unload(self, key: str, device: str) -> int: ...

    def export(self, key: str, device: str) -> list[ShardExport]: ...

    def close(self) -> None: ...


class BlobTier:
    """Shared-blob residency on a tier's devices: the bookkeeping every tier needs.

    Subclasses implement :meth:`device_names`, :meth:`_make`, :meth:`_free` and
    :meth:`_export`, and may override :meth:`_charge` and :meth:`_check_device`. The
    bookkeeping lock is held for dictionary updates only, never while a blob is made or
    freed, so loads of different models (and on different devices) run at once.
    """

    name = "tier"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs: dict[tuple[str, str], _Resident] = {}   # (device, digest)
        self._models: dict[tuple[str, str], list[str]] = {}  # (key, device) -> digests
        self._pending: dict[tuple[str, str], Reservation] = {}
        self._used: dict[str, int] = {}
        self._ids = itertools.count(1)

    # the hooks --------------------------------------------------------------------------

    def device_names(self) -> list[str]:
        """The devices this tier serves, as the node names them."""
        raise NotImplementedError

    def label(self, device: str) -> str:
        """The device as metrics and logs name it."""
        return device

    def _check_device(self, device: str) -> None:
        """Raise when the tier cannot serve ``device`` (before any bookkeeping)."""

    def _charge(self, device: str, size: int) -> int:
        """What a blob of ``size`` bytes really takes on ``device``."""
        return size

    def _make(self, device: str, blob: Blob) -> Any:
        """Make one blob resident on ``device`` (I/O); return what :meth:`_free` and
        :meth:`_export` need. On failure, leave nothing allocated."""
        raise NotImplementedError

    def _free(self, device: str, payload: Any) -> None:
        """Let one resident blob go (I/O)."""
        raise NotImplementedError

    def _export(self, device: str, digest: str, size: int, payload: Any) -> ShardExport:
        raise NotImplementedError

    # bookkeeping ------------------------------------------------------------------------

    def reserve(self, key: str, device: str, blobs: Sequence[Blob]) -> Reservation:
        """Count model ``key``'s blobs on ``device`` as used, before any I/O.

        Blobs already resident (or reserved) for another model are shared. Follow with
        :meth:`fill`, or :meth:`cancel`.

        Raises:
            ValueError: the model is already resident (or reserved) on the device.
        """
        self._check_device(device)
        unique = _unique(blobs)
        with self._lock:
            if (key, device) in self._models or (key, device) in self._pending:
                raise ValueError(f"{key} is already resident on {device}")
            r = Reservation(key, device, unique, next(self._ids))
            for b in unique:
                res = self._blobs.get((device, b.digest))
                if res is None:
                    res = _Resident(b.digest, device, Path(b.path), b.size,
                                    self._charge(device, b.size), maker=r.id)
                    self._blobs[(device, b.digest)] = res
                    self._used[device] = self._used.get(device, 0) + res.charged
                res.users.add(key)
            self._pending[(key, device)] = r
        return r

    def fill(self, reservation: Reservation) -> int:
        """Make a reservation's blobs resident (I/O, no lock held while it runs).

        Returns:
            The bytes this call made resident (blobs other models already had, or that
            another reservation made, are not counted).

        Raises:
            Whatever :meth:`_make` raises; the reservation is then cancelled.
        """
        r = reservation
        added = 0
        try:
            for b in r.blobs:
                added += self._fill_one(r, b)
            with self._lock:
                if self._pending.pop((r.key, r.device), None) is None:
                    raise RuntimeError(f"{r.key} on {r.device}: the reservation was cancelled")
                self._models[(r.key, r.device)] = [b.digest for b in r.blobs]
        except BaseException:
            self.cancel(r)
            raise
        return added

    def _fill_one(self, r: Reservation, b: Blob) -> int:
        while True:
            with self._lock:
                res = self._blobs[(r.device, b.digest)]
                if res.state is _State.READY:
                    return 0
                if res.maker is None:
                    res.maker = r.id
                mine = res.maker == r.id
                ready = res.ready
            if not mine:
                ready.wait()  # its maker is at work (a fill in progress): never queued work
                continue
            try:
                payload = self._make(r.device, b)
            except BaseException:
                with self._lock:
                    res.maker = None  # a waiter (or a later fill) tries again
                    res.ready = threading.Event()
                ready.set()
                raise
            with self._lock:
                res.payload = payload
                res.state = _State.READY
            ready.set()
            return res.charged

    def cancel(self, reservation: Reservation) -> int:
        """Undo a reservation that was not filled: its blobs that no other model uses are
        freed (those it made) or forgotten. Idempotent."""
        r = reservation
        with self._lock:
            if self._pending.pop((r.key, r.device), None) is None:
                return 0
            gone = self._drop_users(r.key, r.device, [b.digest for b in r.blobs], r.id)
        return self._free_all(gone)

    def detach(self, key: str, device: str) -> Detached:
        """Model ``key`` stops using its blobs on ``device``; the ones nobody else uses
        stop counting now and are returned, to be freed by :meth:`free`."""
        with self._lock:
            digests = self._models.pop((key, device), None)
            gone = self._drop_users(key, device, digests or [], None)
        return Detached(key, device, gone)

    def _drop_users(self, key: str, device: str, digests: Sequence[str],
                    maker: int | None) -> list[_Resident]:
        gone = []
        for digest in digests:
            res = self._blobs.get((device, digest))
            if res is None:
                continue
            res.users.discard(key)
            if res.state is _State.PENDING and maker is not None and res.maker == maker:
                # it was this reservation's to make: another user (if any) takes over
                res.maker = None
                ready, res.ready = res.ready, threading.Event()
                ready.set()
            if res.users:
                continue
            del self._blobs[(device, digest)]
            self._used[device] -= res.charged
            if res.state is _State.READY:
                gone.append(res)
        return gone

    def free(self, detached: Detached) -> int:
        """Let detached blobs go (I/O); returns the bytes freed."""
        return self._free_all(detached.blobs)

    def _free_all(self, blobs: Sequence[_Resident]) -> int:
        freed = 0
        for res in blobs:
            try:
                self._free(res.device, res.payload)
            except Exception as e:  # noqa: BLE001 - a leak is better than a double free
                log.error("%s on %s: freeing %d bytes failed (leaked): %s", res.digest[:16],
                          res.device, res.charged, e)
                continue
            freed += res.charged
        return freed

    # both halves at once ----------------------------------------------------------------

    def load(self, key: str, device: str, blobs: Sequence[Blob]) -> int:
        """Make model ``key``'s blobs resident on ``device``; return the bytes added.

        Idempotent: 0 when the model is already resident there.
        """
        with self._lock:
            if (key, device) in self._models:
                return 0
        return self.fill(self.reserve(key, device, blobs))

    def unload(self, key: str, device: str) -> int:
        """Let model ``key`` go from ``device``; return the bytes freed (blobs another
        resident model uses stay)."""
        return self.free(self.detach(key, device))

    # reading ----------------------------------------------------------------------------

    def resident(self, key: str, device: str) -> bool:
        with self._lock:
            return (key, device) in self._models

    def models(self, device: str | None = None) -> list[tuple[str, str]]:
        """``(key, device)`` of every resident model (on one device, or all)."""
        with self._lock:
            return [m for m in self._models if device is None or m[1] == device]

    def used(self, device: str) -> int:
        """Bytes that the device's resident and reserved blobs take (the budget counts
        these)."""
        with self._lock:
            return self._used.get(device, 0)

    def missing_bytes(self, device: str, blobs: Sequence[Blob]) -> int:
        """Bytes a load of these blobs would add: a blob already resident or reserved,
        or named twice, adds nothing more (the budget's ``need``)."""
        with self._lock:
            return sum(self._charge(device, b.size) for b in _unique(blobs)
                       if (device, b.digest) not in self._blobs)

    def model_bytes(self, key: str, device: str) -> int:
        """Bytes of model ``key``'s blobs on the device (shared blobs included)."""
        with self._lock:
            return sum(self._blobs[(device, d)].charged
                       for d in self._models.get((key, device), ()))

    def freeable_bytes(self, key: str, device: str, *, keep: Collection[str] = ()) -> int:
        """Bytes that unloading model ``key`` would free: the blobs only it uses, but
        those of ``keep`` (digests the model being loaded uses: they stay resident)."""
        with self._lock:
            return sum(r.charged for r in (self._blobs[(device, d)]
                                           for d in self._models.get((key, device), ()))
                       if r.users == {key} and r.digest not in keep)

    def export(self, key: str, device: str) -> list[ShardExport]:
        """How clients reach model ``key``'s blobs on ``device``, in blob order.

        Raises:
            KeyError: the model is not resident there.
        """
        with self._lock:
            digests = self._models.get((key, device))
            if digests is None:
                raise KeyError(f"{key} is not resident on {device}")
            blobs = [self._blobs[(device, d)] for d in digests]
        return [self._export(device, r.digest, r.size, r.payload) for r in blobs]

    def close(self) -> None:
        """Free every resident blob (daemon shutdown)."""
        for key, device in self.models():
            self.unload(key, device)
