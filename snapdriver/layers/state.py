"""The persisted record of layers, and of the last Init.

dockerd sends no new Activate or Init to a plugin that restarted under it, so everything the
plugin needs to carry on lives on disk: which Home it serves (``init.json`` in the state
directory) and which layers exist, their parents, whether they are complete and how many
references dockerd holds (``snapdriver.db`` in Home, SQLite in WAL mode, one transaction per
change). A layer is recorded as ``creating`` before the backend makes it and as ``ready`` only
after; anything not ``ready`` at start-up is a leftover of a crash.
"""

from __future__ import annotations

import enum
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from snapdriver.errors import ConfigError

DB_NAME = "snapdriver.db"
INIT_NAME = "init.json"


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


@dataclass(frozen=True)
class InitRecord:
    """The last Init dockerd sent: enough to resume after a plugin restart."""

    home: Path
    options: tuple[str, ...] = ()

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        data = {"home": str(self.home), "options": list(self.options)}
        _atomic_write(state_dir / INIT_NAME, json.dumps(data, indent=1).encode())

    @classmethod
    def load(cls, state_dir: Path) -> InitRecord | None:
        path = state_dir / INIT_NAME
        try:
            data = json.loads(path.read_bytes())
            return cls(Path(data["home"]), tuple(data.get("options") or ()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(
                f"{path} is unreadable ({err}); remove it and restart dockerd"
            ) from err


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY,
    parent TEXT,
    status TEXT NOT NULL,
    quota INTEGER,
    refs INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent);
"""


class LayerStore:
    """Thread-safe access to the layer table; every write is its own committed transaction."""

    def __init__(self, home: Path) -> None:
        self.path = home / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def get(self, layer: str) -> LayerRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, parent, status, quota, refs, created FROM layers WHERE id = ?", (layer,)
            ).fetchone()
        return _record(row) if row else None

    def all(self) -> list[LayerRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, parent, status, quota, refs, created FROM layers ORDER BY created"
            ).fetchall()
        return [_record(r) for r in rows]

    def children(self, layer: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT id FROM layers WHERE parent = ?", (layer,)).fetchall()
        return [r[0] for r in rows]

    def add(self, layer: str, parent: str | None, quota: int | None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO layers (id, parent, status, quota, refs, created)"
                " VALUES (?, ?, ?, ?, 0, ?)",
                (layer, parent, Status.CREATING, quota, time.time()),
            )

    def set_status(self, layer: str, status: Status) -> None:
        with self._tx() as db:
            db.execute("UPDATE layers SET status = ? WHERE id = ?", (status, layer))

    def set_refs(self, layer: str, refs: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE layers SET refs = ? WHERE id = ?", (refs, layer))

    def delete(self, layer: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM layers WHERE id = ?", (layer,))

    def count(self) -> dict[Status, int]:
        with self._lock:
            rows: Sequence[tuple[str, int]] = self._db.execute(
                "SELECT status, COUNT(*) FROM layers GROUP BY status"
            ).fetchall()
        return {Status(s): n for s, n in rows}


def _record(row: tuple[str, str | None, str, int | None, int, float]) -> LayerRecord:
    layer, parent, status, quota, refs, created = row
    return LayerRecord(layer, parent, Status(status), quota, refs, created)
