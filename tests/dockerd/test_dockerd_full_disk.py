"""The full-disk scenario with a real dockerd 20.10 on snapdriver's btrfs and ZFS backends.

On a 400 MiB btrfs (host), or a ZFS root dataset with a 200 MiB quota (lab; tests/storage.py says
why a quota): ``docker import`` of an image bigger than the space fails with one clear line, the
failed layer's space is free again when the command returns, the plugin keeps serving, and once
``docker rmi`` made room, the import that did not fit before works. On ZFS it costs about 4 guest
minutes, most of it dockerd's start and writing the image tars.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapdriver.testing.dockerd import Dockerd
from snapdriver.testing.process import PluginProcess
from tests.conftest import require_dockerd
from tests.storage import Space, Storage, open_space

pytestmark = [pytest.mark.dockerd, pytest.mark.slow]
NAME = f"sdfull{os.getpid()}"
MiB = 1 << 20
#: ENOSPC on a full filesystem or pool, EDQUOT on a full quota (the ZFS root here).
FULL = "(?:no space left on device|disk quota exceeded)"


@dataclass(frozen=True)
class Sizes:
    """MiB: the space, an image that fits, one that fits alone but not beside it, one too big."""

    space: int
    small: int
    medium: int
    big: int


#: btrfs keeps room for its metadata, so less than the whole 400 MiB takes data; a ZFS quota
#: counts data exactly, so there the medium image is more than what the small one leaves.
SIZES = {"btrfs": Sizes(400, 144, 232, 600), "zfs": Sizes(200, 72, 144, 296)}


@dataclass
class Env:
    dockerd: Dockerd
    plugin: PluginProcess
    space: Space
    storage: Storage
    tars: Path

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.dockerd.docker(*args, check=check)

    def free(self) -> int:
        return self.space.free()

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
def env(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    require_dockerd(request, backend)
    workdir = tmp_path_factory.mktemp("full")
    (workdir / "plugin").mkdir()
    socket = Path(f"/run/docker/plugins/{NAME}.sock")
    with open_space(backend, workdir, SIZES[backend].space) as space:
        # dockerd's data root on the small btrfs, as in production; on ZFS a host directory
        # (the layers are datasets of the root, wherever Home is).
        data_root = Path(space.place) / "docker" if backend == "btrfs" else workdir / "data"
        storage = space.at(data_root / NAME)
        plugin = PluginProcess(
            backend, workdir / "plugin", space.plugin_args, name=NAME, socket_path=socket
        )
        plugin.start()
        dockerd = Dockerd(workdir / "dockerd", NAME, data_root=data_root)
        try:
            dockerd.start(timeout=180)
            yield Env(dockerd, plugin, space, storage, workdir)
        finally:
            dockerd.stop()
            plugin.stop()


def import_image(env: Env, tar: Path, tag: str) -> subprocess.CompletedProcess[str]:
    return env.docker("import", str(tar), tag, check=False)


def test_full_disk_import_fails_cleanly_and_rmi_makes_room(
    env: Env, figure: Callable[[str], None]
) -> None:
    sizes = SIZES[env.space.backend]
    small = env.image_tar("small", sizes.small)
    medium = env.image_tar("medium", sizes.medium)
    big = env.image_tar("big", sizes.big)
    assert import_image(env, small, "small:1").returncode == 0
    os.sync()  # btrfs counts written data as used only once it is flushed
    free_before = env.free()

    failed = import_image(env, big, "big:1")
    assert failed.returncode != 0
    error = failed.stderr.strip()
    assert re.search(FULL + " while applying layer", error), error
    assert "\n" not in error, error
    free_after = env.free()  # when the command returned, with no waiting of our own
    assert free_after >= free_before - 16 * MiB, (free_before >> 20, free_after >> 20)
    assert env.plugin.pid is not None, "the plugin died"
    images = env.docker("images", "--format", "{{.Repository}}").stdout.split()
    assert "big" not in images

    too_much = import_image(env, medium, "medium:1")  # beside the small one: no room yet
    assert too_much.returncode != 0 and re.search(FULL, too_much.stderr), too_much.stderr
    env.docker("rmi", "small:1")  # the room the user makes
    again = import_image(env, medium, "medium:1")
    assert again.returncode == 0, again.stderr
    env.docker("rmi", "medium:1")
    left = env.storage.stored()
    assert left == [], f"layers left: {left}"
    figure(
        f"FULL DISK (dockerd 20.10, {env.space.label}): import of {sizes.big} MiB failed with one "
        f"line, {free_after >> 20} of {free_before >> 20} MiB free when it returned; after docker "
        "rmi the import that did not fit worked"
    )
