"""The full-disk scenario with a real dockerd 20.10 on snapdriver's btrfs and ZFS backends.

On a 400 MiB btrfs (host), or a ZFS pool of its own with about 200 MiB for layers (lab; see
tests/storage.py): ``docker import`` of an image bigger than the space fails with one clear
line, the failed layer's space is free again when the command returns, the plugin keeps
serving, and once ``docker rmi`` made room, the import that did not fit before works. On ZFS it
took about 10 guest minutes with three other lab guests beside it, most of it dockerd's start
and the imports.
"""

from __future__ import annotations

import io
import os
import random
import re
import subprocess
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from snapdriver.testing.dockerd import Dockerd
from snapdriver.testing.process import PluginProcess
from tests.conftest import require_dockerd
from tests.storage import Space, Storage, open_space

pytestmark = [pytest.mark.dockerd, pytest.mark.slow]
NAME = f"sdfull{os.getpid()}"
MiB = 1 << 20
#: ENOSPC on a full filesystem or pool.
FULL = "no space left on device"


@dataclass(frozen=True)
class Sizes:
    """MiB: the space, an image that fits, one that fits alone but not beside it, one too big."""

    space: int
    small: int
    medium: int
    big: int


#: btrfs keeps room for its metadata, so less than the whole 400 MiB takes data; the ZFS pool is
#: sized to leave about 200 MiB for data, so there the small and medium images together are
#: well over it and the medium one well under.
SIZES = {"btrfs": Sizes(400, 144, 232, 600), "zfs": Sizes(200, 96, 152, 296)}


@dataclass
class Env:
    dockerd: Dockerd
    plugin: PluginProcess
    space: Space
    storage: Storage

    def docker(
        self, *args: str, check: bool = True, stdin: IO[bytes] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.dockerd.docker(*args, check=check, stdin=stdin)

    def free(self) -> int:
        return self.space.free()

    def import_image(self, name: str, size_mb: int, tag: str) -> subprocess.CompletedProcess[str]:
        """``docker import -`` of a rootfs tar of ``size_mb`` MiB of incompressible files, fed
        through a pipe: never on disk (the lab guest's disk is its RAM)."""
        read, write = os.pipe()
        writer = threading.Thread(target=_write_rootfs, args=(write, name, size_mb), daemon=True)
        writer.start()
        try:
            with open(read, "rb") as stdin:
                return self.docker("import", "-", tag, check=False, stdin=stdin)
        finally:
            writer.join(timeout=60)


def _write_rootfs(fd: int, name: str, size_mb: int) -> None:
    """The same bytes for the same ``name``: files of 8 MiB of seeded random data."""
    rng = random.Random(name)
    try:
        with open(fd, "wb") as out, tarfile.open(fileobj=out, mode="w|") as tar:
            for i in range(size_mb // 8):
                info = tarfile.TarInfo(f"data/{name}-{i:03d}")
                info.size = 8 * MiB
                tar.addfile(info, io.BytesIO(rng.randbytes(info.size)))
    except BrokenPipeError:
        pass  # docker stopped reading: the import failed, which the test judges


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
            yield Env(dockerd, plugin, space, storage)
        finally:
            dockerd.stop()
            plugin.stop()


def test_full_disk_import_fails_cleanly_and_rmi_makes_room(
    env: Env, figure: Callable[[str], None]
) -> None:
    sizes = SIZES[env.space.backend]
    assert env.import_image("small", sizes.small, "small:1").returncode == 0
    os.sync()  # btrfs counts written data as used only once it is flushed
    free_before = env.free()

    failed = env.import_image("big", sizes.big, "big:1")
    assert failed.returncode != 0
    error = failed.stderr.strip()
    assert re.search(FULL + " while applying layer", error), error
    assert "\n" not in error, error
    free_after = env.free()  # when the command returned, with no waiting of our own
    assert free_after >= free_before - 16 * MiB, (free_before >> 20, free_after >> 20)
    assert env.plugin.pid is not None, "the plugin died"
    images = env.docker("images", "--format", "{{.Repository}}").stdout.split()
    assert "big" not in images

    too_much = env.import_image(
        "medium", sizes.medium, "medium:1"
    )  # beside the small one: no room yet
    assert too_much.returncode != 0 and re.search(FULL, too_much.stderr), too_much.stderr
    env.docker("rmi", "small:1")  # the room the user makes
    again = env.import_image("medium", sizes.medium, "medium:1")
    assert again.returncode == 0, again.stderr
    env.docker("rmi", "medium:1")
    left = env.storage.stored()
    assert left == [], f"layers left: {left}"
    figure(
        f"FULL DISK (dockerd 20.10, {env.space.label}): import of {sizes.big} MiB failed with one "
        f"line, {free_after >> 20} of {free_before >> 20} MiB free when it returned; after docker "
        "rmi the import that did not fit worked"
    )
