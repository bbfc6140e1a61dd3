"""The persisted record of layers.

Everything the core needs to carry on after a restart lives on disk, in ``snapdriver.db`` in the
backend's Home (SQLite in WAL mode with an exclusive lock, so no other process can write it and
its wal-index lives in this process's memory: no file on the layer filesystem is ever mmapped):
which layers exist, their parents, whether they are complete or frozen, and how many references
the front holds. A layer is recorded as ``creating`` before the backend makes it and as ``ready``
only after; anything not ``ready`` at start-up is a leftover of a crash. A layer is marked frozen
only after the backend froze it.

Every change to which layers exist and what state they are in is its own committed transaction
before the call returns. Reference counts change on every Get and Put, the plugin's hottest
calls, so they are kept in memory and written behind (:meth:`LayerStore.flush_refs`, which the
driver runs shortly after a change and at shutdown): a SIGKILL can lose the last fraction of a
second of them, never a layer or its status. Records are read from a mirror in memory: this
process is the only writer of its Home's record.

A full filesystem is an ordinary condition: the record opens and reads on one, a write that
cannot get space raises :class:`~snapdriver.errors.NoSpaceError` and changes nothing (on disk or
in the mirror), and a deletion that cannot be written yet is applied to the mirror and written
with the next transaction that gets space (see :meth:`LayerStore.delete`).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from snapdriver.errors import NoSpaceError

log = logging.getLogger(__name__)

DB_NAME = "snapdriver.db"


class Status(enum.StrEnum):
    CREATING = "creating"  # the backend is making it
    READY = "ready"  # complete: reported as existing
    APPLYING = "applying"  # an ApplyDiff is writing into it
    FAILED = "failed"  # an ApplyDiff failed: dockerd will Remove it
    REMOVING = "removing"  # the backend is deleting it


@dataclass(frozen=True)
class LayerRecord:
    id: str
    parent: str | None
    status: Status
    quota: int | None = None
    refs: int = 0
    created: float = 0.0
    frozen: bool = False


_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY,
    parent TEXT,
    status TEXT NOT NULL,
    quota INTEGER,
    refs INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    frozen INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent);
"""
_COLUMNS = "id, parent, status, quota, refs, created, frozen"


class LayerStore:
    """Thread-safe layer table: SQLite on disk, mirrored in memory for reads by ID.

    Every write but :meth:`set_refs` is its own committed transaction, applied to the mirror only
    once committed; reference counts reach the disk at :meth:`flush_refs`.
    """

    def __init__(self, home: Path) -> None:
        self.path = home / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            # Exclusive before WAL: SQLite then keeps the wal-index in heap memory instead of an
            # mmapped -shm file, whose pages a full copy-on-write filesystem answers with SIGBUS.
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            if not self._has_schema():  # only a new record is written to at open
                self._db.executescript(_SCHEMA)
            self._migrate()
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM layers").fetchall()
        except sqlite3.Error as err:
            self._db.close()
            if sqlite_no_space(err):
                raise NoSpaceError(_no_space_message(err, "open", self.path)) from err
            raise
        self._records = {row[0]: _record(row) for row in rows}
        # Kept as the mirror changes: Status reports it, and counting 10,000 records cost 0.5 ms.
        self._counts = Counter(r.status for r in self._records.values())
        self._dirty_refs: set[str] = set()
        #: Deleted in the mirror, still on disk: written with the next transaction that has space.
        self._pending_deletes: set[str] = set()

    def _has_schema(self) -> bool:
        query = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'layers'"
        return bool(self._db.execute(query).fetchone()[0])

    def _migrate(self) -> None:
        """A record written before layers could be frozen gains the column (none is frozen)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(layers)")}
        if "frozen" not in columns:
            self._db.execute("ALTER TABLE layers ADD COLUMN frozen INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        """Write pending reference counts and deletions, then close the database."""
        try:
            self.flush_refs()
        except NoSpaceError as err:
            log.warning("closing the layer record without its last changes: %s", err)
        finally:
            with self._lock:
                self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One committed transaction; the caller holds ``_lock``.

        Deletions still pending are written first, in the same transaction. A failure rolls
        everything back and raises :class:`NoSpaceError` when the filesystem is full.
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
            if self._pending_deletes:
                pending = [(layer,) for layer in self._pending_deletes]
                self._db.executemany("DELETE FROM layers WHERE id = ?", pending)
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as err:
            if self._db.in_transaction:  # a failed COMMIT can leave it open
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error as rollback_err:
                    log.warning("rollback of the layer record failed: %s", rollback_err)
            if isinstance(err, sqlite3.Error) and sqlite_no_space(err):
                raise NoSpaceError(_no_space_message(err, "write", self.path)) from err
            raise
        self._pending_deletes.clear()

    def get(self, layer: str) -> LayerRecord | None:
        with self._lock:
            return self._records.get(layer)

    def all(self) -> list[LayerRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.created)

    def children(self, layer: str) -> list[str]:
        # Indexed on disk, and parents never change: no scan of every record in memory. A child
        # whose deletion is not written yet (a full disk) is gone already.
        with self._lock:
            rows = self._db.execute("SELECT id FROM layers WHERE parent = ?", (layer,)).fetchall()
            return [r[0] for r in rows if r[0] not in self._pending_deletes]

    def add(self, layer: str, parent: str | None, quota: int | None) -> None:
        """Record a new layer as ``creating`` (replacing any record of the same ID)."""
        record = LayerRecord(layer, parent, Status.CREATING, quota, 0, time.time())
        row = (layer, parent, record.status, quota, record.refs, record.created, False)
        with self._lock:
            with self._tx() as db:
                db.execute(
                    f"INSERT OR REPLACE INTO layers ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", row
                )
            self._recount(self._records.get(layer), record)
            self._records[layer] = record
            self._dirty_refs.discard(layer)
            self._pending_deletes.discard(layer)  # replaced, not deleted

    def set_status(self, layer: str, status: Status) -> None:
        with self._lock:
            with self._tx() as db:
                db.execute("UPDATE layers SET status = ? WHERE id = ?", (status, layer))
            record = self._records.get(layer)
            if record is not None:
                self._records[layer] = dataclasses.replace(record, status=status)
                self._recount(record, self._records[layer])

    def set_frozen(self, layer: str) -> None:
        with self._lock:
            with self._tx() as db:
                db.execute("UPDATE layers SET frozen = 1 WHERE id = ?", (layer,))
            record = self._records.get(layer)
            if record is not None:
                self._records[layer] = dataclasses.replace(record, frozen=True)

    def set_refs(self, layer: str, refs: int) -> None:
        """In memory now, on disk at the next :meth:`flush_refs`."""
        with self._lock:
            r = self._records.get(layer)
            if r is not None:
                # Spelled out: on every Get and Put, dataclasses.replace costs several times this.
                record = LayerRecord(r.id, r.parent, r.status, r.quota, refs, r.created, r.frozen)
                self._records[layer] = record
                self._dirty_refs.add(layer)

    def flush_refs(self) -> None:
        """Write every reference count changed since the last flush, and pending deletions."""
        with self._lock:
            if not self._dirty_refs and not self._pending_deletes:
                return
            pending = [(self._records[layer].refs, layer) for layer in self._dirty_refs]
            with self._tx() as db:
                db.executemany("UPDATE layers SET refs = ? WHERE id = ?", pending)
            self._dirty_refs.clear()

    def delete(self, layer: str) -> None:
        """Forget the layer; never fails for want of space.

        Deleting must work on a full filesystem, or nothing could be removed to make space: when
        the row cannot be written, the mirror forgets the layer now and the disk with the next
        transaction that can be written (:meth:`flush_refs` at the latest). A crash before then
        leaves the record, with its storage gone, for the next start's recovery.
        """
        with self._lock:
            try:
                with self._tx() as db:
                    db.execute("DELETE FROM layers WHERE id = ?", (layer,))
            except NoSpaceError as err:
                log.warning("deletion of layer %s is written later: %s", layer, err)
                self._pending_deletes.add(layer)
            self._recount(self._records.pop(layer, None), None)
            self._dirty_refs.discard(layer)

    def deletions_pending(self) -> bool:
        """True while a deletion is in memory only (the disk was full)."""
        with self._lock:
            return bool(self._pending_deletes)

    def count(self) -> dict[Status, int]:
        with self._lock:
            return {status: n for status, n in self._counts.items() if n}

    def _recount(self, old: LayerRecord | None, new: LayerRecord | None) -> None:
        """One record replaced by another (None: absent); the caller holds ``_lock``."""
        if old is not None:
            self._counts[old.status] -= 1
        if new is not None:
            self._counts[new.status] += 1


#: SQLite's primary result codes for a write the filesystem refused (extended codes share them).
_SQLITE_FULL, _SQLITE_IOERR = 13, 10


def sqlite_no_space(err: sqlite3.Error) -> bool:
    """A write refused for want of space.

    On a full filesystem SQLite says SQLITE_FULL, or SQLITE_IOERR where the failing call was an
    fsync or a truncate: both count as no space (extended result codes share the low byte).
    """
    code = getattr(err, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_FULL, _SQLITE_IOERR)


def _no_space_message(err: sqlite3.Error, action: str, path: Path) -> str:
    return f"no space left on device: cannot {action} the layer record {path} ({err})"


def read_copy(home: Path) -> list[LayerRecord]:
    """The records on disk as a restarted plugin would read them, even while one runs.

    A running plugin holds its record's lock for as long as it is open, so this reads a copy
    of the database and its write-ahead log (for tests and diagnostics).
    """
    with tempfile.TemporaryDirectory(prefix="snapdriver-record-") as scratch:
        for suffix in ("", "-wal"):
            source = home / (DB_NAME + suffix)
            if source.exists():
                shutil.copyfile(source, Path(scratch) / (DB_NAME + suffix))
        db = sqlite3.connect(Path(scratch) / DB_NAME)
        try:
            rows = db.execute(f"SELECT {_COLUMNS} FROM layers").fetchall()
        finally:
            db.close()
    return [_record(row) for row in rows]


def _record(row: tuple[str, str | None, str, int | None, int, float, int]) -> LayerRecord:
    layer, parent, status, quota, refs, created, frozen = row
    return LayerRecord(layer, parent, Status(status), quota, refs, created, bool(frozen))
