"""Bad input to the containerd front, as a real process on btrfs: each gets a clear gRPC error.

containerd's own database answers most mistakes a ``ctr`` user can make before the front sees them
(unknown keys, an existing name), so those are sent to the front's socket directly with gRPC; the
ones containerd passes on (a parent that is not committed) go through ``ctr`` and a real
containerd. The codes are containerd's: ``errdefs.FromGRPC`` turns NOT_FOUND, ALREADY_EXISTS,
FAILED_PRECONDITION and INVALID_ARGUMENT into its own error kinds. After all of it the front holds
exactly what it held before and still serves. (Unit-level cases of the same rules live with the
front's own tests; these are about the process and the wire.)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from snapdriver.testing.containerd import RUN_ROOT, Containerd, ContainerdFront, SnapshotsClient

pytestmark = [pytest.mark.containerd]
SNAPSHOTTER = "snapdriver"
NOT_COMMITTED = {"INVALID_ARGUMENT", "FAILED_PRECONDITION"}  # containerd's own says the first


@dataclass
class Env:
    front: ContainerdFront
    client: SnapshotsClient
    active: str = "bad-active"
    view: str = "bad-view"
    committed: str = "bad-committed"

    def error(self, method: str, **fields: Any) -> tuple[str, str]:
        code, details = self.client.error(method, **fields)
        assert details.strip(), f"{method} failed with {code} and no message"
        return code, details

    def state(self) -> list[tuple[str, str, int, dict[str, str]]]:
        infos = self.client.call("List")
        return sorted((i.name, i.parent, i.kind, dict(i.labels)) for i in infos)


@pytest.fixture(scope="module")
def env(btrfs_mount: Path, containerd_available: None) -> Iterator[Env]:
    run = uuid.uuid4().hex[:8]
    front = ContainerdFront(btrfs_mount / f"ctr-errors-{run}", RUN_ROOT / f"errors-{run}.sock")
    front.start()
    client = SnapshotsClient(front.socket, SNAPSHOTTER)
    env = Env(front, client)
    try:
        client.call("Prepare", key="bad-base")
        client.call("Commit", name=env.committed, key="bad-base")
        client.call("Prepare", key=env.active, parent=env.committed)
        client.call("View", key=env.view, parent=env.committed)
        before = env.state()
        yield env
        assert env.state() == before, "bad input changed what the front holds"
        assert "Traceback" not in env.front.log_tail(10_000), env.front.log_tail()
        for key in (env.active, env.view, env.committed):
            client.call("Remove", key=key)
        assert env.state() == []
    finally:
        client.close()
        front.close()


@pytest.mark.parametrize(
    ("method", "fields"),
    [
        ("Stat", {"key": "no-such-key"}),
        ("Mounts", {"key": "no-such-key"}),
        ("Usage", {"key": "no-such-key"}),
        ("Remove", {"key": "no-such-key"}),
        ("Commit", {"name": "bad-new", "key": "no-such-key"}),
        ("Prepare", {"key": "bad-orphan", "parent": "no-such-key"}),
        ("View", {"key": "bad-orphan", "parent": "no-such-key"}),
    ],
)
def test_unknown_keys_are_not_found(env: Env, method: str, fields: dict[str, str]) -> None:
    assert env.error(method, **fields)[0] == "NOT_FOUND"


def test_update_of_an_unknown_key_is_not_found(env: Env) -> None:
    info = env.client.pb.Info(name="no-such-key", labels={"a": "b"})
    assert env.error("Update", info=info)[0] == "NOT_FOUND"


@pytest.mark.parametrize("method", ["Prepare", "View"])
@pytest.mark.parametrize("parent", ["active", "view"])
def test_a_parent_that_is_not_committed_is_refused(env: Env, method: str, parent: str) -> None:
    key = getattr(env, parent)
    assert env.error(method, key="bad-child", parent=key)[0] in NOT_COMMITTED


def test_an_existing_key_cannot_be_prepared_again(env: Env) -> None:
    assert env.error("Prepare", key=env.active, parent=env.committed)[0] == "ALREADY_EXISTS"
    assert env.error("View", key=env.committed)[0] == "ALREADY_EXISTS"


def test_commit_onto_an_existing_name_is_refused_and_keeps_the_key(env: Env) -> None:
    assert env.error("Commit", name=env.committed, key=env.active)[0] == "ALREADY_EXISTS"
    info = env.client.call("Stat", key=env.active).info
    assert info.kind == env.client.pb.ACTIVE and info.parent == env.committed


@pytest.mark.parametrize("which", ["view", "committed"])
def test_only_an_active_snapshot_can_be_committed(env: Env, which: str) -> None:
    code, _ = env.error("Commit", name="bad-new", key=getattr(env, which))
    assert code == "FAILED_PRECONDITION"


def test_a_committed_snapshot_with_children_cannot_be_removed(env: Env) -> None:
    assert env.error("Remove", key=env.committed)[0] == "FAILED_PRECONDITION"


def test_an_empty_key_is_invalid(env: Env) -> None:
    assert env.error("Prepare", key="")[0] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    "bad",
    ["name==", 'labels."unterminated', "==x", "name==a,", "name!", "labels.a==b==c"],
)
def test_malformed_filters_are_invalid(env: Env, bad: str) -> None:
    assert env.error("List", filters=[bad])[0] == "INVALID_ARGUMENT"
    # One bad filter among good ones still fails the whole call.
    assert env.error("List", filters=["kind==active", bad])[0] == "INVALID_ARGUMENT"


@pytest.mark.parametrize("path", ["kind", "parent", "name", "created_at", "bogus"])
def test_masks_beyond_labels_are_invalid(env: Env, path: str) -> None:
    info = env.client.pb.Info(name=env.active, labels={"a": "b"})
    code, _ = env.error("Update", info=info, update_mask=FieldMask(paths=[path]))
    assert code == "INVALID_ARGUMENT"


def test_the_front_still_serves(env: Env) -> None:
    assert env.client.call("Stat", key=env.committed).info.kind == env.client.pb.COMMITTED
    assert env.client.call("Usage", key=env.committed).inodes >= 1


# --- through a real containerd and ctr ---------------------------------------------------------


@pytest.fixture(scope="module")
def containerd(env: Env) -> Iterator[Containerd]:
    """A containerd over a second front on the same filesystem (its own root and keys)."""
    run = uuid.uuid4().hex[:8]
    root = env.front.root.parent
    front = ContainerdFront(root / f"ctr-errors-ctr-{run}", RUN_ROOT / f"errctr-{run}.sock")
    daemon = Containerd(
        root / f"ctr-errors-root-{run}", {SNAPSHOTTER: front.socket}, namespace=f"sderr{run}"
    )
    front.start()
    try:
        daemon.start()
        daemon.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "prepare", "base")
        daemon.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "commit", "base-c", "base")
        daemon.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "prepare", "work", "base-c")
        yield daemon
        for key in ("work", "base-c"):
            daemon.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "rm", key)
    finally:
        daemon.close()
        front.close()


@pytest.mark.parametrize("verb", ["prepare", "view"])
def test_ctr_reports_a_parent_that_is_not_committed(containerd: Containerd, verb: str) -> None:
    done = containerd.ctr(
        "snapshots", "--snapshotter", SNAPSHOTTER, verb, "child", "work", check=False
    )
    assert done.returncode != 0
    assert "invalid argument" in done.stderr or "failed precondition" in done.stderr, done.stderr
    listed = containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout
    assert "child" not in listed.split()
