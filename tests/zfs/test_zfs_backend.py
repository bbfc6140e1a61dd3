"""The ZFS backend on a real pool: layers, clones, mounts, busy datasets, leftovers, quotas.

Runs only in the lab (``SNAPDRIVER_ZPOOL``); see conftest.py.
"""

from __future__ import annotations

import argparse
import errno
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from snapdriver_zfs import ZfsBackend
from snapdriver_zfs.backend import OWNER, TRASH_PREFIX
from snapdriver_zfs.testing import Lab, everything_below, zfs

from snapdriver.errors import BackendError, ConfigError, LayerNotFoundError
from snapdriver.graphdriver.driver import GraphDriver
from snapdriver.hookspec import BackendConfig, CreateRequest
from snapdriver.hostfs import mounts
from snapdriver.layers.changes import ChangeKind, changes_size, walk_changes

pytestmark = pytest.mark.zfs
MiB = 1 << 20


def backend_of(driver: GraphDriver) -> ZfsBackend:
    plugin = driver.backend.pm.get_plugin("backend")
    assert isinstance(plugin, ZfsBackend)
    return plugin


def mounted_at(target: Path) -> list[str]:
    return [m.source for m in mounts() if m.target == str(target)]


def tar_of(files: dict[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in sorted({os.path.dirname(name) for name in files} - {""}):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


# -- set-up ------------------------------------------------------------------------------------


def test_setup_rejects_bad_configuration(lab: Lab) -> None:
    backend = ZfsBackend()
    with pytest.raises(ConfigError, match="unknown storage option"):
        backend.snapdriver_setup(BackendConfig(lab.home, {"zfs.nosuch": "1"}))
    with pytest.raises(ConfigError, match="not usable"):
        backend.snapdriver_setup(BackendConfig(lab.home, {"zfs.fsname": f"{lab.root}/missing"}))
    args = argparse.Namespace(dataset=lab.root)
    with pytest.raises(ConfigError, match="disagree"):
        backend.snapdriver_setup(BackendConfig(lab.home, {"zfs.fsname": f"{lab.root}x"}, args))


def test_root_from_the_dataset_mounted_at_home(lab: Lab, tmp_path: Path) -> None:
    """No flag, no option: the dataset mounted at Home's nearest existing ancestor is used."""
    where = tmp_path / "mounted"
    where.mkdir()
    subprocess.run(["mount", "-t", "zfs", lab.root, str(where)], check=True)
    try:
        backend = ZfsBackend()
        backend.snapdriver_setup(BackendConfig(where / "docker" / "snapdriver"))
        assert backend.root == lab.root
        assert ("Parent Dataset", lab.root) in backend.snapdriver_status()
    finally:
        subprocess.run(["umount", str(where)], check=True)


# -- layers ------------------------------------------------------------------------------------


def test_create_clone_writable_and_isolated(lab: Lab) -> None:
    async def body(driver: GraphDriver) -> None:
        await driver.create("base", None)
        base = await driver.get("base")
        (base / "hello").write_text("from base\n")
        await driver.put("base")
        await driver.create("child", "base")  # Create, not CreateReadWrite: still writable
        child = await driver.get("child")
        assert (child / "hello").read_text() == "from base\n"
        (child / "hello").write_text("from child\n")
        (child / "new").write_text("new\n")
        base = await driver.get("base")
        assert (base / "hello").read_text() == "from base\n"
        assert not (base / "new").exists()
        assert sorted(await lab_layers(driver)) == ["base", "child"]
        assert zfs("get", "-H", "-o", "value", "origin", f"{lab.root}/child").strip() == (
            f"{lab.root}/base@child"
        )
        assert zfs("get", "-H", "-o", "value", "mountpoint", f"{lab.root}/child").strip() == (
            "legacy"
        )
        meta = await driver.metadata("child")
        assert meta == {"Dataset": f"{lab.root}/child", "Mountpoint": str(child)}
        await driver.put("base")
        await driver.put("child")

    lab.session(body)


async def lab_layers(driver: GraphDriver) -> list[str]:
    return backend_of(driver).snapdriver_layers()  # type: ignore[return-value]


def test_nested_get_put_mounts_once(lab: Lab) -> None:
    async def body(driver: GraphDriver) -> None:
        await driver.create("layer", None)
        first = await driver.get("layer")
        second = await driver.get("layer")
        assert first == second == lab.home / "mnt" / "layer"
        assert mounted_at(first) == [f"{lab.root}/layer"]
        await driver.put("layer")
        assert mounted_at(first) == [f"{lab.root}/layer"]
        await driver.put("layer")
        assert mounted_at(first) == []
        assert not first.exists()
        again = await driver.get("layer")
        assert again == first and mounted_at(first) == [f"{lab.root}/layer"]
        await driver.put("layer")

    lab.session(body)


def test_mounting_an_already_mounted_layer_succeeds(lab: Lab) -> None:
    """A plugin restart forgets its mounts but the kernel does not."""

    async def body(driver: GraphDriver) -> None:
        await driver.create("layer", None)
        backend = backend_of(driver)
        path = backend.snapdriver_mount("layer", "")
        assert backend.snapdriver_mount("layer", "") == path
        assert mounted_at(path) == [f"{lab.root}/layer"]
        backend.snapdriver_unmount("layer")
        assert mounted_at(path) == []

    lab.session(body)


def test_unknown_ids(lab: Lab) -> None:
    async def body(driver: GraphDriver) -> None:
        backend = backend_of(driver)
        backend.snapdriver_remove("nosuch")
        await driver.remove("nosuch")
        with pytest.raises(LayerNotFoundError):
            await driver.get("nosuch")
        with pytest.raises(BackendError, match="no dataset"):
            backend.snapdriver_mount("nosuch", "")
        backend.snapdriver_unmount("nosuch")

    lab.session(body)


def test_remove_refuses_a_layer_with_clones(lab: Lab) -> None:
    async def body(driver: GraphDriver) -> None:
        await driver.create("base", None)
        await driver.create("child", "base")
        with pytest.raises(BackendError, match="child"):
            backend_of(driver).snapdriver_remove("base")
        await driver.remove("child")
        await driver.remove("base")
        assert everything_below(lab.root) == []

    lab.session(body)


def test_remove_leaves_nothing(lab: Lab) -> None:
    async def body(driver: GraphDriver) -> None:
        await driver.create("base", None)
        await driver.create("mid", "base")
        await driver.create("top", "mid")
        for layer in ("top", "mid", "base"):
            await driver.get(layer)
            await driver.put(layer)
        assert len(everything_below(lab.root)) == 5  # 3 datasets + 2 origin snapshots
        for layer in ("top", "mid", "base"):
            await driver.remove(layer)
        assert everything_below(lab.root) == []
        assert list((lab.home / "mnt").iterdir()) == []

    lab.session(body)


# -- busy datasets -------------------------------------------------------------------------------


def test_remove_while_a_process_sits_in_the_layer(lab: Lab) -> None:
    """Remove succeeds; the dataset is set aside and destroyed once the process has gone."""

    async def body(driver: GraphDriver) -> None:
        await driver.create("base", None)
        await driver.create("busy", "base")
        path = await driver.get("busy")
        (path / "file").write_text("x")
        holder = subprocess.Popen(["sleep", "600"], cwd=path)
        try:
            await driver.put("busy")
            await driver.remove("busy")
            assert "busy" not in await lab_layers(driver)
            await driver.remove("base")  # its only clone is set aside: it is set aside too
            assert await lab_layers(driver) == []
            left = everything_below(lab.root)
            assert left and all(f"/{TRASH_PREFIX}" in name for name in left), left
        finally:
            holder.kill()
            holder.wait()
        await driver.cleanup()
        assert everything_below(lab.root) == []

    lab.session(body)


def test_remove_waits_out_a_short_busy_spell(lab: Lab) -> None:
    async def body(driver: GraphDriver) -> None:
        await driver.create("layer", None)
        path = await driver.get("layer")
        holder = subprocess.Popen(["sleep", "0.3"], cwd=path)
        await driver.put("layer")
        await driver.remove("layer")
        holder.wait()
        await driver.cleanup()
        assert everything_below(lab.root) == []

    lab.session(body)


def test_remove_while_still_mounted_elsewhere(lab: Lab, tmp_path: Path) -> None:
    """A mount the core does not know about (a crash, an admin) is detached, not an error."""

    async def body(driver: GraphDriver) -> None:
        await driver.create("layer", None)
        other = tmp_path / "other"
        other.mkdir()
        subprocess.run(["mount", "-t", "zfs", f"{lab.root}/layer", str(other)], check=True)
        await driver.remove("layer")
        assert mounted_at(other) == []
        assert everything_below(lab.root) == []

    lab.session(body)


# -- leftovers of a crash -----------------------------------------------------------------------


def test_create_replaces_a_leftover_snapshot(lab: Lab) -> None:
    """A crash between snapshot and clone leaves ``<parent>@<child>``; Create must still work."""

    async def body(driver: GraphDriver) -> None:
        await driver.create("base", None)
        zfs("snapshot", f"{lab.root}/base@child")
        await driver.create("child", "base")
        assert zfs("get", "-H", "-o", "value", "origin", f"{lab.root}/child").strip() == (
            f"{lab.root}/base@child"
        )

    lab.session(body)


def test_remove_drops_a_leftover_snapshot(lab: Lab) -> None:
    """Recovery removes the half-made child: its uncloned ``<parent>@<child>`` goes with it."""
    foreign = f"{lab.root}/foreign"
    zfs("create", "-o", "mountpoint=legacy", foreign)
    zfs("snapshot", f"{foreign}@child")
    try:

        async def body(driver: GraphDriver) -> None:
            await driver.create("base", None)
            zfs("snapshot", f"{lab.root}/base@child")
            backend_of(driver).snapdriver_remove("child")
            assert everything_below(lab.root) == [f"{lab.root}/base", foreign, f"{foreign}@child"]

        lab.session(body)
    finally:
        zfs("destroy", "-r", foreign)


def test_create_replaces_a_leftover_dataset(lab: Lab) -> None:
    async def body(driver: GraphDriver) -> None:
        backend = backend_of(driver)
        # What a crash after the backend's create but before the record says READY leaves.
        backend.snapdriver_create(CreateRequest("again", None))
        path = backend.snapdriver_mount("again", "")
        (path / "stale").write_text("x")
        await driver.create("again", None)
        fresh = await driver.get("again")
        assert list(fresh.iterdir()) == []
        await driver.put("again")

    lab.session(body)


def test_recover_removes_unrecorded_layers(lab: Lab) -> None:
    async def body(driver: GraphDriver) -> None:
        backend_of(driver).snapdriver_create(CreateRequest("orphan", None))
        assert await driver.core.recover() == ["orphan"]
        assert everything_below(lab.root) == []

    lab.session(body)


def test_foreign_datasets_are_never_touched(lab: Lab) -> None:
    foreign = f"{lab.root}/foreign"
    zfs("create", "-o", "mountpoint=legacy", foreign)
    try:

        async def body(driver: GraphDriver) -> None:
            assert "foreign" not in await lab_layers(driver)
            with pytest.raises(BackendError, match="not made by snapdriver"):
                await driver.create("foreign", None)
            backend_of(driver).snapdriver_remove("foreign")
            assert zfs("list", "-H", "-o", "name", foreign).strip() == foreign

        lab.session(body)
    finally:
        zfs("destroy", foreign)


# -- quotas --------------------------------------------------------------------------------------


def fill(path: Path, total: int) -> None:
    chunk = os.urandom(MiB)  # random: compression must not shrink it below the quota
    with open(path, "wb") as handle:
        for _ in range(total // MiB):
            handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())


@pytest.mark.parametrize("parent", [None, "base"])
def test_quota_is_enforced(lab: Lab, parent: str | None) -> None:
    async def body(driver: GraphDriver) -> None:
        if parent:
            await driver.create(parent, None)
        await driver.create("limited", parent, {"size": "16M"})
        assert zfs("get", "-H", "-p", "-o", "value", "quota", f"{lab.root}/limited").strip() == (
            str(16 * MiB)
        )
        path = await driver.get("limited")
        with pytest.raises(OSError, match=r"[Qq]uota|space") as caught:
            fill(path / "big", 96 * MiB)
        assert caught.value.errno in (errno.EDQUOT, errno.ENOSPC)
        (path / "big").unlink()
        await driver.put("limited")

    lab.session(body)


# -- Changes, Diff, ApplyDiff -------------------------------------------------------------------


def test_changes_diff_size_and_apply_diff(lab: Lab) -> None:
    async def body(driver: GraphDriver) -> None:
        await driver.create("base", None)
        files = {"etc/hosts": b"127.0.0.1 localhost\n", "etc/keep": b"keep\n", "bin/sh": b"#!"}
        await driver.apply_diff("base", None, tar_of(files))
        await driver.create("child", "base")
        child = await driver.get("child")
        (child / "etc" / "hosts").write_text("changed\n")
        (child / "bin" / "sh").unlink()
        (child / "opt").mkdir()
        (child / "opt" / "new").write_bytes(b"12345")
        base = await driver.get("base")
        native = backend_of(driver).snapdriver_changes("child", child, "base", base)
        assert native is not None, "the native differ fell back"
        expected = walk_changes(child, base)
        assert list(native) == expected
        assert await driver.changes("child", "base") == expected
        assert {(c.path, c.kind) for c in expected} >= {
            ("/etc/hosts", ChangeKind.MODIFY),
            ("/bin/sh", ChangeKind.DELETE),
            ("/opt/new", ChangeKind.ADD),
        }
        assert await driver.diff_size("child", "base") == changes_size(child, expected)
        await driver.put("base")
        await driver.put("child")

    lab.session(body)


def test_changes_against_an_older_ancestor_falls_back(lab: Lab) -> None:
    async def body(driver: GraphDriver) -> None:
        await driver.create("a", None)
        await driver.create("b", "a")
        await driver.create("c", "b")
        c, a = await driver.get("c"), await driver.get("a")
        (c / "file").write_text("x")
        assert backend_of(driver).snapdriver_changes("c", c, "a", a) is None
        assert await driver.changes("c", "a") == walk_changes(c, a)
        await driver.put("a")
        await driver.put("c")

    lab.session(body)


def test_hard_links(lab: Lab) -> None:
    """A new link to an unchanged file is found natively; a changed linked file walks."""

    async def body(driver: GraphDriver) -> None:
        await driver.create("base", None)
        base = await driver.get("base")
        (base / "d1").mkdir()
        (base / "d2").mkdir()
        (base / "d1" / "f").write_text("content\n")
        os.link(base / "d1" / "f", base / "d2" / "g")
        await driver.create("child", "base")
        child = await driver.get("child")
        os.link(child / "d1" / "f", child / "h")
        backend = backend_of(driver)
        native = backend.snapdriver_changes("child", child, "base", base)
        assert native is not None and list(native) == walk_changes(child, base)
        with open(child / "d1" / "f", "a") as handle:
            handle.write("more\n")
        assert backend.snapdriver_changes("child", child, "base", base) is None
        assert await driver.changes("child", "base") == walk_changes(child, base)
        await driver.put("child")
        await driver.put("base")

    lab.session(body)


def test_changed_parent_falls_back(lab: Lab) -> None:
    """The answer is against the parent as it is now; a parent written after the clone walks."""

    async def body(driver: GraphDriver) -> None:
        await driver.create("base", None)
        base = await driver.get("base")
        (base / "f").write_text("1")
        await driver.create("child", "base")
        child = await driver.get("child")
        backend = backend_of(driver)
        assert backend.snapdriver_changes("child", child, "base", base) == []
        (base / "g").write_text("2")
        assert backend.snapdriver_changes("child", child, "base", base) is None
        assert await driver.changes("child", "base") == walk_changes(child, base)
        await driver.put("child")
        await driver.put("base")

    lab.session(body)


def test_status_and_nothing_left(lab: Lab) -> None:
    async def body(driver: GraphDriver) -> None:
        status = dict(await driver.status())
        assert status["Backend"] == "ZfsBackend"
        assert status["Parent Dataset"] == lab.root
        assert status["Zpool"] == lab.root.split("/")[0]
        assert status["Zpool Health"] == "ONLINE"
        assert status["libzfs_core"]

    lab.session(body)
    out = zfs("list", "-H", "-t", "all", "-r", "-o", "name", lab.root).split()
    assert out == [lab.root]
    assert OWNER == "snapdriver:layer"
