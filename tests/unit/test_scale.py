"""What keeps many layers cheap: the counted Status, dockerd's layer store read once, the sweep.

Over the example copydir backend (plain directories) in tmp: these are the sweep's and the
store's rules, not a filesystem's. The figures at 10,000 layers are in bench/scale.md.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

from snapdriver.graphdriver.dockerdb import layerdb_of, referenced_layers
from snapdriver.graphdriver.driver import GraphDriver
from snapdriver.layers.state import LayerStore, Status
from snapdriver.plugins import Backend


def layer_id(n: int) -> str:
    return f"{n:064x}"


def test_count_follows_every_change(tmp_path: Path) -> None:
    store = LayerStore(tmp_path)
    try:
        for n in range(6):
            store.add(layer_id(n), None, None)
        for n in range(4):
            store.set_status(layer_id(n), Status.READY)
        store.set_status(layer_id(3), Status.FAILED)
        store.add(layer_id(0), None, None)  # replaced, as a Create over a crash's leftover
        store.delete(layer_id(5))
        store.delete(layer_id(99))  # unknown: nothing changes
        store.set_status(layer_id(98), Status.READY)  # unknown: nothing changes
        truth = dict(Counter(r.status for r in store.all()))
        assert store.count() == truth == {Status.READY: 2, Status.FAILED: 1, Status.CREATING: 2}
    finally:
        store.close()
    reopened = LayerStore(tmp_path)
    try:
        assert reopened.count() == truth
    finally:
        reopened.close()


def write_layerdb(home: Path, images: list[str], containers: list[str]) -> None:
    layerdb = layerdb_of(home)
    for n, layer in enumerate(images):
        (layerdb / "sha256" / f"{n:064x}").mkdir(parents=True)
        (layerdb / "sha256" / f"{n:064x}" / "cache-id").write_text(layer)
    for layer in containers:
        (layerdb / "mounts" / layer).mkdir(parents=True)
        (layerdb / "mounts" / layer / "mount-id").write_text(layer + "\n")
        (layerdb / "mounts" / layer / "init-id").write_text(layer + "-init")


def test_referenced_layers_reads_every_name(tmp_path: Path) -> None:
    home = tmp_path / "docker" / "sd"
    assert referenced_layers(home) is None, "no layer store: nothing can be judged"
    write_layerdb(home, [layer_id(1), layer_id(2)], [layer_id(3)])
    layerdb = layerdb_of(home)
    (layerdb / "sha256" / "half-written").mkdir()  # dockerd between mkdir and its cache-id
    (layerdb / "sha256" / "stray-file").write_text("x")
    (layerdb / "mounts" / "no-init").mkdir()
    (layerdb / "mounts" / "no-init" / "mount-id").write_text(layer_id(4))
    expected = {layer_id(n) for n in (1, 2, 3, 4)} | {layer_id(3) + "-init"}
    assert referenced_layers(home) == expected


async def swept(tmp_path: Path) -> tuple[list[str], list[str], set[str]]:
    """A layer store naming a chain and a container; orphans beside them; both sweeps."""
    home = tmp_path / "docker" / "sd"
    driver = GraphDriver(Backend.load("copydir"), tmp_path / "state")
    await driver.init(str(home), [])
    try:
        base, image, container = layer_id(1), layer_id(2), layer_id(3)
        await driver.create(base, None)
        await driver.create(image, base)
        await driver.create(container + "-init", image)
        await driver.create(container, container + "-init")
        write_layerdb(home, [base, image], [container])
        # An orphan chain of three on the image, a leaked -init, one held by a Get, and a
        # layer dockerd did not name (its ID is not of dockerd's form).
        chain = [layer_id(10), layer_id(11), layer_id(12)]
        for parent, layer in zip([image, *chain], chain, strict=False):
            await driver.create(layer, parent)
        await driver.create(layer_id(20) + "-init", image)
        await driver.create(layer_id(30), base)
        await driver.get(layer_id(30))
        await driver.create("buildkit-snapshot", base)
        dry = await driver.sweep(0, dry_run=True)
        real = await driver.sweep(0)
        left = {r.id for r in driver.core.records()}
        return dry, real, left
    finally:
        driver.close()


def test_sweep_takes_orphan_chains_whole(tmp_path: Path) -> None:
    dry, real, left = asyncio.run(swept(tmp_path))
    assert sorted(dry) == sorted([layer_id(12), layer_id(20) + "-init"]), "a dry run: leaves"
    assert sorted(real) == sorted([layer_id(n) for n in (10, 11, 12)] + [layer_id(20) + "-init"])
    assert left == {
        layer_id(1),
        layer_id(2),
        layer_id(3),
        layer_id(3) + "-init",
        layer_id(30),
        "buildkit-snapshot",
    }
    assert not os.path.exists(tmp_path / "docker" / "sd" / "dirs" / layer_id(10))
