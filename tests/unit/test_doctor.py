"""``snapdriver doctor`` against hosts wrong in one way each, built for real where possible.

What needs no mount is here: sockets, Init records, containerd configs, a process that calls
itself dockerd, this machine's missing ZFS. Filesystems on loop images and tmpfs are in
tests/btrfs/test_doctor_hosts.py; a real dockerd in tests/dockerd/test_doctor_dockerd.py.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapdriver import config, doctor
from snapdriver.doctor import Dockerd, Host
from snapdriver.hookspec import Finding


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")


def host(tmp_path: Path, **kw: object) -> Host:
    defaults: dict[str, object] = {
        "backend": "btrfs",
        "name": "sddoc",
        "data_root": tmp_path / "data",
        "listen": f"unix://{tmp_path}/plugin.sock",
        "state_dir": tmp_path / "state",
        "daemon_json": tmp_path / "daemon.json",
        "containerd_config": tmp_path / "containerd.toml",
        "timeout": 5.0,
        "dockerd_pid": -1,  # not a dockerd that happens to run on this machine
        "etc": tmp_path / "etc",
    }
    defaults.update(kw)
    return Host(**defaults)  # type: ignore[arg-type]


FakeDockerd = Callable[..., int]


@pytest.fixture
def fake_dockerd() -> Iterator[FakeDockerd]:
    """Start a live process whose argv is ``dockerd ARGS...`` (bash's ``exec -a``); its pid."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> int:
        sleeper = [sys.executable, "-c", "import time; time.sleep(120)", *args]
        proc = subprocess.Popen(["bash", "-c", f"exec -a dockerd {shlex.join(sleeper)}"])
        procs.append(proc)
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        deadline = time.monotonic() + 30
        while not cmdline.read_bytes().startswith(b"dockerd\0") and time.monotonic() < deadline:
            time.sleep(0.02)  # until bash has exec'd
        return proc.pid

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


# -- kernel, tools, libraries: this machine as it is ------------------------------------------


def test_no_zfs_module_fails_with_the_fix(tmp_path: Path) -> None:
    if Path("/dev/zfs").exists():
        pytest.skip("this host has ZFS loaded")
    result = doctor.check_kernel(host(tmp_path, backend="zfs"))
    assert result.level == "FAIL" and "zfs module is not loaded" in result.detail
    assert "modprobe zfs" in result.fix


def test_btrfs_kernel_support_is_read_from_proc(tmp_path: Path) -> None:
    assert doctor.check_kernel(host(tmp_path)).level == "OK"  # built in here
    fake_proc = tmp_path / "proc"
    fake_proc.mkdir()
    (fake_proc / "filesystems").write_text("nodev\ttmpfs\n\text4\n")
    result = doctor.check_kernel(host(tmp_path, proc=fake_proc))
    assert result.level == "FAIL" and result.fix == "modprobe btrfs"


def test_tools_and_libraries(tmp_path: Path) -> None:
    btrfs = doctor.check_tools(host(tmp_path))
    assert btrfs.level == "OK" and btrfs.detail.startswith("btrfs-progs v")
    lib = doctor.check_library(host(tmp_path))
    assert lib.level == "OK" and lib.detail.startswith("btrfsutil ")
    if shutil.which("zfs") is None:
        zfs = doctor.check_tools(host(tmp_path, backend="zfs"))
        assert zfs.level == "FAIL" and "zfsutils-linux" in zfs.fix


def test_free_space_threshold(tmp_path: Path) -> None:
    assert doctor.check_free_space(host(tmp_path, min_free=0)).level == "OK"
    low = doctor.check_free_space(host(tmp_path, min_free=100))
    assert low.level == "WARN" and "below 100 %" in low.detail and low.fix


# -- the plugin's socket and its Init record ---------------------------------------------------


def test_socket_where_nothing_listens(tmp_path: Path) -> None:
    result = doctor.check_socket(host(tmp_path))
    assert result.level == "FAIL" and "nothing answers" in result.detail
    assert "systemctl start snapdriver.socket" in result.fix
    assert doctor.check_orphans(host(tmp_path)).level == "SKIP"


def test_socket_file_left_by_a_dead_plugin(tmp_path: Path) -> None:
    path = tmp_path / "plugin.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # bound, never listening: what a killed plugin leaves
    result = doctor.check_socket(host(tmp_path))
    assert result.level == "FAIL" and "Connection refused" in result.detail
    containerd = doctor.check_socket(host(tmp_path, front="containerd"))
    assert containerd.level == "FAIL"


def test_containerd_socket_that_is_not_a_snapshotter(tmp_path: Path) -> None:
    """Accepting connections is not enough: the probe is a snapshots API call (a real front
    answering it is checked in tests/containerd/test_ctr_front.py)."""
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "plugin.sock"))
        server.listen()
        result = doctor.check_socket(host(tmp_path, front="containerd", timeout=2.0))
    assert result.level == "FAIL" and "answered Stat with" in result.detail, result


def write_init(tmp_path: Path, home: Path) -> None:
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "init.json").write_text(json.dumps({"home": str(home), "options": []}))


def test_init_record_states(tmp_path: Path) -> None:
    assert doctor.check_init_record(host(tmp_path)).detail.startswith("no Init recorded")
    write_init(tmp_path, tmp_path / "gone")
    stale = doctor.check_init_record(host(tmp_path))
    assert stale.level == "FAIL" and "which is gone" in stale.detail
    assert stale.fix.startswith(f"rm {tmp_path}/state/init.json")
    write_init(tmp_path, tmp_path)  # exists, but tmp_path is not on btrfs here
    wrong = doctor.check_init_record(host(tmp_path))
    assert wrong.level == "FAIL" and "not btrfs" in wrong.detail
    assert doctor.check_init_record(host(tmp_path, backend="copydir")).level == "OK"
    (tmp_path / "state" / "init.json").write_text("{not json")
    assert doctor.check_init_record(host(tmp_path)).level == "FAIL"


# -- userns-remap ----------------------------------------------------------------------------------


def write_remap(tmp_path: Path, setting: str, subuid: str = "", subgid: str = "") -> Host:
    (tmp_path / "etc").mkdir(exist_ok=True)
    (tmp_path / "etc" / "subuid").write_text(subuid)
    (tmp_path / "etc" / "subgid").write_text(subgid)
    (tmp_path / "daemon.json").write_text(json.dumps({"userns-remap": setting}))
    return host(tmp_path)


def record_remap(tmp_path: Path, root: int) -> None:
    maps = [{"container_id": 0, "host_id": root, "size": 65536}]
    record = {"home": str(tmp_path), "options": [], "uid_maps": maps, "gid_maps": maps}
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "init.json").write_text(json.dumps(record))


def test_userns_remap_without_subordinate_ids(tmp_path: Path) -> None:
    result = doctor.check_userns_remap(write_remap(tmp_path, "sdremap", "other:100000:65536\n"))
    assert result.level == "FAIL" and "no range for sdremap" in result.detail
    assert f"sdremap:100000:65536 to {tmp_path}/etc/subuid" in result.fix
    default = doctor.check_userns_remap(write_remap(tmp_path, "default"))
    assert default.level == "OK" and "dockerd adds dockremap's IDs" in default.detail


def test_userns_remap_root_is_the_lowest_range_and_moves_home(tmp_path: Path) -> None:
    subuid = "other:1:5\nsdremap:300000:65536\nsdremap:200000:65536\n"
    checked = write_remap(tmp_path, "sdremap:sdgroup", subuid, "sdgroup:400000:65536\n")
    result = doctor.check_userns_remap(checked)
    assert result.level == "OK" and "root is 200000:400000" in result.detail, result
    assert checked.home == tmp_path / "data" / "200000.400000" / "sddoc"
    record_remap(tmp_path, 100000)
    moved = doctor.check_userns_remap(checked)
    assert moved.level == "WARN" and "recorded Init remapped root to 100000:100000" in moved.detail


def test_recorded_maps_without_remap_now(tmp_path: Path) -> None:
    assert doctor.check_userns_remap(host(tmp_path)).level == "OK"
    record_remap(tmp_path, 100000)
    result = doctor.check_userns_remap(host(tmp_path))
    assert result.level == "WARN" and "dockerd does not remap now" in result.detail


# -- containerd's config ---------------------------------------------------------------------------

SNAPSHOTTER = '[proxy_plugins.sddoc]\n  type = "snapshot"\n  address = "{path}"\n'


def test_containerd_config(tmp_path: Path) -> None:
    checked = host(tmp_path, front="containerd")
    path, sock = tmp_path / "containerd.toml", f"{tmp_path}/plugin.sock"
    missing = doctor.check_containerd_config(checked)
    assert missing.level == "FAIL" and "does not exist" in missing.detail
    path.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n')
    absent = doctor.check_containerd_config(checked)
    assert absent.level == "FAIL" and "has no [proxy_plugins.sddoc]" in absent.detail
    assert f'address = "{sock}"' in absent.fix
    path.write_text("version = 2\n" + SNAPSHOTTER.format(path="/elsewhere.sock"))
    assert "'/elsewhere.sock'" in doctor.check_containerd_config(checked).detail
    path.write_text("version = 2\n" + SNAPSHOTTER.format(path=sock))
    assert doctor.check_containerd_config(checked).level == "OK"
    path.write_text("version = \n")
    assert "unreadable" in doctor.check_containerd_config(checked).detail


# -- dockerd ---------------------------------------------------------------------------------------


def test_fake_dockerd_without_experimental_and_other_driver(
    tmp_path: Path, fake_dockerd: FakeDockerd
) -> None:
    pid = fake_dockerd("--storage-driver=overlay2", "--data-root", str(tmp_path))
    checked = host(tmp_path, dockerd_pid=pid, data_root=None)
    assert [d.pid for d in checked.dockerds()] == [pid]
    experimental = doctor.check_dockerd_experimental(checked)
    assert experimental.level == "FAIL" and f"dockerd pid {pid}" in experimental.detail
    driver = doctor.check_dockerd_driver(checked)
    assert driver.level == "FAIL" and "storage driver is overlay2" in driver.detail
    assert "--storage-driver sddoc" in driver.fix
    assert checked.home == tmp_path / "sddoc"  # dockerd's --data-root
    version = doctor.check_dockerd_version(checked)  # its program is python, not dockerd
    assert version.level == "WARN" and "does not tell its version" in version.detail


def test_fake_dockerd_settings_from_its_config_file(
    tmp_path: Path, fake_dockerd: FakeDockerd
) -> None:
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"experimental": True, "storage-driver": "sddoc:latest"}))
    pid = fake_dockerd("--config-file", str(own))
    checked = host(tmp_path, dockerd_pid=pid)
    assert doctor.check_dockerd_experimental(checked).level == "OK"
    assert doctor.check_dockerd_driver(checked).level == "OK"


def test_flags_win_over_daemon_json(tmp_path: Path, fake_dockerd: FakeDockerd) -> None:
    (tmp_path / "daemon.json").write_text(json.dumps({"storage-driver": "sddoc"}))
    pid = fake_dockerd("--experimental", "-s", "vfs")
    checked = host(tmp_path, dockerd_pid=pid)
    assert doctor.check_dockerd_experimental(checked).level == "OK"
    assert "storage driver is vfs" in doctor.check_dockerd_driver(checked).detail


def test_no_dockerd_reads_daemon_json(tmp_path: Path) -> None:
    checked = host(tmp_path, dockerd_pid=-1)
    assert doctor.check_dockerd_version(checked).level == "WARN"
    assert doctor.check_dockerd_driver(checked).detail.startswith("no storage driver is set")
    (tmp_path / "daemon.json").write_text('{"experimental": true, "storage-driver": "sddoc"}')
    checked = host(tmp_path, dockerd_pid=-1)
    assert doctor.check_dockerd_experimental(checked).level == "OK"
    assert doctor.check_dockerd_driver(checked).level == "OK"


def test_real_dockerd_binary_version(tmp_path: Path) -> None:
    exe = shutil.which("dockerd")
    if exe is None:
        pytest.skip("dockerd is not installed")
    checked = host(tmp_path)
    checked._dockerd = [Dockerd(1, ["dockerd"], exe, {})]
    result = doctor.check_dockerd_version(checked)
    assert result.level == "OK" and result.detail.startswith("Docker version 20.10"), result


@pytest.mark.parametrize(
    ("major", "env", "level"),
    [
        (20, {}, "OK"),
        (26, {}, "OK"),
        (27, {}, "FAIL"),
        (27, {"DOCKERD_DEPRECATED_GRAPHDRIVER_PLUGINS": "1"}, "OK"),
        (28, {}, "FAIL"),
        (19, {}, "WARN"),
    ],
)
def test_version_rules(major: int, env: dict[str, str], level: str) -> None:
    assert doctor._judge_version("v", major, f"Docker version {major}.0.0,", env).level == level


# -- the command -----------------------------------------------------------------------------------


def run_doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapdriver", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_doctor_command_on_this_host_without_zfs(tmp_path: Path) -> None:
    if Path("/dev/zfs").exists():
        pytest.skip("this host has ZFS loaded")
    done = run_doctor(
        "--backend",
        "zfs",
        "--listen",
        f"unix://{tmp_path}/x.sock",
        "--state-dir",
        str(tmp_path),
        "--daemon-json",
        str(tmp_path / "none.json"),
    )
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("FAIL kernel support: the zfs module is not loaded")
    assert "-> fix: apt-get install zfs-dkms zfsutils-linux && modprobe zfs" in lines[0]
    assert all(line.split()[0] in {"OK", "WARN", "FAIL", "SKIP"} for line in lines[:-1])
    assert lines[-1].endswith("problem(s)")


def test_doctor_takes_settings_from_the_config_file(tmp_path: Path) -> None:
    settings = tmp_path / "snapdriver.toml"
    settings.write_text(
        f'backend = "btrfs"\n[graphdriver]\nname = "fromfile"\nstate_dir = "{tmp_path}"\n'
        f'listen = "unix://{tmp_path}/file.sock"\n'
    )
    done = run_doctor("--config", str(settings), "--daemon-json", str(tmp_path / "none.json"))
    assert f"nothing answers at unix://{tmp_path}/file.sock" in done.stdout
    assert "not fromfile" in done.stdout  # the storage driver check names the file's name
    done = run_doctor("--config", str(settings), "--backend", "nosuch")
    assert "nothing known to check for backend 'nosuch'" in done.stdout


def test_doctor_needs_a_backend() -> None:
    done = run_doctor()
    assert done.returncode == 2 and "--backend is required" in done.stderr


def test_a_crashing_check_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(checked: Host) -> Finding:
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor, "COMMON", [broken])
    monkeypatch.setitem(doctor.FRONT_CHECKS, "containerd", [])
    (result,) = doctor.run_checks(host(tmp_path, front="containerd"))
    assert result.level == "FAIL" and "boom" in result.detail


def test_doctor_refuses_a_bad_config_file(tmp_path: Path) -> None:
    settings = tmp_path / "snapdriver.toml"
    settings.write_text('backend = "btrfs"\n[graphdriver]\nnmae = "x"\n')
    done = run_doctor("--config", str(settings))
    assert done.returncode == 2
    assert f"unknown key 'nmae' in [graphdriver] at {settings}:3" in done.stderr


def test_doctor_containerd_front_reads_its_table(tmp_path: Path) -> None:
    settings = tmp_path / "snapdriver.toml"
    config_toml = tmp_path / "containerd.toml"
    config_toml.write_text(
        SNAPSHOTTER.replace("sddoc", "snapdriver").format(path=f"{tmp_path}/c.sock")
    )
    settings.write_text(
        f'backend = "btrfs"\n[containerd]\nroot = "{tmp_path}/root"\nlisten = "unix://{tmp_path}/c.sock"\n'
    )
    done = run_doctor(
        "--front", "containerd", "--config", str(settings), "--containerd-config", str(config_toml)
    )
    assert f"data root filesystem: {tmp_path}/root is on" in done.stdout
    assert f"nothing answers at unix://{tmp_path}/c.sock" in done.stdout
    assert "OK   containerd proxy_plugins: [proxy_plugins.snapdriver]" in done.stdout
    assert "dockerd" not in done.stdout
