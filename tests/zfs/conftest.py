"""Fixtures for the ZFS backend: a root dataset per module on the lab's pool, and drivers on it.

Tests marked ``zfs`` need a real pool named by ``SNAPDRIVER_ZPOOL``; elsewhere they skip loudly
(see :mod:`snapdriver_zfs.testing`).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from snapdriver_zfs.backend import HOME
from snapdriver_zfs.testing import (
    Lab,
    detach_all_below,
    everything_below,
    scratch_root,
    skip_without_zfs,
)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("zfs"):
        skip_without_zfs()


@pytest.fixture(scope="module")
def root_dataset() -> Iterator[str]:
    """``$SNAPDRIVER_ZPOOL/t<random>``, destroyed with everything in it after the module."""
    skip_without_zfs()
    with scratch_root() as root:
        yield root


@pytest.fixture
def lab(root_dataset: str, tmp_path: Path) -> Iterator[Lab]:
    loop = asyncio.new_event_loop()
    yield Lab(root_dataset, tmp_path / "home", tmp_path / "state", loop)
    loop.close()
    # Each test has a Home of its own on the module's root: let the next one claim the root.
    subprocess.run(["zfs", "inherit", HOME, root_dataset], check=False, capture_output=True)
    left = everything_below(root_dataset)
    if left:
        detach_all_below(root_dataset)
        for name in left:
            subprocess.run(["zfs", "destroy", "-R", name], check=False, capture_output=True)
        pytest.fail(f"the test left datasets or snapshots behind: {left}", pytrace=False)
