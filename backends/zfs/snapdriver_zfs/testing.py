"""Helpers for a real pool (tests/zfs, bench/native_changes.py): the lab check, ``zfs`` calls.

Tests marked ``zfs`` need a real pool named by ``SNAPDRIVER_ZPOOL`` (the lab makes one on a
file); anywhere else they skip with a loud reason, or fail where CI requires the ``zfs`` tier
(``SNAPDRIVER_REQUIRE_TIERS=zfs``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from snapdriver.graphdriver.driver import GraphDriver
from snapdriver.hostfs import mounts
from snapdriver.plugins import Backend
from snapdriver_zfs import ZfsBackend

T = TypeVar("T")
POOL_ENV = "SNAPDRIVER_ZPOOL"
LAB_HINT = (
    "run them in the ZFS lab: vagrant/lab run -- 'modprobe zfs && truncate -s 2G /tmp/p.img && "
    "zpool create -f sdtest /tmp/p.img && SNAPDRIVER_ZPOOL=sdtest python3 -m pytest tests/zfs'"
)


def no_zfs_reason() -> str | None:
    """Why the ZFS tests cannot run here, or None if they can."""
    if not os.environ.get(POOL_ENV):
        return f"{POOL_ENV} is not set"
    if shutil.which("zfs") is None:
        return "the zfs command is not installed"
    if not os.path.exists("/dev/zfs"):
        return "/dev/zfs is missing (no ZFS kernel module)"
    if os.geteuid() != 0:
        return "not root"
    return None


def skip_without_zfs() -> None:
    reason = no_zfs_reason()
    if reason is None:
        return
    message = f"NO ZFS HERE, ZFS TIER NOT RUN: {reason}; {LAB_HINT}"
    if "zfs" in os.environ.get("SNAPDRIVER_REQUIRE_TIERS", "").split(","):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def zfs(*args: str) -> str:
    proc = subprocess.run(["zfs", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"zfs {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def everything_below(root: str) -> list[str]:
    """Every dataset and snapshot below ``root`` (``root`` itself excluded)."""
    names = zfs("list", "-H", "-o", "name", "-t", "all", "-r", root).split()
    return sorted(n for n in names if n != root)


def dataset_mounts(root: str) -> list[str]:
    """Where datasets below ``root`` are mounted (by source, not path), outermost first."""
    return [m.target for m in mounts() if m.fstype == "zfs" and m.source.startswith(root + "/")]


def detach_all_below(root: str) -> None:
    for target in reversed(dataset_mounts(root)):
        subprocess.run(["umount", "-l", target], check=False)


#: Root datasets :func:`scratch_root` made in this process, for the tier's leak check.
ROOTS: list[str] = []
#: Pools :func:`scratch_pool` made in this process, for the same check.
POOLS: list[str] = []
#: What each of them still held when its user was done, before it was destroyed.
LEFT: dict[str, list[str]] = {"datasets": [], "snapshots": [], "mounts": []}


def leftovers(root: str) -> dict[str, list[str]]:
    """Datasets, snapshots and mounts below ``root``."""
    names = everything_below(root)
    return {
        "datasets": [n for n in names if "@" not in n],
        "snapshots": [n for n in names if "@" in n],
        "mounts": dataset_mounts(root),
    }


@contextlib.contextmanager
def scratch_root(prefix: str = "t", pool: str | None = None) -> Iterator[str]:
    """``POOL/<prefix><random>``, destroyed with everything in it afterwards.

    What is still below it at the end is recorded in :data:`LEFT` first: its user should have
    removed every layer, so anything there is a leak, even though it is destroyed here.
    """
    root = f"{pool or os.environ[POOL_ENV]}/{prefix}{secrets.token_hex(4)}"
    zfs("create", "-o", "mountpoint=legacy", root)
    ROOTS.append(root)
    try:
        yield root
    finally:
        for kind, found in leftovers(root).items():
            LEFT[kind] += found
        detach_all_below(root)
        subprocess.run(["zfs", "destroy", "-R", root], check=False)


@contextlib.contextmanager
def scratch_pool(size_mb: int, directory: Path) -> Iterator[str]:
    """A pool of its own on a sparse ``size_mb`` file in ``directory``, destroyed afterwards.

    For a test that fills a pool to the last block: writes then fail with ENOSPC, as on a real
    host (a quota gives EDQUOT), and nothing else shares it. ZFS keeps up to half of a small
    pool back (slop space), so measure the room rather than assume it. Compression is off: the
    filling writes compress to nothing otherwise.
    """
    name = f"sdfull{secrets.token_hex(3)}"
    image = directory / f"{name}.img"
    with open(image, "xb") as handle:
        handle.truncate(size_mb << 20)
    options = ("mountpoint=none", "compression=off", "atime=off")
    created = subprocess.run(
        ["zpool", "create", "-f", *(f"-O{opt}" for opt in options), name, str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    if created.returncode != 0:
        image.unlink()
        raise AssertionError(f"zpool create {name} failed: {created.stderr.strip()}")
    POOLS.append(name)
    try:
        yield name
    finally:
        subprocess.run(["zpool", "destroy", "-f", name], check=False)
        image.unlink()


@dataclass
class Lab:
    """One test's Home and state directory on the module's root dataset."""

    root: str
    home: Path
    state: Path
    loop: asyncio.AbstractEventLoop

    def driver(self) -> GraphDriver:
        return GraphDriver(
            Backend.load(ZfsBackend()), self.state, argparse.Namespace(dataset=self.root)
        )

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def session(self, body: Callable[[GraphDriver], Awaitable[T]]) -> T:
        """Init a fresh driver, run ``body``, then remove every layer it left."""

        async def main() -> T:
            driver = self.driver()
            await driver.init(str(self.home), [f"zfs.fsname={self.root}"])
            try:
                return await body(driver)
            finally:
                await remove_all(driver)
                driver.close()

        return self.run(main())


async def remove_all(driver: GraphDriver) -> None:
    """Release and remove every recorded layer, children first."""
    records = driver.core.records()
    for record in records:
        for _ in range(record.refs):
            await driver.put(record.id)
    for record in reversed(records):  # created later means child (or unrelated)
        await driver.remove(record.id)
    await driver.cleanup()
