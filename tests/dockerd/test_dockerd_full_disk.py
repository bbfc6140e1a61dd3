"""The full-disk scenario with a real dockerd 20.10 on snapdriver's btrfs backend.

On a 400 MiB btrfs: ``docker import`` of an image bigger than the disk fails with one clear line,
the failed layer's space is free again when the command returns, the plugin keeps serving, and
once ``docker rmi`` made room, the import that did not fit before works.
"""

from __future__ import annotations

import os
import random
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapdriver.testing.dockerd import Dockerd
from snapdriver.testing.loopfs import loop_filesystem
from snapdriver.testing.process import PluginProcess

pytestmark = [pytest.mark.dockerd, pytest.mark.slow]
NAME = f"sdfull{os.getpid()}"
MiB = 1 << 20
SIZE_MB = 400


@dataclass
class Env:
    dockerd: Dockerd
    plugin: PluginProcess
    mnt: Path
    tars: Path

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.dockerd.docker(*args, check=check)

    def free(self) -> int:
        st = os.statvfs(self.mnt)
        return st.f_bavail * st.f_frsize

    def image_tar(self, name: str, size_mb: int) -> Path:
        """A rootfs tar of ``size_mb`` MiB of incompressible files, on the host's disk."""
        path = self.tars / f"{name}.tar"
        rng = random.Random(name)
        with tarfile.open(path, "w") as tar:
            for i in range(size_mb // 8):
                info = tarfile.TarInfo(f"data/{name}-{i:03d}")
                info.size = 8 * MiB
                tar.addfile(info, _Random(rng, info.size))
        return path


class _Random:
    """A file-like of ``size`` random bytes, read once."""

    def __init__(self, rng: random.Random, size: int) -> None:
        self.rng, self.left = rng, size

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return self.rng.randbytes(size)


@pytest.fixture(scope="module")
def env(dockerd_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("full")
    (workdir / "plugin").mkdir()
    socket = Path(f"/run/docker/plugins/{NAME}.sock")
    with loop_filesystem("btrfs", size_mb=SIZE_MB) as mnt:
        plugin = PluginProcess("btrfs", workdir / "plugin", name=NAME, socket_path=socket)
        plugin.start()
        dockerd = Dockerd(workdir / "dockerd", NAME, data_root=mnt / "docker")
        try:
            dockerd.start()
            yield Env(dockerd, plugin, mnt, workdir)
        finally:
            dockerd.stop()
            plugin.stop()


def import_image(env: Env, tar: Path, tag: str) -> subprocess.CompletedProcess[str]:
    return env.docker("import", str(tar), tag, check=False)


def test_full_disk_import_fails_cleanly_and_rmi_makes_room(
    env: Env, figure: Callable[[str], None]
) -> None:
    small = env.image_tar("small", 144)
    medium = env.image_tar("medium", 232)
    big = env.image_tar("big", 600)
    assert import_image(env, small, "small:1").returncode == 0
    os.sync()  # btrfs counts written data as used only once it is flushed
    free_before = env.free()

    failed = import_image(env, big, "big:1")
    assert failed.returncode != 0
    error = failed.stderr.strip()
    assert "no space left on device while applying layer" in error, error
    assert "\n" not in error, error
    free_after = env.free()  # when the command returned, with no waiting of our own
    assert free_after >= free_before - 16 * MiB, (free_before >> 20, free_after >> 20)
    assert env.plugin.pid is not None, "the plugin died"
    images = env.docker("images", "--format", "{{.Repository}}").stdout.split()
    assert "big" not in images

    too_much = import_image(env, medium, "medium:1")  # 232 MiB beside 144: no room yet
    assert too_much.returncode != 0 and "no space left on device" in too_much.stderr
    env.docker("rmi", "small:1")  # the room the user makes
    again = import_image(env, medium, "medium:1")
    assert again.returncode == 0, again.stderr
    env.docker("rmi", "medium:1")
    left = sorted(os.listdir(env.mnt / "docker" / NAME / "subvolumes"))
    assert left == [], f"subvolumes left: {left}"
    figure(
        f"FULL DISK (dockerd 20.10, btrfs {SIZE_MB} MiB): import of 600 MiB failed with one line, "
        f"{free_after >> 20} of {free_before >> 20} MiB free when it returned; after docker rmi "
        "the import that did not fit worked"
    )
