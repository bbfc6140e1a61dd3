"""SIGKILL the plugin at random points inside Create, ApplyDiff, Diff, Changes and Remove.

After each kill the plugin is restarted without a new Init, as dockerd leaves it, and must show:
every layer that was complete still stored (and recorded and readable, for the layers the call
touched), the interrupted layer either whole or absent (never reported as existing while half
made), and no storage without a record. At the end every layer must read back whole, and after
removing them all nothing of the backend's may be left. The same scenario runs on btrfs (a loop
image, on the host) and on ZFS (a pool, in the lab).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import tarfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from http.client import HTTPException
from pathlib import Path

import pytest

from snapdriver.core import REFS_FLUSH_DELAY
from snapdriver.graphdriver.client import PluginCallError, PluginClient
from snapdriver.layers.state import read_copy
from snapdriver.testing.conformance import Plugin, random_content
from snapdriver.testing.process import ForkedPluginProcess
from tests.storage import Space, Storage

pytestmark = pytest.mark.slow
KILLS = int(os.environ.get("SNAPDRIVER_CRASH_KILLS", "60"))
OPS = ("apply", "changes", "create", "diff", "remove")


@pytest.fixture(scope="module")
def storage(space: Space) -> Storage:
    return space.new_home("crashes")


def layer_tar(files: int, size: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(files):
            info = tarfile.TarInfo(f"d{i % 20}/f{i}")
            info.size = size
            tar.addfile(info, io.BytesIO(random_content(size, seed + i)))
    return buffer.getvalue()


def slowly(data: bytes, pieces: int = 40) -> Iterator[bytes]:
    """The body in pieces with pauses, so a kill can land in the middle of the stream."""
    step = max(1, len(data) // pieces)
    for start in range(0, len(data), step):
        time.sleep(0.003)
        yield data[start : start + step]


def marker(layer: str) -> str:
    return hashlib.sha256(layer.encode()).hexdigest()


class Harness:
    def __init__(self, plugin: Plugin, storage: Storage, rng: random.Random) -> None:
        self.plugin = plugin
        self.storage = storage
        self.rng = rng
        self.complete: dict[str, str | None] = {}  # layer -> expected marker (None: no marker)
        self.base = ""
        #: How long after sending each call the kill may land: the call's own duration here.
        self.windows: dict[str, float] = {}
        self.kills = 0
        self.outcomes: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)  # per phase, for the figure

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def new_layer(self, parent: str = "", changed: int = 0) -> str:
        """A complete layer with its marker and ``changed`` of base's files rewritten."""
        layer = uuid.uuid4().hex * 2
        self.plugin.create(layer, parent)
        root = self.plugin.get(layer)
        (root / "marker").write_text(marker(layer))
        for i in range(changed):
            (root / f"many-{i % 30}" / f"f{i}").write_bytes(b"changed")
        self.plugin.put(layer)
        self.complete[layer] = marker(layer)
        return layer

    def exists(self, layer: str) -> bool:
        return bool(self.plugin.call("Exists", ID=layer)["Exists"])

    def is_layer(self, name: str) -> bool:
        try:
            return self.exists(name)
        except PluginCallError:  # not even a valid layer ID
            return False

    def read(self, layer: str) -> None:
        """The layer is recorded, mounts, and holds its marker."""
        assert self.exists(layer), f"complete layer {layer} lost after a crash"
        root = self.plugin.get(layer)
        try:
            expected = self.complete[layer]
            if expected is not None:
                assert (root / "marker").read_text() == expected
        finally:
            self.plugin.put(layer)

    def check_after_kill(self, touched: Iterable[str]) -> None:
        """Every complete layer still stored, the ``touched`` ones readable, no unrecorded storage.

        Reading every layer after every kill would cost minutes in the lab (a mount each): a crash
        can only damage what its call touched, a lost record does not come back, and the test
        reads every layer at the end.
        """
        stored = set(self.storage.stored())
        lost = [layer for layer in self.complete if layer not in stored]
        assert lost == [], f"complete layers without storage after a crash: {lost}"
        unrecorded = [name for name in stored - self.complete.keys() if not self.is_layer(name)]
        assert unrecorded == [], f"storage that is not a layer: {unrecorded}"
        for layer in touched:
            self.read(layer)

    def remove_all(self) -> None:
        """Children first: every other layer was made on base."""
        for layer in [*(layer for layer in self.complete if layer != self.base), self.base]:
            self.plugin.remove(layer)
        self.complete.clear()


def make_base(harness: Harness) -> str:
    base = harness.new_layer()
    root = harness.plugin.get(base)
    for i in range(3000):  # enough entries that Changes and Diff take a while
        (root / f"many-{i % 30}").mkdir(exist_ok=True)
        (root / f"many-{i % 30}" / f"f{i}").write_bytes(random_content(64, i))
    harness.plugin.put(base)
    return base


def calibrate(harness: Harness) -> dict[str, float]:
    """Each operation's duration, run once to the end: calls are ~30x slower in the lab."""
    windows = {}
    for op in OPS:
        call, target, kind = run_op(harness, op, harness.plugin.process.address)
        start = time.perf_counter()
        call()
        windows[op] = time.perf_counter() - start
        if kind == "new":
            harness.complete[target] = None
    return windows


@pytest.fixture(scope="module")
def harness(storage: Storage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    # Forked, not exec'd: each restart would cost ~17 s of imports in the lab's emulated guest.
    process = ForkedPluginProcess(storage.backend, tmp_path_factory.mktemp("crashes"))
    process.start()
    plugin = Plugin(process, storage.home)
    init = {"Home": str(storage.home), "Opts": storage.init_options or None, "UIDMaps": None}
    plugin.client.call("GraphDriver.Init", {**init, "GIDMaps": None})
    seed = int(os.environ.get("SNAPDRIVER_CRASH_SEED", "7"))
    harness = Harness(plugin, storage, random.Random(seed))
    try:
        harness.base = make_base(harness)
        harness.windows = calibrate(harness)
        yield harness
    finally:
        if harness.complete:  # the test stopped half way: leave no layers behind all the same
            with contextlib.suppress(OSError, PluginCallError):
                harness.remove_all()
        harness.plugin.client.close()
        process.stop()


def run_op(harness: Harness, op: str, address: str) -> tuple[Callable[[], object], str, str]:
    """Prepare one operation; returns (the call, its target layer, what the target was)."""
    plugin, base = harness.plugin, harness.base
    if op == "create":
        target = uuid.uuid4().hex * 2
        return (
            (
                lambda: PluginClient(address).call(
                    "GraphDriver.Create", {"ID": target, "Parent": base}
                )
            ),
            target,
            "new",
        )
    if op == "apply":
        target = uuid.uuid4().hex * 2
        plugin.create(target, base)
        data = layer_tar(200, 20_000, harness.rng.randrange(1 << 20))
        return (lambda: PluginClient(address).apply_diff(target, base, slowly(data))), target, "new"
    child = harness.new_layer(base, changed=50)
    if op == "diff":
        return (lambda: PluginClient(address).diff(child, base)), child, "complete"
    if op == "changes":
        return (
            (
                lambda: PluginClient(address).call(
                    "GraphDriver.Changes", {"ID": child, "Parent": base}
                )
            ),
            child,
            "complete",
        )
    harness.complete.pop(child)
    return (
        (lambda: PluginClient(address).call("GraphDriver.Remove", {"ID": child})),
        child,
        "removing",
    )


def kill_during(harness: Harness, op: str) -> tuple[str, str, bool]:
    """Send ``op``, SIGKILL the plugin while it runs, restart it; (target, kind, survived)."""
    plugin = harness.plugin
    with harness.phase("prepare"):
        call, target, kind = run_op(harness, op, plugin.process.address)

    def attempt() -> None:
        # The call may succeed or die with the plugin; only what follows is checked.
        # A Diff cut off by the kill is a truncated chunked body: IncompleteRead.
        with contextlib.suppress(OSError, PluginCallError, ValueError, HTTPException):
            call()

    worker = threading.Thread(target=attempt)
    worker.start()
    time.sleep(harness.rng.uniform(0, harness.windows[op]))
    plugin.client.close()
    plugin.process.kill()
    worker.join(60)
    assert not worker.is_alive()
    harness.kills += 1
    with harness.phase("restart"):
        plugin.process.start()  # no Activate, no Init: as under a running dockerd
    plugin.client = plugin.process.client()
    survived = harness.exists(target)
    harness.outcomes[f"{op}:{'kept' if survived else 'gone'}"] += 1
    return target, kind, survived


def check_target(harness: Harness, op: str, target: str, kind: str, survived: bool) -> None:
    """Whole or absent: a layer reported as existing must be readable, and complete."""
    plugin = harness.plugin
    if kind == "complete":
        assert survived, f"{op} of a complete layer lost it"
    elif survived:
        root = plugin.get(target)
        assert root.is_dir()
        if op == "apply":
            assert len(list(root.rglob("f*"))) >= 200 + 3000, "half-applied layer exists"
        plugin.put(target)
        harness.complete[target] = marker(target) if kind == "removing" else None
    else:
        plugin.remove(target)  # what dockerd does after a failed call; must succeed


def test_sigkill_at_random_points(harness: Harness, figure: Callable[[str], None]) -> None:
    for _ in range(KILLS):
        op = harness.rng.choice(OPS)
        target, kind, survived = kill_during(harness, op)
        with harness.phase("check"):
            check_target(harness, op, target, kind, survived)
            harness.check_after_kill({harness.base, target} & harness.complete.keys())
    for layer in harness.complete:
        harness.read(layer)
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(harness.outcomes.items()))
    windows = ", ".join(f"{op} {s:.2f}" for op, s in harness.windows.items())
    spent = ", ".join(f"{k} {s / harness.kills:.1f}" for k, s in harness.seconds.items())
    figure(
        f"CRASHES ({harness.storage.backend}): {harness.kills} SIGKILLs survived, every complete "
        f"layer intact ({outcomes}; kill windows in s: {windows}; s per kill: {spent})"
    )
    assert harness.kills >= min(KILLS, 50)


def recorded_refs(home: Path, layer: str) -> int:
    """The reference count on disk, read as the restarted plugin will read it."""
    (record,) = [r for r in read_copy(home) if r.id == layer]
    return record.refs


def test_held_references_survive_a_sigkill(harness: Harness) -> None:
    """Reference counts are written behind: one held longer than the delay is on disk."""
    plugin = harness.plugin
    layer = harness.new_layer(harness.base)
    root = plugin.get(layer)
    assert plugin.get(layer) == root
    time.sleep(REFS_FLUSH_DELAY + 1)
    plugin.client.close()
    plugin.process.kill()
    plugin.process.start()  # no Activate, no Init
    plugin.client = plugin.process.client()
    assert recorded_refs(plugin.home, layer) == 2
    assert plugin.get(layer) == root
    for _ in range(3):
        plugin.put(layer)
    time.sleep(REFS_FLUSH_DELAY + 1)
    assert recorded_refs(plugin.home, layer) == 0


def test_nothing_left_after_removing_every_layer(harness: Harness) -> None:
    """Last in the module: every layer the tests above left, removed; then no storage at all."""
    harness.remove_all()
    left = harness.storage.stored()
    assert left == [], f"left after every layer was removed: {left}"
