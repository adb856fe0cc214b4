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

A blob becomes visible only by ``rename`` from ``tmp/`` after fsync (:class:`TempBlob`);
a snapshot switches revisions by an atomic ``rename`` of its link. Locks only avoid duplicate work:
correctness comes from the rename.

Modes, whatever the umask: directories 0750, blobs and temp files 0440 (a download in
progress is read by the replicas that stream it; its writer's descriptor was opened
before the mode applied, nobody can open it for writing), the index, manifests and lock
files 0640; the group is the daemon's (its files' default). Members of that group (model
servers) read the cache, nobody else can. An exclusive open tightens
the top-level entries of a cache made with wider modes; ``verify`` fixes every entry.
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
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import xxhash

from weightd.errors import BudgetExceeded, CacheLocked, IntegrityError
from weightd.sources import check_relpaths, model_name
from weightd.store.index import Index, ModelFile, ModelRecord

log = logging.getLogger(__name__)

HASH_BLOCK = 8 * 1024 * 1024

#: Modes of what the store creates (see the module's docstring).
DIR_MODE = 0o750
BLOB_MODE = 0o440
FILE_MODE = 0o640
TEMP_MODE = 0o440


def revision_of(files: Mapping[str, ModelFile]) -> str:
    """The revision of a snapshot: a hash of its manifest (relpath -> digest)."""
    manifest = "\n".join(f"{rel}\0{f.digest}" for rel, f in sorted(files.items()))
    return xxhash.xxh3_64_hexdigest(manifest.encode())


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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    with open(fd, "wb") as f:
        os.fchmod(fd, FILE_MODE)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _mkdirs(path: Path) -> None:
    """``mkdir -p`` whose every new directory is :data:`DIR_MODE`, whatever the umask."""
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue
        # keep the setgid bit a new directory inherits (how a shared cache keeps its group)
        os.chmod(d, DIR_MODE | (os.stat(d).st_mode & stat.S_ISGID))


def _create(path: Path) -> None:
    """Create an empty file of :data:`FILE_MODE` if there is none (SQLite would make its
    database 0644; its -wal and -shm files take the database's mode)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
        os.chmod(path, FILE_MODE)


def _tighten(path: Path, mode: int) -> int | None:
    """Remove the permission bits of ``path`` (not a link) beyond ``mode``; return the old
    mode when it was wider, else None. Only the rwx bits are compared and narrowed: the
    setgid bit an operator sets on a shared cache's directories (so that new entries
    inherit its group) is kept."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    old = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode) or not old & 0o777 & ~mode:
        return None
    os.chmod(path, old & (mode | ~0o777))
    return old


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _always(digest: str) -> Iterator[bool]:
    yield True


def _links(directory: Path) -> Iterator[Path]:
    for dirpath, _, filenames in os.walk(directory):
        for f in filenames:
            yield Path(dirpath) / f


class TempBlob:
    """A download's temporary file in ``tmp/``: preallocated, flock'ed by its writer (so
    that a start-up never removes a live writer's file), :data:`TEMP_MODE`. It ends in one
    of two ways: :meth:`commit` (fsync, rename into ``blobs/``, fsync of the directory:
    the blob is visible, complete and durable) or :meth:`discard` (closed and removed).
    Until then its path is where its bytes are, for whoever reads them before the blob is
    durable (the node serves a verified one from here).

    A commit is two steps, :meth:`sync` then :meth:`publish`, so that a test can stop
    between them (weightd/testhooks.py).
    """

    def __init__(self, store: Store, fd: int, path: Path) -> None:
        self.store = store
        self.fd = fd
        self.path = path
        self.closed = False

    def sync(self) -> None:
        """fsync the file's data (the disk has it once this returns)."""
        os.fsync(self.fd)

    def publish(self, digest: str) -> Path:
        """Rename the (synced) file to its blob path and fsync the directory; when the
        blob is there already (same content), the file is only removed. Closes it."""
        dest = self.store.blob_path(digest)
        try:
            if not dest.exists():
                _mkdirs(dest.parent)
                os.fchmod(self.fd, BLOB_MODE)
                os.rename(self.path, dest)
                _fsync_dir(dest.parent)
        finally:
            self.discard()
        return dest

    def commit(self, digest: str) -> Path:
        """:meth:`sync`, then :meth:`publish`."""
        self.sync()
        return self.publish(digest)

    def discard(self) -> None:
        """Close the file and remove it if it was not renamed (idempotent)."""
        if self.closed:
            return
        self.closed = True
        os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            # after a rename this name is gone (temp names carry pid, thread and a
            # clock: never another writer's)
            os.unlink(self.path)


@dataclass(frozen=True)
class VerifyReport:
    checked: int
    bytes: int
    corrupt: tuple[str, ...]       # digests moved to quarantine
    missing: tuple[str, ...]       # digests in the index without a blob
    unindexed: tuple[str, ...]     # blobs on disk the index did not know (now indexed)
    modes: tuple[tuple[str, int, int], ...] = ()  # (path, old, new): wider modes, narrowed


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
            _mkdirs(self.root / sub)
        self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
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
        self._tighten_top()
        if exclusive:
            self._migrate_names()
        self._flight: dict[str, threading.Lock] = {}
        self._flight_guard = threading.Lock()
        self.clean_tmp()
        if exclusive:
            self._drop_uncommitted()

    def _top_entries(self) -> list[tuple[Path, int]]:
        """The cache's own directories and files, with the widest mode each may have."""
        dirs = [self.root, *(self.root / d for d in ("blobs", "tmp", "snapshots",
                                                      "snapshots/.revs", "quarantine", "locks"))]
        index = self.root / "index.sqlite3"
        files = [self.root / ".lock", index, *(index.with_name(index.name + suffix)
                                               for suffix in ("-wal", "-shm"))]
        return [(d, DIR_MODE) for d in dirs] + [(f, FILE_MODE) for f in files]

    def _tighten_top(self) -> None:
        """A cache made with wider modes (before 0.2, or by hand) is narrowed where it
        matters at once: nobody else can enter it (``verify`` narrows every entry)."""
        self._narrowed: list[tuple[str, int, int]] = []
        for path, mode in self._top_entries():
            with contextlib.suppress(PermissionError):
                old = _tighten(path, mode)
                if old is not None:
                    self._narrowed.append((str(path), old, old & mode))
                    log.warning("%s was mode %04o: narrowed to %04o", path, old, old & mode)

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
        _create(path)
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
            _create(path)
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

    def _migrate_names(self) -> None:
        """Rename models whose name is not :func:`~weightd.sources.model_name` of their
        source (a cache made before names were injective): the revision directories,
        the snapshot link and the index rows move to the new name, so that existing
        snapshots stay reachable and nothing is fetched again. Each step is idempotent;
        an interrupted migration finishes at the next exclusive open."""
        for m in self.index.models():
            new = model_name(m.source)
            if new != m.name:
                self._rename_model(m, new)

    def _rename_model(self, m: ModelRecord, new: str) -> None:
        revs = self.root / "snapshots" / ".revs"
        old_dir, new_dir = revs / m.name, revs / new
        if self.index.model(new) is not None:
            # fetched again under its new name meanwhile (by a command that may not
            # migrate): the old name's revisions only take room
            shutil.rmtree(old_dir, ignore_errors=True)
            self.index.forget_model(m.name)
            log.info("model %s: dropped, %s holds %s now", m.name, new, m.source)
        else:
            if old_dir.is_dir():
                _mkdirs(new_dir)
                for entry in sorted(old_dir.iterdir()):
                    if not (new_dir / entry.name).exists():
                        os.rename(entry, new_dir / entry.name)
                shutil.rmtree(old_dir, ignore_errors=True)
            for manifest in new_dir.glob("*.manifest.json"):
                with contextlib.suppress(OSError, ValueError):
                    record = json.loads(manifest.read_bytes())
                    if record.get("name") != new:
                        record["name"] = new
                        _write_atomic(manifest, json.dumps(record, indent=1).encode())
            self._switch_link(new, new_dir / m.revision)
            self.index.rename_model(m.name, new)
            log.info("model %s is now %s (injective names)", m.name, new)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.snapshot_path(m.name))

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

    def temp_blob(self, size: int, *, hint: str = "") -> TempBlob:
        """A new preallocated file in tmp/ (:data:`TEMP_MODE`), locked by this process
        until it is committed or discarded (see :class:`TempBlob`).

        Raises:
            BudgetExceeded: the disk has no room for ``size`` bytes (nothing is left).
        """
        name = f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}-{hint[:40]}"
        path = self.root / "tmp" / (name.replace("/", "_") + ".incomplete")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, TEMP_MODE)
        try:
            os.fchmod(fd, TEMP_MODE)  # whatever the umask
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
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        return TempBlob(self, fd, path)

    # single flight ----------------------------------------------------------------------

    @contextlib.contextmanager
    def single_flight(self, key: str, *, wait: bool = True) -> Iterator[bool]:
        """Hold the work on ``key`` against other threads here and other processes;
        yields True. ``wait=False``: yields False at once (holding nothing) when another
        holds it."""
        with self._flight_guard:
            lock = self._flight.setdefault(key, threading.Lock())
        if not lock.acquire(blocking=wait):
            yield False
            return
        try:
            name = hashlib.sha256(key.encode()).hexdigest()[:32]
            fd = os.open(self.root / "locks" / f"{name}.lock",
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                except BlockingIOError:
                    held = False
                else:
                    held = True
                yield held
            finally:
                os.close(fd)
        finally:
            lock.release()

    # snapshots --------------------------------------------------------------------------

    def stage_snapshot(self, name: str, source: str, files: Mapping[str, ModelFile]) -> str:
        """Build the revision directory of links for ``files`` (nothing else changes: the
        model's link and the index still name what they named); return the revision.

        The links name blob paths: a blob not yet committed (served before it is durable)
        is a link that resolves once its rename is done. A revision that never commits
        (the process died first) has no manifest, and the next exclusive open removes it
        when one of its links still resolves to nothing (:meth:`_drop_uncommitted`).

        Raises:
            FormatError: one relpath is a directory of another (``x.json`` and
                ``x.json/y.json``): no snapshot can hold both. Nothing is left behind.
            IntegrityError: the name belongs to another source (cannot happen with
                :func:`~weightd.sources.model_name`; checked all the same).
        """
        check_relpaths(source, list(files))
        known = self.index.model(name)
        if known is not None and known.source != source:
            raise IntegrityError(f"{source}: its model name {name} belongs to {known.source}")
        rev = revision_of(files)
        revs = self.root / "snapshots" / ".revs" / name
        rev_dir = revs / rev
        _mkdirs(revs)
        if not rev_dir.is_dir():
            staging = revs / f".{rev}.{os.getpid()}.{threading.get_ident()}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                for rel, f in files.items():
                    link = staging / rel
                    _mkdirs(link.parent)
                    os.symlink(os.path.relpath(self.blob_path(f.digest), link.parent), link)
                os.rename(staging, rev_dir)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                if not rev_dir.is_dir():  # not another process that won the race
                    raise
        return rev

    def commit_snapshot(self, name: str, source: str, files: Mapping[str, ModelFile]) -> Path:
        """Build a revision directory of links (:meth:`stage_snapshot`, unless it is there),
        write its manifest and switch the model's link to it atomically; every blob it
        names is committed by now.

        Raises:
            FormatError, IntegrityError: see :meth:`stage_snapshot`.
        """
        rev = self.stage_snapshot(name, source, files)
        revs = self.root / "snapshots" / ".revs" / name
        rev_dir = revs / rev
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
        link = self._switch_link(name, rev_dir)
        self.index.record_model(name, source, rev, files)
        return link

    def _drop_uncommitted(self) -> int:
        """Remove what a fetch that died before its commit left in ``snapshots/.revs``:
        staging directories, and revision directories without a manifest one of whose
        links resolves to nothing (their blobs never became durable). Only under the
        exclusive lock: nobody else is fetching."""
        removed = 0
        revs = self.root / "snapshots" / ".revs"
        for model_dir in revs.iterdir():
            if not model_dir.is_dir() or model_dir.is_symlink():
                continue
            for entry in model_dir.iterdir():
                if not entry.is_dir() or entry.is_symlink():
                    continue
                staging = entry.name.startswith(".") and entry.name.endswith(".tmp")
                if not staging and (entry.name.startswith(".")
                                    or (model_dir / f"{entry.name}.manifest.json").exists()
                                    or all(os.path.exists(p) for p in _links(entry))):
                    continue
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        if removed:
            log.info("removed %d revision(s) of fetches that never committed", removed)
        return removed

    def _switch_link(self, name: str, rev_dir: Path) -> Path:
        """Point ``snapshots/<name>`` at ``rev_dir`` (atomically; nothing when it does)."""
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
        return link

    def model_complete(self, model: ModelRecord) -> bool:
        return all(self.has_blob(f.digest) for f in model.files)

    # verify -----------------------------------------------------------------------------

    def verify(self, *, claim: Callable[[str], AbstractContextManager[bool]] | None = None,
               ) -> VerifyReport:
        """Rehash every blob; move corrupt ones to quarantine/ and forget them; narrow
        every entry whose mode is wider than the store's (see the module's docstring).

        Args:
            claim: asked about each corrupt blob before it is moved: a context that
                yields whether the blob may be moved now (held for the move's duration);
                False leaves it in place (the daemon: something holds it). Default:
                always.
        """
        claim = claim or _always
        modes = self._narrow_modes()
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
        return VerifyReport(checked, total, tuple(corrupt), tuple(missing), tuple(unindexed),
                            modes)

    def _narrow_modes(self) -> tuple[tuple[str, int, int], ...]:
        """Every directory 0750 at most, blobs 0440, other files 0640 (links are skipped)."""
        fixed, self._narrowed = self._narrowed, []  # what the open narrowed already
        entries = self._top_entries()
        for top in ("blobs", "snapshots", "quarantine", "locks"):
            for dirpath, dirnames, filenames in os.walk(self.root / top):
                base = Path(dirpath)
                entries += [(base / d, DIR_MODE) for d in dirnames]
                blob_dir = base.parent == self.root / "blobs"
                entries += [(base / f, BLOB_MODE if blob_dir else FILE_MODE) for f in filenames]
        for path, mode in entries:
            old = _tighten(path, mode)
            if old is not None:
                fixed.append((str(path), old, old & mode))
                log.warning("%s was mode %04o: narrowed to %04o", path, old, old & mode)
        return tuple(fixed)

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

