"""Bad input reaching the containerd front through a real containerd 1.6 and ``ctr``.

containerd's own database answers many mistakes before a proxy snapshotter sees them (a name that
exists, an unknown key, removing a parent); what it passes on must come back from the front as
one of the codes containerd maps to its own error kinds (``errdefs.FromGRPC``), which ``ctr``
prints: a parent that is not committed, mounts of a committed snapshot, a commit of what is not
active, and keys containerd knows but the front does not (removed behind containerd's back). After
all of it the front holds what it held and still serves. The front's own tests
(tests/containerd/test_ctr_front.py) send the direct-gRPC cases (unknown keys, a parent that is
active, commit onto an existing name, masks, filters); here only what they leave out is sent
directly: more malformed filters and masks, and that none of it changes the front's state.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import StatusCode as Code

from snapdriver.testing.containerd import RUN_ROOT, Client, Containerd, ContainerdFront, code_of

pytestmark = [pytest.mark.containerd]
SNAPSHOTTER = "snapdriver"
NOT_COMMITTED = ("invalid argument", "failed precondition")  # containerd's own says the first


@dataclass
class Env:
    containerd: Containerd
    front: ContainerdFront
    client: Client

    def ctr_fails(self, *args: str) -> str:
        """``ctr snapshots ARGS`` must fail; its message."""
        done = self.containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, *args, check=False)
        assert done.returncode != 0, f"ctr snapshots {' '.join(args)} succeeded: {done.stdout}"
        return done.stderr.strip()

    def ctr(self, *args: str) -> str:
        return self.containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, *args).stdout

    def keep_view(self, key: str, parent: str) -> None:
        """``ctr snapshots view``, then marked a GC root: ctr's prepare marks its snapshot so, its
        view does not, and a collection between the two calls takes the view (seen under load)."""
        for _ in range(5):
            self.ctr("view", key, parent)
            done = self.containerd.ctr(
                "snapshots",
                "--snapshotter",
                SNAPSHOTTER,
                "label",
                key,
                "containerd.io/gc.root=keep",
                check=False,
            )
            if done.returncode == 0:
                return
        raise AssertionError(f"the view {key} was collected five times before it was labelled")

    def listed(self) -> set[str]:
        return {line.split()[0] for line in self.ctr("ls").splitlines()[1:] if line.strip()}

    def state(self) -> list[tuple[str, str, int, dict[str, str]]]:
        """The front's own view, straight from its socket."""
        return sorted((i.name, i.parent, i.kind, dict(i.labels)) for i in self.client.list())

    def settled(self, expected: list[tuple[str, str, int, dict[str, str]]]) -> list[Any]:
        """The state once containerd's garbage collector has caught up (it removes later, and
        may not at all until asked again: see Containerd.collect)."""
        deadline = time.monotonic() + 120
        while (state := self.state()) != expected and time.monotonic() < deadline:
            self.containerd.collect()
            time.sleep(0.2)
        return state


@pytest.fixture(scope="module")
def env(btrfs_mount: Path, containerd_available: None) -> Iterator[Env]:
    run = uuid.uuid4().hex[:8]
    front = ContainerdFront(btrfs_mount / f"ctr-errors-{run}", RUN_ROOT / f"errors-{run}.sock")
    containerd = Containerd(
        btrfs_mount / f"ctr-errors-root-{run}",
        {SNAPSHOTTER: front.socket},
        namespace=f"sderr{run}",
        gc_deletion_threshold=1,
    )
    front.start()
    client = front.client()
    env = Env(containerd, front, client)
    try:
        containerd.start()
        env.ctr("prepare", "base")
        env.ctr("commit", "base-c", "base")
        env.ctr("prepare", "work", "base-c")
        env.keep_view("look", "base-c")
        before = env.state()
        yield env
        assert env.settled(before) == before, "bad input changed what the front holds"
        for key in ("work", "look", "base-c"):
            env.ctr("rm", key)
        assert env.settled([]) == [], "containerd's GC left snapshots in the front"
    finally:
        client.close()
        containerd.close()
        front.close()


@pytest.mark.parametrize("verb", ["prepare", "view"])
@pytest.mark.parametrize("parent", ["work", "look"])
def test_a_parent_that_is_not_committed(env: Env, verb: str, parent: str) -> None:
    message = env.ctr_fails(verb, "child", parent)
    assert any(kind in message for kind in NOT_COMMITTED), message
    assert "child" not in env.listed()


def test_mounts_of_a_committed_snapshot(env: Env) -> None:
    assert "failed precondition" in env.ctr_fails("mounts", "/tmp/x", "base-c")


@pytest.mark.parametrize("key", ["look", "base-c"])
def test_only_an_active_snapshot_can_be_committed(env: Env, key: str) -> None:
    assert "failed precondition" in env.ctr_fails("commit", "new-name", key)
    assert "new-name" not in env.listed()


def test_a_key_the_front_does_not_have_is_not_found(env: Env) -> None:
    """containerd's record and the front disagree (a snapshot removed on the front's socket):
    every call containerd forwards for it comes back NOT_FOUND, and containerd can drop it."""
    env.ctr("prepare", "lost", "base-c")
    backend_key = next(i.name for i in env.client.list() if i.name.endswith("/lost"))
    env.client.remove(backend_key)
    for args in (("mounts", "/tmp/x", "lost"), ("usage", "lost"), ("info", "lost")):
        assert "not found" in env.ctr_fails(*args), args
    assert "not found" in env.ctr_fails("prepare", "lost-child", "lost")
    env.ctr("rm", "lost")  # containerd's record only; its GC's Remove finds nothing to do
    assert "lost" not in env.listed()


# --- sent directly: what the front's own tests leave out ---------------------------------------


@pytest.mark.parametrize(
    "bad", ['labels."unterminated', "==x", "name==a,", "name!", "kind==", 'name=="a"b', "name==a b"]
)
def test_malformed_filters_are_invalid(env: Env, bad: str) -> None:
    """Each is refused by containerd's own parser too (``name==a==b`` is not: its value is
    ``a==b``)."""
    assert code_of(lambda: env.client.list(bad)) == Code.INVALID_ARGUMENT
    # One bad filter among good ones fails the whole call.
    assert code_of(lambda: env.client.list("kind==active", bad)) == Code.INVALID_ARGUMENT


@pytest.mark.parametrize("path", ["kind", "created_at", "updated_at", "bogus", "info.labels"])
def test_masks_beyond_labels_are_invalid(env: Env, path: str) -> None:
    key = next(i.name for i in env.client.list() if i.name.endswith("/work"))
    info = env.client.stat(key)
    info.labels["containerd.io/snapshot/x"] = "y"
    assert code_of(lambda: env.client.update(info, path)) == Code.INVALID_ARGUMENT


def test_errors_carry_a_message(env: Env) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        env.client.list("name==")
    assert caught.value.details(), "an INVALID_ARGUMENT with no message"
    with pytest.raises(grpc.RpcError) as caught:
        env.client.stat("no such key")
    assert "no such key" in (caught.value.details() or ""), caught.value.details()


def test_the_front_still_serves_through_containerd(env: Env) -> None:
    env.ctr("prepare", "after", "base-c")
    assert "after" in env.listed()
    env.ctr("rm", "after")
