"""dockerd 20.10 on snapdriver's ZFS backend, inside the lab guest.

import, run, diff, commit, run the committed image, rm and rmi, and then no dataset or snapshot
of snapdriver's is left under the root dataset.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from snapdriver_zfs.testing import everything_below

from snapdriver.testing.dockerd import Dockerd
from snapdriver.testing.process import PluginProcess

pytestmark = [pytest.mark.zfs, pytest.mark.dockerd, pytest.mark.slow]
# Per run: dockerd finds the plugin by this name in /run/docker/plugins, shared by concurrent runs.
NAME = f"sdzfs{os.getpid()}"


@dataclass
class Env:
    dockerd: Dockerd
    root: str

    def docker(self, *args: str) -> str:
        return self.dockerd.docker(*args).stdout


@pytest.fixture(scope="module")
def env(root_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if shutil.which("dockerd") is None or not Path("/bin/busybox").exists():
        pytest.skip("DOCKERD-ON-ZFS NOT RUN: dockerd or busybox-static missing in this machine")
    workdir = tmp_path_factory.mktemp("zfs-dockerd")
    plugin = PluginProcess(
        "zfs",
        workdir / "plugin",
        ["--dataset", root_dataset],
        name=NAME,
        socket_path=Path(f"/run/docker/plugins/{NAME}.sock"),
    )
    (workdir / "plugin").mkdir()
    plugin.start()
    dockerd = Dockerd(workdir / "dockerd", NAME, data_root=workdir / "data")
    try:
        dockerd.start(timeout=180)
        dockerd.import_busybox("bb:1")
        yield Env(dockerd, root_dataset)
    finally:
        dockerd.stop()
        plugin.stop()


def test_run_diff_commit_and_clean_removal(env: Env) -> None:
    out = env.docker(
        "run",
        "--name",
        "z1",
        "--network",
        "none",
        "bb:1",
        "sh",
        "-c",
        "echo hello > /hello; rm /bin/touch; echo done",
    )
    assert out.strip() == "done"
    diff = set(env.docker("diff", "z1").split("\n"))
    assert {"A /hello", "D /bin/touch", "C /bin"} <= diff
    env.docker("commit", "z1", "bb:committed")
    assert (
        env.docker("run", "--rm", "--network", "none", "bb:committed", "cat", "/hello").strip()
        == "hello"
    )
    assert "zfs" in env.docker("info", "--format", "{{json .DriverStatus}}").lower()
    env.docker("rm", "z1")
    env.docker("rmi", "bb:committed", "bb:1")
    assert env.docker("images", "-q", "-a").strip() == ""
    left = [name for name in everything_below(env.root) if name != env.root]
    assert left == [], f"datasets or snapshots left behind: {left}"
