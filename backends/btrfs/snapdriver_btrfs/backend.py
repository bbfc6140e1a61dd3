"""The btrfs backend: each layer a subvolume, each child a writable snapshot of its parent.

Layout under Docker's Home: ``subvolumes/<id>`` holds the layers (the path Get returns, so no
mounts are made and nothing can be "busy"); ``scratch/`` holds the short-lived read-only snapshots
that ``btrfs send`` needs to diff a layer that is still writable. Changes come from a no-data send
stream, judged path by path with Docker's rules (:mod:`snapdriver_btrfs.native`); the tree walk
answers instead if the stream cannot be read.

Quotas are opt-in: a ``size`` storage option is enforced with a qgroup limit on the subvolume's
referenced bytes, when quotas are already enabled on the filesystem or the daemon was started with
``--storage-opt btrfs.enable_quota=true``. Quotas are never switched off again.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import btrfsutil

from snapdriver.errors import (
    BackendError,
    ConfigError,
    QuotaNotSupportedError,
    SnapdriverError,
    storage_error,
)
from snapdriver.hookspec import BackendConfig, CreateRequest, hookimpl
from snapdriver.hostfs import mount_of
from snapdriver.layers.changes import Change, WalkTooLarge, walk_changes
from snapdriver_btrfs import ioctl
from snapdriver_btrfs.native import SendStreamError, native_changes

log = logging.getLogger(__name__)
OPTION_PREFIX = "btrfs."
_TRUE = ("1", "true", "yes", "on")
_NOT_SET_UP = "the btrfs backend is not set up (no Init yet)"
#: Entries (both trees) up to which Changes walks the trees rather than reading a send stream:
#: the stream's two snapshots and deletions cost ~20-50 ms at any size (bench/buildkit.md).
SMALL_WALK = 1000


class BtrfsBackend:
    """A pluggy plugin object; registered under the name ``btrfs``."""

    def __init__(self) -> None:
        self._home: Path | None = None
        # Joined once: path() is on every Get, and a pathlib join costs as much as the stat.
        self._subvolumes: Path | None = None
        self._enable_quota = False
        self._stale_qgroups: set[int] = set()

    @property
    def home(self) -> Path:
        if self._home is None:
            raise BackendError(_NOT_SET_UP)
        return self._home

    @property
    def subvolumes(self) -> Path:
        if self._subvolumes is None:
            raise BackendError(_NOT_SET_UP)
        return self._subvolumes

    @property
    def scratch(self) -> Path:
        return self.home / "scratch"

    def path(self, layer: str) -> Path:
        return self.subvolumes / layer

    # -- set-up --------------------------------------------------------------------------------

    @hookimpl
    def snapdriver_setup(self, config: BackendConfig) -> None:
        mount = mount_of(config.home)
        if mount.fstype != "btrfs":
            raise ConfigError(
                f"{config.home} is not on btrfs (it is on {mount.fstype} mounted at "
                f"{mount.target}): put dockerd's --data-root on a btrfs filesystem"
            )
        self._enable_quota = False
        for key, value in config.options.items():
            if key == OPTION_PREFIX + "enable_quota":
                self._enable_quota = value.lower() in _TRUE
            elif key.startswith(OPTION_PREFIX):
                raise ConfigError(f"unknown storage option {key!r} (btrfs knows enable_quota)")
        config.home.mkdir(mode=0o710, parents=True, exist_ok=True)
        for directory in (config.home / "subvolumes", config.home / "scratch"):
            directory.mkdir(mode=0o700, exist_ok=True)
        self._home, self._subvolumes = config.home, config.home / "subvolumes"
        for leftover in self.scratch.iterdir():
            self._delete(leftover)
        pending = config.home / "qgroups.pending"
        if pending.exists():
            self._stale_qgroups.update(int(x) for x in pending.read_text().split())
            self._reap_qgroups(wait=0)

    @hookimpl
    def snapdriver_status(self) -> list[tuple[str, str]]:
        if self._home is None:
            return []
        quota = "enabled" if ioctl.quota_enabled(self.home) else "disabled"
        return [("Filesystem", "btrfs"), ("Quota", quota), ("Native diff", "btrfs send")]

    # -- layers --------------------------------------------------------------------------------

    @hookimpl
    def snapdriver_create(self, request: CreateRequest) -> None:
        target = self.path(request.layer)
        if os.path.lexists(target):
            self._delete(target)  # a leftover of a crash: Create replaces it
        try:
            if request.parent is None:
                btrfsutil.create_subvolume(str(target))
            else:
                btrfsutil.create_snapshot(str(self.path(request.parent)), str(target))
        except btrfsutil.BtrfsUtilError as err:
            raise _error(err, f"cannot create subvolume {target}") from err
        if request.quota is not None:
            self._limit(target, request.quota)

    def _limit(self, target: Path, size: int) -> None:
        if not ioctl.quota_enabled(self.home):
            if not self._enable_quota:
                raise QuotaNotSupportedError(
                    f"a size limit needs btrfs quotas on {self.home}: run `btrfs quota enable "
                    f"{mount_of(self.home).target}` or start dockerd with "
                    "--storage-opt btrfs.enable_quota=true"
                )
            ioctl.enable_quota(self.home)
        ioctl.limit_referenced(target, size)

    def _delete(self, path: Path) -> None:
        deleted = _delete_tree(path)
        if deleted and ioctl.quota_enabled(self.home):
            self._stale_qgroups.update(deleted)
            self._reap_qgroups(wait=0)

    def _reap_qgroups(self, wait: float) -> None:
        """Destroy the qgroups of deleted subvolumes once btrfs's cleaner has dropped them.

        The kernel refuses (EBUSY) until then, so each removal retries the earlier ones and
        Cleanup waits up to ``wait`` seconds; what is still pending is kept in Home for the
        next start, so qgroups never pile up as ``<stale>``.
        """
        deadline = time.monotonic() + wait
        while self._stale_qgroups:
            for subvol_id in sorted(self._stale_qgroups):
                if ioctl.forget_qgroup(self.home, subvol_id):
                    self._stale_qgroups.discard(subvol_id)
            if not self._stale_qgroups or time.monotonic() >= deadline:
                break
            btrfsutil.sync(str(self.home))  # commit, so the cleaner can drop what was deleted
            time.sleep(0.2)
        pending = self.home / "qgroups.pending"
        if self._stale_qgroups:
            pending.write_text("".join(f"{i}\n" for i in sorted(self._stale_qgroups)))
        else:
            pending.unlink(missing_ok=True)

    @hookimpl
    def snapdriver_cleanup(self) -> None:
        if self._home is not None:
            self._reap_qgroups(wait=10)

    @hookimpl
    def snapdriver_reclaim(self, timeout: float) -> None:
        """Wait for btrfs's cleaner to drop the deleted subvolumes, then commit what it freed.

        A deleted subvolume's extents are freed by a kernel thread after the transaction that
        deleted it commits; until the next commit after that, writes still find no space.
        """
        home = str(self.home)
        deadline = time.monotonic() + timeout
        try:
            btrfsutil.sync(home)
            while btrfsutil.deleted_subvolumes(home) and time.monotonic() < deadline:
                time.sleep(0.02)
            btrfsutil.sync(home)
        except btrfsutil.BtrfsUtilError as err:
            log.warning("cannot wait for deleted subvolumes' space: %s", err)

    @hookimpl
    def snapdriver_remove(self, layer: str) -> None:
        target = self.path(layer)
        if os.path.lexists(target):
            self._delete(target)

    @hookimpl
    def snapdriver_commit(self, layer: str) -> None:
        """Frozen natively: a read-only subvolume, which ``btrfs send`` reads as it is (no
        scratch snapshot for Changes or Usage); snapshots of it are writable as usual."""
        target = str(self.path(layer))
        try:
            if not btrfsutil.get_subvolume_read_only(target):
                btrfsutil.set_subvolume_read_only(target, True)
        except btrfsutil.BtrfsUtilError as err:
            raise _error(err, f"cannot make subvolume {target} read-only") from err

    @hookimpl
    def snapdriver_mount(self, layer: str, mount_label: str) -> Path:
        target = self.path(layer)
        if not target.is_dir():
            raise BackendError(f"subvolume {target} is missing")
        return target

    @hookimpl
    def snapdriver_unmount(self, layer: str) -> None:
        """Nothing to release: a subvolume is a plain directory of the mounted filesystem."""

    @hookimpl
    def snapdriver_instant_mounts(self) -> bool:
        """Mount is a stat of the subvolume and unmount nothing: no worker thread needed."""
        return True

    @hookimpl
    def snapdriver_layers(self) -> Sequence[str]:
        return sorted(p.name for p in self.subvolumes.iterdir())

    @hookimpl
    def snapdriver_metadata(self, layer: str) -> dict[str, str]:
        return {"Subvolume": str(self.path(layer))}

    # -- native diff ---------------------------------------------------------------------------

    @hookimpl
    def snapdriver_changes(
        self, layer: str, layer_dir: Path, parent: str, parent_dir: Path
    ) -> Sequence[Change] | None:
        with suppress(WalkTooLarge):
            # Small trees (a build's layers over a small base): the walk is cheaper than the
            # two read-only snapshots and their deletion that a send stream costs.
            return walk_changes(layer_dir, parent_dir, limit=SMALL_WALK)
        try:
            with ExitStack() as stack:
                layer_ro = stack.enter_context(self._read_only(self.path(layer)))
                parent_ro = stack.enter_context(self._read_only(self.path(parent)))
                return native_changes(layer_ro, parent_ro)
        except (SendStreamError, OSError, btrfsutil.BtrfsUtilError) as err:
            log.warning("native diff %s..%s failed (%s); walking both trees", parent, layer, err)
            return None

    @contextmanager
    def _read_only(self, subvolume: Path) -> Iterator[Path]:
        """``btrfs send`` needs read-only subvolumes: use the layer if it is, else a snapshot."""
        if btrfsutil.get_subvolume_read_only(str(subvolume)):
            yield subvolume
            return
        snapshot = self.scratch / f"{subvolume.name}.{uuid.uuid4().hex[:12]}"
        btrfsutil.create_snapshot(str(subvolume), str(snapshot), read_only=True)
        try:
            yield snapshot
        finally:
            self._delete(snapshot)


def _error(err: btrfsutil.BtrfsUtilError, what: str) -> SnapdriverError:
    """A full filesystem or quota as :class:`NoSpaceError` (the core says which layer)."""
    return storage_error(err.errno or 0, what, str(err))


def _delete_tree(path: Path) -> list[int]:
    """Delete a subvolume with every subvolume nested in it, or a plain leftover directory.

    Returns the IDs of the subvolumes deleted, whose qgroups outlive them for a while.
    """
    try:
        if btrfsutil.is_subvolume(str(path)):
            ids = [btrfsutil.subvolume_id(str(path))]
            with btrfsutil.SubvolumeIterator(str(path)) as nested:
                ids += [subvol_id for _, subvol_id in nested]
            if len(ids) > 1 and btrfsutil.get_subvolume_read_only(str(path)):
                # A nested subvolume is unlinked from its parent's directory: a frozen
                # (read-only) parent would refuse that with EROFS.
                btrfsutil.set_subvolume_read_only(str(path), False)
            btrfsutil.delete_subvolume(str(path), recursive=True)
            return ids
    except btrfsutil.BtrfsUtilError as err:
        raise BackendError(f"cannot delete subvolume {path}: {err}") from err
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    return []
