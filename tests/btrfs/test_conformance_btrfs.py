"""The conformance suite, and btrfs-only behaviour, on a real btrfs loop image."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import btrfsutil
import pytest

from snapdriver.testing import Conformance, Plugin

pytestmark = pytest.mark.btrfs


@pytest.fixture(scope="class")
def snapdriver_home(btrfs_mount: Path) -> Path:
    """Init's Home must be on btrfs: put it on the session's loop image."""
    home = btrfs_mount / f"conformance-{uuid.uuid4().hex[:8]}"
    home.mkdir()
    return home


class TestBtrfsConformance(Conformance):
    backend = "btrfs"
    init_options = ("btrfs.enable_quota=true",)

    def test_remove_deletes_nested_subvolumes(self, plugin: Plugin) -> None:
        """moby's TestBtrfsSubvolDelete: a container made a subvolume inside its layer."""
        plugin.create("nested", rw=True)
        root = plugin.get("nested")
        btrfsutil.create_subvolume(str(root / "subvol"))
        btrfsutil.create_subvolume(str(root / "subvol" / "deeper"))
        plugin.put("nested")
        plugin.remove("nested")
        assert not root.exists()

    def test_layers_are_subvolumes_and_leave_none_behind(self, plugin: Plugin) -> None:
        plugin.create("sv-base")
        plugin.create("sv-child", "sv-base")
        child = plugin.get("sv-child")
        assert btrfsutil.is_subvolume(str(child))
        plugin.put("sv-child")
        plugin.remove("sv-child")
        plugin.remove("sv-base")
        listing = subprocess.run(
            ["btrfs", "subvolume", "list", "-o", str(plugin.home / "subvolumes")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "sv-base" not in listing and "sv-child" not in listing
