"""Fetching a model from its source into the store.

Per file: stat (already done by the listing); a hit when the index knows this source
file at this identity and its blob is present (no data is read); otherwise the file is
opened once (:meth:`~weightd.sources.Source.open_file`), read in concurrent ranged reads
into a preallocated temp file, hashed with xxh3-128 in order as the chunks land (and with
the origin's own digest, where it gives one, on a thread of its own), validated
(safetensors header, parsed as soon as its bytes have landed: the layout is kept for the
node), fsynced and renamed into ``blobs/``. Transient errors are retried per chunk; a
permanent error leaves nothing visible. The same source file fetched twice at once, in
one process or in two, is downloaded once. A model whose Acquire answer would not fit in
a gRPC message is refused before its snapshot is made.

Serve before durable: side files are committed as each lands; a shard is verified, then
waits in its temp file; when every file is verified the fetch says so
(:meth:`FetchEvents.ready`, with where each shard's bytes are) and only then fsyncs and
renames the shards and records the model, so that a node serves the model from the page
cache while the disk catches up. The index names a blob only once it is durable.

With a mirror (weightd/store/mirror.py), the files that miss the cache are read from the
mirror's blobs where its manifest names them (through the same download path, the xxh3
checked against the manifest), from the origin otherwise or when the mirror fails; what
came from the origin is written back in the background.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import errno
import heapq
import itertools
import logging
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import fsspec.asyn
import xxhash
from fsspec.callbacks import Callback, NoOpCallback

from weightd.config import Config
from weightd.errors import (
    BudgetExceeded,
    FormatError,
    IntegrityError,
    SourceUnavailable,
    WeightdError,
)
from weightd.formats import LayoutCache, ShardLayout, header_length, parse_header, read_layout
from weightd.retry import RetryPolicy, retry_async
from weightd.sources import (
    Buffer,
    ChunkPlan,
    FileReader,
    OriginDigest,
    RemoteFile,
    Source,
    is_transient,
    model_name,
    open_source,
)
from weightd.store.cas import Store, TempBlob
from weightd.store.index import ModelFile
from weightd.store.mirror import Mirror, MirrorPull, Via
from weightd.testhooks import pause_at

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ready:
    """A model whose every file is written and verified (xxh3, the origin's digest, the
    safetensors header), before its shards are durable: what a node may serve.

    Attributes:
        name: the model's name; ``source`` its canonical URL.
        revision: the revision its snapshot will have; ``snapshot`` that revision's
            directory (side files are there; a shard's link resolves once its blob is
            committed).
        files: every file, by relpath.
        pending: digest -> the temporary file (0440) of each shard not yet committed;
            it is renamed to its blob path once it is fsynced.
    """

    name: str
    source: str
    revision: str
    snapshot: str
    files: Mapping[str, ModelFile]
    pending: Mapping[str, Path]


class FetchEvents:
    """What a fetch tells whoever follows its files as they land (the node, for streaming
    replicas and for serving before durable). Called from the fetch's threads; each
    method does nothing here, override what you need and return quickly."""

    def listed(self, hits: Sequence[tuple[RemoteFile, str]], todo: Sequence[RemoteFile],
               ) -> None:
        """The model's files: ``hits`` are in the cache already (with their digest, no
        byte is read), ``todo`` are downloaded. The first shard's first events may come
        before this one: it is read while the others are listed (see ``_Lead``)."""

    def opened(self, rf: RemoteFile, path: Path) -> None:
        """``rf``'s bytes land in ``path`` (its temporary file, 0440), from now on."""

    def header(self, rf: RemoteFile, layout: ShardLayout) -> None:
        """A shard's header has landed and is valid (parsed from the temporary file)."""

    def written(self, rf: RemoteFile, offset: int, nbytes: int) -> None:
        """Bytes ``[offset, offset + nbytes)`` of ``rf`` were hashed and written. From the
        file's writer thread, in order: ``offset + nbytes`` leading bytes are written."""

    def ready(self, ready: Ready) -> None:
        """Every file is written and verified; the shards are committed after this
        returns (see :class:`Ready`)."""


@dataclass(eq=False)
class _Landed:
    """A downloaded, verified shard, not committed yet: its temp file."""

    file: RemoteFile
    digest: str
    temp: TempBlob

#: The largest Acquire answer a model may need: the daemon's and the client's gRPC
#: message limit (64 MiB, weightd/server.py), less 1 MiB for what is not counted.
MAX_ANSWER_BYTES = 63 * 1024 * 1024


def _shard_bytes(path_len: int) -> int:
    """A bound of a shard's own part of the answer (its ``Shard`` message)."""
    return 256 + path_len


def entries_bytes(layout: ShardLayout) -> int:
    """A bound of the answer bytes of a shard's tensors and metadata (what the index
    records per shard blob, so that a warm fetch need not parse its header again)."""
    return (sum(48 + len(t.name.encode()) + len(t.dtype) + 11 * len(t.shape)
                for t in layout.tensors)
            + sum(8 + len(k.encode()) + len(v.encode()) for k, v in layout.metadata.items()))


@dataclass
class FetchStats:
    """What one model fetch did: bytes downloaded (``bytes_fetched``: from the origin,
    ``bytes_origin``, and from the cluster's mirror, ``bytes_mirror``), hits (files
    already in the cache: ``bytes_total - bytes_fetched`` bytes), time."""

    files: int = 0
    hits: int = 0
    bytes_total: int = 0
    bytes_fetched: int = 0
    seconds: float = 0.0
    hash_seconds: float = 0.0
    bytes_origin: int = 0
    bytes_mirror: int = 0
    #: whole chunks in flight the model's window of reads ended at (see :class:`_Growth`)
    window: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, hit: bool, size: int, fetched: int, hash_seconds: float,
            mirror: bool = False) -> None:
        with self._lock:
            self.files += 1
            self.hits += hit
            self.bytes_total += size
            self.bytes_fetched += fetched
            self.hash_seconds += hash_seconds
            if mirror:
                self.bytes_mirror += fetched
            else:
                self.bytes_origin += fetched


@dataclass(frozen=True)
class Snapshot:
    """A fetched model: its name, snapshot directory and files."""

    name: str
    source: str
    path: str
    files: tuple[ModelFile, ...]
    stats: FetchStats


class _LockedCallback:
    """Serialize progress updates from many threads onto one fsspec-style callback."""

    def __init__(self, cb: Callback) -> None:
        self.cb = cb
        self.lock = threading.Lock()

    def update(self, n: int) -> None:
        with self.lock:
            self.cb.relative_update(n)

    def set_size(self, n: int) -> None:
        with self.lock:
            self.cb.set_size(n)


class _Attempt(_LockedCallback):
    """The progress of one try at a file (from the mirror), taken back if it fails."""

    def __init__(self, inner: _LockedCallback) -> None:
        self.inner = inner
        self.n = 0

    def update(self, n: int) -> None:
        self.n += n  # one writer thread per file
        self.inner.update(n)

    def undo(self) -> None:
        self.inner.update(-self.n)
        self.n = 0


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


try:
    _IOV_MAX = max(1, min(1024, os.sysconf("SC_IOV_MAX")))
except (AttributeError, ValueError, OSError):  # pragma: no cover
    _IOV_MAX = 16


def _pwritev_all(fd: int, blocks: Sequence[Buffer], offset: int) -> None:
    """Write ``blocks`` back to back at ``offset``: one syscall per ``IOV_MAX`` of them."""
    if not hasattr(os, "pwritev"):  # pragma: no cover
        for b in blocks:
            _pwrite_all(fd, memoryview(b), offset)
            offset += len(b)
        return
    views = [memoryview(b) for b in blocks if b]
    i = 0
    while i < len(views):
        n = os.pwritev(fd, views[i:i + _IOV_MAX], offset)
        offset += n
        while n and i < len(views):
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


#: The piece of a chunk hashed and then written while it is still in the CPU's cache
#: (docs/fetch-tuning.md, "The write"): a 16 MiB chunk hashed whole and then written whole
#: is read from memory twice, and wrote 0.56-1.8 GB/s into the page cache here where 1 MiB
#: pieces wrote 2.3-3.5.
WRITE_PIECE = 1 << 20


def _hash_and_write(hasher: xxhash.xxh3_128, fd: int, blocks: Sequence[Buffer],
                    offset: int) -> float:
    """Hash ``blocks`` and write them back to back at ``offset``, about a
    :data:`WRITE_PIECE` at a time: a large block in pieces, small ones (S3's body comes
    in blocks of 64 KiB and less) gathered into one ``pwritev``, each hashed just before
    it is written; return the seconds spent hashing."""
    hash_seconds = 0.0
    group: list[memoryview] = []
    grouped = 0
    for b in blocks:
        view = memoryview(b)
        for start in range(0, len(view), WRITE_PIECE):
            piece = view[start:start + WRITE_PIECE]
            t0 = time.perf_counter()
            hasher.update(piece)
            hash_seconds += time.perf_counter() - t0
            group.append(piece)
            grouped += len(piece)
            if grouped >= WRITE_PIECE:
                _pwritev_all(fd, group, offset)
                offset += grouped
                group, grouped = [], 0
    if group:
        _pwritev_all(fd, group, offset)
    return hash_seconds


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE)`` where Linux has it, else None.

    It starts the writeback of a written range without waiting for it, so that the disk
    writes a blob while the rest of it is still downloading and the fsync before the
    rename has little left to do (the pages stay cached, unlike with fadvise DONTNEED).
    """
    if not hasattr(os, "sched_getaffinity"):  # not Linux
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; a failure only loses the hint

    return start_writeback


_start_writeback = _load_sync_file_range()


class _SideHash:
    """The origin's digest of a file, computed on a thread of its own while the writer
    hashes (xxh3) and writes the same chunk (hashlib and zlib release the GIL), so that
    MD5 or SHA-256 (1.3-1.6 s/GiB here, twenty times xxh3) overlaps the writes and the
    network instead of adding to them. :meth:`wait` returns when the chunk is hashed: its
    buffer may then be reused."""

    def __init__(self, digest: OriginDigest) -> None:
        self.digest = digest
        self.hasher = digest.hasher()
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weightd-digest")
        self.pending: concurrent.futures.Future[None] | None = None

    def _update(self, blocks: Sequence[Buffer]) -> None:
        for b in blocks:
            self.hasher.update(b)

    def add(self, blocks: Sequence[Buffer]) -> None:
        self.wait()
        self.pending = self.pool.submit(self._update, blocks)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def check(self, url: str) -> None:
        """Wait for the last chunk; raise IntegrityError on a mismatch."""
        self.wait()
        self.digest.check(self.hasher.hexdigest(), url)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Buffers:
    """Chunk buffers of one model fetch, shared by its files and reused once their chunk
    is written: anonymous mappings, faulted once, returned to the system when the fetch
    ends. Reuse matters: a fresh 16 MiB buffer per chunk (a new mapping, its pages
    faulted in by the ``recv`` and unmapped after) read 0.36 GB/s where reused ones read
    0.91 (docs/fetch-tuning.md, "The wire"). A buffer whose read was cancelled is never
    given back (its thread may still be writing into it).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.free: list[mmap.mmap] = []
        self.lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self.lock:
            if self.free:
                return self.free.pop()
        # private: Python's default for an anonymous map is shared, i.e. shmem pages,
        # which the kernel accounts as shared memory of the daemon
        return mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def give(self, buf: mmap.mmap) -> None:
        with self.lock:
            self.free.append(buf)


def _flight_key(f: RemoteFile) -> str:
    return f"{f.url}\0{f.identity}"


#: The smallest range of a ramp (see :class:`_Schedule`), and what a ramp's ranges are
#: multiples of (but a file's last, and those its first tensor's end cuts).
MIN_RANGE = 64 * 1024
#: How fast a ramp grows and shrinks: a range is this fraction of the model's bytes
#: before it (or after it), so each about 1/8 longer (or shorter) than the one before.
RAMP = 8
#: The first read of a model's first shard where it is read ahead of its listing (an
#: HTTP index page) for a streaming replica and the plan ramps, made alone in the
#: model's window: it brings the shard's header, so the window's next reads end where
#: the shard's first tensor does (see :meth:`_Schedule.ranges`). A header is 8 bytes
#: and a JSON of about 150 bytes a tensor: 256 KiB holds that of a shard of 1,500
#: tensors (a DeepSeek-V3 shard's is about 100 KiB).
HEADER_PROBE = 256 * 1024


class _Turns:
    """A capacity shared by waiters granted in the order of their keys (then of their
    arrival): one waits while the lowest waiting key does not fit, and an amount larger
    than the capacity goes through alone. On the event loop of the reads (fsspec's):
    the model's window of reads (:class:`_Schedule`, one turn per read) and each file's
    bytes read and not yet written (``Fetcher._read_all``) are one each."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiting: list[tuple[tuple[int, ...], int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.capacity

    async def take(self, n: int = 1, key: tuple[int, ...] = ()) -> None:
        """Wait for ``n`` of the capacity, behind every lower waiting ``key``."""
        if not self._waiting and self._fits(n):
            self.used += n
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (key, next(self._seq), n, turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give(n)  # granted as it was cancelled: the next one's
            raise

    def give(self, n: int = 1) -> None:
        """``n`` of the capacity back: the lowest waiters that fit go on."""
        self.used -= n
        while self._waiting:
            _, _, m, turn = self._waiting[0]
            if turn.done():
                heapq.heappop(self._waiting)
            elif self._fits(m):
                heapq.heappop(self._waiting)
                self.used += m
                turn.set_result(None)
            else:
                break


#: How much sooner a model's reads must land, after its window doubled, for the window
#: to keep its new size and try the next (see :class:`_Growth`).
GROWTH_GAIN = 1.25
#: The shortest stretch of a download over which one window size's rate is measured.
EPOCH_SECONDS = 0.1


class _Growth:
    """The size of a model's window of reads, found by measurement while it downloads.

    It starts at ``start`` (the plan's ``concurrency``) and doubles, up to ``limit``
    (``concurrency × max_parallel_files``), for as long as each doubling lands bytes at
    least :data:`GROWTH_GAIN` times as fast as the size before it, measured over at least
    :data:`EPOCH_SECONDS` and one window of reads; the first doubling that does not pay
    goes back to the size before it, for the rest of the download. So an origin that
    gives each connection a share (a CDN, S3: ~90 MB/s each) gets the connections it
    needs, and a link that one window already fills (loopback, a shared rate) is not
    read by more connections for nothing: on this 2-core machine a model read through
    32 connections instead of 8 cost twice the CPU and came 1.3-1.5x later
    (docs/fetch-tuning.md, "The window"). No doubling is tried when what is left would
    land in less than two epochs at the rate measured.
    """

    def __init__(self, start: int, limit: int, total: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = max(1, limit)
        self.size = max(1, min(start, self.limit))
        self.settled = self.size >= self.limit
        self.left = total
        self.clock = clock
        self._before = 0.0  # bytes/s at the size before this one
        self._t0: float | None = None
        self._bytes = 0
        self._reads = 0
        self._skip = 0
        self._smaller = self.size  # the size before the last doubling

    def landed(self, nbytes: int, measure: bool = True) -> int:
        """A read of ``nbytes`` was written (``measure``: it counts in the window's
        rate): the window's size from now on."""
        self.left -= nbytes
        if self.settled or not measure:
            return self.size
        if self._skip:  # read (in part) at the size before: not this size's rate
            self._skip -= 1
            return self.size
        now = self.clock()
        if self._t0 is None:  # an epoch starts at a landing: not at a connection's start
            self._t0 = now
            return self.size
        self._bytes += nbytes
        self._reads += 1
        elapsed = now - self._t0
        if self._reads < self.size or elapsed < EPOCH_SECONDS:
            return self.size
        rate = self._bytes / elapsed
        # what the next size's epoch would read, twice: the least left worth a try
        worth = 2 * max(EPOCH_SECONDS * rate, 2 * self.size * self._bytes / self._reads)
        if self._before and rate < GROWTH_GAIN * self._before:
            self.size = self._smaller  # as fast with fewer reads: back to them
            self.settled = True
        elif self.size >= self.limit or self.left < worth:
            self.settled = True
        else:
            self._before, self._smaller = rate, self.size
            self.size = min(self.limit, self.size * 2)
            # the next epoch starts once every read in flight now has landed: they began
            # at the size before, and their bytes, counted at the new one, made it look
            # faster than it is (a shared link read at 8 seemed to gain from 16)
            self._skip = self.size
        self._t0, self._bytes, self._reads = None, 0, 0
        return self.size


#: What a schedule's window counts as left of a model whose files are not all known
#: yet (see :meth:`_Schedule.extend`): more than any model, so that it never settles for
#: lack of bytes to measure.
_UNKNOWN_REST = 1 << 62


class _Schedule:
    """The ranged reads of one model fetch: the ranges each file is read in, and one
    window of reads in flight for the whole model, granted in the model's order: its
    files in the order they are fetched, each from its start. The bytes a streaming
    replica wants first are read first, with the whole window, instead of a file's first
    chunk sharing the link with every other file's.

    The window is counted in bytes: ``size`` chunks' worth (:class:`_Growth` finds the
    size while the model downloads, from ``start`` up to ``limit``), each read costing
    its own bytes but at least ``1 / limit`` of the window, so that at most ``limit``
    reads are in flight, and they are that many only while they are small files' (a
    ramp's ranges cost a whole chunk, below); whole chunks are ``size`` at once. What is
    in flight is what a read's buffers hold: a window of ``limit`` whole chunks, the
    whole of a 256 MiB model over 32 connections, was written to fresh pages of memory
    and cost this 2-core machine twice the CPU of 8 (docs/fetch-tuning.md, "The
    window").

    With the plan's ``ramp``, the model's first chunk is read as ``start`` ranges (as
    many as the window starts with), which land together in about one chunk's time at
    the link's rate (where a whole chunk per read, each read with a share of the link,
    took the window's chunks' time: the first tensor 0.96 s instead of 42 ms at
    200 MB/s); from there a range at the model's byte ``o`` of ``total`` is
    ``min(o, total - o) / RAMP`` long, within ``[chunk_size / start, chunk_size]``: it
    grows to whole chunks and shrinks again toward the end, so that the last reads end
    together with little left to write and hash after the source's last byte (with
    whole chunks to the end, a window of 64 MiB landing together, the model was ready
    100-270 ms after the source's last byte over loopback, with the ramp 40-50 ms).
    Every range of a ramp costs a whole chunk of the window: at most ``size`` of them
    are in flight, as whole chunks would be.

    The model's first shard, read ahead of its listing for a streaming replica
    (``header_first``, see :class:`_Lead`) where the plan ramps, starts with its header
    (:data:`HEADER_PROBE`, :meth:`probe`) read alone, the one round trip that tells
    where its first tensor ends; the bytes to there are then the window's first reads
    (as many as it starts with, fewer for a short tensor, each at least
    ``MIN_RANGE``), which together take the whole window, and the rest of the ramp
    follows them. A streaming replica's first tensor has the whole link, where as a
    part of the first chunk's ranges it had their share of it: at 200 MB/s a 5.4 MiB
    first tensor came when the whole 8 MiB chunk had (docs/fetch-tuning.md, "The
    first tensor's bytes first"). Not where the listing gives sizes (``hf://``): there
    the model's files start together, and a later shard's reads may hold the window
    before the header's read asks for all of it.

    The first chunk in ``limit`` (32) ranges of 256 KiB, each costing 1/32 of the
    window, put 32 requests, threads and connections
    at every model's start, which this 2-core machine served one after another: the
    first tensor at 200 MB/s came 93-147 ms after a replica asked, with 8 ranges at
    61-82 ms (docs/fetch-tuning.md, "The ramp and a model's start").

    :meth:`acquire` and :meth:`release` run on the event loop of the reads (fsspec's);
    a turn lasts until its range is written (see ``Fetcher._read_all``).
    """

    def __init__(self, files: Sequence[RemoteFile], limit: int, chunk: int, *,
                 start: int | None = None, more: bool = False, header_first: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = max(1, limit)
        self.chunk = max(1, chunk)
        self._place: dict[str, tuple[int, int]] = {}
        self.total = 0
        #: the flight key of the first shard read ahead of the listing for a streaming
        #: replica (``files``' first, ``header_first``): its header first (:meth:`probe`)
        self._lead = _flight_key(files[0]) if header_first and files else None
        #: set once the first shard's read has begun: its bytes to its first tensor's end
        #: written (a chunk past the header's read at most; the header's read alone where
        #: it does not hold the whole header), or its read ended, or failed to start; a
        #: listing asks the model's other files' sizes after it
        #: (:data:`~weightd.sources.FirstShard`)
        self.begun = threading.Event()
        #: the model goes on after ``files`` (:meth:`extend` tells the rest): its end is
        #: not near, and no range shrinks toward it
        self.more = more
        self.growth = _Growth(self.limit if start is None else start, self.limit,
                              _UNKNOWN_REST if more else 0, clock)
        self.growth.left += self._add(files)
        #: the ranges a ramp reads the model's first chunk in (see :meth:`ranges`)
        self.split = self.growth.size
        self._turns = _Turns(self.growth.size * self.chunk)

    def extend(self, files: Sequence[RemoteFile], *, ahead: int = 0) -> None:
        """Place ``files`` after those placed before (those placed already keep theirs);
        the model ends with them. The first ``ahead`` of them are granted turns before
        the reads of those placed before that still wait (the small side files, see
        ``Fetcher._download_all``)."""
        self.growth.left += self._add(files, ahead) - (_UNKNOWN_REST if self.more else 0)
        self.more = False

    def _add(self, files: Sequence[RemoteFile], ahead: int = 0) -> int:
        added = 0
        for i, f in enumerate(files):
            key = _flight_key(f)
            if key not in self._place:
                order = i - ahead if i < ahead else len(self._place)
                self._place[key] = (order, self.total)
                self.total += f.size
                added += f.size
        return added

    def place(self, f: RemoteFile) -> tuple[int, int]:
        """``f``'s place in the model's order and the model's byte where it starts."""
        return self._place.get(_flight_key(f), (len(self._place), self.total))

    @property
    def header_first(self) -> bool:
        """The model's first shard is read header first (see :meth:`probe`)."""
        return self._lead is not None

    def leads(self, f: RemoteFile) -> bool:
        """Whether ``f`` is the first shard read header first."""
        return self._lead is not None and _flight_key(f) == self._lead

    def probe(self, f: RemoteFile, plan: ChunkPlan) -> int:
        """How many of ``f``'s first bytes are read alone before its other ranges are
        cut (0: none): the header of the model's first shard read ahead of its listing
        for a streaming replica (``header_first``), where ``plan`` ramps and the window
        starts with more than one read (a window of one reads the first chunk whole); at
        most a chunk, the size of a read's buffer."""
        n = min(HEADER_PROBE, plan.chunk_size)
        if plan.ramp and self.split > 1 and f.size > n and self.leads(f):
            return n
        return 0

    def ranges(self, size: int, plan: ChunkPlan, start: int, *,
               first: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """The ranges of a file of ``size`` bytes that starts at the model's byte
        ``start``, read as ``plan`` says. ``first``: the bytes read alone first (see
        :meth:`probe`) and where the file's first tensor ends: when that is within a
        chunk after them, the window's first reads end there."""
        chunk = plan.chunk_size
        floor = max(MIN_RANGE, chunk // self.split // MIN_RANGE * MIN_RANGE)
        out: list[tuple[int, int]] = []
        o = 0
        if first is not None:
            probe, end = first
            out.append((0, probe))
            o = probe
            if self.cuts(probe, end, size, chunk):
                count = self.first_reads(probe, end)
                n = -(-(end - probe) // count)
                while o < end:
                    out.append((o, min(o + n, end)))
                    o = out[-1][1]
        while o < size:
            n = chunk
            if plan.ramp and floor < chunk:
                m = start + o
                if m < chunk:  # the model's first chunk: a window of reads together
                    n = floor
                else:
                    n = (m if self.more else min(m, self.total - m)) // RAMP
                    n = n // MIN_RANGE * MIN_RANGE
                    n = max(floor, min(chunk, n))
            out.append((o, min(o + n, size)))
            o += n
        return out

    @staticmethod
    def cuts(probe: int, end: int, size: int, chunk: int) -> bool:
        """Whether the reads after a header's ``probe`` bytes end at the first tensor's
        ``end`` (see :meth:`ranges`): it ends past them, within a chunk after them (a
        longer one, an embedding, is read as the ramp goes)."""
        return probe < end <= min(size, probe + chunk)

    def first_reads(self, probe: int, end: int) -> int:
        """How many reads bring a first shard's bytes ``[probe, end)`` (see
        :meth:`ranges`): as many as the window starts with, each ``MIN_RANGE`` at
        least."""
        return max(1, min(self.split, (end - probe) // MIN_RANGE))

    async def acquire(self, key: tuple[int, int], nbytes: int, chunk: int | None = None,
                      *, split: bool = False, share: int = 0) -> int:
        """Wait for the turn of a read of ``nbytes``: ``key`` is (file's place, offset);
        the lowest waiting key goes first. ``chunk``: the chunk size of the plan the read
        is cut from, when it is not the model's (a mirror's reads, 16 MiB for an origin's
        8): its bytes are counted in the model's chunks, so that the window holds as many
        of its whole chunks. ``split``: one of the ranges a ramp cuts a file into, which
        costs a whole chunk. ``share``: the read is one of that many that take the whole
        window together (1: the header's read alone, see :meth:`probe`; then the first
        tensor's reads, :meth:`first_reads`): no other read of the model is granted a
        turn while they hold theirs. Return the read's cost, for :meth:`release`."""
        scaled = nbytes if not chunk else nbytes * self.chunk // chunk
        cost = max(scaled, self.chunk if split else self._turns.capacity // self.limit, 1)
        if share:
            cost = max(cost, self._turns.capacity // share)
        await self._turns.take(cost, key)
        return cost

    def release(self, cost: int, landed: int = 0, *, measure: bool = True) -> None:
        """A read that cost ``cost`` ended, ``landed`` bytes written (0: its read
        failed, or it was cancelled): the next reads in the model's order start, and the
        window takes its new size. ``measure``: the range counts in the window's rate (a
        ramp's short range would say more of its request's cost than of the window)."""
        if landed:
            self._turns.capacity = self.growth.landed(landed, measure) * self.chunk
        self._turns.give(cost)


#: The most ranges of a file handed to its writer at once (those that landed while the
#: write before them ran, a chunk's bytes at most): a bound of one ``sink`` call's blocks.
MAX_BATCH = 64


def _header_if_landed(fd: int, f: RemoteFile, written: int) -> ShardLayout | None:
    """The layout of shard ``f`` once its first ``written`` bytes hold its whole header
    (read back from its temp file, validated against its size), else None.

    Raises:
        FormatError: the header is malformed (or larger than the file).
    """
    if written < 8:
        return None
    n = header_length(os.pread(fd, 8, 0), path=f.url, file_size=f.size)
    if written < 8 + n:
        return None
    return parse_header(os.pread(fd, n, 8), path=f.url, file_size=f.size)


def _first_tensor_end(layout: ShardLayout | None, landed: int) -> int:
    """Where a shard's first tensor (of any bytes) ends, by its ``layout`` (tensors in
    file order); ``landed``, the bytes written, where its header is not all in them."""
    if layout is None:
        return landed
    return next((t.offset + t.nbytes for t in layout.tensors if t.nbytes), landed)


class _Flights:
    """The single-flight locks of one fetch's files (:meth:`Store.single_flight`), held
    until its blobs are durable and recorded, so that a second fetch of a file, here or
    in another process, waits for the first one's commit and then finds it (and reads
    nothing). The lock only avoids duplicate work: correctness comes from the rename.

    Fetches that share files must never wait for each other in a cycle: a lock is waited
    for only while no lock of a later key (sorted) is held. The model's first shard's
    may be taken first, ahead of that order (:class:`_Lead`): a lock of an earlier key
    is then only tried, and when another holds it, every lock is let go and all of them
    are taken again in the sorted order (the first shard's read goes on meanwhile: at
    worst a second fetch reads it too)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._held: dict[str, ExitStack] = {}

    def hold(self, key: str, *, wait: bool = True) -> bool:
        """Take ``key``'s lock (``wait=False``: only if it is free); whether it is held."""
        if key in self._held:
            return True
        stack = ExitStack()
        if not stack.enter_context(self._store.single_flight(key, wait=wait)):
            stack.close()
            return False
        self._held[key] = stack
        return True

    def take(self, keys: Sequence[str]) -> None:
        """Hold every one of ``keys``, taken in their order (the first may be ahead of
        the sorted order, see above)."""
        for key in keys:
            if key in self._held:
                continue
            if any(k > key for k in self._held):
                if self.hold(key, wait=False):
                    continue
                self.release()  # waiting now, with a later key held, could be a cycle
                for k in sorted(keys):
                    self.hold(k)
                return
            self.hold(key)

    def release(self) -> None:
        held, self._held = self._held, {}
        for stack in reversed(held.values()):
            stack.close()


@dataclass(frozen=True)
class _Reading:
    """The first shard's read under way (see :class:`_Lead`)."""

    file: RemoteFile
    schedule: _Schedule
    future: concurrent.futures.Future[str | _Landed]

    def check(self) -> None:
        """Raise what the read raised, if it failed already."""
        if self.future.done() and not self.future.cancelled():
            error = self.future.exception()
            if error is not None:
                raise error


class _Lead:
    """A model's first shard, read as soon as the listing has its size and identity,
    while the listing still waits for the other files' (an HTTP index page names files
    only: each file's size is a ``HEAD``, 18 of them 14-35 ms of a model's start here,
    and the first tensor waited for the slowest). A streaming replica's first tensors
    are in that shard.

    It is read as the model's first file, in the model's :class:`_Schedule` (the other
    files join it once they are listed); it is not read when the cache has it, and not
    with a mirror (which decides, from the whole listing, where each file comes from).
    Its single-flight lock is taken before it is read, if it is free (see
    :class:`_Flights`: the model's other locks are taken after it, once the listing is
    done); when another fetch holds it, it is not read now, and its lock is the first
    this fetch waits for, so that fetches of one model wait for the first of them
    whole, holding nothing. When the listing or the fetch fails, the read is stopped and
    its temporary file removed (:meth:`abort`).

    ``streamed``: a replica streams the model (an AcquireStream started the fetch): the
    shard is read header first (:meth:`_Schedule.probe`) and the listing's other
    ``HEAD``s wait for its first tensor (:attr:`_Schedule.begun`). For a whole Acquire
    neither: the first tensor is of no use before the last, and the header's round trip
    and the window held by the first tensor's reads cost a loopback fetch of 256 MiB
    2-4% (docs/fetch-tuning.md, "The first tensor's bytes first")."""

    def __init__(self, fetcher: Fetcher, source: Source, flights: _Flights,
                 progress: _LockedCallback, stats: FetchStats,
                 hold: Callable[[str], None] | None, events: FetchEvents,
                 buffers: _Buffers, *, streamed: bool = False) -> None:
        self._fetcher = fetcher
        self._source = source
        self._flights = flights
        self._streamed = streamed
        self._args = (progress, stats, hold, events, buffers)
        #: the first shard's single-flight key (read or not)
        self.key: str | None = None
        #: its read, once started
        self.reading: _Reading | None = None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None

    def start(self, f: RemoteFile, more: bool) -> threading.Event | None:
        """The listing's :data:`~weightd.sources.FirstShard`: read ``f`` now, unless the
        cache has it (then it is found with the rest) or another fetch is reading it;
        for a streaming replica, return the event set once the read has begun
        (:attr:`_Schedule.begun`)."""
        self.key = _flight_key(f)
        if self._fetcher._hit(f) is not None or not self._flights.hold(self.key, wait=False):
            return None
        if self._fetcher._hit(f) is not None:  # committed by the one that held it
            self._flights.release()  # (the only lock held yet)
            return None
        schedule = self._fetcher._schedule(self._source, [f], more=more,
                                           header_first=self._streamed)
        self._thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="weightd-fetch")
        progress, stats, hold, events, buffers = self._args

        def read() -> str | _Landed:
            try:
                return self._fetcher._fetch_one(self._source, f, progress, stats, hold,
                                                events, buffers, None, schedule)
            finally:  # (failed before its reads, e.g. its temporary file: not begun)
                schedule.begun.set()

        self.reading = _Reading(f, schedule, self._thread.submit(read))
        return schedule.begun if self._streamed else None

    def owns(self, f: RemoteFile) -> bool:
        return self.reading is not None and f.relpath == self.reading.file.relpath

    def check(self) -> None:
        """Raise what the read raised, if it failed already (the fetch stops now, not
        after waiting for locks and starting the other files)."""
        if self.reading is not None:
            self.reading.check()

    def abort(self) -> None:
        """Stop the read (the source's reads end now) and remove what it wrote."""
        if self.reading is None:
            return
        future = self.reading.future
        if not future.done():
            self._source.close()
        concurrent.futures.wait([future])
        if not future.cancelled() and future.exception() is None:
            got = future.result()
            if isinstance(got, _Landed):
                got.temp.discard()
        self.close()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)


class Fetcher:
    """Fetches models into a :class:`Store` under a :class:`Config`."""

    def __init__(self, store: Store, config: Config, *,
                 layouts: LayoutCache | None = None) -> None:
        self.store = store
        self.config = config
        self.policy = RetryPolicy(attempts=config.retry_attempts,
                                  max_seconds=config.retry_max_seconds)
        #: Shard layouts by digest, filled as shards are validated (the node reuses them)
        self.layouts = layouts if layouts is not None else LayoutCache()
        #: The cluster's mirror (the ``mirrors`` setting), or None
        self.mirror = Mirror(config.mirrors[0], config) if config.mirrors else None

    def close(self, timeout: float | None = None) -> None:
        """Wait for the mirror's write-backs in progress (see :meth:`Mirror.close`)."""
        if self.mirror is not None:
            self.mirror.close(timeout)

    def _schedule(self, source: Source, files: Sequence[RemoteFile], *,
                  more: bool = False, header_first: bool = False) -> _Schedule:
        """The window of a model fetch's reads from ``source`` (see :class:`_Schedule`)."""
        plan = source.plan
        return _Schedule(files, plan.concurrency * self.config.max_parallel_files,
                         plan.chunk_size, start=plan.concurrency, more=more,
                         header_first=header_first)

    def fetch(
        self,
        ref: str,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        callback: Callback | None = None,
        hold: Callable[[str], None] | None = None,
        events: FetchEvents | None = None,
        streamed: bool = False,
    ) -> Snapshot:
        """Fetch a model and switch its snapshot to what the source holds now.

        Args:
            ref: the model reference (any fsspec URL or a plain path).
            include: globs of files to bring from a directory (default: shards and side
                files).
            exclude: globs of files to leave out.
            callback: fsspec-style progress (``set_size`` in bytes to fetch,
                ``relative_update`` as bytes land).
            hold: called with each blob's digest before the fetch relies on it (a hit,
                or a download about to become visible): the daemon's gc then keeps it
                until the snapshot names it (see weightd/node.py).
            events: told of the files as they land, and when the model is verified
                but not yet durable (see :class:`FetchEvents`).
            streamed: a replica streams the model's tensors as they land: its first
                tensor is fetched first (see :class:`_Lead`).

        Returns:
            The model's :class:`Snapshot`.

        Raises:
            SourceNotFound, SourceUnavailable, NotPermitted, FormatError, IntegrityError,
            BudgetExceeded: also when the disk cannot hold a blob (full, or failing: then
                after :meth:`FetchEvents.ready`, the bytes were served and are not
                durable; nothing is recorded).
        """
        start = time.monotonic()
        with open_source(ref, self.config) as source:
            return self._fetch(source, start, include, exclude, callback, hold,
                               events or FetchEvents(), streamed)

    def _fetch(self, source: Source, start: float, include: Sequence[str] | None,
               exclude: Sequence[str], callback: Callback | None,
               hold: Callable[[str], None] | None, events: FetchEvents,
               streamed: bool = False) -> Snapshot:
        stats = FetchStats()
        progress = _LockedCallback(callback or NoOpCallback())
        buffers = _Buffers(source.plan.chunk_size)
        flights = _Flights(self.store)
        # the first shard is read once it is listed (not with a mirror: see _Lead)
        lead = (_Lead(self, source, flights, progress, stats, hold, events, buffers,
                      streamed=streamed)
                if self.mirror is None else None)
        try:
            files = source.list_files(include, exclude,
                                      first=lead.start if lead is not None else None)
            return self._fetch_listed(source, start, files, progress, buffers, flights, lead,
                                      stats, hold, events)
        except BaseException:
            if lead is not None:
                lead.abort()
            raise
        finally:
            flights.release()
            if lead is not None:
                lead.close()

    def _fetch_listed(self, source: Source, start: float, files: Sequence[RemoteFile],
                      progress: _LockedCallback, buffers: _Buffers,
                      flights: _Flights, lead: _Lead | None, stats: FetchStats,
                      hold: Callable[[str], None] | None, events: FetchEvents) -> Snapshot:
        results: dict[str, ModelFile] = {}

        def missing(f: RemoteFile) -> bool:  # (the lead is read already: never a hit)
            return (lead is not None and lead.owns(f)) or not self._found(f, hold, stats,
                                                                         results)

        todo = [f for f in files if missing(f)]
        pull: MirrorPull | None = None
        try:
            try:
                # single flight: the lock of every file to download (see _Flights), the
                # first shard's first
                keys = sorted({_flight_key(f) for f in todo},
                              key=lambda k: (lead is None or k != lead.key, k))
                if lead is not None:
                    lead.check()
                flights.take(keys)
                if lead is not None:
                    lead.check()
                todo = [f for f in todo if missing(f)]
                events.listed([(f, results[f.relpath].digest) for f in files
                               if f.relpath in results], todo)
                progress.set_size(sum(f.size for f in todo))
                name = model_name(source.url)
                # the mirror, after the listing and the hits: which files it gives, who
                # pulls from the origin
                if self.mirror is not None and todo and source.protocol != "file":
                    pull = self.mirror.begin(source.url, files, todo, self.store.blob_path)
                landed = self._download_all(source, todo, stats, progress, hold, events,
                                            results, pull, buffers=buffers, lead=lead)
                try:
                    pending = {x.digest: x.temp.path for x in landed}
                    self._check_answer(source.url, results, pending)
                    rev = self.store.stage_snapshot(name, source.url, results)
                    events.ready(Ready(name, source.url, rev,
                                       str(self.store.revision_path(name, rev)),
                                       dict(results), pending))
                    pause_at("ready")
                    self._commit(landed)
                finally:
                    for x in landed:
                        x.temp.discard()  # (those committed are closed already)
            finally:
                flights.release()
            path = self.store.commit_snapshot(name, source.url, results)
        except BaseException:
            if pull is not None:
                # the files waiting for another node's blobs stop now, and no manifest is
                # written for a model that is not in the cache
                pull.abort()
            raise
        if pull is not None:
            pull.commit(results)  # the rest of the write-back, in the background
        stats.seconds = time.monotonic() - start
        log.info("fetched %s: %d files, %d hits, %d of %d bytes from the source%s in %.2fs%s",
                 source.url, stats.files, stats.hits, stats.bytes_origin, stats.bytes_total,
                 f" and {stats.bytes_mirror} from the mirror" if stats.bytes_mirror else "",
                 stats.seconds, f" (window {stats.window} chunks)" if stats.window else "")
        return Snapshot(name, source.url, str(path), tuple(results[k] for k in sorted(results)),
                        stats)

    def _found(self, f: RemoteFile, hold: Callable[[str], None] | None, stats: FetchStats,
               results: dict[str, ModelFile]) -> bool:
        """Whether ``f`` is in the cache already (then it is counted and in ``results``)."""
        digest = self._hit(f, hold)
        if digest is None:
            return False
        stats.add(hit=True, size=f.size, fetched=0, hash_seconds=0.0)
        results[f.relpath] = ModelFile(f.relpath, f.url, digest, f.size, f.identity)
        return True

    def _download_all(self, source: Source, todo: Sequence[RemoteFile], stats: FetchStats,
                      progress: _LockedCallback, hold: Callable[[str], None] | None,
                      events: FetchEvents, results: dict[str, ModelFile],
                      pull: MirrorPull | None, *, buffers: _Buffers,
                      lead: _Lead | None) -> list[_Landed]:
        """Download ``todo``, ``max_parallel_files`` at once (each from the mirror where
        ``pull`` gives it, see :meth:`_fetch_one`); side files are committed as they land,
        verified shards are returned uncommitted. A failure stops the other files at once
        and commits nothing more (what was verified goes with them).

        The small side files (less than a chunk) go first, then the rest in order: a
        small file last in the model's order (``model.safetensors.index.json`` sorts
        after its shards) waited for every shard's reads to be granted before its own,
        then for its own ``HEAD``, all after the last shard's bytes (20-40 ms of a
        256 MiB model's ready, here); a large one (a 17 MB ``tokenizer.json``) would hold
        a streaming replica's first shard back. ``lead``: the first shard, read already
        (see :class:`_Lead`): the small side files are granted turns ahead of its reads
        still waiting, the other files follow it."""
        def big(f: RemoteFile) -> bool:
            return f.relpath.endswith(".safetensors") or f.size >= source.plan.chunk_size

        todo = sorted(todo, key=big)  # (stable)
        reading = lead.reading if lead is not None else None
        workers = self.config.max_parallel_files
        if reading is not None:
            schedule = reading.schedule
            todo = [f for f in todo if f.relpath != reading.file.relpath]

            async def extend() -> None:  # (the schedule is the reads' loop's)
                schedule.extend(todo, ahead=sum(not big(f) for f in todo))

            fsspec.asyn.sync(fsspec.asyn.get_loop(), extend)
            if workers == 1:  # it is one of the files at once
                concurrent.futures.wait([reading.future])
                reading.check()
            else:
                workers -= 1
        else:
            schedule = self._schedule(source, todo)
        landed: list[_Landed] = []
        futures: dict[concurrent.futures.Future[str | _Landed], RemoteFile] = {}
        try:
            with concurrent.futures.ThreadPoolExecutor(
                    max_workers=workers, thread_name_prefix="weightd-fetch") as pool:
                futures = {pool.submit(self._fetch_one, source, f, progress, stats, hold,
                                       events, buffers, pull, schedule): f
                           for f in todo}
                if reading is not None:
                    futures[reading.future] = reading.file
                try:
                    for fut in concurrent.futures.as_completed(futures):
                        f = futures[fut]
                        got = fut.result()
                        if isinstance(got, _Landed):
                            landed.append(got)
                            got = got.digest
                        results[f.relpath] = ModelFile(f.relpath, f.url, got, f.size,
                                                       f.identity)
                    stats.window = schedule.growth.size
                except BaseException:
                    for other in futures:
                        other.cancel()
                    source.close()  # the other files' reads end now, not when their bytes do
                    if pull is not None:
                        pull.abort()  # and those waiting for another node's blobs
                    raise
        except BaseException:
            # every future is done here (the pool was joined; the lead's is waited for)
            concurrent.futures.wait(futures)
            for fut in futures:
                if not fut.cancelled() and fut.exception() is None:
                    got = fut.result()
                    if isinstance(got, _Landed):
                        got.temp.discard()
            raise
        return landed

    def _commit(self, landed: Sequence[_Landed]) -> None:
        """Make verified shards durable: fsync each, then rename it into ``blobs/``; then
        record them in the index.

        Raises:
            BudgetExceeded: the disk is full (ENOSPC, EDQUOT).
            IntegrityError: the disk failed (EIO, ...): the bytes are not durable.
        """
        for x in landed:
            try:
                x.temp.sync()
                pause_at("fsynced")
                x.temp.publish(x.digest)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise BudgetExceeded(f"{self.store.root}: disk full while committing "
                                         f"{x.file.url}") from e
                raise IntegrityError(f"{x.file.url}: its verified bytes are not durable: the "
                                     f"disk failed the commit of {x.temp.path.name} ({e}); "
                                     "fetch again") from e
        pause_at("renamed")
        for x in landed:  # durable now: the index may name them
            self.store.index.record_file(x.file.url, x.file.identity, x.file.size, x.digest)

    def layout(self, digest: str, path: Path | None = None) -> ShardLayout:
        """The layout of the shard blob ``digest``: the one its fetch parsed, while the
        cache keeps it, else read from the blob (or from ``path``, where it is while it is
        not committed yet), and kept."""
        layout = self.layouts.get(digest)
        if layout is None:
            try:
                layout = read_layout(path if path is not None
                                     else self.store.blob_path(digest))
            except FileNotFoundError:
                if path is None:
                    raise
                # committed meanwhile: the temporary file was renamed to its blob
                layout = read_layout(self.store.blob_path(digest))
            self.layouts.put(digest, layout)
        return layout

    def _check_answer(self, url: str, files: dict[str, ModelFile],
                      pending: Mapping[str, Path]) -> None:
        """Refuse a model whose Acquire answer would not fit in a gRPC message, or whose
        shards share a tensor name (every client refuses such a model).

        A warm fetch parses no header: each shard's share of the answer is in the index
        (recorded the first time a fetch checks the blob), and the names are compared
        only when the shards differ from those the model's snapshot has now (which were
        compared when it was made). ``pending``: the temporary file of each shard not yet
        committed (read there, see :meth:`layout`)."""
        rels = [rel for rel in sorted(files) if rel.endswith(".safetensors")]
        digests = [files[rel].digest for rel in rels]
        known = self.store.index.shard_answers(digests)
        learned: dict[str, tuple[int, int]] = {}
        for d in digests:
            if d not in known:
                layout = self.layout(d, pending.get(d))
                learned[d] = (len(layout.tensors), entries_bytes(layout))
        if learned:
            self.store.index.record_shard_answers(learned)
        known.update(learned)
        recorded = self.store.index.model(model_name(url))
        if recorded is None or {f.relpath: f.digest for f in recorded.files
                                if f.relpath.endswith(".safetensors")} != dict(
                                    zip(rels, digests, strict=True)):
            self._check_names(url, rels, digests, pending)
        need = sum(_shard_bytes(len(str(self.store.blob_path(d)))) + known[d][1]
                   for d in digests)
        if need > MAX_ANSWER_BYTES:
            tensors = sum(known[d][0] for d in digests)
            raise FormatError(url, f"its {tensors} tensors need an answer of about "
                                   f"{need // (1024 * 1024)} MiB, over the "
                                   f"{MAX_ANSWER_BYTES // (1024 * 1024)} MiB a gRPC message "
                                   "may hold")

    def _check_names(self, url: str, rels: Sequence[str], digests: Sequence[str],
                     pending: Mapping[str, Path]) -> None:
        """Refuse shards that share a tensor name (naming the tensor and both shards)."""
        seen: dict[str, str] = {}
        for rel, digest in zip(rels, digests, strict=True):
            for t in self.layout(digest, pending.get(digest)).tensors:
                first = seen.setdefault(t.name, rel)
                if first != rel:
                    raise FormatError(url, f"tensor {t.name!r} appears in both {first} and "
                                           f"{rel}: a model's shards must not share names")

    def _hit(self, f: RemoteFile, hold: Callable[[str], None] | None = None) -> str | None:
        digest = self.store.index.lookup_file(f.url, f.identity)
        if digest is not None and hold is not None:
            hold(digest)  # then look: a gc that had it may just have deleted it
        return digest if digest is not None and self.store.has_blob(digest) else None

    def _fetch_one(self, source: Source, f: RemoteFile, progress: _LockedCallback,
                   stats: FetchStats, hold: Callable[[str], None] | None,
                   events: FetchEvents, buffers: _Buffers,
                   pull: MirrorPull | None, schedule: _Schedule | None = None) -> str | _Landed:
        """One file that missed the cache: from the mirror when it has it, else (or when
        that fails) from the origin, then handed to the write-back.

        A file read from the mirror is told to ``events`` (the streaming replicas) only
        once its digest matched the manifest's, whole: bytes that may yet turn out wrong
        and be read again from the origin are never streamed."""
        via = pull.via(f) if pull is not None else None
        if pull is not None and via is not None:
            attempt = _Attempt(progress)
            try:
                got = self.fetch_file(source, f, attempt, stats, hold=hold, buffers=buffers,
                                      via=via, schedule=schedule)
            except BudgetExceeded:
                raise  # the disk is full: the origin's bytes would not fit either
            except Exception as e:  # the mirror costs a warning, never the load
                attempt.undo()
                pull.failed(f, e)
            else:
                if isinstance(got, _Landed):
                    events.opened(f, got.temp.path)
                    events.header(f, self.layout(got.digest, got.temp.path))
                    events.written(f, 0, f.size)
                return got
        got = self.fetch_file(source, f, progress, stats, hold=hold, events=events,
                              buffers=buffers, schedule=schedule)
        if pull is not None:
            if isinstance(got, _Landed):  # uploaded from its temporary file (or its blob)
                pull.verified(f, got.digest, got.temp.path)
            else:
                pull.verified(f, got)
        return got

    def fetch_file(self, source: Source, f: RemoteFile, progress: _LockedCallback,
                   stats: FetchStats, *, hold: Callable[[str], None] | None = None,
                   events: FetchEvents | None = None,
                   buffers: _Buffers | None = None, via: Via | None = None,
                   schedule: _Schedule | None = None) -> str | _Landed:
        """Download one file that is not in the store (the caller holds its single-flight
        lock). A side file is committed and recorded: its digest is returned. A shard is
        returned verified and uncommitted (:class:`_Landed`): the caller commits it.
        ``via``: read it from there (the mirror) instead of from ``source``.
        ``schedule``: the model's reads, this file's among them (default: its own)."""
        temp, digest, hash_s = self._download(
            source, f, progress, events or FetchEvents(),
            buffers or _Buffers(source.plan.chunk_size), hold, via,
            schedule=schedule or _Schedule([f], source.plan.concurrency,
                                           source.plan.chunk_size))
        stats.add(hit=False, size=f.size, fetched=f.size, hash_seconds=hash_s,
                  mirror=via is not None)
        if f.relpath.endswith(".safetensors"):
            return _Landed(f, digest, temp)
        try:
            temp.commit(digest)
        finally:
            temp.discard()
        self.store.index.record_file(f.url, f.identity, f.size, digest)
        return digest

    def _download(self, source: Source, f: RemoteFile, progress: _LockedCallback,
                  events: FetchEvents, buffers: _Buffers,
                  hold: Callable[[str], None] | None = None,
                  via: Via | None = None, *,
                  schedule: _Schedule) -> tuple[TempBlob, str, float]:
        """Download, hash and validate ``f`` into a temp file; return it uncommitted (the
        caller commits or discards it), with the digest and the seconds spent hashing."""
        hasher = xxhash.xxh3_128()
        hash_seconds = 0.0
        landed = 0  # bytes hashed and written
        shard = f.relpath.endswith(".safetensors")
        layout: ShardLayout | None = None
        temp = self.store.temp_blob(f.size, hint=f.relpath.rsplit("/", 1)[-1])
        try:
            fd = temp.fd
            events.opened(f, temp.path)
            with via.open() if via is not None else source.open_file(f) as reader:
                side = _SideHash(reader.digest) if reader.digest is not None else None

                def sink(offset: int, blocks: Sequence[Buffer]) -> ShardLayout | None:
                    """Hash and write one chunk; its buffers are free when it returns.
                    Return the shard's layout, once its header is written."""
                    nonlocal hash_seconds, layout, landed
                    if side is not None:
                        side.add(blocks)
                    nbytes = sum(len(b) for b in blocks)
                    landed += nbytes
                    try:
                        hash_seconds += _hash_and_write(hasher, fd, blocks, offset)
                    except OSError as e:
                        if e.errno in (errno.ENOSPC, errno.EDQUOT):
                            raise BudgetExceeded(f"{self.store.root}: disk full while writing "
                                                 f"{f.url}") from e
                        raise
                    if _start_writeback is not None:
                        _start_writeback(fd, offset, nbytes)
                    if side is not None:
                        side.wait()
                    if shard and layout is None:
                        # a malformed header fails the download now, not at its end
                        layout = _header_if_landed(fd, f, offset + nbytes)
                        if layout is not None:
                            events.header(f, layout)
                    events.written(f, offset, nbytes)
                    progress.update(nbytes)
                    pause_at("downloading")
                    return layout

                try:
                    try:
                        order, start = schedule.place(f)
                        # (a mirror's reads are not the origin's link: not measured)
                        fsspec.asyn.sync(fsspec.asyn.get_loop(), self._read_all, reader,
                                         reader.rf, sink, buffers, schedule, order, start,
                                         measure=via is None)
                    except WeightdError:
                        raise
                    except Exception as e:
                        raise reader.source.error(e, reader.rf.url) from e
                    if landed != f.size:
                        # the reads ended without every byte (cancelled, e.g. by the
                        # source's close): never a digest of part of the file
                        raise SourceUnavailable(f"{reader.rf.url}: the download stopped "
                                                f"after {landed} of {f.size} bytes")
                    digest = hasher.hexdigest()
                    if via is not None and digest != via.digest:
                        raise IntegrityError(f"{reader.rf.url}: its bytes hash to {digest}, "
                                             f"not to {via.digest} as the {via.what}'s "
                                             f"manifest says for {f.url}")
                    if side is not None:
                        side.check(f.url)
                finally:
                    if side is not None:
                        side.close()
                if shard and layout is None:  # (an empty file: no chunk was written)
                    with os.fdopen(os.dup(fd), "rb") as fobj:
                        layout = read_layout(f.url, fileobj=fobj)
                again = reader.identity()
            if again != reader.rf.identity:
                raise IntegrityError(f"{reader.rf.url}: the source changed during the "
                                     f"download ({reader.rf.identity} -> {again}); fetch "
                                     "again")
            if hold is not None:
                hold(digest)
        except BaseException:
            temp.discard()
            raise
        if layout is not None:
            self.layouts.put(digest, layout)
        return temp, digest, hash_seconds

    async def _read_all(self, reader: FileReader, f: RemoteFile,
                        sink: Callable[[int, Sequence[Buffer]], ShardLayout | None],
                        pool: _Buffers,
                        schedule: _Schedule | None = None, order: int = 0,
                        model_offset: int = 0, *, measure: bool = True) -> None:
        """Read every range of ``f`` in the model's window (``schedule``: its own by
        default; ``order`` and ``model_offset``: the file's place in the model); hand
        them to ``sink`` in order.

        ``sink`` runs on one writer thread per file, so hashing and writing range i
        overlap the reads of the ranges after it; the ranges that landed while a write
        ran are handed over together, in one call (a chunk's bytes, :data:`MAX_BATCH`
        ranges at most). A range holds its turn in the model's window from the start of
        its read until it is written (with its batch), and each file's bytes read and not
        yet written are bounded by ``concurrency + 2`` chunks (:class:`_Turns`, taken
        before the turn): a file whose writer falls behind leaves the window to the other
        files. A reader that fills buffers gets one per range when its read starts, taken
        back once the range is written.
        """
        plan = reader.source.plan
        policy = reader.policy or self.policy
        loop = asyncio.get_running_loop()
        window = schedule or _Schedule([f], plan.concurrency, plan.chunk_size)
        # the model's first shard: its header first, alone (the rest is cut after it),
        # then the reads to its first tensor's end (until first_end), which share the
        # window (first_reads); it has begun (window.begun) once written to begin_at
        leads = window.leads(f)
        probe = window.probe(f, plan)
        first_end = first_reads = 0
        begin_at = f.size if probe else 0  # (not at the header's write: its layout says)
        chunks = deque([] if probe else window.ranges(f.size, plan, model_offset))
        buffers = pool if reader.fills_buffer and pool.size >= plan.chunk_size else None

        # the file's bytes read and not yet written, taken in the file's order
        unwritten = _Turns((plan.concurrency + 2) * plan.chunk_size)

        Read = tuple[mmap.mmap | None, Sequence[Buffer], int]

        async def read(start: int, end: int, share: int = 0) -> Read:
            # room in the file's unwritten bytes first, in the file's order; then a turn
            # in the model's window, kept until the range is written (released by
            # write()): a new read starts as the model's written front moves, which
            # keeps the reads in the model's order; the buffer is taken when the read
            # starts, not while it waits
            await unwritten.take(end - start, (start,))
            try:
                cost = await window.acquire(
                    (order, start), end - start, plan.chunk_size,
                    split=plan.ramp and end - start < f.size, share=share)
            except BaseException:
                unwritten.give(end - start)
                raise
            try:
                buf = buffers.take() if buffers is not None else None
                into = memoryview(buf)[:end - start] if buf is not None else None
                data = await retry_async(
                    lambda: reader.read(start, end, into), policy=policy,
                    is_transient=is_transient, what=f"{f.url} bytes {start}-{end}")
            except BaseException:
                window.release(cost)
                unwritten.give(end - start)
                raise
            return buf, data, cost  # (a failed or cancelled read's buffer is dropped)

        pending: deque[tuple[int, int, asyncio.Task[Read]]] = deque()

        def schedule_reads() -> None:
            # every range waits at once (a coroutine, no buffer until its read starts):
            # the window sees this file's ranges as soon as the file's budget allows
            while chunks:
                start, end = chunks.popleft()
                share = first_reads if end <= first_end else 0
                pending.append((start, end, asyncio.ensure_future(read(start, end, share))))

        writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weightd-write")

        async def write(batch: Sequence[tuple[int, int, Read]]) -> ShardLayout | None:
            # ranges back to back, in the file's order: one hop to the writer for them all
            written = False
            blocks = [b for _, _, (_, data, _) in batch for b in data]
            try:
                layout = await loop.run_in_executor(writer, sink, batch[0][0], blocks)
                written = True
                if leads and batch[-1][1] >= begin_at:
                    window.begun.set()
            finally:
                for start, end, (_, _, cost) in batch:
                    landed = end - start if written else 0
                    window.release(cost, landed,
                                   measure=measure and landed >= plan.chunk_size // 2)
                    unwritten.give(end - start)
            for _, _, (buf, _, _) in batch:
                if buf is not None and buffers is not None:
                    buffers.give(buf)  # for the next range (of this file, or the fetch's next)
            return layout

        last_write: asyncio.Future[ShardLayout | None] | None = None
        held: list[int] = []  # the costs of ranges read whose turns no write() has taken yet
        try:
            if probe:
                # the header's read, alone, and its write: the layout the writer parses
                # from it (the shard's, once) tells where the first tensor ends, and the
                # window's next reads are cut there
                end = _first_tensor_end(await write([(0, probe, await read(0, probe, 1))]),
                                        probe)
                chunks.extend(window.ranges(f.size, plan, model_offset, first=(probe, end))[1:])
                begin_at = min(end, probe + plan.chunk_size)
                if begin_at <= probe:
                    window.begun.set()
                if window.cuts(probe, end, f.size, plan.chunk_size):
                    first_end, first_reads = end, window.first_reads(probe, end)
            schedule_reads()
            while pending:
                start, end, task = pending[0]
                got = await task
                pending.popleft()
                held.append(got[2])
                batch = [(start, end, got)]
                if last_write is not None:
                    await last_write  # in order: one write at a time
                # the ranges after it that landed meanwhile go with it, up to a chunk's
                # bytes (their turns come back when the batch is written): on a busy event
                # loop each write's hops (the loop, then the writer thread) took 1-2 ms,
                # and a first chunk read as 32 short ranges was written 15-40 ms after it
                # landed
                nbytes = end - start
                while (pending and len(batch) < MAX_BATCH and pending[0][2].done()
                       and not pending[0][2].cancelled()
                       and pending[0][2].exception() is None
                       and nbytes + pending[0][1] - pending[0][0] <= plan.chunk_size):
                    nbytes += pending[0][1] - pending[0][0]
                    start, end, task = pending.popleft()
                    got = task.result()
                    held.append(got[2])
                    batch.append((start, end, got))
                last_write = asyncio.ensure_future(write(batch))
                held = []
            if last_write is not None:
                await last_write
        finally:
            for _, _, task in pending:
                task.cancel()
            if pending:
                done = await asyncio.gather(*(t for _, _, t in pending), return_exceptions=True)
                for x in done:
                    if not isinstance(x, BaseException):
                        window.release(x[2])  # read, never written: the other files' go on
            for cost in held:
                window.release(cost)
            if last_write is not None and not last_write.done():
                await asyncio.gather(last_write, return_exceptions=True)
            writer.shutdown(wait=False)
