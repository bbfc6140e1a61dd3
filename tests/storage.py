"""Where a hardening tier keeps its layers: btrfs (a loop image, on the host) or ZFS (the lab).

The tiers are parametrized over both by the ``backend`` and ``space`` fixtures
(tests/conftest.py); a tier that needs a small filesystem opens its own :func:`open_space` with a
size. A small btrfs is a loop image of that size; a small ZFS is a pool of its own on a file, as
full as a host's pool gets (writes fail with ENOSPC), made bigger than asked by what ZFS keeps of
a small pool for itself (:data:`ZFS_SLOP_MB`, :data:`ZFS_OVERHEAD`). The lab's main pool is
shared by the whole ZFS tier and is never filled.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from snapdriver_zfs.backend import HOME
from snapdriver_zfs.testing import everything_below, scratch_pool, scratch_root, zfs

from snapdriver.testing.loopfs import loop_filesystem

#: What ZFS keeps back of a small pool (its slop space, at least this), and the part of the
#: device its metadata takes: a pool file sized by both leaves about the Space's size for layers.
ZFS_SLOP_MB, ZFS_OVERHEAD = 128, 0.07
#: The parametrization every backend-agnostic hardening tier shares.
BACKENDS = [
    pytest.param("btrfs", marks=pytest.mark.btrfs),
    pytest.param("zfs", marks=pytest.mark.zfs),
]


@dataclass
class Storage:
    """One plugin Home on a backend: where its layers live and what it has stored."""

    backend: str
    home: Path
    init_options: list[str]
    #: Every name the backend keeps storage under (layer IDs, or junk that is not one).
    stored: Callable[[], list[str]]


@dataclass
class Space:
    """A btrfs filesystem or a ZFS root dataset, with a directory for Homes."""

    backend: str
    #: The btrfs mount point, or the ZFS root dataset's name.
    place: str
    #: Where Homes go: on the btrfs filesystem; for ZFS a host directory (layers are datasets).
    homes: Path
    size_mb: int | None = None

    @property
    def label(self) -> str:
        """How the figures name it: ``btrfs``, ``btrfs 400 MiB``, ``zfs pool 200 MiB``."""
        if self.size_mb is None:
            return self.backend
        kind = "btrfs" if self.backend == "btrfs" else "zfs pool"
        return f"{kind} {self.size_mb} MiB"

    @property
    def plugin_args(self) -> list[str]:
        """Command-line arguments for a plugin dockerd starts (dockerd sends no options)."""
        return ["--dataset", self.place] if self.backend == "zfs" else []

    def new_home(self, prefix: str) -> Storage:
        """A fresh Home; on ZFS the root is released by the previous Home first (one owner)."""
        if self.backend == "zfs":
            zfs("inherit", HOME, self.place)
        return self.at(self.homes / f"{prefix}-{uuid.uuid4().hex[:8]}")

    def at(self, home: Path) -> Storage:
        """The Storage of a plugin whose Home is ``home`` (dockerd's choice, say)."""
        if self.backend == "btrfs":
            return Storage("btrfs", home, [], lambda: _btrfs_stored(home))
        root = self.place
        return Storage("zfs", home, [f"zfs.fsname={root}"], lambda: _zfs_stored(root))

    def free(self) -> int:
        """Bytes layers may still take: statvfs on btrfs, the root's ``available`` on ZFS."""
        if self.backend == "btrfs":
            st = os.statvfs(self.place)
            return st.f_bavail * st.f_frsize
        subprocess.run(["zpool", "sync", self.place.split("/")[0]], check=False)
        return int(zfs("get", "-H", "-p", "-o", "value", "available", self.place).strip())


def _btrfs_stored(home: Path) -> list[str]:
    # A scratch snapshot (made for a Changes or Diff) is storage too, if a kill left it.
    return [
        name
        for sub in ("subvolumes", "scratch")
        if (home / sub).is_dir()
        for name in os.listdir(home / sub)
    ]


def _zfs_stored(root: str) -> list[str]:
    # <root>/<id> is a layer's dataset; <root>/<parent>@<id> the origin made for layer <id>.
    return sorted({name.rpartition("/")[2].rpartition("@")[2] for name in everything_below(root)})


@contextlib.contextmanager
def open_space(
    backend: str, homes: Path, size_mb: int | None = None, btrfs_mount: Path | None = None
) -> Iterator[Space]:
    """A :class:`Space` of ``size_mb`` (None: the session's btrfs, or an unlimited root)."""
    if backend == "btrfs":
        if size_mb is None:
            assert btrfs_mount is not None, "an unlimited btrfs space is the session's mount"
            yield Space("btrfs", str(btrfs_mount), btrfs_mount, None)
            return
        with loop_filesystem("btrfs", size_mb=size_mb) as mnt:
            yield Space("btrfs", str(mnt), mnt, size_mb)
        return
    if size_mb is None:
        with scratch_root("hard") as root:
            yield Space("zfs", root, homes, None)
        return
    pool_mb = round((size_mb + ZFS_SLOP_MB) * (1 + ZFS_OVERHEAD))
    with scratch_pool(pool_mb, homes) as pool, scratch_root("full", pool) as root:
        yield Space("zfs", root, homes, size_mb)
