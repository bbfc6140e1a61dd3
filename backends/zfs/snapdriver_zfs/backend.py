"""The ZFS backend: each layer a dataset ``<root>/<id>``, each child a clone of its parent.

The root dataset is ``--dataset``, else the storage option ``zfs.fsname``, else the dataset
mounted at Docker's Home. Layers are ``mountpoint=legacy`` filesystems that Get mounts at
``<Home>/mnt/<id>``. A child is cloned from the snapshot ``<root>/<parent>@<child>``: named after
the child, so it is unique and its owner is plain, and marked for deferred destruction at once,
so it goes with its clone whichever way the clone goes.

Every layer dataset carries the user property ``snapdriver:layer=<id>``. Datasets without it
were not made here: they are never listed as layers and never destroyed.

Changes come from ``zfs diff`` of the origin snapshot against the clone (:mod:`.diff`). A dataset
still busy at Remove (a process keeps a file open in it, even after a lazy unmount) is renamed to
``<root>/_removed.<hex>`` and destroyed later, so Remove succeeds.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from snapdriver.errors import BackendError, ConfigError, SnapdriverError, storage_error
from snapdriver.hookspec import BackendConfig, CreateRequest, Finding, hookimpl
from snapdriver.hostfs import mount_of
from snapdriver.layers.changes import Change
from snapdriver_zfs import mounts
from snapdriver_zfs.diff import DiffEntry, DiffFormatError, Fallback, native_changes, parse_diff
from snapdriver_zfs.zfs import (
    Dataset,
    PropValue,
    Zfs,
    ZfsError,
    find_command,
    load_libzfs_core,
)

log = logging.getLogger(__name__)

OPTION_PREFIX = "zfs."
OWNER = "snapdriver:layer"
#: On the root dataset: the Home whose record knows its layers (one record per root dataset).
HOME = "snapdriver:home"
#: Not a valid layer ID (those start with a letter or digit), so it can never clash with one.
TRASH_PREFIX = "_removed."
#: Seconds to wait between tries to destroy a busy dataset (about 1.5 s in all).
BUSY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)
#: Seconds between looks at the pool's ``freeing`` while Reclaim waits (each look is a process).
FREEING_POLL = 0.1
DEV_ZFS = "/dev/zfs"


class ZfsBackend:
    """A pluggy plugin object; registered under the name ``zfs``."""

    def __init__(self) -> None:
        self._home: Path | None = None
        self._root: str | None = None
        self._zfs = Zfs()
        self._lzc_state = "not checked"
        self._trash_lock = threading.Lock()
        self._trash_pending = False
        self._origins: dict[str, str] = {}  # layer -> its origin snapshot ("-" for none)

    @property
    def home(self) -> Path:
        if self._home is None:
            raise BackendError("the zfs backend is not set up (no Init yet)")
        return self._home

    @property
    def root(self) -> str:
        if self._root is None:
            raise BackendError("the zfs backend is not set up (no Init yet)")
        return self._root

    def dataset(self, layer: str) -> str:
        return f"{self.root}/{layer}"

    def mountpoint(self, layer: str) -> Path:
        return self.home / "mnt" / layer

    # -- set-up ----------------------------------------------------------------------------------

    @hookimpl
    def snapdriver_addoption(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--dataset",
            metavar="POOL/DATASET",
            help="zfs backend: the dataset that holds the layers (default: the zfs.fsname "
            "storage option, else the dataset mounted at Docker's data root)",
        )

    @hookimpl
    def snapdriver_setup(self, config: BackendConfig) -> None:
        command = _require_zfs()
        root = _choose_root(config, _parse_options(config.options))
        zfs = Zfs(command)
        _check_root(zfs, root)
        _claim_root(zfs, root, config.home)
        zfs.lzc, self._lzc_state = load_libzfs_core(root)
        config.home.mkdir(mode=0o710, parents=True, exist_ok=True)
        (config.home / "mnt").mkdir(mode=0o700, exist_ok=True)
        self._zfs, self._root, self._home = zfs, root, config.home
        self._origins.clear()  # layer IDs of another root dataset, perhaps
        self._trash_pending = True  # a crash may have left some: look once
        self._collect_trash()

    @hookimpl
    def snapdriver_doctor(self, config: BackendConfig) -> list[Finding]:
        from snapdriver_zfs.doctor import findings  # it imports this module's set-up steps

        return findings(config)

    @hookimpl
    def snapdriver_status(self) -> list[tuple[str, str]]:
        if self._root is None:
            return []
        pool = self.root.split("/")[0]
        try:
            props = self._zfs.get(self.root, "used", "available", "quota", "compression")
            health = self._zfs.pool_health(pool)
        except ZfsError as err:
            return [("Parent Dataset", self.root), ("Error", str(err))]
        quota = props.get("quota", "-")
        return [
            ("Zpool", pool),
            ("Zpool Health", health),
            ("Parent Dataset", self.root),
            ("Space Used By Parent", props.get("used", "?")),
            ("Space Available", props.get("available", "?")),
            ("Parent Quota", "no" if quota in ("0", "-") else quota),
            ("Compression", props.get("compression", "?")),
            ("Native diff", "zfs diff"),
            ("libzfs_core", self._lzc_state),
        ]

    @hookimpl
    def snapdriver_cleanup(self) -> None:
        if self._root is not None:
            self._collect_trash()

    @hookimpl
    def snapdriver_free_space(self) -> tuple[int, int]:
        """The root dataset's ``available`` (its quota and the pool's space both count)."""
        try:
            props = self._zfs.get(self.root, "used", "available")
            used, available = int(props["used"]), int(props["available"])
        except (ZfsError, KeyError, ValueError) as err:
            raise BackendError(f"cannot read the space of {self.root}: {err}") from err
        return available, used + available

    @hookimpl
    def snapdriver_reclaim(self, timeout: float) -> None:
        """Wait until the pool has freed what destroyed datasets held (``freeing`` is 0).

        A destroy returns once its transaction group committed: a quota sees the space again
        then, but the pool's free space grows only as a background task releases the blocks
        (``async_destroy``), over later transaction groups.
        """
        pool = self.root.split("/")[0]
        deadline = time.monotonic() + timeout
        try:
            freeing = self._zfs.pool_freeing(pool)
            while freeing and time.monotonic() < deadline:
                time.sleep(FREEING_POLL)
                freeing = self._zfs.pool_freeing(pool)
        except ZfsError as err:
            log.warning("cannot wait for pool %s to free destroyed datasets: %s", pool, err)
            return
        if freeing:
            log.warning(
                "pool %s is still freeing %d bytes of destroyed datasets after %.0f s; "
                "replying anyway (the space comes back as ZFS frees it)",
                pool,
                freeing,
                timeout,
            )

    # -- layers ----------------------------------------------------------------------------------

    @hookimpl
    def snapdriver_create(self, request: CreateRequest) -> None:
        dataset = self.dataset(request.layer)
        props: dict[str, PropValue] = {"mountpoint": "legacy", OWNER: request.layer}
        if request.quota:
            props["quota"] = request.quota  # bounds what the layer adds, not its parent's data
        self._origins.pop(request.layer, None)
        try:
            self._clear_leftover(request.layer)
            if request.parent is None:
                self._zfs.create(dataset, props)
            else:
                self._clone(request.parent, request.layer, props)
        except ZfsError as err:
            raise _error(err, f"cannot create layer dataset {dataset}") from err

    def _clone(self, parent: str, layer: str, props: Mapping[str, PropValue]) -> None:
        origin = f"{self.dataset(parent)}@{layer}"
        self._clear_leftover_snapshot(origin)
        self._zfs.snapshot(origin)
        try:
            self._zfs.clone(origin, self.dataset(layer), props)
        except ZfsError:
            try:
                self._zfs.destroy_snapshots([origin], defer=False)
            except ZfsError as err:  # the next Create of this ID replaces it anyway
                log.warning("cannot destroy snapshot %s after a failed clone: %s", origin, err)
            raise
        self._zfs.destroy_snapshots([origin], defer=True)
        self._origins[layer] = origin

    def _clear_leftover(self, layer: str) -> None:
        """A dataset of this ID left by a crash is replaced; one we did not make is not touched."""
        dataset = self.dataset(layer)
        if not self._zfs.exists(dataset):
            return
        found = self._describe(dataset)
        if found is None:
            return
        if found.props.get(OWNER) != layer:
            raise BackendError(
                f"dataset {dataset} exists but was not made by snapdriver (it has no {OWNER} "
                "property): destroy or rename it, or give snapdriver another root dataset"
            )
        log.warning("replacing leftover dataset %s", dataset)
        self._remove_dataset(layer, found)

    def _describe(self, dataset: str) -> Dataset | None:
        return self._zfs.describe(dataset, OWNER, "origin")

    def _clear_leftover_snapshot(self, snapshot: str) -> None:
        """A crash between snapshot and clone leaves the child's snapshot behind: replace it."""
        if not self._zfs.exists(snapshot):
            return
        clones = _split_list(self._zfs.get(snapshot, "clones").get("clones", ""))
        live = [c for c in clones if not self._is_trash(c)]
        if live:
            raise BackendError(f"snapshot {snapshot} is still the origin of {', '.join(live)}")
        log.warning("replacing leftover snapshot %s", snapshot)
        if clones:  # a set-aside dataset still depends on it: move it out of the way
            dataset = snapshot.partition("@")[0]
            self._zfs.rename(snapshot, f"{dataset}@{TRASH_PREFIX}{uuid.uuid4().hex[:16]}")
        else:
            self._zfs.destroy_snapshots([snapshot], defer=False)

    @hookimpl
    def snapdriver_remove(self, layer: str) -> None:
        if self._trash_pending:
            self._collect_trash()
        self._origins.pop(layer, None)
        dataset = self.dataset(layer)
        try:
            found = self._describe(dataset) if self._zfs.exists(dataset) else None
            if found is None:
                self._drop_unused_origins(layer)
            elif found.props.get(OWNER) == layer:
                self._remove_dataset(layer, found)
            else:
                log.warning("not destroying %s: no %s=%s property", dataset, OWNER, layer)
        except ZfsError as err:
            raise _error(err, f"cannot remove layer dataset {dataset}") from err
        self._drop_mount_dir(layer)

    def _remove_dataset(self, layer: str, found: Dataset) -> None:
        live = sorted(c.rpartition("/")[2] for c in found.clones if not self._is_trash(c))
        if live:
            raise BackendError(
                f"cannot remove layer {layer}: layer(s) {', '.join(live)} are cloned from it; "
                "remove them first"
            )
        self._detach_all(found.name)
        recursive = bool(found.snapshots or found.children)
        if found.clones or not self._destroy_patiently(found.name, recursive):
            self._set_aside(found.name)
        self._drop_origin(found.props.get("origin", "-"), layer)

    def _destroy_patiently(self, dataset: str, recursive: bool) -> bool:
        """Destroy, retrying while it is busy; False if it stayed busy."""
        for delay in (0.0, *BUSY_DELAYS):
            time.sleep(delay)
            try:
                if recursive:
                    self._zfs.destroy_recursive(dataset)
                else:
                    self._zfs.destroy(dataset)
                return True
            except ZfsError as err:
                if err.missing:
                    return True
                if not err.busy:
                    raise
                log.info("%s is busy; retrying in a moment", dataset)
                self._detach_all(dataset)  # in case something mounted it again meanwhile
        return False

    def _set_aside(self, dataset: str) -> None:
        trash = f"{self.root}/{TRASH_PREFIX}{uuid.uuid4().hex[:16]}"
        log.warning(
            "%s is still in use (a process has files open in it); renamed to %s, which is "
            "destroyed once it is free",
            dataset,
            trash,
        )
        self._zfs.rename(dataset, trash)
        self._trash_pending = True

    def _drop_origin(self, origin: str, layer: str) -> None:
        """Destroy the snapshot the layer was cloned from, if we made it (``<root>/*@<layer>``)."""
        if not (origin.startswith(self.root + "/") and origin.endswith("@" + layer)):
            return
        try:
            # Deferred: if the clone was only set aside, the snapshot goes when the clone does.
            self._zfs.destroy_snapshots([origin], defer=True)
        except ZfsError as err:
            log.warning("could not destroy snapshot %s: %s", origin, err)

    def _drop_unused_origins(self, layer: str) -> None:
        """A kill between snapshot and clone leaves ``<root>/<parent>@<layer>``, clone-less."""
        ours = {row[0] for row in self._zfs.children(self.root, OWNER) if row[1] != "-"}
        unused = []
        for name, clones in self._zfs.snapshots_below(self.root):
            dataset, _, snap = name.partition("@")
            if snap == layer and dataset in ours and not _split_list(clones):
                unused.append(name)
        if unused:
            log.warning("destroying %s: made for layer %s, never cloned", unused, layer)
            self._zfs.destroy_snapshots(unused, defer=False)

    def _is_trash(self, dataset: str) -> bool:
        return dataset.startswith(f"{self.root}/{TRASH_PREFIX}")

    def _collect_trash(self) -> None:
        """Destroy set-aside datasets that are free now, clones before their origins."""
        with self._trash_lock:
            try:
                rows = self._zfs.children(self.root, OWNER)
            except ZfsError as err:
                log.warning("cannot list %s for set-aside datasets: %s", self.root, err)
                return
            trash = [row[0] for row in rows if self._is_trash(row[0]) and row[1] != "-"]
            while trash:
                left = [name for name in trash if not self._destroy_trash(name)]
                if len(left) == len(trash):
                    break
                trash = left
            self._trash_pending = bool(trash)

    def _destroy_trash(self, dataset: str) -> bool:
        try:
            found = self._zfs.describe(dataset)
            if found is not None:
                if found.clones:
                    return False  # its clones go first
                self._detach_all(dataset)
                if found.snapshots or found.children:
                    self._zfs.destroy_recursive(dataset)
                else:
                    self._zfs.destroy(dataset)
        except ZfsError as err:
            if not err.missing:
                log.info("set-aside %s cannot be destroyed yet: %s", dataset, err)
                return False
        log.info("destroyed set-aside dataset %s", dataset)
        return True

    @hookimpl
    def snapdriver_commit(self, layer: str) -> None:
        """Frozen natively: ``readonly=on`` (no copy); its mount, if any, turns read-only too."""
        dataset = self.dataset(layer)
        try:
            if self._zfs.get(dataset, "readonly").get("readonly") != "on":
                self._zfs.set(dataset, {"readonly": "on"})
        except ZfsError as err:
            raise _error(err, f"cannot make {dataset} read-only") from err

    @hookimpl
    def snapdriver_layers(self) -> Sequence[str]:
        try:
            rows = self._zfs.children(self.root, OWNER)
        except ZfsError as err:
            raise BackendError(f"cannot list the datasets below {self.root}: {err}") from err
        return sorted(
            name for name, owner in ((r[0].rpartition("/")[2], r[1]) for r in rows) if owner == name
        )

    @hookimpl
    def snapdriver_metadata(self, layer: str) -> dict[str, str]:
        return {"Dataset": self.dataset(layer), "Mountpoint": str(self.mountpoint(layer))}

    # -- mounts ----------------------------------------------------------------------------------

    @hookimpl
    def snapdriver_mount(self, layer: str, mount_label: str) -> Path:
        dataset, target = self.dataset(layer), self.mountpoint(layer)
        target.mkdir(mode=0o755, exist_ok=True)
        if mounts.is_mounted(dataset, target):
            return target
        try:
            mounts.mount_dataset(dataset, target, mount_label)
        except OSError as err:
            if not self._zfs.exists(dataset):
                raise BackendError(f"layer {layer} has no dataset {dataset}") from err
            raise BackendError(f"cannot mount {dataset} at {target}: {err.strerror}") from err
        return target

    @hookimpl
    def snapdriver_unmount(self, layer: str) -> None:
        target = self.mountpoint(layer)
        try:
            for _ in range(16):  # stacked mounts, e.g. after a crash and a second mount
                if not mounts.detach(target):
                    break
        except OSError as err:
            raise BackendError(f"cannot unmount {target}: {err.strerror}") from err
        self._drop_mount_dir(layer)

    def _detach_all(self, dataset: str) -> None:
        """Lazily unmount every mount of ``dataset``; the files stay usable by who holds them."""
        for target in reversed(mounts.targets_of(dataset)):
            try:
                mounts.detach(target)
            except OSError as err:
                raise BackendError(f"cannot unmount {dataset} from {target}: {err}") from err

    def _drop_mount_dir(self, layer: str) -> None:
        try:
            self.mountpoint(layer).rmdir()
        except FileNotFoundError:
            pass
        except OSError as err:  # still a mount point, or not empty: keep it, it is harmless
            log.warning("cannot remove mount directory %s: %s", self.mountpoint(layer), err)

    # -- native diff -----------------------------------------------------------------------------

    @hookimpl
    def snapdriver_changes(
        self, layer: str, layer_dir: Path, parent: str, parent_dir: Path
    ) -> Sequence[Change] | None:
        origin = f"{self.dataset(parent)}@{layer}"
        try:
            if self._origin(layer) != origin:
                log.warning("%s is not a clone of %s; walking both trees", layer, origin)
                return None
            entries = self._diff(origin, self.dataset(layer))
            # After the diff: its snapshot of the layer synced the pool, parent writes included.
            self._check_parent_unchanged(origin)
            return native_changes(entries, layer_dir, parent_dir)
        except (ZfsError, DiffFormatError, Fallback, OSError) as err:
            log.warning("zfs diff %s %s unusable (%s); walking both trees", origin, layer, err)
            return None

    def _origin(self, layer: str) -> str:
        """The snapshot a layer was cloned from; it never changes, so it is asked for once."""
        if layer not in self._origins:
            origin = self._zfs.get(self.dataset(layer), "origin").get("origin", "-")
            self._origins[layer] = origin
        return self._origins[layer]

    def _diff(self, snapshot: str, dataset: str) -> list[DiffEntry]:
        targets = set(mounts.targets_of(dataset))
        if len(targets) != 1:
            # zfs diff prefixes paths with one of them; which one is not ours to guess
            raise Fallback(f"{dataset} is mounted at {len(targets)} places, not one")
        out = self._zfs.diff(snapshot, dataset)
        if out.returncode != 0 or out.stderr:
            # An error on stderr may come with rc 0 and a silently skipped object.
            raise Fallback(f"zfs diff: {out.stderr or f'exit status {out.returncode}'}")
        return parse_diff(out.stdout, targets.pop())

    def _check_parent_unchanged(self, origin: str) -> None:
        """The answer is against the parent as it is now: fine only if it did not change since.

        ``written@snap`` is 0 for an untouched parent, but it counts only data already synced to
        disk: call this after something synced the pool (``zfs diff`` of the layer does). Reading
        files can make it non-zero (atime), so then ``zfs diff`` decides, which ignores atime.
        """
        parent_ds, _, snap = origin.partition("@")
        if self._zfs.get(parent_ds, f"written@{snap}").get(f"written@{snap}") == "0":
            return
        out = self._zfs.diff(origin, parent_ds)
        if out.returncode != 0 or out.stderr or out.stdout.strip():
            raise Fallback(f"{parent_ds} changed after {origin} was taken")


def _require_zfs() -> str:
    command = find_command("zfs")
    if command is None:
        raise ConfigError(
            "the zfs command is not installed: install OpenZFS's tools (Debian: zfsutils-linux)"
        )
    try:
        os.close(os.open(DEV_ZFS, os.O_RDWR))
    except FileNotFoundError:
        raise ConfigError(
            f"{DEV_ZFS} is missing: the ZFS kernel module is not loaded (run `modprobe zfs`)"
        ) from None
    except OSError as err:
        raise ConfigError(
            f"cannot open {DEV_ZFS}: {err.strerror} (snapdriver must run as root)"
        ) from err
    return command


def _parse_options(options: Mapping[str, str]) -> str | None:
    """The ``zfs.*`` storage options: only ``zfs.fsname`` exists."""
    fsname = None
    for key, value in options.items():
        if key == OPTION_PREFIX + "fsname":
            if not value:
                raise ConfigError("storage option zfs.fsname needs a dataset name")
            fsname = value
        elif key.startswith(OPTION_PREFIX):
            raise ConfigError(f"unknown storage option {key!r} (zfs knows zfs.fsname)")
    return fsname


def _choose_root(config: BackendConfig, fsname: str | None) -> str:
    flag = getattr(config.args, "dataset", None)
    if flag and fsname and flag != fsname:
        raise ConfigError(
            f"--dataset {flag} and --storage-opt zfs.fsname={fsname} disagree: give only one"
        )
    if flag or fsname:
        return str(flag or fsname)
    mount = mount_of(config.home)
    if mount.fstype != "zfs":
        raise ConfigError(
            f"no ZFS dataset to keep layers in: {config.home} is on {mount.fstype} (mounted at "
            f"{mount.target}); start snapdriver with --dataset POOL/DATASET, give dockerd "
            "--storage-opt zfs.fsname=POOL/DATASET, or put dockerd's --data-root on ZFS"
        )
    return mount.source


def _check_root(zfs: Zfs, root: str) -> None:
    if root.startswith("/") or "@" in root or "#" in root or root.endswith("/"):
        raise ConfigError(f"{root!r} is not a dataset name (expected POOL/DATASET)")
    try:
        kind = zfs.get(root, "type").get("type")
    except ZfsError as err:
        raise ConfigError(
            f"root dataset {root} is not usable ({err}); create it with "
            f"`zfs create -o mountpoint=none {root}`"
        ) from err
    if kind != "filesystem":
        raise ConfigError(f"root dataset {root} is a {kind}, not a filesystem")


def _claim_root(zfs: Zfs, root: str, home: Path) -> None:
    """One root dataset, one Home: a second record would take the first one's layers for
    leftovers and destroy them at start (two fronts, or two plugins, given one dataset)."""
    try:
        owner = zfs.get(root, HOME).get(HOME, "-")
        if owner in ("", "-"):
            zfs.set(root, {HOME: str(home)})
            return
    except ZfsError as err:
        raise ConfigError(f"cannot read or set {HOME} on {root}: {err}") from err
    if owner != str(home):
        raise ConfigError(
            f"dataset {root} keeps the layers of {owner}, not of {home}: give each front or "
            f"plugin its own dataset (if {owner} is gone for good: zfs inherit {HOME} {root})"
        )


def _split_list(value: str) -> list[str]:
    return [item for item in value.split(",") if item and item != "-"]


def _error(err: ZfsError, what: str) -> SnapdriverError:
    """A full pool or quota as :class:`NoSpaceError` (the core says which layer)."""
    return storage_error(err.no_space, what, str(err))
