"""The containerd front's key store: snapshot keys, their kinds, parents, labels and layers.

containerd names snapshots by opaque keys (``default/4/extract-... sha256:...``, with ``/``, ``:``
and spaces); the core knows layers by hex IDs this front makes. One SQLite table in the front's
root maps each key to its layer and keeps what containerd asks about: kind, parent key, labels,
created and updated times (nanoseconds since the epoch, so a Stat returns exactly what was
stored). Every change an RPC makes is one committed transaction (``synchronous=FULL``).

The database runs in WAL mode with ``locking_mode=EXCLUSIVE`` set first, so SQLite keeps the WAL
index in process memory instead of a mmapped ``-shm`` file: a mapped file on a full copy-on-write
filesystem raises SIGBUS on write. The exclusive lock also keeps a second front off this root.

Labels with an empty value are never stored: containerd drops them too, and that is how
``Update`` with a ``labels.KEY`` mask deletes a label.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from snapdriver.errors import (
    ConfigError,
    LayerBusyError,
    LayerExistsError,
    LayerNotFoundError,
    NoSpaceError,
    RequestError,
)
from snapdriver.layers.state import sqlite_no_space

log = logging.getLogger(__name__)
DB_NAME = "containerd-snapshots.db"
SCHEMA_VERSION = 1
#: Seconds to wait for the database lock before refusing to start.
LOCK_WAIT = 1.0


class Kind(enum.StrEnum):
    """A snapshot's kind, spelt as containerd's filters spell it."""

    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


@dataclass(frozen=True)
class Snapshot:
    key: str
    layer: str
    kind: Kind
    parent: str = ""  # the parent's key; "" for none
    labels: Mapping[str, str] = field(default_factory=dict)
    created: int = 0  # nanoseconds since the epoch
    updated: int = 0


def clean_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels as stored: empty values dropped."""
    return {k: v for k, v in labels.items() if v != ""}


def updated_labels(
    current: Mapping[str, str], given: Mapping[str, str], paths: Sequence[str]
) -> dict[str, str]:
    """Apply an Update's field mask to ``current`` (containerd's rules).

    No paths, or the path ``labels``: ``given`` replaces every label. ``labels.KEY``: that one
    label takes its value in ``given`` (absent or empty: deleted). Any other path is refused.
    """
    if not paths:
        return clean_labels(given)
    result = dict(current)
    for path in paths:
        if path == "labels":
            result = dict(given)
        elif path.startswith("labels."):
            key = path.removeprefix("labels.")
            result[key] = given.get(key, "")
        else:
            raise RequestError(f"cannot update field {path!r}: only labels can change")
    return clean_labels(result)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    key TEXT PRIMARY KEY,
    layer TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    parent TEXT NOT NULL,
    labels TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""
_COLUMNS = "key, layer, kind, parent, labels, created_at, updated_at"
_Row = tuple[str, str, str, str, str, int, int]


def _snapshot(row: _Row) -> Snapshot:
    key, layer, kind, parent, labels, created, updated = row
    return Snapshot(key, layer, Kind(kind), parent, json.loads(labels), created, updated)


def _row(s: Snapshot) -> _Row:
    labels = json.dumps(dict(s.labels), sort_keys=True)
    return (s.key, s.layer, s.kind.value, s.parent, labels, s.created, s.updated)


class KeyStore:
    """The table of snapshots. Single-threaded: the front calls it from its event loop."""

    def __init__(self, root: Path) -> None:
        self.path = root / DB_NAME
        #: Keys deleted while the disk was full: gone for every read, written with the next
        #: transaction that gets space.
        self._pending: set[str] = set()
        # A short wait: the lock is only ever held by another front on the same root.
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=LOCK_WAIT)
        try:
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")  # before WAL: no -shm file
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            if not self._has_schema():  # only a new store is written at open: a full disk
                self._create_schema()  # must not keep a front from starting
        except sqlite3.OperationalError as err:
            self._db.close()
            raise ConfigError(
                f"cannot open {self.path}: {err} (is another snapdriver serving this root?)"
            ) from err

    def _has_schema(self) -> bool:
        query = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'snapshots'"
        return bool(self._db.execute(query).fetchone()[0])

    def _create_schema(self) -> None:
        with self._tx() as db:
            # One statement at a time: executescript() would commit on its own.
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        """Write deletions still pending if there is space now, then close."""
        if self._pending:
            with contextlib.suppress(NoSpaceError), self._tx():
                pass
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One committed transaction, pending deletions first; a failure rolls it all back and
        raises :class:`NoSpaceError` when the filesystem is full."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            if self._pending:
                pending = [(key,) for key in self._pending]
                self._db.executemany("DELETE FROM snapshots WHERE key = ?", pending)
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as err:
            if self._db.in_transaction:  # a failed COMMIT can leave it open
                self._db.execute("ROLLBACK")
            if isinstance(err, sqlite3.Error) and sqlite_no_space(err):
                raise NoSpaceError(f"no space left on device: cannot write {self.path}") from err
            raise
        self._pending.clear()

    def _select(self, where: str = "", args: Sequence[object] = ()) -> list[Snapshot]:
        query = f"SELECT {_COLUMNS} FROM snapshots {where}"
        rows = self._db.execute(query, tuple(args))
        return [_snapshot(row) for row in rows if row[0] not in self._pending]

    def get(self, key: str) -> Snapshot | None:
        found = self._select("WHERE key = ?", (key,))
        return found[0] if found else None

    def require(self, key: str) -> Snapshot:
        found = self.get(key)
        if found is None:
            raise LayerNotFoundError(f"snapshot {key!r} does not exist")
        return found

    def all(self) -> list[Snapshot]:
        return self._select("ORDER BY created_at, key")

    def children(self, key: str) -> list[str]:
        rows = self._db.execute("SELECT key FROM snapshots WHERE parent = ?", (key,))
        return [row[0] for row in rows if row[0] not in self._pending]

    def insert(self, snapshot: Snapshot) -> Snapshot:
        """Add a new snapshot; LayerExistsError if its key is taken."""
        snapshot = dataclasses.replace(snapshot, labels=clean_labels(snapshot.labels))
        try:
            with self._tx() as db:
                db.execute(
                    f"INSERT INTO snapshots ({_COLUMNS}) VALUES (?,?,?,?,?,?,?)", _row(snapshot)
                )
        except sqlite3.IntegrityError:
            raise LayerExistsError(f"snapshot {snapshot.key!r} already exists") from None
        return snapshot

    def commit(self, key: str, name: str, labels: Mapping[str, str]) -> Snapshot:
        """Active ``key`` becomes committed ``name`` with ``labels``, in one transaction.

        The checks come in containerd's order: ``name`` taken, ``key`` missing, ``key`` not
        active.
        """
        with self._tx() as db:
            if self.get(name) is not None:
                raise LayerExistsError(f"snapshot {name!r} already exists")
            active = self.require(key)
            if active.kind is not Kind.ACTIVE:
                raise LayerBusyError(
                    f"snapshot {key!r} is {active.kind}, not active: cannot commit"
                )
            now = time.time_ns()
            committed = dataclasses.replace(
                active,
                key=name,
                kind=Kind.COMMITTED,
                labels=clean_labels(labels),
                created=now,
                updated=now,
            )
            db.execute("DELETE FROM snapshots WHERE key = ?", (key,))
            db.execute(
                f"INSERT INTO snapshots ({_COLUMNS}) VALUES (?,?,?,?,?,?,?)", _row(committed)
            )
        return committed

    def update(self, key: str, labels: Mapping[str, str], paths: Sequence[str]) -> Snapshot:
        """Change labels under a field mask (see :func:`updated_labels`); bump updated only."""
        with self._tx() as db:
            current = self.require(key)
            changed = dataclasses.replace(
                current,
                labels=updated_labels(current.labels, labels, paths),
                updated=time.time_ns(),
            )
            db.execute(
                "UPDATE snapshots SET labels = ?, updated_at = ? WHERE key = ?",
                (_row(changed)[4], changed.updated, key),
            )
        return changed

    def restore(self, replaced: str, snapshot: Snapshot) -> None:
        """Put ``snapshot`` back in place of the row ``replaced``: undoes a :meth:`commit`."""
        with self._tx() as db:
            db.execute("DELETE FROM snapshots WHERE key = ?", (replaced,))
            db.execute(f"INSERT INTO snapshots ({_COLUMNS}) VALUES (?,?,?,?,?,?,?)", _row(snapshot))

    def delete(self, key: str) -> None:
        """Forget ``key``; never fails for want of space.

        A Remove deletes the row after its layer is gone, and removing is how space is made: on
        a full filesystem the key is forgotten in memory now and on disk with the next
        transaction that gets space (at :meth:`close` at the latest). A crash before then leaves
        the row, whose layer is gone, for start-up to drop.
        """
        try:
            with self._tx() as db:
                db.execute("DELETE FROM snapshots WHERE key = ?", (key,))
        except NoSpaceError as err:
            log.warning("deletion of snapshot %r is written later: %s", key, err)
            self._pending.add(key)
