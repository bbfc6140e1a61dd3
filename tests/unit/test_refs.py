"""Reference counts live in memory and are written behind; instant mounts stay on the loop."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from snapdriver import BackendConfig, CreateRequest, hookimpl
from snapdriver.core import REFS_FLUSH_DELAY
from snapdriver.graphdriver.driver import GraphDriver
from snapdriver.layers.state import LayerStore, Status, read_copy
from snapdriver.plugins import Backend

ID = "b" * 64


def on_disk(home: Path, layer: str) -> tuple[str, int]:
    """What a restarted plugin would read: a connection of its own, not the store's mirror."""
    (record,) = [r for r in read_copy(home) if r.id == layer]
    return (str(record.status), record.refs)


class DirBackend:
    """Plain directories; records which thread ran each mount and unmount."""

    def __init__(self, instant: bool) -> None:
        self.instant = instant
        self.root = Path()
        self.calls: list[tuple[str, bool]] = []  # (hook, ran on the event loop's thread)

    @hookimpl
    def snapdriver_setup(self, config: BackendConfig) -> None:
        self.root = config.home / "dirs"
        self.root.mkdir(parents=True, exist_ok=True)

    @hookimpl
    def snapdriver_create(self, request: CreateRequest) -> None:
        (self.root / request.layer).mkdir()

    @hookimpl
    def snapdriver_remove(self, layer: str) -> None:
        shutil.rmtree(self.root / layer, ignore_errors=True)

    @hookimpl
    def snapdriver_mount(self, layer: str, mount_label: str) -> Path:
        self.calls.append(("mount", threading.current_thread() is threading.main_thread()))
        return self.root / layer

    @hookimpl
    def snapdriver_unmount(self, layer: str) -> None:
        self.calls.append(("unmount", threading.current_thread() is threading.main_thread()))

    @hookimpl
    def snapdriver_layers(self) -> Sequence[str]:
        return sorted(p.name for p in self.root.iterdir())

    @hookimpl
    def snapdriver_instant_mounts(self) -> bool:
        return self.instant


def test_store_writes_refs_at_flush_and_close(tmp_path: Path) -> None:
    store = LayerStore(tmp_path)
    store.add(ID, None, None)
    store.set_status(ID, Status.READY)
    assert on_disk(tmp_path, ID) == ("ready", 0), "a status change is on disk at once"
    store.set_refs(ID, 2)
    record = store.get(ID)
    assert record is not None and record.refs == 2
    assert on_disk(tmp_path, ID) == ("ready", 0)
    store.flush_refs()
    assert on_disk(tmp_path, ID) == ("ready", 2)
    store.set_refs(ID, 1)
    store.close()
    reopened = LayerStore(tmp_path)
    try:
        assert reopened.all()[0].refs == 1 and reopened.count() == {Status.READY: 1}
    finally:
        reopened.close()


def test_refs_of_a_removed_layer_are_not_written(tmp_path: Path) -> None:
    store = LayerStore(tmp_path)
    store.add(ID, None, None)
    store.set_refs(ID, 1)
    store.delete(ID)
    store.set_refs(ID, 3)  # a Put racing a Remove: nothing to count
    store.flush_refs()
    assert store.get(ID) is None and store.all() == []
    store.close()


@pytest.mark.parametrize("instant", [True, False])
def test_get_put_mount_on_the_loop_only_for_instant_mounts(tmp_path: Path, instant: bool) -> None:
    backend = DirBackend(instant)

    async def scenario() -> None:
        driver = GraphDriver(Backend.load(backend), tmp_path / "state")
        await driver.init(str(tmp_path / "home"), [])
        await driver.create(ID, None)
        path = await driver.get(ID)
        assert await driver.get(ID) == path, "a nested Get is bookkeeping only"
        await driver.put(ID)
        await driver.put(ID)
        await driver.remove(ID)
        driver.close()

    asyncio.run(scenario())
    assert backend.calls == [("mount", instant), ("unmount", instant)]


def test_driver_writes_refs_behind_and_at_close(tmp_path: Path) -> None:
    home = tmp_path / "home"

    async def scenario() -> None:
        driver = GraphDriver(Backend.load(DirBackend(True)), tmp_path / "state")
        await driver.init(str(home), [])
        await driver.create(ID, None)
        await driver.get(ID)
        assert on_disk(home, ID) == ("ready", 0), "a Get does not wait for the disk"
        await asyncio.sleep(REFS_FLUSH_DELAY + 0.5)
        assert on_disk(home, ID) == ("ready", 1)
        await driver.put(ID)
        driver.close()
        assert on_disk(home, ID) == ("ready", 0)

    asyncio.run(scenario())
