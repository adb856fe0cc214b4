"""The cache's SQLite index (WAL): sources' files, blobs, models and last use.

What is in the index only says what is known; the truth of a blob is the file under
``blobs/`` (a visible blob is complete and verified). Every write is one transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightd.errors import BudgetExceeded

#: 2 added ``shard_answers`` (an older index gets the table when opened, empty: each
#: shard's row is written the next time a fetch checks it).
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    url TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    size INTEGER NOT NULL,
    digest TEXT NOT NULL,
    fetched REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_digest ON files(digest);
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    revision TEXT NOT NULL,
    fetched REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS model_files (
    model TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE,
    relpath TEXT NOT NULL,
    url TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (model, relpath)
);
CREATE INDEX IF NOT EXISTS model_files_digest ON model_files(digest);
CREATE TABLE IF NOT EXISTS shard_answers (
    digest TEXT PRIMARY KEY,
    tensors INTEGER NOT NULL,
    answer_bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pins (
    source TEXT NOT NULL,
    tier TEXT NOT NULL,
    device TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (source, tier, device)
);
"""


@dataclass(frozen=True)
class ModelFile:
    relpath: str
    url: str
    digest: str
    size: int
    identity: str = ""


@dataclass(frozen=True)
class ModelRecord:
    name: str
    source: str
    revision: str
    fetched: float
    last_used: float
    files: tuple[ModelFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class PinRecord:
    source: str
    tier: str
    device: str
    created: float


@dataclass(frozen=True)
class BlobRecord:
    digest: str
    size: int
    created: float
    last_used: float


class Index:
    """A thread-safe handle on ``index.sqlite3`` (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, timeout=60, check_same_thread=False,
                                   isolation_level=None)
        try:
            self._open()
        except sqlite3.DatabaseError:
            self._db.close()
            raise

    def _open(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=60000")
        with self.transaction() as db:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            db.execute("UPDATE meta SET value=? WHERE key='schema' AND "
                       "CAST(value AS INTEGER) < ?", (str(SCHEMA_VERSION), SCHEMA_VERSION))
        (check,) = self._db.execute("PRAGMA quick_check").fetchone()
        if check != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE, so writers queue instead of deadlocking)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as e:
                if "full" in str(e):  # SQLITE_FULL: the disk (or quota) is full
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise BudgetExceeded(f"{self.path}: no room on disk to update the "
                                         f"index ({e})") from e
                raise

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args))

    # files and blobs ----------------------------------------------------------------

    def lookup_file(self, url: str, identity: str) -> str | None:
        """The digest recorded for this source file at this identity, if any."""
        rows = self._query("SELECT digest FROM files WHERE url=? AND identity=?", (url, identity))
        return str(rows[0][0]) if rows else None

    def record_file(self, url: str, identity: str, size: int, digest: str) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute("INSERT INTO blobs VALUES (?,?,?,?) ON CONFLICT(digest) DO UPDATE SET "
                       "last_used=excluded.last_used", (digest, size, now, now))
            db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?)",
                       (url, identity, size, digest, now))

    def blobs(self) -> list[BlobRecord]:
        return [BlobRecord(str(d), int(s), float(c), float(u))
                for d, s, c, u in self._query("SELECT digest,size,created,last_used FROM blobs")]

    def shard_answers(self, digests: Sequence[str]) -> dict[str, tuple[int, int]]:
        """What the answer-size check needs of each shard blob it knows: digest ->
        (tensors, bytes of its tensors' and metadata's part of an Acquire answer)."""
        found: dict[str, tuple[int, int]] = {}
        for i in range(0, len(digests), 500):  # SQLite's bound on a statement's variables
            part = digests[i:i + 500]
            for d, n, b in self._query("SELECT digest,tensors,answer_bytes FROM shard_answers "
                                       f"WHERE digest IN ({','.join('?' * len(part))})",
                                       tuple(part)):
                found[str(d)] = (int(n), int(b))
        return found

    def record_shard_answers(self, answers: Mapping[str, tuple[int, int]]) -> None:
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO shard_answers VALUES (?,?,?)",
                           [(d, n, b) for d, (n, b) in answers.items()])

    def forget_blob(self, digest: str) -> None:
        """Drop a blob and every source file that pointed at it (the next fetch refetches)."""
        with self.transaction() as db:
            db.execute("DELETE FROM shard_answers WHERE digest=?", (digest,))
            db.execute("DELETE FROM files WHERE digest=?", (digest,))
            db.execute("DELETE FROM blobs WHERE digest=?", (digest,))

    # models ---------------------------------------------------------------------------

    def record_model(self, name: str, source: str, revision: str,
                     files: Mapping[str, ModelFile]) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO models VALUES (?,?,?,?,?)",
                       (name, source, revision, now, now))
            db.execute("DELETE FROM model_files WHERE model=?", (name,))
            db.executemany("INSERT INTO model_files VALUES (?,?,?,?,?)",
                           [(name, f.relpath, f.url, f.digest, f.size) for f in files.values()])
            db.executemany("UPDATE blobs SET last_used=? WHERE digest=?",
                           [(now, f.digest) for f in files.values()])

    def touch_model(self, name: str, now: float | None = None) -> None:
        """Record that model ``name`` (and its blobs) was used at ``now`` (default: now)."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            # MAX: a batched touch written late never moves a newer time back
            db.execute("UPDATE models SET last_used=MAX(last_used, ?) WHERE name=?", (now, name))
            db.execute("UPDATE blobs SET last_used=MAX(last_used, ?) WHERE digest IN "
                       "(SELECT digest FROM model_files WHERE model=?)", (now, name))

    def models(self, name: str | None = None) -> list[ModelRecord]:
        """Every model (or the one named), with its files."""
        where, args = ("WHERE model=?", (name,)) if name is not None else ("", ())
        files: dict[str, list[ModelFile]] = {}
        for m, rel, url, digest, size in self._query(
                f"SELECT model,relpath,url,digest,size FROM model_files {where} "
                "ORDER BY model,relpath", args):
            files.setdefault(m, []).append(ModelFile(rel, url, digest, size))
        where = "WHERE name=?" if name is not None else ""
        return [ModelRecord(n, s, r, f, u, tuple(files.get(n, ())))
                for n, s, r, f, u in self._query(
                    f"SELECT name,source,revision,fetched,last_used FROM models {where} "
                    "ORDER BY name", args)]

    def model(self, name: str) -> ModelRecord | None:
        found = self.models(name)
        return found[0] if found else None

    def rename_model(self, old: str, new: str) -> None:
        """Give model ``old`` (its row and files) the name ``new``, unless ``new`` exists
        already (then ``old`` is only forgotten)."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO models SELECT ?, source, revision, fetched, "
                       "last_used FROM models WHERE name=?", (new, old))
            db.execute("INSERT OR IGNORE INTO model_files SELECT ?, relpath, url, digest, size "
                       "FROM model_files WHERE model=?", (new, old))
            db.execute("DELETE FROM models WHERE name=?", (old,))

    def forget_model(self, name: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM models WHERE name=?", (name,))

    # pins -----------------------------------------------------------------------------

    def add_pin(self, source: str, tier: str, device: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO pins VALUES (?,?,?,?)",
                       (source, tier, device, time.time()))

    def remove_pin(self, source: str, tier: str, device: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM pins WHERE source=? AND tier=? AND device=?",
                              (source, tier, device)).rowcount > 0

    def pins(self) -> list[PinRecord]:
        return [PinRecord(*row) for row in self._query(
            "SELECT source, tier, device, created FROM pins ORDER BY created")]
