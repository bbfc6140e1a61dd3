"""Shared fixtures: real filesystems on loop devices, and loud skips for tiers that cannot run.

A tier that cannot run here is skipped with its reason in the summary (``-ra``). CI sets
``SNAPDRIVER_REQUIRE_TIERS=btrfs,dockerd,containerd`` so that a tier it expects never skips
silently: there the skip becomes a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from snapdriver_btrfs.testing import layer_subvolumes, stale_qgroups
from snapdriver_zfs import testing as zfs_testing

from snapdriver.hostfs import mounts_below
from snapdriver.testing.loopfs import (
    MADE,
    can_make_loop_filesystems,
    loop_filesystem,
    sweep_stale,
)
from snapdriver.testing.process import SOCKETS
from tests.storage import BACKENDS, Space, open_space

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
        LEAKS.update(btrfs_leftovers(mnt))
    LEAKS.update(host_leftovers())


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """``btrfs`` (host) or ``zfs`` (lab): the parametrization the hardening tiers share."""
    if request.param == "zfs":
        zfs_testing.skip_without_zfs()
    return str(request.param)


@pytest.fixture(scope="module")
def space(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Space]:
    """The session's btrfs filesystem, or a fresh ZFS root dataset for the module."""
    mount = request.getfixturevalue("btrfs_mount") if backend == "btrfs" else None
    with open_space(backend, tmp_path_factory.mktemp(f"{backend}-homes"), None, mount) as found:
        yield found


#: What the session left behind, filled in at the end and printed in the summary.
LEAKS: dict[str, list[str]] = {}


def _lines(*cmd: str) -> list[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return [line for line in done.stdout.splitlines() if line.strip()]


def btrfs_leftovers(mnt: Path) -> dict[str, list[str]]:
    """Subvolumes of any layer store, and qgroups whose subvolume is gone, on the test fs."""
    stale = sorted(stale_qgroups(mnt))  # waits for the cleaner first
    return {"subvolumes": layer_subvolumes(mnt), "stale qgroups": stale}


def host_leftovers() -> dict[str, list[str]]:
    """Mounts and loop devices of this test run that outlived it."""
    ours = [str(workdir) for workdir in MADE]
    mounts = [m.target for m in mounts_below(*MADE)]
    loops = [line for line in _lines("losetup", "-a") if any(w in line for w in ours)]
    sockets = [str(path) for path in SOCKETS if os.path.lexists(path)]
    return {"mounts": mounts, "loop devices": loops, "plugin sockets": sockets}


#: One line per tier that measured something (kills survived, requests tried, ...).
FIGURES: list[str] = []


@pytest.fixture
def figure() -> Callable[[str], None]:
    """Report a tier's figure: it is printed in the run's summary, where CI output shows it."""
    return FIGURES.append


def zfs_leaks() -> dict[str, list[str]]:
    """What the ZFS tests left in their root datasets (empty if none ran), and surviving roots."""
    if not zfs_testing.ROOTS:
        return {}
    left = {kind: list(found) for kind, found in zfs_testing.LEFT.items()}
    for root in zfs_testing.ROOTS:  # each was destroyed when its tests were done; unless busy
        done = subprocess.run(["zfs", "list", "-H", root], capture_output=True, check=False)
        if done.returncode == 0:
            left["datasets"].append(root)
    for pool in zfs_testing.POOLS:
        done = subprocess.run(["zpool", "list", "-H", pool], capture_output=True, check=False)
        left.setdefault("pools", []).extend([pool] if done.returncode == 0 else [])
    return left


def _write_leaks(
    reporter: pytest.TerminalReporter, title: str, leaks: dict[str, list[str]], sep: str = ", "
) -> None:
    figure = sep.join(f"{kind}={len(found)}" for kind, found in leaks.items())
    reporter.write_line(f"{title}: {figure}")
    for kind, found in leaks.items():
        for item in found[:20]:
            reporter.write_line(f"  leftover {kind}: {item}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in FIGURES:
        terminalreporter.write_line(line)
    if LEAKS:
        _write_leaks(terminalreporter, "LEAKS after the btrfs and dockerd tiers", LEAKS)
    zfs = zfs_leaks()
    if zfs:
        _write_leaks(terminalreporter, "LEAKS (zfs)", zfs, sep=" ")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaked = any(LEAKS.values()) or any(zfs_leaks().values())
    if leaked and session.exitstatus == 0:
        session.exitstatus = 1  # a leak fails the run even when every test passed


@pytest.fixture(scope="session")
def dockerd_available() -> None:
    reason = can_make_loop_filesystems()
    if reason is None and shutil.which("dockerd") is None:
        reason = "dockerd is not installed (apt-get install docker.io)"
    if reason is None and not Path("/bin/busybox").exists():
        reason = "busybox-static is not installed"
    if reason:
        skip_tier("dockerd", reason)


def require_dockerd(request: pytest.FixtureRequest, backend: str) -> None:
    """On the host the dockerd tier's own check; the lab guest has no loop devices to check."""
    if backend == "btrfs":
        request.getfixturevalue("dockerd_available")
    elif shutil.which("dockerd") is None or not Path("/bin/busybox").exists():
        skip_tier("dockerd", "dockerd or busybox-static is missing in this machine")


@pytest.fixture(scope="session")
def containerd_available() -> None:
    """The containerd tier needs root and loop btrfs, containerd, ctr, runc and Go with
    containerd's sources (for its conformance suite)."""
    from snapdriver.testing import gosuite

    reason = can_make_loop_filesystems()
    for tool, package in (("containerd", "containerd"), ("ctr", "containerd"), ("runc", "runc")):
        if reason is None and shutil.which(tool) is None:
            reason = f"{tool} is not installed (apt-get install {package})"
    if reason is None and not Path("/bin/busybox").exists():
        reason = "busybox-static is not installed"
    reason = reason or gosuite.unavailable()
    if reason:
        skip_tier("containerd", reason)
