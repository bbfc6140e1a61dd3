"""What a test run left on a btrfs filesystem: subvolumes of layer stores and stale qgroups.

Leaked subvolumes and qgroups are what users of Docker's btrfs driver complain about most, so
every tier that uses btrfs counts them at its end (tests/conftest.py, the load tier).
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def _lines(*cmd: str) -> list[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return [line for line in done.stdout.splitlines() if line.strip()]


def subvolume_paths(mount: Path) -> dict[str, str]:
    """``btrfs subvolume list``: subvolume id -> path from the filesystem's top."""
    return {  # "ID <id> gen <g> top level <t> path <path, which may hold spaces>"
        line.split()[1]: line.split(" path ", 1)[1]
        for line in _lines("btrfs", "subvolume", "list", str(mount))
    }


def quotas_enabled(mount: Path) -> bool:
    done = subprocess.run(["btrfs", "qgroup", "show", str(mount)], capture_output=True, check=False)
    return done.returncode == 0


def wait_for_cleaner(mount: Path) -> None:
    """Let btrfs's cleaner drop deleted subvolumes: recent kernels then remove their qgroups
    themselves, so only qgroups that would stay behind for good are counted as stale."""
    subprocess.run(
        ["btrfs", "subvolume", "sync", str(mount)], capture_output=True, timeout=300, check=False
    )


def stale_qgroups(mount: Path) -> set[str]:
    """Level-0 qgroups whose subvolume is gone (the top level, 0/5, excepted)."""
    if not quotas_enabled(mount):
        return set()
    wait_for_cleaner(mount)
    live = set(subvolume_paths(mount)) | {"5"}
    return {
        line.split()[0]
        for line in _lines("btrfs", "qgroup", "show", "--raw", str(mount))
        if line.startswith("0/") and line.split()[0][2:] not in live
    }


def layer_subvolumes(mount: Path, below: str = "") -> list[str]:
    """Paths of subvolumes in any layer store (``…/subvolumes/`` or ``…/scratch/``)."""
    return sorted(
        path
        for path in subvolume_paths(mount).values()
        if path.startswith(below) and ("/subvolumes/" in path or "/scratch/" in path)
    )
