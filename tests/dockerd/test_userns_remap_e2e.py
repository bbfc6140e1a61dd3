"""dockerd 20.10 with ``--userns-remap`` on snapdriver, beside its in-tree btrfs driver.

A user with its own subordinate ID range is made for the run (and removed after), so the host's
``dockremap`` and ``/etc/subuid`` are left as they were. Both dockerds use the same remap; the
layers snapdriver stores hold host IDs, containers see root, and the diffIDs of committed and
loaded images are the ones the in-tree driver computes.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapdriver.testing.dockerd import Dockerd
from snapdriver.testing.process import PluginProcess

pytestmark = [pytest.mark.dockerd, pytest.mark.slow]
NAME = f"sdus{os.getpid()}"
USER = f"sdremap{os.getpid() % 100000}"
#: Above the usual 100000-based ranges useradd hands out, and a size Docker accepts.
FIRST, SIZE = 400000 + (os.getpid() % 64) * 65536, 65536
REMAPPED = f"{FIRST}.{FIRST}"
#: Writes a file owned by an unprivileged container user, with fixed times, so the committed
#: layer's bytes (and diffID) depend only on how the driver exports owners.
WRITE = (
    "mkdir /data && echo hi > /data/f && busybox chown 1000:1000 /data/f"
    " && busybox touch -d '2020-01-01 00:00:00' /data/f /data"
    " && busybox stat -c %u:%g /bin/busybox /data/f"
)


@dataclass
class Pair:
    plugin_dockerd: Dockerd
    intree: Dockerd
    home: Path  # the plugin's Home, below dockerd's remapped root
    workdir: Path


def _remap_user() -> Iterator[None]:
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
        check=True,
    )
    try:
        last = FIRST + SIZE - 1
        subprocess.run(
            [
                "usermod",
                "--add-subuids",
                f"{FIRST}-{last}",
                "--add-subgids",
                f"{FIRST}-{last}",
                USER,
            ],
            check=True,
        )
        yield
    finally:
        subprocess.run(["userdel", USER], check=False)
        for path in (Path("/etc/subuid"), Path("/etc/subgid")):  # userdel may leave them
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if not line.startswith(USER + ":")]
            if kept != lines:
                path.write_text("".join(kept))


def _traversable(path: Path) -> Iterator[None]:
    """dockerd refuses a data root whose parents the remapped root cannot pass (o+x)."""
    changed: list[tuple[Path, int]] = []
    for parent in path.parents:
        mode = stat.S_IMODE(os.stat(parent).st_mode)
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)
            changed.append((parent, mode))
    try:
        yield
    finally:
        for parent, mode in changed:
            os.chmod(parent, mode)


@pytest.fixture(scope="module")
def pair(
    btrfs_mount: Path, dockerd_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    workdir = tmp_path_factory.mktemp("userns")
    remap = ["--userns-remap", USER]
    plugin = PluginProcess(
        "btrfs", workdir / "plugin", name=NAME, socket_path=Path(f"/run/docker/plugins/{NAME}.sock")
    )
    (workdir / "plugin").mkdir()
    plugin_root, intree_root = btrfs_mount / "us-plugin", btrfs_mount / "us-intree"
    a = Dockerd(workdir / "a", NAME, data_root=plugin_root, extra_args=remap)
    b = Dockerd(workdir / "b", "btrfs", data_root=intree_root, extra_args=remap)
    user, traversable = _remap_user(), _traversable(btrfs_mount / "x")
    next(user)
    next(traversable)
    try:
        plugin.start()
        a.start()
        b.start()
        yield Pair(a, b, plugin_root / REMAPPED / NAME, workdir)
    finally:
        a.stop()
        b.stop()
        plugin.stop()
        for generator in (traversable, user):
            next(generator, None)


def both(pair: Pair, *args: str) -> tuple[str, str]:
    return (
        pair.plugin_dockerd.docker(*args).stdout.strip(),
        pair.intree.docker(*args).stdout.strip(),
    )


def layers(dockerd: Dockerd, image: str) -> str:
    return dockerd.docker("inspect", "--format", "{{.RootFS.Layers}}", image).stdout.strip()


def test_dockerd_runs_with_the_remap(pair: Pair) -> None:
    for dockerd in (pair.plugin_dockerd, pair.intree):
        info = dockerd.docker("info", "--format", "{{.Driver}} {{.SecurityOptions}}").stdout
        assert "userns" in info, info
    assert pair.plugin_dockerd.docker("info", "--format", "{{.Driver}}").stdout.strip() == NAME
    # dockerd's data root moved below the remapped root; the plugin's Home with it.
    assert pair.home.is_dir() and os.stat(pair.home).st_gid == FIRST


def test_import_run_diff_commit_match_the_in_tree_driver(pair: Pair) -> None:
    for dockerd in (pair.plugin_dockerd, pair.intree):
        dockerd.import_busybox("bb:1")
    plugin_layers, intree_layers = both(pair, "inspect", "--format", "{{.RootFS.Layers}}", "bb:1")
    assert plugin_layers == intree_layers

    outputs = both(pair, "run", "--network", "none", "--name", "writer", "bb:1", "sh", "-c", WRITE)
    # Inside, files are root's and the container's own user's, as the container sees them.
    assert outputs[0].split() == ["0:0", "1000:1000"] == outputs[1].split()
    diffs = both(pair, "diff", "writer")
    assert set(diffs[0].split("\n")) == {"A /data", "A /data/f"} == set(diffs[1].split("\n"))

    # On the host, snapdriver's layers hold the remapped IDs.
    found = list((pair.home / "subvolumes").glob("*/data/f"))
    assert len(found) == 1 and (os.stat(found[0]).st_uid, os.stat(found[0]).st_gid) == (
        FIRST + 1000,
        FIRST + 1000,
    )
    busybox = next((pair.home / "subvolumes").glob("*/bin/busybox"))
    assert os.stat(busybox).st_uid == FIRST

    both(pair, "commit", "writer", "bb:committed")
    committed = both(pair, "inspect", "--format", "{{.RootFS.Layers}}", "bb:committed")
    assert committed[0] == committed[1], "snapdriver's Diff differs from the in-tree driver's"


def test_image_saved_by_the_in_tree_driver_loads_with_the_same_diff_ids(pair: Pair) -> None:
    archive = pair.workdir / "committed.tar"
    pair.intree.docker("save", "-o", str(archive), "bb:committed")
    pair.plugin_dockerd.docker("rmi", "bb:committed")
    pair.plugin_dockerd.docker("load", "-i", str(archive))
    assert layers(pair.plugin_dockerd, "bb:committed") == layers(pair.intree, "bb:committed")
    out = pair.plugin_dockerd.docker(
        "run", "--rm", "--network", "none", "bb:committed", "busybox", "stat", "-c", "%u", "/data/f"
    )
    assert out.stdout.strip() == "1000"
    # And back: what snapdriver saves (its layers reassembled by dockerd) loads in-tree.
    saved = pair.workdir / "from-plugin.tar"
    pair.plugin_dockerd.docker("save", "-o", str(saved), "bb:committed")
    pair.intree.docker("rmi", "bb:committed")
    pair.intree.docker("load", "-i", str(saved))
    assert layers(pair.plugin_dockerd, "bb:committed") == layers(pair.intree, "bb:committed")


def test_removing_everything_leaves_no_subvolume(pair: Pair) -> None:
    for dockerd in (pair.plugin_dockerd, pair.intree):
        dockerd.docker("rm", "-f", "writer")
        dockerd.docker("rmi", "bb:committed", "bb:1")
        dockerd.docker("image", "prune", "-a", "-f")
    assert list((pair.home / "subvolumes").iterdir()) == []
