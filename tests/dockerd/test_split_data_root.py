"""dockerd 20.10's data root on ext4 with snapdriver's layers on a btrfs mounted inside it.

The set-up the README recommends (dockerd's own fsyncs land on ext4; bench/goals.md), and the
way it goes wrong: a data root that is not a mount point of its own is bind-mounted onto itself
by dockerd at start, which hides the btrfs below it. snapdriver must then refuse the Init with
a line that says so, not accept it and fail at the first Create.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapdriver.hostfs import mount_of
from snapdriver.testing.dockerd import Dockerd
from snapdriver.testing.loopfs import data_root_with_layers
from snapdriver.testing.process import PluginProcess

pytestmark = [pytest.mark.dockerd, pytest.mark.slow]
NAME = f"sdsplit{os.getpid()}"
TAG = "sdsplit-busybox"


def _plugin(workdir: Path) -> PluginProcess:
    (workdir / "plugin").mkdir(parents=True, exist_ok=True)
    return PluginProcess(
        "btrfs",
        workdir / "plugin",
        name=NAME,
        socket_path=Path(f"/run/docker/plugins/{NAME}.sock"),
    )


@pytest.fixture
def started(dockerd_available: None, tmp_path: Path) -> Iterator[tuple[Dockerd, Path]]:
    """dockerd and the plugin on an ext4 data root (its own mount) with a btrfs at NAME."""
    with data_root_with_layers(NAME) as data_root:
        plugin = _plugin(tmp_path)
        dockerd = Dockerd(tmp_path / "dockerd", NAME, data_root=data_root)
        try:
            plugin.start()
            dockerd.start()
            yield dockerd, data_root
        finally:
            dockerd.stop()
            plugin.stop()


def test_layers_go_to_the_btrfs_and_dockerds_state_stays_on_ext4(
    started: tuple[Dockerd, Path],
) -> None:
    dockerd, data_root = started
    dockerd.import_busybox(TAG)
    made = dockerd.docker(
        "run",
        "--name",
        "sdsplit-c",
        "--network",
        "none",
        TAG,
        "sh",
        "-c",
        "echo hi > /made; cat /made",
    )
    assert made.stdout.strip() == "hi"
    assert "A /made" in dockerd.docker("diff", "sdsplit-c").stdout.splitlines()
    dockerd.docker("commit", "sdsplit-c", f"{TAG}:2")
    again = dockerd.docker("run", "--rm", "--network", "none", f"{TAG}:2", "cat", "/made")
    assert again.stdout.strip() == "hi"

    subvolumes = data_root / NAME / "subvolumes"
    assert mount_of(subvolumes).fstype == "btrfs"
    assert mount_of(data_root / "image").fstype == "ext4"
    layers = list(subvolumes.iterdir())
    # The image's layer, the container's and its -init, the commit's: each a subvolume (inode
    # 256 is a subvolume's root on btrfs).
    assert len(layers) >= 4
    assert all(layer.stat().st_ino == 256 for layer in layers)


def test_a_data_root_that_is_no_mount_point_is_refused_at_init(
    dockerd_available: None, tmp_path: Path
) -> None:
    with data_root_with_layers(NAME, own_mount=False) as data_root:
        plugin = _plugin(tmp_path)
        dockerd = Dockerd(tmp_path / "dockerd", NAME, data_root=data_root)
        try:
            plugin.start()
            with pytest.raises(RuntimeError, match="exited early") as failed:
                dockerd.start()
            assert plugin.pid is not None  # it refused the Init and keeps serving
        finally:
            dockerd.stop()
            plugin.stop()
    refusal = f"{data_root}/{NAME} is not on btrfs (it is on ext4 mounted at {data_root})"
    assert refusal in str(failed.value)
