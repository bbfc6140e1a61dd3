"""The persisted record of layers.

Everything the core needs to carry on after a restart lives on disk, in ``snapdriver.db`` in the
backend's Home (SQLite in WAL mode): which layers exist, their parents, whether they are complete
or frozen, and how many references the front holds. A layer is recorded as ``creating`` before
the backend makes it and as ``ready`` only after; anything not ``ready`` at start-up is a leftover
of a crash. A layer is marked frozen only after the backend froze it.

Every change to which layers exist and what state they are in is its own committed transaction
before the call returns. Reference counts change on every Get and Put, the plugin's hottest
calls, so they are kept in memory and written behind (:meth:`LayerStore.flush_refs`, which the
driver runs shortly after a change and at shutdown): a SIGKILL can lose the last fraction of a
second of them, never a layer or its status. Records are read from a mirror in memory: this
process is the only writer of its Home's record.
"""

from __future__ import annotations

import dataclasses
import enum
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._migrate()
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM layers").fetchall()
        self._records = {row[0]: _record(row) for row in rows}
        # Kept as the mirror changes: Status reports it, and counting 10,000 records cost 0.5 ms.
        self._counts = Counter(r.status for r in self._records.values())
        self._dirty_refs: set[str] = set()

    def _migrate(self) -> None:
        """A record written before layers could be frozen gains the column (none is frozen)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(layers)")}
        if "frozen" not in columns:
            self._db.execute("ALTER TABLE layers ADD COLUMN frozen INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        """Write pending reference counts, then close the database."""
        try:
            self.flush_refs()
        finally:
            with self._lock:
                self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One committed transaction; the caller holds ``_lock``."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def get(self, layer: str) -> LayerRecord | None:
        with self._lock:
            return self._records.get(layer)

    def all(self) -> list[LayerRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.created)

    def children(self, layer: str) -> list[str]:
        # Indexed on disk, and parents never change: no scan of every record in memory.
        with self._lock:
            rows = self._db.execute("SELECT id FROM layers WHERE parent = ?", (layer,)).fetchall()
        return [r[0] for r in rows]

    def add(self, layer: str, parent: str | None, quota: int | None) -> None:
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
        """Write every reference count changed since the last flush, in one transaction."""
        with self._lock:
            if not self._dirty_refs:
                return
            pending = [(self._records[layer].refs, layer) for layer in self._dirty_refs]
            with self._tx() as db:
                db.executemany("UPDATE layers SET refs = ? WHERE id = ?", pending)
            self._dirty_refs.clear()

    def delete(self, layer: str) -> None:
        with self._lock:
            with self._tx() as db:
                db.execute("DELETE FROM layers WHERE id = ?", (layer,))
            self._recount(self._records.pop(layer, None), None)
            self._dirty_refs.discard(layer)

    def count(self) -> dict[Status, int]:
        with self._lock:
            return {status: n for status, n in self._counts.items() if n}

    def _recount(self, old: LayerRecord | None, new: LayerRecord | None) -> None:
        """One record replaced by another (None: absent); the caller holds ``_lock``."""
        if old is not None:
            self._counts[old.status] -= 1
        if new is not None:
            self._counts[new.status] += 1


def _record(row: tuple[str, str | None, str, int | None, int, float, int]) -> LayerRecord:
    layer, parent, status, quota, refs, created, frozen = row
    return LayerRecord(layer, parent, Status(status), quota, refs, created, bool(frozen))
