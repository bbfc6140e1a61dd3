"""``snapdriver doctor`` on a host that is right (a real dockerd 20.10 on the plugin), then not.

The run's output is printed (``-s``) and is the sample in the README's "Operating snapdriver".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from snapdriver.testing.dockerd import Dockerd
from snapdriver.testing.process import PluginProcess

pytestmark = [pytest.mark.dockerd, pytest.mark.slow]
NAME = f"sddoc{os.getpid()}"


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "snapdriver", "doctor", "--backend", "btrfs", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    print(done.stdout, done.stderr)
    return done


def test_doctor_on_a_working_host_and_after_the_plugin_stops(
    btrfs_mount: Path, dockerd_available: None, tmp_path: Path
) -> None:
    (tmp_path / "plugin").mkdir()
    plugin = PluginProcess(
        "btrfs",
        tmp_path / "plugin",
        name=NAME,
        socket_path=Path(f"/run/docker/plugins/{NAME}.sock"),
    )
    plugin.start()
    dockerd = Dockerd(tmp_path / "dockerd", NAME, data_root=btrfs_mount / "doctor-docker")
    try:
        dockerd.start()
        assert dockerd._proc is not None
        args = ["--name", NAME, "--state-dir", str(plugin.state_dir)]
        args += ["--dockerd-pid", str(dockerd._proc.pid)]
        good = doctor(*args)
        assert good.returncode == 0, good.stdout
        assert good.stdout.splitlines()[-1] == "no problems found"
        assert (
            f"OK   data root filesystem: {btrfs_mount}/doctor-docker/{NAME} is on btrfs"
            in good.stdout
        )
        assert "OK   dockerd version: Docker version 20.10" in good.stdout
        plugin.stop()
        down = doctor(*args)
        assert down.returncode == 1
        assert "FAIL plugin socket: nothing answers" in down.stdout
        assert "SKIP orphan layers" in down.stdout
    finally:
        dockerd.stop()
        plugin.stop()
        subprocess.run(["rm", "-rf", str(btrfs_mount / "doctor-docker")], check=False)
