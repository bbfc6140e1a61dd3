"""A full pool on a real pool: ZFS's own errors are read as "no space", and Reclaim waits.

Runs only in the lab (``SNAPDRIVER_ZPOOL``); about half a guest minute. The full-disk scenarios
themselves are tests/hardening/test_full_disk.py and tests/dockerd/test_dockerd_full_disk.py.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from snapdriver_zfs import ZfsBackend
from snapdriver_zfs.backend import _error
from snapdriver_zfs.testing import scratch_pool, scratch_root
from snapdriver_zfs.zfs import Zfs, ZfsError, load_libzfs_core

from snapdriver.errors import NoSpaceError
from snapdriver.hookspec import BackendConfig, CreateRequest

pytestmark = pytest.mark.zfs
MiB = 1 << 20
#: More than the lab's 2 GiB pool: reserving it is refused with ENOSPC ("out of space").
TOO_BIG = 1 << 40


@pytest.mark.parametrize("way", ["cli", "libzfs_core"])
def test_a_reservation_bigger_than_the_pool_is_no_space(root_dataset: str, way: str) -> None:
    """The real words of the CLI and the real errno of pyzfs both become NoSpaceError."""
    handle = Zfs()
    if way == "libzfs_core":
        handle.lzc, state = load_libzfs_core(root_dataset)
        if handle.lzc is None:
            pytest.skip(f"libzfs_core {state}")
    dataset = f"{root_dataset}/reserved-{way}"
    with pytest.raises(ZfsError) as caught:
        handle.create(dataset, {"mountpoint": "legacy", "refreservation": TOO_BIG})
    assert caught.value.no_space == errno.ENOSPC, str(caught.value)
    mapped = _error(caught.value, f"cannot create layer dataset {dataset}")
    assert isinstance(mapped, NoSpaceError)
    assert str(mapped).startswith("no space left on device: cannot create layer dataset")


def test_reclaim_returns_once_the_pool_has_freed_a_removed_layer(
    root_dataset: str, tmp_path: Path, figure: Callable[[str], None]
) -> None:
    backend = ZfsBackend()
    backend.snapdriver_setup(BackendConfig(tmp_path / "home", {"zfs.fsname": root_dataset}))
    try:
        backend.snapdriver_create(CreateRequest("fat", None))
        target = backend.snapdriver_mount("fat", "")
        with open(target / "blob", "wb") as handle:
            for _ in range(64):
                handle.write(os.urandom(MiB))
        backend.snapdriver_unmount("fat")
        backend.snapdriver_remove("fat")
        pool = root_dataset.split("/", maxsplit=1)[0]
        started = time.monotonic()
        backend.snapdriver_reclaim(timeout=60)
        took = time.monotonic() - started
        assert Zfs().pool_freeing(pool) == 0
    finally:
        Zfs().run("inherit", "snapdriver:home", root_dataset)
    figure(f"FULL DISK (zfs): Reclaim after removing a 64 MiB layer returned in {took:.2f} s")


def test_free_space_is_the_pools_room_for_layers(tmp_path: Path) -> None:
    """What the core decides a Remove's wait by: the root's ``available``, which a full pool
    (not only a quota) brings down, and a write into a layer lowers."""
    with scratch_pool(256, tmp_path) as pool, scratch_root("space", pool) as root:
        backend = ZfsBackend()
        backend.snapdriver_setup(BackendConfig(tmp_path / "home", {"zfs.fsname": root}))
        empty, total = backend.snapdriver_free_space()
        assert 0 < empty <= total < 256 * MiB
        backend.snapdriver_create(CreateRequest("fat", None))
        target = backend.snapdriver_mount("fat", "")
        with open(target / "blob", "wb") as handle:
            for _ in range(32):
                handle.write(os.urandom(MiB))
        backend.snapdriver_unmount("fat")  # the write reaches the pool
        free, _ = backend.snapdriver_free_space()
        assert empty - free >= 30 * MiB, (empty, free)
        backend.snapdriver_remove("fat")
        backend.snapdriver_reclaim(timeout=60)
        assert backend.snapdriver_free_space()[0] > empty - 2 * MiB
