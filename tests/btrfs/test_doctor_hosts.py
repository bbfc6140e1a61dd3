"""``snapdriver doctor`` on real filesystems: a data root on tmpfs, on ext4, on btrfs without
quotas, and a running btrfs plugin with an orphan layer and a stale Init record."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapdriver import doctor
from snapdriver.doctor import Host
from snapdriver.testing.loopfs import (
    STATE_ROOT,
    data_root_with_layers,
    loop_filesystem,
    unmount_below,
)
from snapdriver.testing.process import PluginProcess

pytestmark = pytest.mark.btrfs
LAYER = "a" * 64  # an ID of the form dockerd makes (the sweep only takes those)


@pytest.fixture(autouse=True)
def loop_filesystems(btrfs_mount: Path) -> None:
    """The btrfs tier's own fixture decides whether loop filesystems can be made (and says so)."""


@contextlib.contextmanager
def tmpfs() -> Iterator[Path]:
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    mnt = Path(tempfile.mkdtemp(prefix="snapdriver-test-tmpfs-", dir=STATE_ROOT))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        mnt.rmdir()


def host(data_root: Path, tmp_path: Path, **kw: object) -> Host:
    settings: dict[str, object] = {
        "backend": "btrfs",
        "name": "sddoc",
        "data_root": data_root,
        "listen": f"unix://{tmp_path}/none.sock",
        "state_dir": tmp_path / "state",
        "daemon_json": tmp_path / "daemon.json",
        "dockerd_pid": -1,  # not a dockerd that happens to run on this machine
    }
    settings.update(kw)
    return Host(**settings)  # type: ignore[arg-type]


def test_data_root_on_tmpfs(tmp_path: Path) -> None:
    with tmpfs() as mnt:
        result = doctor.check_filesystem(host(mnt / "docker", tmp_path))
    assert result.level == "FAIL", result
    assert f"{mnt}/docker/sddoc is on tmpfs ({mnt}), not btrfs" in result.detail
    assert "dockerd --data-root" in result.fix


def test_data_root_on_ext4_and_quota_not_judged(tmp_path: Path) -> None:
    with loop_filesystem("ext4", size_mb=64) as mnt:
        checked = host(mnt, tmp_path, storage_opts=["size=1G"])
        result = doctor.check_filesystem(checked)
        quota = doctor.check_quota(checked)
    assert result.level == "FAIL" and "is on ext4" in result.detail
    assert quota.level == "SKIP" and "cannot read the quota state" in quota.detail


def test_btrfs_in_a_data_root_hidden_by_dockerds_bind(tmp_path: Path) -> None:
    """btrfs mounted at <data-root>/NAME on an ext4 whose data root is no mount point: a WARN
    before dockerd starts, as its bind of the data root onto itself will hide the btrfs, and a
    FAIL that names the hidden btrfs once that bind is there."""
    with data_root_with_layers("sddoc", root_mb=64, layers_mb=256, own_mount=False) as data_root:
        before = doctor.check_filesystem(host(data_root, tmp_path))
        subprocess.run(["mount", "--bind", data_root, data_root], check=True)  # dockerd's
        after = doctor.check_filesystem(host(data_root, tmp_path))
    assert before.level == "WARN", before
    assert f"inside the data root {data_root}, which is not a mount point" in before.detail
    assert after.level == "FAIL", after
    assert f"is on ext4 ({data_root}): the btrfs mounted at {data_root}/sddoc" in after.detail
    assert after.fix.startswith(f"make {data_root} a mount point")


def test_a_data_root_mounted_over_a_btrfs_is_not_on_btrfs(tmp_path: Path) -> None:
    """tmpfs mounted inside a btrfs: the btrfs above is not hidden, the data root is elsewhere."""
    with loop_filesystem("btrfs", size_mb=256) as btrfs:
        data_root = btrfs / "docker"
        data_root.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "t", data_root], check=True)
        try:
            result = doctor.check_filesystem(host(data_root, tmp_path))
        finally:
            unmount_below(data_root)
    assert result.level == "FAIL", result
    assert result.detail.endswith(f"is on tmpfs ({data_root}), not btrfs")
    assert "dockerd --data-root" in result.fix


def test_btrfs_in_a_data_root_of_its_own_mount(tmp_path: Path) -> None:
    with data_root_with_layers("sddoc", root_mb=64, layers_mb=256) as data_root:
        result = doctor.check_filesystem(host(data_root, tmp_path))
    assert (result.level, result.detail) == (
        "OK",
        f"{data_root}/sddoc is on btrfs ({data_root}/sddoc)",
    )


def test_btrfs_without_quotas_and_a_size_option(tmp_path: Path) -> None:
    with loop_filesystem("btrfs", size_mb=256) as mnt:
        assert doctor.check_filesystem(host(mnt, tmp_path)).level == "OK"
        assert doctor.check_quota(host(mnt, tmp_path)).detail == "no size limit configured"
        sized = host(mnt, tmp_path, storage_opts=["btrfs.size=1G"])
        off = doctor.check_quota(sized)
        assert off.level == "FAIL" and "quotas are off" in off.detail
        assert off.fix.startswith(f"btrfs quota enable {mnt}")
        may = doctor.check_quota(
            host(mnt, tmp_path, storage_opts=["size=1G", "btrfs.enable_quota=true"])
        )
        assert may.level == "OK" and "will be switched on" in may.detail
        (tmp_path / "daemon.json").write_text(json.dumps({"storage-opts": ["size=2G"]}))
        from_dockerd = doctor.check_quota(host(mnt, tmp_path, dockerd_pid=-1))
        assert from_dockerd.level == "FAIL" and "size=2G" in from_dockerd.detail
        subprocess.run(["btrfs", "quota", "enable", str(mnt)], check=True)
        on = doctor.check_quota(sized)
        assert on.level == "OK" and "quotas are on" in on.detail


def test_full_filesystem_warns(tmp_path: Path) -> None:
    with loop_filesystem("btrfs", size_mb=256) as mnt:
        fill = mnt / "fill"
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={fill}", "bs=1M", "count=400", "status=none"], check=False
        )  # stops when full
        subprocess.run(["sync"], check=True)
        result = doctor.check_free_space(host(mnt, tmp_path))
    assert result.level == "WARN", result
    assert "below 10 %" in result.detail


@pytest.fixture
def plugin(btrfs_mount: Path, tmp_path: Path) -> Iterator[tuple[PluginProcess, Path]]:
    """A running btrfs plugin after Init, with a Home on the session's btrfs and one layer."""
    data_root = Path(tempfile.mkdtemp(prefix="doctor-", dir=btrfs_mount))
    proc = PluginProcess("btrfs", tmp_path)
    proc.start()
    home = data_root / proc.name
    try:
        with proc.client() as client:
            client.call(
                "GraphDriver.Init", {"Home": str(home), "Opts": [], "UIDMaps": [], "GIDMaps": []}
            )
            client.call("GraphDriver.Create", {"ID": LAYER, "Parent": ""})
        yield proc, data_root
    finally:
        with contextlib.suppress(Exception), proc.client() as client:
            client.call("GraphDriver.Remove", {"ID": LAYER})
        proc.stop()
        subprocess.run(["rm", "-rf", str(data_root)], check=False)


def test_running_plugin_orphans_and_stale_record(
    plugin: tuple[PluginProcess, Path], tmp_path: Path
) -> None:
    proc, data_root = plugin
    checked = host(
        data_root,
        tmp_path,
        name=proc.name,
        listen=proc.address,
        state_dir=proc.state_dir,
        orphan_age=0.0,
    )
    assert doctor.check_socket(checked).level == "OK"
    init = doctor.check_init_record(checked)
    assert init.level == "OK" and init.detail.endswith("(btrfs)")
    no_store = doctor.check_orphans(checked)  # no layer store of dockerd's: nothing is judged
    assert no_store.level == "OK", no_store
    (data_root / "image" / proc.name / "layerdb").mkdir(parents=True)
    orphans = doctor.check_orphans(checked)
    assert orphans.level == "WARN" and LAYER in orphans.detail
    assert orphans.fix == f"snapdriver sweep --name {proc.name} --listen {proc.address}"
    assert doctor.check_orphans(host(data_root, tmp_path, listen=proc.address)).level == "OK"
    proc.stop()
    (data_root / proc.name).rename(data_root / "moved")
    stale = doctor.check_init_record(checked)
    assert stale.level == "FAIL" and "which is gone" in stale.detail
    (data_root / "moved").rename(data_root / proc.name)


def test_doctor_command_exit_status(plugin: tuple[PluginProcess, Path], tmp_path: Path) -> None:
    proc, data_root = plugin
    (tmp_path / "daemon.json").write_text(
        json.dumps({"experimental": True, "storage-driver": proc.name})
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "snapdriver",
            "doctor",
            "--backend",
            "btrfs",
            "--name",
            proc.name,
            "--data-root",
            str(data_root),
            "--listen",
            proc.address,
            "--state-dir",
            str(proc.state_dir),
            "--daemon-json",
            str(tmp_path / "daemon.json"),
            "--dockerd-pid",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    levels = {line.split(":")[0]: line.split()[0] for line in done.stdout.splitlines()[:-1]}
    problems = {check for check, level in levels.items() if level in ("WARN", "FAIL")}
    assert problems == {"WARN dockerd version"}, done.stdout  # no dockerd runs: the one problem
    assert done.returncode == 1


def test_a_backend_adds_its_own_findings(btrfs_mount: Path, tmp_path: Path) -> None:
    """The example backend's ``snapdriver_doctor`` hook: its finding depends on the real
    filesystem under the Home (btrfs shares blocks; tmpfs makes full copies)."""
    on_btrfs = doctor.check_backend(host(btrfs_mount / "docker", tmp_path, backend="copydir"))
    assert [(f.check, f.level) for f in on_btrfs] == [("copydir copies", "OK")]
    with tmpfs() as mnt:
        (found,) = doctor.check_backend(host(mnt / "docker", tmp_path, backend="copydir"))
    assert found.level == "WARN" and "every layer is a full copy" in found.detail
    assert found.fix.startswith("keep the Home on btrfs")
    (unknown,) = doctor.check_backend(host(mnt, tmp_path, backend="no-such-backend"))
    assert unknown.level == "FAIL" and "no-such-backend" in unknown.detail
