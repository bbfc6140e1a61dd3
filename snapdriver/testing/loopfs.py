"""Real filesystems on loop devices, for tests and benchmarks.

Mounts and loop devices outlive the process that made them, so every image made here is named
with a recognisable prefix, released on exit, and reclaimed by :func:`sweep_stale` when an
earlier run died before it could release its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from snapdriver.hostfs import mounts_below

PREFIX = "snapdriver-test-"
STATE_ROOT = Path(os.environ.get("SNAPDRIVER_TEST_ROOT", "/var/tmp/snapdriver-tests"))
#: Work directories this process made, so a leak check can tell them from other runs'.
MADE: list[Path] = []


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def can_make_loop_filesystems() -> str | None:
    """None if this process can make loop-backed btrfs, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (loop devices and mounts)"
    for tool in ("losetup", "mkfs.btrfs", "mount", "umount", "btrfs"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install btrfs-progs util-linux)"
    return None


def _detach_image(image: Path) -> None:
    out = subprocess.run(
        ["losetup", "-j", str(image)], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        device = line.split(":", 1)[0]
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)


@contextlib.contextmanager
def data_root_with_layers(
    name: str,
    *,
    root_fstype: str = "ext4",
    layers_fstype: str = "btrfs",
    root_mb: int = 1024,
    layers_mb: int = 1024,
    own_mount: bool = True,
) -> Iterator[Path]:
    """dockerd's data root on a ``root_fstype`` loop filesystem, with a ``layers_fstype`` one
    mounted at ``DATA_ROOT/name``, the Home dockerd's Init gives a plugin called ``name``.

    ``own_mount``: the data root is made a mount point first, as an operator's own volume is.
    Without, dockerd bind-mounts it onto itself at start, which hides the layers' filesystem.
    """
    with (
        loop_filesystem(root_fstype, root_mb) as mount,
        loop_filesystem(layers_fstype, layers_mb) as layers,
    ):
        data_root = mount / "docker"
        binds = [(data_root, data_root)] if own_mount else []
        try:
            for source, target in [*binds, (layers, data_root / name)]:
                target.mkdir(parents=True, exist_ok=True)
                _run("mount", "--bind", str(source), str(target))
            yield data_root
        finally:
            for _ in range(2):  # a bind over the data root hides the layers' mount until gone
                unmount_below(data_root)


def unmount_below(mountpoint: Path) -> None:
    """Unmount everything at or below ``mountpoint``, deepest first (lazily if it is busy)."""
    for mount in mounts_below(mountpoint):
        subprocess.run(["umount", mount.target], check=False, capture_output=True)
        if any(m.target == mount.target for m in mounts_below(mount.target)):
            subprocess.run(["umount", "-l", mount.target], check=False, capture_output=True)


def sweep_stale() -> None:
    """Release the images under :data:`STATE_ROOT` whose owning process has died.

    Images of runs still alive (another test session on the same machine) are left alone.
    """
    if not STATE_ROOT.is_dir():
        return
    for entry in STATE_ROOT.glob(PREFIX + "*"):
        if not _owner_alive(entry):
            _release(entry)


def _owner_alive(workdir: Path) -> bool:
    try:
        pid = int((workdir / "owner.pid").read_text())
    except (OSError, ValueError):
        return False
    return pid != os.getpid() and Path(f"/proc/{pid}").exists()


def _release(workdir: Path) -> None:
    unmount_below(workdir / "mnt")
    _detach_image(workdir / "image")
    shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def loop_filesystem(fstype: str = "btrfs", size_mb: int = 1024) -> Iterator[Path]:
    """Make, mount and finally remove a ``fstype`` filesystem on a sparse loop image."""
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=PREFIX, dir=STATE_ROOT))
    MADE.append(workdir)
    (workdir / "owner.pid").write_text(str(os.getpid()))
    image, mnt = workdir / "image", workdir / "mnt"
    try:
        with open(image, "wb") as handle:
            handle.truncate(size_mb * 1024 * 1024)
        mkfs = ["mkfs.btrfs", "-q", "-f"] if fstype == "btrfs" else ["mkfs." + fstype, "-q", "-F"]
        _run(*mkfs, str(image))
        mnt.mkdir()
        _run("mount", "-o", "loop", str(image), str(mnt))
        yield mnt
    finally:
        _release(workdir)
