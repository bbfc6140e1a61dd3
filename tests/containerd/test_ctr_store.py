"""The containerd front's key store and Update's field masks (pure logic on a temp dir)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapdriver.containerd.store import DB_NAME, KeyStore, Kind, Snapshot, updated_labels
from snapdriver.errors import (
    ConfigError,
    LayerBusyError,
    LayerExistsError,
    LayerNotFoundError,
    RequestError,
)

ODD_KEY = "default/1/extract-385520567-0fr_ sha256:abc"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    opened = KeyStore(tmp_path)
    yield opened
    opened.close()


def snap(key: str, kind: Kind = Kind.ACTIVE, parent: str = "", **labels: str) -> Snapshot:
    now = time.time_ns()
    return Snapshot(key, f"{abs(hash(key)):032x}", kind, parent, labels, now, now)


def test_insert_get_and_odd_keys(store: KeyStore) -> None:
    made = store.insert(snap(ODD_KEY, a="1", empty=""))
    assert made.labels == {"a": "1"}  # empty values are never stored
    assert store.get(ODD_KEY) == made
    assert store.get("nope") is None
    with pytest.raises(LayerExistsError):
        store.insert(snap(ODD_KEY))
    with pytest.raises(LayerNotFoundError):
        store.require("nope")


def test_commit_renames_and_replaces_labels(store: KeyStore) -> None:
    store.insert(snap("base", Kind.COMMITTED))
    active = store.insert(snap("work", parent="base", old="x"))
    committed = store.commit("work", "done", {"new": "y", "gone": ""})
    assert store.get("work") is None
    assert store.get("done") == committed
    assert committed.kind is Kind.COMMITTED
    assert committed.layer == active.layer
    assert committed.parent == "base"
    assert committed.labels == {"new": "y"}
    assert committed.created == committed.updated >= active.created
    assert store.children("base") == ["done"]


def test_commit_checks_in_containerds_order(store: KeyStore) -> None:
    store.insert(snap("taken", Kind.COMMITTED))
    store.insert(snap("view", Kind.VIEW))
    with pytest.raises(LayerExistsError):
        store.commit("missing", "taken", {})  # the name is checked first
    with pytest.raises(LayerNotFoundError):
        store.commit("missing", "new", {})
    with pytest.raises(LayerBusyError):
        store.commit("view", "new", {})
    with pytest.raises(LayerBusyError):
        store.commit("taken", "new", {})
    assert store.get("new") is None


def test_restore_undoes_a_commit(store: KeyStore) -> None:
    active = store.insert(snap("work"))
    store.commit("work", "done", {})
    store.restore("done", active)
    assert store.get("done") is None
    assert store.get("work") == active


GIVEN = {"l1": "new", "l4": "v4", "a.b": "dot", "l5": ""}
ALL_GIVEN = {"l1": "new", "l4": "v4", "a.b": "dot"}


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        ([], ALL_GIVEN),
        (["labels"], ALL_GIVEN),
        (["labels.l1"], {"l1": "new", "l2": "v2"}),
        (["labels.l2"], {"l1": "v1"}),  # absent from the update: deleted
        (["labels.l1", "labels.l5"], {"l1": "new", "l2": "v2"}),  # empty: deleted (absent)
        (["labels.l4"], {"l1": "v1", "l2": "v2", "l4": "v4"}),
        (["labels.a.b"], {"l1": "v1", "l2": "v2", "a.b": "dot"}),
        (["labels", "labels.l2"], ALL_GIVEN),
    ],
)
def test_update_masks(paths: list[str], expected: dict[str, str]) -> None:
    assert updated_labels({"l1": "v1", "l2": "v2"}, GIVEN, paths) == expected


@pytest.mark.parametrize("path", ["name", "parent", "kind", "created_at", "label.x", ""])
def test_update_refuses_other_fields(path: str) -> None:
    with pytest.raises(RequestError, match="only labels"):
        updated_labels({}, {}, ["labels.a", path])


def test_update_bumps_updated_only(store: KeyStore) -> None:
    made = store.insert(snap("s", a="1"))
    changed = store.update("s", {"b": "2"}, ["labels.b"])
    assert changed.labels == {"a": "1", "b": "2"}
    assert changed.created == made.created
    assert changed.updated >= made.updated
    assert store.get("s") == changed
    with pytest.raises(RequestError):
        store.update("s", {}, ["parent"])
    assert store.get("s") == changed  # the refused update changed nothing
    with pytest.raises(LayerNotFoundError):
        store.update("missing", {}, [])


def test_persists_and_locks_out_a_second_store(tmp_path: Path) -> None:
    first = KeyStore(tmp_path)
    made = first.insert(snap(ODD_KEY, Kind.VIEW, x="y"))
    with pytest.raises(ConfigError, match="another snapdriver"):
        KeyStore(tmp_path)
    assert not (tmp_path / f"{DB_NAME}-shm").exists()  # no mmapped index: no SIGBUS
    first.close()
    again = KeyStore(tmp_path)
    try:
        assert again.all() == [made]
        again.delete(ODD_KEY)
        assert again.all() == []
    finally:
        again.close()
