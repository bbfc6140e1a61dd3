"""Commit (freeze) and Usage through the core on btrfs: read-only subvolumes, native changes."""

from __future__ import annotations

import asyncio
import importlib
import uuid
from collections.abc import Callable
from pathlib import Path

import btrfsutil
import pytest

from snapdriver import BackendConfig
from snapdriver.core import Core, Usage
from snapdriver.layers.changes import Change, changes_size, walk_changes
from snapdriver.plugins import Backend
from snapdriver.testing.conformance import add_many_files

pytestmark = pytest.mark.btrfs
BASE, CHILD, GRANDCHILD = "1" * 64, "2" * 64, "3" * 64


def test_commit_makes_a_read_only_subvolume_that_children_snapshot(btrfs_mount: Path) -> None:
    home = btrfs_mount / f"commit-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        core = Core(Backend.load("btrfs"), "test")
        await core.open(BackendConfig(home))
        try:
            await core.create(BASE, None)
            base_dir = await core.get(BASE)
            add_many_files(base_dir, 300, seed=1)
            await core.put(BASE)
            await core.commit(BASE)
            assert btrfsutil.get_subvolume_read_only(str(base_dir))
            with pytest.raises(OSError, match="Read-only"):
                (base_dir / "new").write_bytes(b"no")

            await core.create(CHILD, BASE)
            child_dir = await core.get(CHILD)
            (child_dir / "directory-0" / "file-1").write_bytes(b"changed")
            (child_dir / "added").write_bytes(b"a" * 100)
            await core.put(CHILD)
            await core.commit(CHILD)
            expected = walk_changes(child_dir, base_dir)
            usage = await core.usage(CHILD)
            assert usage == Usage(changes_size(child_dir, expected), len(expected))
            assert usage.size == len(b"changed") + 100

            # A frozen layer with a subvolume inside (made before the commit) still goes.
            await core.create(GRANDCHILD, CHILD)
            grandchild = await core.get(GRANDCHILD)
            btrfsutil.create_subvolume(str(grandchild / "nested"))
            await core.put(GRANDCHILD)
            await core.commit(GRANDCHILD)
            for layer in (GRANDCHILD, CHILD, BASE):
                await core.remove(layer)
            assert core.records() == []
            assert list((home / "subvolumes").iterdir()) == []
        finally:
            core.close()

    asyncio.run(main())


def test_small_layers_are_walked_large_ones_read_from_a_send_stream(
    btrfs_mount: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes of small trees skip the send stream's two snapshots (bench/buildkit.md); past
    ``SMALL_WALK`` entries the send stream answers, and both give the walk's list."""
    btrfs_backend = importlib.import_module("snapdriver_btrfs.backend")
    sends: list[Path] = []
    native: Callable[[Path, Path], list[Change]] = btrfs_backend.native_changes

    def counted(layer: Path, parent: Path) -> list[Change]:
        sends.append(layer)
        return native(layer, parent)

    monkeypatch.setattr(btrfs_backend, "native_changes", counted)
    home = btrfs_mount / f"small-walk-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        core = Core(Backend.load("btrfs"), "test")
        await core.open(BackendConfig(home))
        try:
            await core.create(BASE, None)
            add_many_files(await core.get(BASE), 300, seed=2)
            await core.put(BASE)
            await core.create(CHILD, BASE)
            child_dir = await core.get(CHILD)
            (child_dir / "directory-100" / "file-150").write_bytes(b"changed")
            (child_dir / "added").write_bytes(b"new")
            await core.put(CHILD)
            expected = walk_changes(child_dir, home / "subvolumes" / BASE)
            assert await core.changes(CHILD, BASE) == expected
            assert sends == []  # 2 x 304 entries: walked
            monkeypatch.setattr(btrfs_backend, "SMALL_WALK", 100)
            assert await core.changes(CHILD, BASE) == expected
            assert len(sends) == 1
            assert list((home / "scratch").iterdir()) == []  # the send's snapshots are gone
            await core.remove(CHILD)
            await core.remove(BASE)
        finally:
            core.close()

    asyncio.run(main())
