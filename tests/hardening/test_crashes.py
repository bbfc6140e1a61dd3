"""SIGKILL the plugin at random points inside Create, ApplyDiff, Diff, Changes and Remove.

After each kill the plugin is restarted without a new Init, as dockerd leaves it, and must show:
every layer that was complete still complete and readable, the interrupted layer either whole or
absent (never reported as existing while half made), and no storage without a record.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import sqlite3
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.client import HTTPException
from pathlib import Path

import pytest

from snapdriver.driver import REFS_FLUSH_DELAY
from snapdriver.layers.state import DB_NAME
from snapdriver.protocol.client import PluginCallError, PluginClient
from snapdriver.testing.conformance import Plugin, random_content
from snapdriver.testing.process import PluginProcess

pytestmark = [pytest.mark.btrfs, pytest.mark.slow]
KILLS = int(os.environ.get("SNAPDRIVER_CRASH_KILLS", "60"))
#: How long after sending each call the kill may land: about the call's own duration here.
WINDOWS = {"create": 0.03, "apply": 0.3, "diff": 0.15, "changes": 0.08, "remove": 0.03}


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
    def __init__(self, plugin: Plugin, rng: random.Random) -> None:
        self.plugin = plugin
        self.rng = rng
        self.complete: dict[str, str | None] = {}  # layer -> expected marker (None: no marker)
        self.base = ""
        self.kills = 0
        self.outcomes: dict[str, int] = {}

    def new_layer(self, parent: str = "") -> str:
        layer = uuid.uuid4().hex * 2
        self.plugin.create(layer, parent)
        root = self.plugin.get(layer)
        (root / "marker").write_text(marker(layer))
        self.plugin.put(layer)
        self.complete[layer] = marker(layer)
        return layer

    def exists(self, layer: str) -> bool:
        return bool(self.plugin.call("Exists", ID=layer)["Exists"])

    def check_complete_layers(self) -> None:
        for layer, expected in self.complete.items():
            assert self.exists(layer), f"complete layer {layer} lost after a crash"
            root = self.plugin.get(layer)
            try:
                if expected is not None:
                    assert (root / "marker").read_text() == expected
            finally:
                self.plugin.put(layer)

    def check_no_unrecorded_storage(self) -> None:
        subvolumes = self.plugin.home / "subvolumes"
        for name in os.listdir(subvolumes):
            assert self.exists(name), f"storage for {name} exists but is not a layer"


@pytest.fixture(scope="module")
def harness(btrfs_mount: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    workdir = tmp_path_factory.mktemp("crashes")
    process = PluginProcess("btrfs", workdir)
    process.start()
    plugin = Plugin(process, btrfs_mount / f"crashes-{process.name}")
    plugin.client.call(
        "GraphDriver.Init",
        {"Home": str(plugin.home), "Opts": None, "UIDMaps": None, "GIDMaps": None},
    )
    harness = Harness(plugin, random.Random(int(os.environ.get("SNAPDRIVER_CRASH_SEED", "7"))))
    base = harness.new_layer()
    root = plugin.get(base)
    for i in range(3000):  # enough entries that Changes and Diff take a while
        (root / f"many-{i % 30}").mkdir(exist_ok=True)
        (root / f"many-{i % 30}" / f"f{i}").write_bytes(random_content(64, i))
    plugin.put(base)
    harness.base = base
    try:
        yield harness
        # Children first: every other layer was made on base.
        for layer in [*(layer for layer in harness.complete if layer != base), base]:
            harness.plugin.remove(layer)
    finally:
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
    child = harness.new_layer(base)
    root = plugin.get(child)
    for i in range(50):
        (root / f"many-{i % 30}" / f"f{i}").write_bytes(b"changed")
    plugin.put(child)
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


def test_sigkill_at_random_points(harness: Harness, figure: Callable[[str], None]) -> None:
    plugin = harness.plugin
    for _ in range(KILLS):
        op = harness.rng.choice(sorted(WINDOWS))
        call, target, kind = run_op(harness, op, plugin.process.address)

        def attempt(call: Callable[[], object] = call) -> None:
            # The call may succeed or die with the plugin; only what follows is checked.
            # A Diff cut off by the kill is a truncated chunked body: IncompleteRead.
            with contextlib.suppress(OSError, PluginCallError, ValueError, HTTPException):
                call()

        worker = threading.Thread(target=attempt)
        worker.start()
        time.sleep(harness.rng.uniform(0, WINDOWS[op]))
        plugin.client.close()
        plugin.process.kill()
        worker.join(60)
        assert not worker.is_alive()
        harness.kills += 1
        plugin.process.start()  # no Activate, no Init: as under a running dockerd
        plugin.client = plugin.process.client()
        survived = harness.exists(target)
        harness.outcomes[f"{op}:{'kept' if survived else 'gone'}"] = (
            harness.outcomes.get(f"{op}:{'kept' if survived else 'gone'}", 0) + 1
        )
        if kind == "complete":
            assert survived, f"{op} of a complete layer lost it"
        elif survived:
            # Whole or absent: a layer reported as existing must be readable.
            root = plugin.get(target)
            assert root.is_dir()
            if op == "apply":
                assert len(list(root.rglob("f*"))) >= 200 + 3000, "half-applied layer exists"
            plugin.put(target)
            harness.complete[target] = marker(target) if kind == "removing" else None
        else:
            plugin.remove(target)  # what dockerd does after a failed call; must succeed
        harness.check_complete_layers()
        harness.check_no_unrecorded_storage()
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(harness.outcomes.items()))
    figure(f"CRASHES: {harness.kills} SIGKILLs survived, every complete layer intact ({outcomes})")
    assert harness.kills >= min(KILLS, 50)


def recorded_refs(home: Path, layer: str) -> int:
    """The reference count on disk, read as the restarted plugin will read it."""
    with contextlib.closing(sqlite3.connect(home / DB_NAME)) as db:
        row = db.execute("SELECT refs FROM layers WHERE id = ?", (layer,)).fetchone()
    return int(row[0])


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
