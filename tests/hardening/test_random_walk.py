"""A model-based random walk through every GraphDriver call, over the real socket, on btrfs.

A hypothesis state machine sends random sequences of Create, CreateReadWrite, Get, Put, ApplyDiff
(small random tars with whiteouts and opaque directories), Diff, Changes, DiffSize and Remove,
writes into writable layers as a container would, SIGKILLs and restarts the plugin, and fills
the (small, real) filesystem. A model keeps what each layer must hold, path by path, by applying
its own reading of Docker's tar rules; after every step every complete layer must equal its
model, and every error must be the expected one (a busy parent, or no space while the disk is
full). Diff is checked by applying its tar to the parent's model, Changes and DiffSize against
the difference of two models.

Budget: ``SNAPDRIVER_WALK_EXAMPLES`` sequences of up to ``SNAPDRIVER_WALK_STEPS`` steps
(defaults 12 and 50). Derandomized unless ``SNAPDRIVER_WALK_SEED`` is set; a failure prints
hypothesis's ``@reproduce_failure`` blob and the seed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import posixpath
import shutil
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from snapdriver.graphdriver.client import PluginCallError
from snapdriver.testing.conformance import Plugin
from snapdriver.testing.loopfs import can_make_loop_filesystems, loop_filesystem
from snapdriver.testing.process import ForkedPluginProcess
from tests.conftest import skip_tier

pytestmark = [pytest.mark.btrfs, pytest.mark.slow]
MiB = 1 << 20
SIZE_MB = 256
EXAMPLES = int(os.environ.get("SNAPDRIVER_WALK_EXAMPLES", "12"))
STEPS = int(os.environ.get("SNAPDRIVER_WALK_STEPS", "50"))
SEED = os.environ.get("SNAPDRIVER_WALK_SEED")
MAX_LAYERS = 10
SPACING = 5  # steps between kills, and between disk fills
NAMES = ("a", "b", "c")
NO_SPACE = "no space left on device"

#: A layer's content: relative path -> ("dir", b""), ("file", bytes) or ("link", target).
Node = tuple[str, bytes]
Content = dict[str, Node]


# -- the model's tar rules -----------------------------------------------------------------------


def remove_tree(content: Content, path: str) -> None:
    for key in [k for k in content if k == path or k.startswith(path + "/")]:
        del content[key]


def apply_entries(content: Content, entries: list[tuple[str, str, bytes]]) -> Content:
    """Docker's UnpackLayer as the model reads it; parents always exist in generated tars."""
    result = dict(content)
    for kind, path, payload in entries:
        if kind == "whiteout":
            remove_tree(result, path)
        elif kind == "opaque":
            remove_tree(result, path)
            result[path] = ("dir", b"")
        elif kind == "dir" and result.get(path, ("", b""))[0] == "dir":
            continue  # an existing directory is kept, with its contents
        else:
            remove_tree(result, path)
            result[path] = (kind, payload)
    return result


def build_tar(entries: list[tuple[str, str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, path, payload in entries:
            parent, base = posixpath.split(path)
            if kind == "whiteout":
                info = tarfile.TarInfo(posixpath.join(parent, ".wh." + base))
            elif kind == "opaque":
                info = tarfile.TarInfo(path + "/.wh..wh..opq")
            else:
                info = tarfile.TarInfo(path)
            info.mtime = 1_700_000_000
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, payload.decode()
            if kind == "file":
                info.size, info.mode = len(payload), 0o644
                tar.addfile(info, io.BytesIO(payload))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def parse_tar(data: bytes) -> list[tuple[str, str, bytes]]:
    """A Diff's tar as model entries (whiteouts and opaque markers recognised)."""
    entries = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            path = posixpath.normpath(member.name.lstrip("/")).removeprefix("./")
            parent, base = posixpath.split(path)
            if path in (".", ""):
                continue
            if base == ".wh..wh..opq":
                entries.append(("opaque", parent, b""))
            elif base.startswith(".wh."):
                entries.append(("whiteout", posixpath.join(parent, base[4:]), b""))
            elif member.isdir():
                entries.append(("dir", path, b""))
            elif member.issym():
                entries.append(("link", path, member.linkname.encode()))
            elif member.isfile():
                source = tar.extractfile(member)
                assert source is not None
                entries.append(("file", path, source.read()))
            else:
                raise AssertionError(f"unexpected entry in a Diff: {member.name} ({member.type!r})")
    return entries


def read_tree(root: Path) -> Content:
    content: Content = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            if full.is_symlink():
                content[rel] = ("link", os.readlink(full).encode())
            elif full.is_dir():
                content[rel] = ("dir", b"")
            else:
                content[rel] = ("file", full.read_bytes())
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return content


# -- the walk ----------------------------------------------------------------------------------


@dataclass
class Layer:
    parent: str | None
    rw: bool
    content: Content = field(default_factory=dict)


@dataclass
class Env:
    plugin: Plugin
    mnt: Path
    counts: Counter[str] = field(default_factory=Counter)


def new_id() -> str:
    return uuid.uuid4().hex * 2


class Walk(RuleBasedStateMachine):
    env: Env  # set on the class by the test, shared by every sequence

    def __init__(self) -> None:
        super().__init__()
        self.layers: dict[str, Layer] = {}
        self.refs: Counter[str] = Counter()
        self.filler: str | None = None  # while set, the disk is full
        #: Steps so far, and the step of the last kill and disk fill: each is one step in several,
        #: not one in three when swarm testing leaves few rules enabled.
        self.step = 0
        self.last: Counter[str] = Counter()
        self.env.counts["sequences"] += 1
        self.reset()

    def spaced(self, what: str) -> bool:
        return self.step - self.last[what] >= SPACING if self.last[what] else True

    @property
    def plugin(self) -> Plugin:
        return self.env.plugin

    def call(self, method: str, **payload: Any) -> dict[str, Any]:
        self.env.counts["calls"] += 1
        self.env.counts[method] += 1
        return self.plugin.call(method, **payload)

    def no_space(self, err: PluginCallError, what: str) -> None:
        """One line saying no space, and what it was doing."""
        assert f"{NO_SPACE} {what}" in err.message, err.message
        assert "\n" not in err.message
        self.env.counts["disk-full errors"] += 1

    def children(self, layer: str) -> list[str]:
        return [k for k, v in self.layers.items() if v.parent == layer]

    # -- strategies bound to the model

    def pick(self, data: st.DataObject, which: Callable[[str, Layer], bool] | None = None) -> str:
        # In the order made, not by ID: IDs are random, and a replay must pick the same layers.
        choices = [k for k, v in self.layers.items() if which is None or which(k, v)]
        return data.draw(st.sampled_from(choices))

    def draw_entries(self, data: st.DataObject, content: Content) -> list[tuple[str, str, bytes]]:
        """A small layer tar's entries, each valid against the content at its point in the tar."""
        state = dict(content)
        entries: list[tuple[str, str, bytes]] = []
        unpacked: set[str] = set()
        for _ in range(data.draw(st.integers(1, 8))):
            kind = data.draw(st.sampled_from(["file", "file", "dir", "link", "whiteout", "opaque"]))
            path, payload = self.draw_path(data, state, kind, unpacked), b""
            if path is None:
                continue
            if kind == "file":
                payload = data.draw(st.binary(max_size=64)) * data.draw(st.sampled_from([1, 97]))
            elif kind == "link":
                payload = data.draw(st.sampled_from([b"a", b"../b", b"/c/a", b"missing"]))
            entries.append((kind, path, payload))
            if kind == "whiteout" and path in state:
                self.env.counts["whiteouts that removed something"] += 1
            if kind == "opaque" and any(k.startswith(path + "/") for k in state):
                self.env.counts["opaques that emptied a directory"] += 1
            state = apply_entries(state, [entries[-1]])
            unpacked.add(path)
        return entries

    @staticmethod
    def draw_path(data: st.DataObject, state: Content, kind: str, unpacked: set[str]) -> str | None:
        """A new name in an existing directory; for whiteouts, mostly an existing path."""
        if kind == "opaque":  # only where nothing below was unpacked by this tar yet
            dirs = [p for p, n in state.items() if n[0] == "dir"]
            dirs = [d for d in dirs if not any(u.startswith(d + "/") for u in unpacked)]
            return data.draw(st.sampled_from(sorted(dirs))) if dirs else None
        if kind == "whiteout" and state and data.draw(st.booleans()):
            return data.draw(st.sampled_from(sorted(state)))
        dirs = ["", *sorted(p for p, n in state.items() if n[0] == "dir")]
        parent = data.draw(st.sampled_from(dirs))
        return posixpath.join(parent, data.draw(st.sampled_from(NAMES)))

    # -- rules

    def can_write(self) -> bool:
        """Writes run while the disk has space (while it is full, see :meth:`write_while_full`)."""
        return self.filler is None and len(self.layers) < MAX_LAYERS

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

    def apply(self, layer: str, entries: list[tuple[str, str, bytes]]) -> None:
        model = self.layers[layer]
        self.env.counts["calls"] += 1
        self.env.counts["ApplyDiff"] += 1
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
            self.env.counts["calls"] += 1
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
            for kind, path, payload in entries:
                target = root / path
                if kind == "dir" and target.is_dir() and not target.is_symlink():
                    continue
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.is_symlink() or target.exists():
                    target.unlink()
                if kind == "dir":
                    target.mkdir()
                else:
                    target.write_bytes(payload)
        finally:
            self.call("Put", ID=layer)
        model.content = apply_entries(model.content, entries)

    @precondition(lambda self: bool(self.layers))
    @rule(data=st.data())
    def diff(self, data: st.DataObject) -> None:
        """Diff against the parent, applied to the parent's model, gives the layer's model."""
        layer = self.pick(data)
        model = self.layers[layer]
        self.env.counts["calls"] += 1
        tar = self.plugin.client.diff(layer, model.parent or "")
        base = self.layers[model.parent].content if model.parent else {}
        assert apply_entries(base, parse_tar(tar)) == model.content

    @precondition(lambda self: self.filler is None and 0 < len(self.layers) < MAX_LAYERS)
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        """dockerd's commit: Diff of a layer, applied to a new layer on the same parent."""
        source = self.pick(data)
        parent = self.layers[source].parent
        self.env.counts["calls"] += 3
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
        self.env.counts["kills"] += 1
        self.last["kill"] = self.step

    @precondition(lambda self: self.filler is None and self.spaced("full"))
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
        self.last["full"] = self.step

    @precondition(lambda self: self.filler is not None)
    @rule()
    def free_disk(self) -> None:
        assert self.filler is not None
        self.call("Remove", ID=self.filler)
        self.filler = None
        free = os.statvfs(self.env.mnt)
        assert free.f_bavail * free.f_frsize > SIZE_MB * MiB // 2, "Remove replied before space"

    @precondition(lambda self: self.can_write() and self.spaced("full"))
    @rule()
    def apply_too_big(self) -> None:
        """An ApplyDiff bigger than the disk: one clear error, space back, layer gone."""
        layer = new_id()
        self.plugin.create(layer)
        self.env.counts["calls"] += 1
        with pytest.raises(PluginCallError) as failed:
            self.plugin.client.apply_diff(layer, "", big_tar(SIZE_MB * MiB))
        expected = f"{NO_SPACE} while applying layer {layer} after "
        assert failed.value.message.startswith(expected), failed.value.message
        self.env.counts["disk-full errors"] += 1
        self.call("Remove", ID=layer)
        free = os.statvfs(self.env.mnt)
        assert free.f_bavail * free.f_frsize > SIZE_MB * MiB // 2, "space not given back"
        self.last["full"] = self.step

    # -- after every step

    @invariant()
    def every_layer_matches_its_model(self) -> None:
        self.env.counts["checks"] += 1
        self.step += 1
        self.env.counts["layer checks"] += len(self.layers)
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
        subvolumes = self.plugin.home / "subvolumes"
        left = sorted(os.listdir(subvolumes)) if subvolumes.exists() else []
        for _ in range(MAX_LAYERS + 2):  # children before parents, in as many rounds
            for layer in left:
                with contextlib.suppress(PluginCallError):  # a parent: the next round
                    self.plugin.call("Remove", ID=layer)
            left = sorted(os.listdir(subvolumes)) if subvolumes.exists() else []
        assert left == [], f"cannot remove {left}"


def check_changes(base: Content, layer: Content, kinds: dict[str, int]) -> None:
    """Changes against the two models: Docker's kinds (0 modify, 1 add, 2 delete)."""
    for path in layer.keys() - base.keys():
        assert kinds.get(path) == 1, f"{path} added but reported as {kinds.get(path)}"
    for path in base.keys() - layer.keys():
        if posixpath.dirname(path) in layer or "/" not in path:  # the topmost deleted path
            assert kinds.get(path) == 2, f"{path} deleted but reported as {kinds.get(path)}"
    for path in base.keys() & layer.keys():
        if base[path] != layer[path] and "dir" not in (base[path][0], layer[path][0]):
            assert path in kinds, f"{path} changed but not reported"
    for path, kind in kinds.items():
        if kind == 1:
            assert path in layer, f"{path} reported added but absent"
        elif kind == 2:
            assert path in base, f"{path} reported deleted but never there"
            assert path not in layer or layer[path][0] != base[path][0], f"{path} still there"
        else:
            assert path in base and path in layer, f"{path} reported modified"


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem is full (unbuffered: closing it writes nothing)."""
    with open(path, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\xa5" * MiB)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise


def big_tar(total: int) -> Iterator[bytes]:
    """``total`` bytes of file content in 8 MiB files, streamed."""
    for i in range(total // (8 * MiB)):
        info = tarfile.TarInfo(f"big/{i:03d}")
        info.size = 8 * MiB
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        for _ in range(8):
            yield b"\x5a" * MiB
    yield b"\0" * 1024


@pytest.fixture(scope="module")
def walk_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    reason = can_make_loop_filesystems()
    if reason:
        skip_tier("btrfs", reason)
    with loop_filesystem("btrfs", size_mb=SIZE_MB) as mnt:
        process = ForkedPluginProcess("btrfs", tmp_path_factory.mktemp("walk"))
        process.start()
        home = mnt / "walk"
        plugin = Plugin(process, home)
        try:
            plugin.call("Init", Home=str(home), Opts=[], UIDMaps=None, GIDMaps=None)
            yield Env(plugin, mnt)
            left = sorted(os.listdir(home / "subvolumes"))
            assert left == [], f"subvolumes left after the walk: {left}"
        finally:
            plugin.client.close()
            process.stop()


def test_random_walk(walk_env: Env, figure: Callable[[str], None]) -> None:
    Walk.env = walk_env
    factory: type[Walk] = Walk
    if SEED is not None:
        factory = seed(int(SEED))(Walk)
    config = settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        derandomize=SEED is None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
    started = time.monotonic()
    try:
        run_state_machine_as_test(factory, settings=config)
    except BaseException:
        print(f"random walk failed; seed: {SEED or 'derandomized (no SNAPDRIVER_WALK_SEED)'}")
        print(walk_env.plugin.process.log_tail(60))
        raise
    counts = walk_env.counts
    steps = counts["checks"] - counts["sequences"]  # one check before the first step
    figure(
        f"RANDOM WALK (btrfs): {counts['sequences']} sequences, {steps} steps, {counts['calls']} "
        f"calls ({counts['ApplyDiff']} ApplyDiff, {counts['whiteouts that removed something']} "
        f"whiteouts and {counts['opaques that emptied a directory']} opaque directories that "
        f"removed something), {counts['kills']} kills, {counts['disk-full errors']} disk-full "
        f"errors, 0 layers lost or changed in {counts['layer checks']} layer checks "
        f"({time.monotonic() - started:.0f} s, seed {SEED or 'derandomized'})"
    )
