"""Shared fixtures: real filesystems on loop devices, and loud skips for tiers that cannot run.

A tier that cannot run here is skipped with its reason in the summary (``-ra``). CI sets
``SNAPDRIVER_REQUIRE_TIERS=btrfs,dockerd`` so that a tier it expects never skips silently: there the
skip becomes a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapdriver.testing.loopfs import can_make_loop_filesystems, loop_filesystem, sweep_stale

REQUIRED = {t for t in os.environ.get("SNAPDRIVER_REQUIRE_TIERS", "").split(",") if t}


def skip_tier(tier: str, reason: str) -> None:
    """Skip (or, where the tier is required, fail) with a reason that names the tier."""
    message = f"{tier.upper()} TIER NOT RUN: {reason}"
    if tier in REQUIRED:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def btrfs_mount() -> Iterator[Path]:
    """A fresh btrfs filesystem on a loop device, released at the end of the session."""
    reason = can_make_loop_filesystems()
    if reason:
        skip_tier("btrfs", reason)
    sweep_stale()  # what an earlier, killed run left behind
    with loop_filesystem("btrfs", size_mb=6144) as mnt:
        yield mnt


@pytest.fixture(scope="session")
def dockerd_available() -> None:
    reason = can_make_loop_filesystems()
    if reason is None and shutil.which("dockerd") is None:
        reason = "dockerd is not installed (apt-get install docker.io)"
    if reason is None and not Path("/bin/busybox").exists():
        reason = "busybox-static is not installed"
    if reason:
        skip_tier("dockerd", reason)
