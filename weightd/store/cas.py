"""The content-addressed store on local disk.

Layout under ``cache_dir``::

    blobs/ab/<xxh3-128 hex>          immutable, read-only, complete and verified
    snapshots/<model>                a link to the model's current revision ...
    snapshots/.revs/<model>/<rev>/   ... a plain directory of links to blobs
    tmp/                             downloads in progress (*.incomplete)
    quarantine/                      blobs that failed verification
    locks/                           one lock file per source file (single-flight)
    index.sqlite3                    the index (WAL)
    .lock                            the cache lock (the daemon holds it exclusively)

A blob becomes visible only by ``rename`` from ``tmp/`` after fsync; a snapshot switches
revisions by an atomic ``rename`` of its link. Locks only avoid duplicate work:
correctness comes from the rename.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import xxhash

from weightd.errors import BudgetExceeded, CacheLocked, IntegrityError
from weightd.store.index import Index, ModelFile, ModelRecord

log = logging.getLogger(__name__)

HASH_BLOCK = 8 * 1024 * 1024


def hash_file(path: str | os.PathLike[str], *, block: int = HASH_BLOCK) -> str:
    """xxh3-128 hex digest of a whole file, read sequentially in large blocks."""
    h = xxhash.xxh3_128()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _always(digest: str) -> Iterator[bool]:
    yield True


@dataclass(frozen=True)
class VerifyReport:
    checked: int
    bytes: int
    corrupt: tuple[str, ...]       # digests moved to quarantine
    missing: tuple[str, ...]       # digests in the index without a blob
    unindexed: tuple[str, ...]     # blobs on disk the index did not know (now indexed)


@dataclass(frozen=True)
class GcPlan:
    """What a gc would delete, in order: old revisions, orphan blobs, then LRU models."""

    budget: int
    before: int
    models: tuple[str, ...]
    blobs: tuple[tuple[str, int], ...]
    revisions: tuple[Path, ...]

    @property
    def freed(self) -> int:
        return sum(size for _, size in self.blobs)

    @property
    def after(self) -> int:
        return self.before - self.freed


class Store:
    """A cache directory: blobs, snapshots, temp files, locks and the index.

    Open it with :meth:`open`, which takes the cache lock (shared for a CLI process,
    exclusive for the daemon or for ``verify``/``gc``) and removes dead leftovers in tmp.
    """

    def __init__(self, root: Path, *, exclusive: bool = False, wait: bool = False) -> None:
        self.root = Path(root)
        for sub in ("blobs", "tmp", "snapshots/.revs", "quarantine", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self._lock_fd, mode | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as e:
            os.close(self._lock_fd)
            raise CacheLocked(
                f"{self.root}: the cache is in use by another process "
                f"({'a daemon or another command' if exclusive else 'probably the daemon'}); "
                "talk to the daemon, or stop it first") from e
        self.exclusive = exclusive
        self.index = self._open_index()
        self._flight: dict[str, threading.Lock] = {}
        self._flight_guard = threading.Lock()
        self.clean_tmp()

    def _open_index(self) -> Index:
        """Open the index; rebuild it from the snapshot manifests when it is missing or
        damaged (only under the exclusive lock: the daemon, verify, gc)."""
        path = self.root / "index.sqlite3"
        has_snapshots = any(not p.name.startswith(".")
                            for p in (self.root / "snapshots").iterdir())
        if not path.exists() and has_snapshots and not self.exclusive:
            os.close(self._lock_fd)
            raise IntegrityError(
                f"{path}: the index is missing; start the daemon or run `weightd verify` to "
                "rebuild it from the snapshots")
        try:
            index = Index(path)
        except sqlite3.DatabaseError as e:
            if not self.exclusive:
                os.close(self._lock_fd)
                raise IntegrityError(
                    f"{path}: the index is damaged ({e}); start the daemon or run "
                    "`weightd verify` to rebuild it from the snapshots") from e
            aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
            log.error("%s: the index is damaged (%s): moved to %s; rebuilding it from the "
                      "snapshot manifests", path, e, aside)
            try:
                os.rename(path, aside)
                for suffix in ("-wal", "-shm"):
                    side = path.with_name(path.name + suffix)
                    if side.exists():
                        os.rename(side, aside.with_name(aside.name + suffix))
            except OSError as moved:
                os.close(self._lock_fd)
                raise IntegrityError(f"{path}: the index is damaged ({e}) and cannot be moved "
                                     f"aside ({moved}); move it away by hand") from moved
            index = Index(path)
        if self.exclusive and has_snapshots and not index.models():
            self._rebuild(index)
        return index

    def _rebuild(self, index: Index) -> None:
        """Register every model whose current revision's manifest names blobs that are all
        present with the right size; skip (and log) the others."""
        revs = self.root / "snapshots" / ".revs"
        restored = skipped = 0
        for link in sorted((self.root / "snapshots").iterdir()):
            if link.name.startswith(".") or not link.is_symlink():
                continue
            rev_dir = Path(os.path.realpath(link))
            manifest = revs / link.name / f"{rev_dir.name}.manifest.json"
            try:
                data = json.loads(manifest.read_text())
                files = {f["relpath"]: ModelFile(f["relpath"], f["url"], f["digest"],
                                                 int(f["size"]), f.get("identity", ""))
                         for f in data["files"]}
                source = str(data["source"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("%s: no usable manifest (%s): not restored", link.name, e)
                skipped += 1
                continue
            if not all(self.has_blob(f.digest)
                       and self.blob_path(f.digest).stat().st_size == f.size
                       for f in files.values()):
                log.warning("%s: some blobs are missing: not restored (fetch it again)",
                            link.name)
                skipped += 1
                continue
            for f in files.values():
                if f.identity:
                    index.record_file(f.url, f.identity, f.size, f.digest)
            index.record_model(link.name, source, rev_dir.name, files)
            restored += 1
        if restored or skipped:
            log.warning("index rebuilt from manifests: %d models restored, %d skipped",
                        restored, skipped)

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, exclusive: bool = False,
             wait: bool = False) -> Store:
        return cls(Path(root), exclusive=exclusive, wait=wait)

    def close(self) -> None:
        self.index.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # paths ----------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / digest[:2] / digest

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def snapshot_path(self, name: str) -> Path:
        """The stable path of a model's snapshot (a link to its current revision)."""
        return self.root / "snapshots" / name

    def revision_path(self, name: str, revision: str) -> Path:
        """The directory of one revision of a model's snapshot (what a view names: it
        does not move when the model is fetched again)."""
        return self.root / "snapshots" / ".revs" / name / revision

    # temp files -----------------------------------------------------------------------

    def clean_tmp(self) -> int:
        """Remove leftovers in tmp/ whose writer is gone (their lock can be taken)."""
        removed = 0
        for entry in os.scandir(self.root / "tmp"):
            try:
                fd = os.open(entry.path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(entry.path)
                removed += 1
            except BlockingIOError:
                pass  # a live writer holds it
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
        if removed:
            log.info("removed %d leftover temp file(s) in %s", removed, self.root / "tmp")
        return removed

    @contextlib.contextmanager
    def temp_file(self, size: int, *, hint: str = "") -> Iterator[tuple[int, Path]]:
        """A new preallocated file in tmp/, locked by this process, removed unless renamed.

        Yields ``(fd, path)``. The caller commits it with :meth:`commit_blob`.
        """
        name = f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}-{hint[:40]}"
        path = self.root / "tmp" / (name.replace("/", "_") + ".incomplete")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if size:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        raise BudgetExceeded(
                            f"{self.root}: no room on disk for {size} bytes") from e
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    os.ftruncate(fd, size)
            yield fd, path
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def commit_blob(self, fd: int, tmp: Path, digest: str) -> Path:
        """fsync a finished temp file and rename it to its blob path (dedup if present)."""
        os.fsync(fd)
        dest = self.blob_path(digest)
        if dest.exists():
            return dest  # same content already there; the temp file is removed by the caller
        dest.parent.mkdir(exist_ok=True)
        os.fchmod(fd, 0o444)
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
        return dest

    # single flight ----------------------------------------------------------------------

    @contextlib.contextmanager
    def single_flight(self, key: str) -> Iterator[None]:
        """Hold the work on ``key`` against other threads here and other processes."""
        with self._flight_guard:
            lock = self._flight.setdefault(key, threading.Lock())
        with lock:
            name = hashlib.sha256(key.encode()).hexdigest()[:32]
            fd = os.open(self.root / "locks" / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    # snapshots --------------------------------------------------------------------------

    def commit_snapshot(self, name: str, source: str, files: Mapping[str, ModelFile]) -> Path:
        """Build a revision directory of links and switch the model's link to it atomically."""
        manifest = "\n".join(f"{rel}\0{f.digest}" for rel, f in sorted(files.items()))
        rev = xxhash.xxh3_64_hexdigest(manifest.encode())
        revs = self.root / "snapshots" / ".revs" / name
        rev_dir = revs / rev
        revs.mkdir(parents=True, exist_ok=True)
        # beside the revision (not in it: the snapshot stays a plain directory of the model's
        # files): what the index needs to be rebuilt if it is ever lost
        record = {"source": source, "name": name, "revision": rev,
                  "files": [dataclasses.asdict(f) for _, f in sorted(files.items())]}
        manifest_path = revs / f"{rev}.manifest.json"
        data = json.dumps(record, indent=1).encode()
        try:
            unchanged = manifest_path.read_bytes() == data
        except FileNotFoundError:
            unchanged = False
        if not unchanged:  # a repeat fetch of an unchanged model writes (and fsyncs) nothing
            _write_atomic(manifest_path, data)
        if not rev_dir.is_dir():
            staging = revs / f".{rev}.{os.getpid()}.{threading.get_ident()}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            for rel, f in files.items():
                link = staging / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.relpath(self.blob_path(f.digest), link.parent), link)
            try:
                os.rename(staging, rev_dir)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)  # another process won the race
        link = self.snapshot_path(name)
        target = os.path.relpath(rev_dir, link.parent)
        try:
            current = os.readlink(link)
        except OSError:
            current = None
        if current != target:
            tmp_link = link.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.link")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_link)
            os.symlink(target, tmp_link)
            os.replace(tmp_link, link)
            _fsync_dir(link.parent)
        self.index.record_model(name, source, rev, files)
        return link

    def model_complete(self, model: ModelRecord) -> bool:
        return all(self.has_blob(f.digest) for f in model.files)

    # verify -----------------------------------------------------------------------------

    def verify(self, *, claim: Callable[[str], AbstractContextManager[bool]] | None = None,
               ) -> VerifyReport:
        """Rehash every blob; move corrupt ones to quarantine/ and forget them.

        Args:
            claim: asked about each corrupt blob before it is moved: a context that
                yields whether the blob may be moved now (held for the move's duration);
                False leaves it in place (the daemon: something holds it). Default:
                always.
        """
        claim = claim or _always
        known = {b.digest: b for b in self.index.blobs()}
        corrupt, unindexed = [], []
        checked = total = 0
        on_disk = set()
        for sub in sorted((self.root / "blobs").iterdir()):
            if not sub.is_dir():
                continue
            for blob in sorted(sub.iterdir()):
                digest = blob.name
                try:
                    actual = hash_file(blob)
                    size = blob.stat().st_size
                except FileNotFoundError:
                    continue  # a daemon's gc removed it meanwhile: nothing to verify
                on_disk.add(digest)
                checked += 1
                total += size
                rec = known.get(digest)
                if actual != digest or (rec is not None and rec.size != size):
                    corrupt.append(digest)
                    with claim(digest) as free:
                        if not free:
                            continue  # in use: the caller quarantines it later
                        dest = self.quarantine(digest)
                    log.error("corrupt blob %s (content hashes to %s): moved to %s",
                              digest, actual, dest)
                elif rec is None:
                    unindexed.append(digest)
        # (what a daemon's gc removed meanwhile, it also forgot: not missing)
        missing = sorted((set(known) - on_disk) & {b.digest for b in self.index.blobs()})
        for digest in missing:
            self.index.forget_blob(digest)
        return VerifyReport(checked, total, tuple(corrupt), tuple(missing), tuple(unindexed))

    def quarantine(self, digest: str) -> Path:
        """Move a blob to quarantine/ and forget it (the next fetch downloads it again)."""
        dest = self.root / "quarantine" / f"{digest}.{time.time_ns()}"
        os.rename(self.blob_path(digest), dest)
        self.index.forget_blob(digest)
        return dest

    # gc ---------------------------------------------------------------------------------

    def blob_bytes(self) -> int:
        return sum(b.size for b in self.index.blobs() if self.has_blob(b.digest))

    def plan_gc(self, budget: int, *, keep: Collection[str] = (), held: Collection[str] = (),
                held_revisions: Collection[tuple[str, str]] = ()) -> GcPlan:
        """Plan evictions until blobs take at most ``budget`` bytes (nothing is deleted).

        Args:
            budget: bytes the blobs may take.
            keep: models never evicted (resident, leased, pinned, being fetched...), nor
                any of their revisions deleted.
            held: blobs never deleted, whoever references them (a fetch in progress
                holds blobs that no model record names yet; a resident revision holds
                blobs that its model's current record may no longer name).
            held_revisions: ``(model, revision)`` snapshot directories never deleted
                (a leased older revision).
        """
        held = set(held)
        blobs = {b.digest: b for b in self.index.blobs() if self.has_blob(b.digest)}
        before = sum(b.size for b in blobs.values())
        models = sorted(self.index.models(), key=lambda m: m.last_used)
        current = {(m.name, m.revision) for m in models} | set(held_revisions)
        # old revisions of models nothing uses (a model being fetched may be writing a
        # revision that the index does not name yet)
        revisions = tuple(
            rev for model_dir in sorted((self.root / "snapshots" / ".revs").iterdir())
            if model_dir.name not in keep
            for rev in sorted(model_dir.iterdir())
            if rev.is_dir() and (model_dir.name, rev.name) not in current)
        users: dict[str, set[str]] = {}
        for m in models:
            for f in m.files:
                users.setdefault(f.digest, set()).add(m.name)
        evict_models: list[str] = []
        evict_blobs: list[tuple[str, int]] = []
        size = before
        for b in sorted(blobs.values(), key=lambda b: b.last_used):
            if size <= budget:
                break
            if b.digest not in users and b.digest not in held:
                evict_blobs.append((b.digest, b.size))
                size -= b.size
        for m in models:
            if size <= budget:
                break
            if m.name in keep:
                continue
            evict_models.append(m.name)
            for f in m.files:
                holders = users.get(f.digest, set())
                holders.discard(m.name)
                if (not holders and f.digest in blobs and f.digest not in held
                        and (f.digest, f.size) not in evict_blobs):
                    evict_blobs.append((f.digest, blobs[f.digest].size))
                    size -= blobs[f.digest].size
        return GcPlan(budget, before, tuple(evict_models), tuple(evict_blobs), revisions)

    def run_gc(self, plan: GcPlan) -> None:
        """Execute a plan: snapshots and revisions first, then blobs."""
        for name in plan.models:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.snapshot_path(name))
            shutil.rmtree(self.root / "snapshots" / ".revs" / name, ignore_errors=True)
            self.index.forget_model(name)
        for rev in plan.revisions:
            shutil.rmtree(rev, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rev.with_name(f"{rev.name}.manifest.json"))
        for digest, _ in plan.blobs:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.blob_path(digest))
            self.index.forget_blob(digest)

