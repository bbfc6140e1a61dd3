"""A model-based random walk through every GraphDriver call, over the real socket, on btrfs (on
the host) and ZFS (in the lab).

A hypothesis state machine sends random sequences of Create, CreateReadWrite, Get, Put, ApplyDiff
(small random tars with whiteouts and opaque directories), Diff, Changes, DiffSize and Remove,
writes into writable layers as a container would, SIGKILLs and restarts the plugin, and fills
the (small, real) filesystem. The model (tests/hardening/walk.py, shared with the containerd
front's walk) keeps what each layer must hold, path by path; after every step every complete
layer must equal its model, and every error must be the expected one (a busy parent, or no space
while the disk is full). Diff is checked by applying its tar to the parent's model, Changes and
DiffSize against the difference of two models.

Budget: ``SNAPDRIVER_WALK_EXAMPLES`` sequences of up to ``SNAPDRIVER_WALK_STEPS`` steps
(defaults 12 and 50 on btrfs, under a minute on the host; 1 and 20 on ZFS, 86-98 s in the lab
with its disk fills). Derandomized
unless ``SNAPDRIVER_WALK_SEED`` is set; a failure prints hypothesis's ``@reproduce_failure`` blob
and the seed. The disk that fills is the walk's own: a btrfs loop image, or on ZFS a pool on a
file (ENOSPC when full, as on a host).
"""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from snapdriver.graphdriver.client import PluginCallError
from snapdriver.testing.conformance import Plugin
from snapdriver.testing.process import ForkedPluginProcess
from tests.hardening.walk import (
    NO_SPACE,
    SIZE_MB,
    Content,
    Entry,
    MiB,
    ModelWalk,
    apply_entries,
    big_tar,
    budget,
    build_tar,
    check_changes,
    fill,
    given_back,
    parse_tar,
    read_tree,
    run_walk,
    walk_space,
    write_entries,
)
from tests.storage import BACKENDS, Space, Storage

pytestmark = pytest.mark.slow
MAX_LAYERS = 10
#: (sequences, steps) by backend: a ZFS step costs ~10x a btrfs one under the lab's emulation.
BUDGETS = {"btrfs": (12, 50), "zfs": (1, 20)}


@dataclass
class Layer:
    parent: str | None
    rw: bool
    content: Content


@dataclass
class Env:
    plugin: Plugin
    storage: Storage
    space: Space
    room: int  # the space's free bytes while empty


def new_id() -> str:
    return uuid.uuid4().hex * 2


class Walk(ModelWalk):
    env: Env  # set on the class by the test, shared by every sequence

    def __init__(self) -> None:
        super().__init__()
        self.layers: dict[str, Layer] = {}
        self.refs: Counter[str] = Counter()
        self.filler: str | None = None  # while set, the disk is full
        self.reset()

    @property
    def plugin(self) -> Plugin:
        return self.env.plugin

    def call(self, method: str, **payload: Any) -> dict[str, Any]:
        self.counts["calls"] += 1
        return self.plugin.call(method, **payload)

    def no_space(self, err: PluginCallError, what: str) -> None:
        """One line saying no space, and what it was doing."""
        assert f"{NO_SPACE} {what}" in err.message, err.message
        assert "\n" not in err.message
        self.counts["disk-full errors"] += 1

    def children(self, layer: str) -> list[str]:
        return [k for k, v in self.layers.items() if v.parent == layer]

    def pick(self, data: st.DataObject, which: Callable[[str, Layer], bool] | None = None) -> str:
        # In the order made, not by ID: IDs are random, and a replay must pick the same layers.
        choices = [k for k, v in self.layers.items() if which is None or which(k, v)]
        return data.draw(st.sampled_from(choices))

    # -- rules

    def can_write(self) -> bool:
        """Writes run while the disk has space (while it is full, see :meth:`write_while_full`)."""
        return self.filler is None and len(self.layers) < MAX_LAYERS

    def can_fill(self) -> bool:
        return self.filler is None and self.spaced("full")

    @precondition(can_write)
    @rule(data=st.data(), rw=st.booleans(), with_parent=st.booleans())
    def create(self, data: st.DataObject, rw: bool, with_parent: bool) -> None:
        parent = self.pick(data) if with_parent and self.layers else None
        layer = new_id()
        self.call("CreateReadWrite" if rw else "Create", ID=layer, Parent=parent or "")
        content = dict(self.layers[parent].content) if parent else {}
        self.layers[layer] = Layer(parent, rw, content)

    @precondition(can_write)
    @rule(data=st.data(), with_parent=st.booleans())
    def create_and_apply(self, data: st.DataObject, with_parent: bool) -> None:
        """dockerd's pull: Create, then ApplyDiff of the layer's tar."""
        parent = self.pick(data) if with_parent and self.layers else None
        layer = new_id()
        self.call("Create", ID=layer, Parent=parent or "")
        content = dict(self.layers[parent].content) if parent else {}
        self.layers[layer] = Layer(parent, False, content)
        self.apply(layer, self.draw_entries(data, content))

    @precondition(lambda self: self.filler is None and self.leaves())
    @rule(data=st.data())
    def apply_diff(self, data: st.DataObject) -> None:
        layer = self.pick(data, lambda k, v: not self.children(k))
        self.apply(layer, self.draw_entries(data, self.layers[layer].content))

    def leaves(self) -> list[str]:
        return [k for k in self.layers if not self.children(k)]

    def apply(self, layer: str, entries: list[Entry]) -> None:
        model = self.layers[layer]
        self.counts["calls"] += 1
        self.counts["writes"] += 1
        self.plugin.client.apply_diff(layer, model.parent or "", build_tar(entries))
        model.content = apply_entries(model.content, entries)

    @precondition(lambda self: self.filler is not None)
    @rule(data=st.data(), with_parent=st.booleans())
    def write_while_full(self, data: st.DataObject, with_parent: bool) -> None:
        """A pull on the full disk: Create may still fit in metadata, a MiB of data cannot.

        Whatever happens, nothing is left: the model does not depend on where the disk gave out.
        """
        parent = self.pick(data) if with_parent and self.layers else None
        layer = new_id()
        try:
            self.call("Create", ID=layer, Parent=parent or "")
        except PluginCallError as err:
            self.no_space(err, f"while creating layer {layer}")
        else:
            self.counts["calls"] += 1
            tar = build_tar([("file", f"f{i}", bytes(64 * 1024)) for i in range(32)])
            with pytest.raises(PluginCallError) as failed:
                self.plugin.client.apply_diff(layer, parent or "", tar)
            self.no_space(failed.value, f"while applying layer {layer} after ")
        assert self.call("Exists", ID=layer) == {"Exists": False}
        self.call("Remove", ID=layer)  # dockerd's clean-up after a failed call

    @precondition(lambda self: bool(self.layers))
    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        layer = self.pick(data)
        root = Path(self.call("Get", ID=layer)["Dir"])
        assert read_tree(root) == self.layers[layer].content
        self.refs[layer] += 1

    @precondition(lambda self: bool(+self.refs))
    @rule(data=st.data())
    def put(self, data: st.DataObject) -> None:
        layer = data.draw(st.sampled_from([k for k, n in self.refs.items() if n > 0]))
        self.call("Put", ID=layer)
        self.refs[layer] -= 1

    @precondition(lambda self: self.filler is None and any(v.rw for v in self.layers.values()))
    @rule(data=st.data())
    def container_writes(self, data: st.DataObject) -> None:
        """A container writes into its writable layer (through Get's directory)."""
        layer = self.pick(data, lambda k, v: v.rw)
        model = self.layers[layer]
        entries = [e for e in self.draw_entries(data, model.content) if e[0] in ("file", "dir")]
        root = Path(self.call("Get", ID=layer)["Dir"])
        try:
            write_entries(root, entries)
        finally:
            self.call("Put", ID=layer)
        self.counts["writes"] += 1
        model.content = apply_entries(model.content, entries)

    @precondition(lambda self: bool(self.layers))
    @rule(data=st.data())
    def diff(self, data: st.DataObject) -> None:
        """Diff against the parent, applied to the parent's model, gives the layer's model."""
        layer = self.pick(data)
        model = self.layers[layer]
        self.counts["calls"] += 1
        tar = self.plugin.client.diff(layer, model.parent or "")
        base = self.layers[model.parent].content if model.parent else {}
        assert apply_entries(base, parse_tar(tar)) == model.content

    @precondition(lambda self: self.filler is None and 0 < len(self.layers) < MAX_LAYERS)
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        """dockerd's commit: Diff of a layer, applied to a new layer on the same parent."""
        source = self.pick(data)
        parent = self.layers[source].parent
        self.counts["calls"] += 3
        tar = self.plugin.client.diff(source, parent or "")
        layer = new_id()
        self.plugin.create(layer, parent or "")
        self.plugin.client.apply_diff(layer, parent or "", tar)
        self.layers[layer] = Layer(parent, False, dict(self.layers[source].content))

    @precondition(lambda self: bool(self.layers))
    @rule(data=st.data())
    def changes_and_size(self, data: st.DataObject) -> None:
        layer = self.pick(data)
        model = self.layers[layer]
        base = self.layers[model.parent].content if model.parent else {}
        reported = self.call("Changes", ID=layer, Parent=model.parent or "")["Changes"] or []
        kinds = {c["Path"].lstrip("/"): c["Kind"] for c in reported}
        check_changes(base, model.content, kinds)
        size = self.call("DiffSize", ID=layer, Parent=model.parent or "")["Size"]
        changed = [model.content[p] for p, k in kinds.items() if k in (0, 1)]
        assert size == sum(len(data) for kind, data in changed if kind != "dir")

    @precondition(lambda self: bool(self.layers))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        layer = self.pick(data)
        if self.children(layer):
            with pytest.raises(PluginCallError, match="child layer"):
                self.call("Remove", ID=layer)
            return
        self.call("Remove", ID=layer)
        del self.layers[layer]
        self.refs.pop(layer, None)
        assert self.call("Exists", ID=layer) == {"Exists": False}

    @precondition(lambda self: self.spaced("kill"))
    @rule()
    def kill_and_restart(self) -> None:
        plugin = self.plugin
        plugin.client.close()
        plugin.process.kill()
        plugin.process.start()  # no Init: as under a running dockerd
        plugin.client = plugin.process.client()
        self.counts["kills"] += 1
        self.last["kill"] = self.step

    @precondition(can_fill)
    @rule()
    def fill_disk(self) -> None:
        """A container fills the filesystem through its writable layer."""
        filler = new_id()
        self.plugin.create(filler, rw=True)
        root = Path(self.call("Get", ID=filler)["Dir"])
        try:
            fill(root / "fill")
        finally:
            self.call("Put", ID=filler)
        self.filler = filler
        self.disk_filled()

    @precondition(lambda self: self.filler is not None)
    @rule()
    def free_disk(self) -> None:
        assert self.filler is not None
        self.call("Remove", ID=self.filler)
        self.filler = None
        assert given_back(self.env.space, self.env.room), "Remove replied before space"

    @precondition(lambda self: self.can_write() and self.can_fill())
    @rule()
    def apply_too_big(self) -> None:
        """An ApplyDiff bigger than the disk: one clear error, space back, layer gone."""
        layer = new_id()
        self.plugin.create(layer)
        self.counts["calls"] += 1
        with pytest.raises(PluginCallError) as failed:
            self.plugin.client.apply_diff(layer, "", big_tar(SIZE_MB * MiB))
        expected = f"{NO_SPACE} while applying layer {layer} after "
        assert failed.value.message.startswith(expected), failed.value.message
        self.counts["disk-full errors"] += 1
        self.call("Remove", ID=layer)
        assert given_back(self.env.space, self.env.room), "space not given back"
        self.disk_filled()

    # -- after every step

    @invariant()
    def every_layer_matches_its_model(self) -> None:
        self.stepped(len(self.layers))
        for layer, model in self.layers.items():
            assert self.call("Exists", ID=layer) == {"Exists": True}, f"layer {layer} lost"
            root = Path(self.call("Get", ID=layer)["Dir"])
            try:
                assert read_tree(root) == model.content, f"layer {layer} differs from its model"
            finally:
                self.call("Put", ID=layer)

    def teardown(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Remove every layer in storage, whatever an earlier (maybe failed) sequence left."""
        left = sorted(self.env.storage.stored())
        for _ in range(MAX_LAYERS + 2):  # children before parents, in as many rounds
            for layer in left:
                with contextlib.suppress(PluginCallError):  # a parent: the next round
                    self.plugin.call("Remove", ID=layer)
            left = sorted(self.env.storage.stored())
        assert left == [], f"cannot remove {left}"


@pytest.fixture(scope="module", params=BACKENDS)
def walk_env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    backend: str = request.param
    with walk_space(backend, tmp_path_factory.mktemp("walk-homes")) as (space, room):
        storage = space.at(space.homes / "walk")
        # Forked, not exec'd: each restart would cost ~17 s of imports in the lab's guest.
        process = ForkedPluginProcess(backend, tmp_path_factory.mktemp("walk"))
        process.start()
        plugin = Plugin(process, storage.home)
        try:
            init = {"Home": str(storage.home), "Opts": storage.init_options, "UIDMaps": None}
            plugin.client.call("GraphDriver.Init", {**init, "GIDMaps": None})
            yield Env(plugin, storage, space, room)
            left = storage.stored()
            assert left == [], f"layers left after the walk: {left}"
        finally:
            plugin.client.close()
            process.stop()


def test_random_walk(walk_env: Env, figure: Callable[[str], None]) -> None:
    Walk.env = walk_env
    backend = walk_env.storage.backend
    run_walk(
        Walk,
        budget(*BUDGETS[backend]),
        figure,
        f"RANDOM WALK (graphdriver, {backend})",
        log_tail=lambda: walk_env.plugin.process.log_tail(60),
    )
