"""The model-based random walk on the containerd front: snapshots.v1 over gRPC, as containerd's
proxy sends it, on btrfs (on the host) and ZFS (in the lab).

A hypothesis state machine sends random sequences of Prepare, View, Mounts, Commit, Remove, Stat,
Update, Usage, List (containerd's Walk) and Cleanup, with opaque keys as containerd makes them.
Contents are written through the mounts the front returns, mounted as containerd would (a layer's
files and whiteouts unpacked, or a container's writes); the front is SIGKILLed and restarted, and
the (small, real) filesystem is filled. The model is the one the GraphDriver walk uses
(tests/hardening/walk.py), plus what containerd keeps per key: kind, parent and labels.

After every step the front's List must equal the model (names, kinds, parents, labels) and every
active snapshot and view must read back, through its mount, as its model; committed snapshots
are read through a View on them. Refusals must carry containerd's codes (FAILED_PRECONDITION,
INVALID_ARGUMENT, ALREADY_EXISTS, NOT_FOUND); while the disk is full a call that stores something
may fail, only with RESOURCE_EXHAUSTED, and then change nothing.

Budget: ``SNAPDRIVER_WALK_EXAMPLES`` sequences of up to ``SNAPDRIVER_WALK_STEPS`` steps
(defaults 10 and 40 on btrfs, ~3-5 min on the host; 6 and 15 on ZFS, ~2 guest minutes in the
lab, most of it the front's restarts at ~20 s each). Derandomized unless ``SNAPDRIVER_WALK_SEED``
is set; a failure prints hypothesis's ``@reproduce_failure`` blob, the seed and the front's log.
Disk full is a small filesystem of the walk's own: a btrfs loop image, or on ZFS a pool on a file
(ENOSPC, as on a host).
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from snapdriver.containerd.proto import mount_pb2
from snapdriver.containerd.proto import snapshots_pb2 as pb
from snapdriver.testing.containerd import (
    Client,
    ContainerdFront,
    code_of,
    mount,
    remove_everything,
    umount,
)
from tests.hardening.walk import (
    Content,
    MiB,
    ModelWalk,
    apply_entries,
    budget,
    fill,
    given_back,
    read_tree,
    run_walk,
    walk_space,
    write_entries,
)
from tests.storage import BACKENDS, Space

pytestmark = pytest.mark.slow
Code = grpc.StatusCode
MAX_SNAPSHOTS = 10
#: (sequences, steps) by backend: a ZFS step costs ~10x a btrfs one under the lab's emulation.
BUDGETS = {"btrfs": (10, 40), "zfs": (6, 15)}
#: Only labels under containerd.io/snapshot/ reach a proxy snapshotter.
LABELS = ("containerd.io/snapshot/a", "containerd.io/snapshot.ref")
WIRE_KIND = {"view": pb.VIEW, "active": pb.ACTIVE, "committed": pb.COMMITTED}


@dataclass
class Snap:
    kind: str  # active, view or committed
    parent: str  # the parent's key, "" for none
    labels: dict[str, str]
    content: Content = field(default_factory=dict)


@dataclass
class Storage:
    front: ContainerdFront
    #: Every name the backend keeps storage under (layer IDs).
    stored: Callable[[], list[str]]
    space: Space
    room: int  # the space's free bytes while empty


@dataclass
class Env:
    storage: Storage
    client: Client
    target: Path  # where the walk mounts snapshots, as containerd would


class Walk(ModelWalk):
    env: Env  # set on the class by the test, shared by every sequence

    def __init__(self) -> None:
        super().__init__()
        self.snaps: dict[str, Snap] = {}
        self.filler: str | None = None  # while set, the disk is full
        self.reset()

    @property
    def client(self) -> Client:
        self.counts["calls"] += 1
        return self.env.client

    @contextlib.contextmanager
    def mounted(self, mounts: Sequence[mount_pb2.Mount]) -> Iterator[Path]:
        mount(mounts, self.env.target)
        try:
            yield self.env.target
        finally:
            umount(self.env.target)

    def key(self) -> str:
        """An opaque key, as containerd makes them: namespace, serial, '/', ':' and a space."""
        self.counts["keys"] += 1
        return f"walk/{self.counts['keys']}/extract-{uuid.uuid4().hex[:8]} sha256:x"

    def pick(self, data: st.DataObject, *kinds: str) -> str:
        # In the order made, not by key: keys are random, and a replay must pick the same ones.
        return data.draw(st.sampled_from([k for k, v in self.snaps.items() if v.kind in kinds]))

    def has(self, *kinds: str) -> bool:
        return any(v.kind in kinds for v in self.snaps.values())

    def children(self, key: str) -> list[str]:
        return [k for k, v in self.snaps.items() if v.parent == key]

    def stored_or_full(self, call: Callable[[], object]) -> bool:
        """Run a call that stores something; while the disk is full it may fail, only with
        RESOURCE_EXHAUSTED (then it changed nothing: the model is left alone). True if it ran."""
        try:
            call()
        except grpc.RpcError as err:
            if self.filler is None or err.code() != Code.RESOURCE_EXHAUSTED:
                raise
            message = err.details() or ""
        else:
            return True
        assert "\n" not in message, message  # one line, as containerd's log shows it
        self.counts["disk-full errors"] += 1
        return False

    def can_make(self) -> bool:
        return self.filler is None and len(self.snaps) < MAX_SNAPSHOTS

    def draw_labels(self, data: st.DataObject) -> dict[str, str]:
        chosen = data.draw(st.lists(st.sampled_from(LABELS), max_size=2, unique=True))
        return {label: data.draw(st.sampled_from(["x", "y z"])) for label in chosen}

    # -- rules

    @initialize(data=st.data())
    def pulled(self, data: st.DataObject) -> None:
        """Each sequence starts from an image layer, unpacked and committed: short sequences
        (hypothesis tries many) would otherwise hold few snapshots to check."""
        key, name = self.key(), self.key()
        self.client.prepare(key)
        self.snaps[key] = Snap("active", "", {})
        self.write_through(key, data)
        self.client.commit(name, key)
        self.snaps[name] = Snap("committed", "", {}, self.snaps.pop(key).content)

    @precondition(can_make)
    @rule(data=st.data(), with_parent=st.booleans(), unpack=st.booleans())
    def prepare(self, data: st.DataObject, with_parent: bool, unpack: bool) -> None:
        """containerd's unpack (Prepare, the layer written through its mounts) or a container's
        Prepare; the mounts are one bind of the parent's content, writable."""
        parent = self.pick(data, "committed") if with_parent and self.has("committed") else ""
        key, labels = self.key(), self.draw_labels(data)
        mounts = self.client.prepare(key, parent, labels)
        assert [(m.type, list(m.options)) for m in mounts] == [("bind", ["rbind", "rw"])]
        content = dict(self.snaps[parent].content) if parent else {}
        self.snaps[key] = Snap("active", parent, labels, content)
        if unpack:
            self.write_through(key, data)

    @precondition(lambda self: self.filler is None and self.has("active"))
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        """A container writes into its rootfs, mounted from the snapshot's Mounts."""
        self.write_through(self.pick(data, "active"), data)

    def write_through(self, key: str, data: st.DataObject) -> None:
        model = self.snaps[key]
        entries = self.draw_entries(data, model.content)
        with self.mounted(self.client.mounts(key)) as root:
            write_entries(root, entries)
        self.counts["writes"] += 1
        model.content = apply_entries(model.content, entries)

    @precondition(lambda self: self.can_make() and self.has("committed"))
    @rule(data=st.data())
    def view(self, data: st.DataObject) -> None:
        """A read-only view: the parent's content, and no write gets through its mount."""
        parent, key = self.pick(data, "committed"), self.key()
        mounts = self.client.view(key, parent)
        assert [(m.type, list(m.options)) for m in mounts] == [("bind", ["rbind", "ro"])]
        self.snaps[key] = Snap("view", parent, {}, dict(self.snaps[parent].content))
        with self.mounted(mounts) as root, pytest.raises(OSError, match="Read-only"):
            (root / "late").write_bytes(b"x")

    @precondition(lambda self: self.has("active"))
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        key, name, labels = self.pick(data, "active"), self.key(), self.draw_labels(data)
        if self.stored_or_full(lambda: self.client.commit(name, key, labels)):
            model = self.snaps.pop(key)
            self.snaps[name] = Snap("committed", model.parent, labels, model.content)
            assert code_of(lambda: self.client.stat(key)) == Code.NOT_FOUND

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        key = self.pick(data, *WIRE_KIND)
        if self.children(key):
            assert code_of(lambda: self.client.remove(key)) == Code.FAILED_PRECONDITION
        elif self.stored_or_full(lambda: self.client.remove(key)):
            del self.snaps[key]
            assert code_of(lambda: self.client.stat(key)) == Code.NOT_FOUND

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data(), which=st.integers(0, 4))
    def refused(self, data: st.DataObject, which: int) -> None:
        """What containerd may pass on that the front must refuse, with its code, changing
        nothing (the invariant checks that)."""
        key = self.pick(data, *WIRE_KIND)
        kind = self.snaps[key].kind
        if which == 0 and kind != "committed":  # a parent that is not committed
            assert code_of(lambda: self.client.prepare(self.key(), key)) == Code.INVALID_ARGUMENT
        elif which == 1 and kind != "active":
            assert code_of(lambda: self.client.commit(self.key(), key)) == Code.FAILED_PRECONDITION
        elif which == 2 and kind == "committed":
            assert code_of(lambda: self.client.mounts(key)) == Code.FAILED_PRECONDITION
        elif which == 3:
            assert code_of(lambda: self.client.prepare(key)) == Code.ALREADY_EXISTS
        else:
            assert code_of(lambda: self.client.stat(key + "-gone")) == Code.NOT_FOUND

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def stat(self, data: st.DataObject) -> None:
        key = self.pick(data, *WIRE_KIND)
        assert self.described(self.client.stat(key)) == self.expected(key)

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data(), label=st.sampled_from(LABELS), value=st.sampled_from(["", "v", "w w"]))
    def update(self, data: st.DataObject, label: str, value: str) -> None:
        """One label set or (empty value) deleted through a ``labels.KEY`` mask."""
        key = self.pick(data, *WIRE_KIND)
        info = pb.Info(name=key, labels={label: value} if value else {})
        updated: list[pb.Info] = []
        if self.stored_or_full(lambda: updated.append(self.client.update(info, f"labels.{label}"))):
            labels = self.snaps[key].labels
            labels.pop(label, None)
            labels.update({label: value} if value else {})
            assert self.described(updated[0]) == self.expected(key)

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def usage(self, data: st.DataObject) -> None:
        """The snapshot's own content: at least what differs from its parent's model, at most
        that and every file it shares with it (rewritten with the same bytes, say)."""
        key = self.pick(data, *WIRE_KIND)
        model = self.snaps[key]
        base = self.snaps[model.parent].content if model.parent else {}
        changed = {p: n for p, n in model.content.items() if base.get(p) != n}
        least = sum(len(n[1]) for n in changed.values() if n[0] != "dir")
        most = sum(len(n[1]) for n in model.content.values() if n[0] != "dir")
        usage = self.client.usage(key)
        assert least <= usage.size <= most, (least, usage.size, most)
        assert len(changed) <= usage.inodes <= len(model.content), (changed, usage.inodes)

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data(), by_kind=st.booleans())
    def walk_filtered(self, data: st.DataObject, by_kind: bool) -> None:
        """containerd's Walk with one filter: a kind, or a parent."""
        key = self.pick(data, *WIRE_KIND)
        if by_kind:
            kind = self.snaps[key].kind
            wanted = {k for k, v in self.snaps.items() if v.kind == kind}
            found = self.client.list(f"kind=={kind}")
        else:
            wanted = set(self.children(key))
            found = self.client.list(f'parent=="{key}"')
        assert {i.name for i in found} - {self.filler} == wanted

    @precondition(lambda self: self.has("committed") and len(self.snaps) < MAX_SNAPSHOTS)
    @rule(data=st.data())
    def read_committed(self, data: st.DataObject) -> None:
        """A committed snapshot reads back as its model, through a View on it (then removed)."""
        parent, key = self.pick(data, "committed"), self.key()
        if not self.stored_or_full(lambda: self.client.view(key, parent)):
            return
        with self.mounted(self.client.mounts(key)) as root:
            assert read_tree(root) == self.snaps[parent].content, f"{parent} differs from its model"
        self.client.remove(key)

    @rule()
    def cleanup(self) -> None:
        self.client.cleanup()

    @precondition(lambda self: self.spaced("kill"))
    @rule()
    def kill_and_restart(self) -> None:
        self.env.client.close()
        front = self.env.storage.front
        front.kill()
        self.env.client = front.client()  # dials at its first call, after the start
        front.start()  # as containerd finds it: its next call dials again
        self.counts["kills"] += 1
        self.last["kill"] = self.step

    # -- disk full

    @precondition(lambda self: self.can_make() and self.spaced("full"))
    @rule()
    def fill_disk(self) -> None:
        """A container fills the filesystem through its snapshot's mount."""
        filler = self.key()
        with self.mounted(self.client.prepare(filler)) as root:
            fill(root / "fill")
        self.filler = filler
        self.disk_filled()

    @precondition(lambda self: self.filler is not None)
    @rule(data=st.data(), with_parent=st.booleans())
    def write_while_full(self, data: st.DataObject, with_parent: bool) -> None:
        """An unpack on the full disk: Prepare may still fit, a MiB of data cannot; containerd
        then removes what it prepared, and nothing is left."""
        parent = self.pick(data, "committed") if with_parent and self.has("committed") else ""
        key, mounts = self.key(), []
        if not self.stored_or_full(lambda: mounts.extend(self.client.prepare(key, parent))):
            assert code_of(lambda: self.client.stat(key)) == Code.NOT_FOUND
            return
        with self.mounted(mounts) as root, pytest.raises(OSError, match="No space left"):
            (root / "big").write_bytes(bytes(MiB))
        self.counts["disk-full errors"] += 1
        self.client.remove(key)

    @precondition(lambda self: self.filler is not None)
    @rule()
    def free_disk(self) -> None:
        assert self.filler is not None
        self.client.remove(self.filler)
        self.filler = None
        assert given_back(self.env.storage.space, self.env.storage.room), (
            "Remove replied before space"
        )

    # -- after every step

    @staticmethod
    def described(info: pb.Info) -> tuple[str, str, int, dict[str, str]]:
        return info.name, info.parent, info.kind, dict(info.labels)

    def expected(self, key: str) -> tuple[str, str, int, dict[str, str]]:
        model = self.snaps[key]
        return key, model.parent, WIRE_KIND[model.kind], model.labels

    @invariant()
    def every_snapshot_matches_its_model(self) -> None:
        self.stepped(len(self.snaps))
        listed = {i.name: self.described(i) for i in self.client.list() if i.name != self.filler}
        assert listed == {key: self.expected(key) for key in self.snaps}, "List differs"
        for key, model in self.snaps.items():
            if model.kind != "committed":  # read at the source: a mount each costs minutes on ZFS
                (source,) = [Path(m.source) for m in self.client.mounts(key)]
                assert read_tree(source) == model.content, f"{key} differs from its model"

    def teardown(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Remove every snapshot, whatever an earlier (maybe failed) sequence left; then the
        backend must hold nothing."""
        with contextlib.suppress(Exception):  # a failed step may have left it mounted
            umount(self.env.target)
        remove_everything(self.env.client)
        left = self.env.storage.stored()
        assert left == [], f"layers left with no snapshot: {left}"


@contextlib.contextmanager
def front_storage(backend: str, scratch: Path) -> Iterator[Storage]:
    """A front for ``backend`` on a small btrfs or ZFS pool of its own. Its socket and log are
    in ``scratch``, off the filesystem the walk fills; so is its root on ZFS (a host directory:
    the layers are datasets)."""
    with walk_space(backend, scratch) as (space, room):
        program = [sys.executable, "-m", "snapdriver.containerd", *space.plugin_args]
        front = ContainerdFront(space.homes / "front", scratch / "walk.sock", backend, program)
        yield Storage(front, space.at(front.root).stored, space, room)


@pytest.fixture(scope="module", params=BACKENDS)
def walk_env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    scratch = tmp_path_factory.mktemp("cwalk")
    with front_storage(request.param, scratch) as storage:
        target = scratch / "mnt"
        target.mkdir()
        storage.front.start()
        env = Env(storage, storage.front.client(), target)
        try:
            yield env
            remove_everything(env.client)
        finally:
            env.client.close()
            storage.front.close()


def test_random_walk_containerd(walk_env: Env, figure: Callable[[str], None]) -> None:
    Walk.env = walk_env
    backend = walk_env.storage.space.backend
    run_walk(
        Walk,
        budget(*BUDGETS[backend]),
        figure,
        f"RANDOM WALK (containerd front, {backend})",
        log_tail=lambda: walk_env.storage.front.log_tail(60),
    )
