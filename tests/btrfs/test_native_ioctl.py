"""The raw ioctls: subvolume ids, send errors, inode paths and quota groups, on real btrfs."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapdriver.testing.loopfs import loop_filesystem

btrfsutil = pytest.importorskip("btrfsutil", reason="python3-btrfsutil is needed for subvolumes")

from snapdriver_btrfs import ioctl  # noqa: E402
from snapdriver_btrfs.sendstream import MAGIC, Attr, Cmd, parse_chunks, parse_stream  # noqa: E402

pytestmark = pytest.mark.btrfs
MiB = 1 << 20


@pytest.fixture(scope="module")
def quota_root(btrfs_mount: Path) -> Iterator[Path]:
    """A btrfs of its own, whose quota state these tests own (the session's may have quotas on).

    Depends on ``btrfs_mount`` for its loud skip (tests/conftest.py) when loop devices are out.
    """
    with loop_filesystem("btrfs", size_mb=512) as mnt:
        yield mnt


@pytest.fixture
def base(btrfs_mount: Path) -> Iterator[Path]:
    """A directory for one test's subvolumes on the session's btrfs, all deleted afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ioctl-", dir=btrfs_mount))
    yield path
    _delete_all(path)


def _delete_all(path: Path) -> None:
    for entry in path.iterdir():
        if btrfsutil.is_subvolume(str(entry)):
            btrfsutil.set_subvolume_read_only(str(entry), False)
            btrfsutil.delete_subvolume(str(entry), recursive=True)
    shutil.rmtree(path)


def frozen(path: Path, files: dict[str, bytes] | None = None) -> Path:
    btrfsutil.create_subvolume(str(path))
    for name, data in (files or {}).items():
        (path / name).write_bytes(data)
    btrfsutil.set_subvolume_read_only(str(path), True)
    return path


# -- subvolumes and send ------------------------------------------------------------------------


def test_subvolume_id(base: Path) -> None:
    sub = base / "sub"
    btrfsutil.create_subvolume(str(sub))
    (sub / "dir").mkdir()
    assert ioctl.subvolume_id(sub) == btrfsutil.subvolume_id(str(sub))
    assert ioctl.subvolume_id(sub / "dir") == btrfsutil.subvolume_id(str(sub))
    assert ioctl.subvolume_id(base) == 5  # the top-level subvolume


def test_send_refuses_writable_subvolumes(base: Path) -> None:
    parent = frozen(base / "parent")
    child = base / "child"
    btrfsutil.create_snapshot(str(parent), str(child))
    with pytest.raises(PermissionError, match=r"BTRFS_IOC_SEND failed.*child"):
        ioctl.send_stream(child, parent=parent)


def test_send_errors_name_the_path(base: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        ioctl.send_stream(base / "missing")
    (base / "plain").write_bytes(b"x")
    with pytest.raises(OSError, match="plain") as caught:
        ioctl.send_stream(base / "plain")
    assert caught.value.filename == str(base / "plain")


def test_send_parent_on_another_filesystem_is_refused(base: Path) -> None:
    child = frozen(base / "child")
    with loop_filesystem("btrfs", size_mb=256) as other:
        parent = frozen(other / "parent")
        try:
            with pytest.raises(OSError, match="another filesystem") as caught:
                ioctl.send_stream(child, parent=parent)
            assert caught.value.errno == errno.EXDEV
        finally:
            btrfsutil.set_subvolume_read_only(str(parent), False)
            btrfsutil.delete_subvolume(str(parent))


def test_send_stream_larger_than_a_pipe(base: Path) -> None:
    """The reader thread drains the pipe while the ioctl blocks: no deadlock on big streams."""
    sub = frozen(base / "big", {f"f{i}": os.urandom(64) for i in range(3000)})
    stream = ioctl.send_stream(sub)
    assert len(stream) > 1 << 17
    written = [c for c in parse_stream(ioctl.send_stream(sub, flags=0)) if c.cmd == Cmd.WRITE]
    assert sum(len(c.raw(Attr.DATA)) for c in written) == 3000 * 64


def test_leaving_send_chunks_early_stops_the_send(base: Path) -> None:
    """Closing the pipe stops the kernel's send quietly (EPIPE), and its thread ends."""
    sub = frozen(base / "big", {f"f{i}": os.urandom(4096) for i in range(1000)})
    with ioctl.send_chunks(sub, flags=0) as chunks:
        first = next(chunks)
    assert first.startswith(MAGIC)
    assert len(first) < 1000 * 4096
    assert not [t for t in threading.enumerate() if t.name == "btrfs-send"]


def test_a_failed_send_wins_over_the_readers_error(base: Path) -> None:
    """A stream the kernel gave up on is raised as the kernel's error, not as the reader's."""
    child = base / "child"
    btrfsutil.create_subvolume(str(child))
    with (
        pytest.raises(PermissionError, match="BTRFS_IOC_SEND"),
        ioctl.send_chunks(child) as chunks,
    ):
        list(parse_chunks(chunks))


# -- inode paths --------------------------------------------------------------------------------


def test_inode_paths_lists_every_name(base: Path) -> None:
    sub = base / "sub"
    btrfsutil.create_subvolume(str(sub))
    (sub / "a/b").mkdir(parents=True)
    (sub / "a/b/orig").write_bytes(b"x")
    odd = os.fsdecode(b"odd \xff name")
    os.link(sub / "a/b/orig", sub / "hard")
    os.link(sub / "a/b/orig", sub / "a" / odd)
    inode = os.lstat(sub / "hard").st_ino
    expected = {"/a/b/orig", "/hard", f"/a/{odd}"}
    assert set(ioctl.inode_paths(sub, inode)) == expected
    assert set(ioctl.inode_paths(sub / "a/b", inode)) == expected  # any path in the subvolume
    assert ioctl.inode_paths(sub, os.lstat(sub / "a").st_ino) == ["/a"]


def test_inode_paths_beyond_the_kernel_buffer(base: Path) -> None:
    """INO_PATHS stops at 4 KiB of names; the INODE_REF/EXTREF search finds the rest."""
    sub = base / "sub"
    btrfsutil.create_subvolume(str(sub))
    for directory in ("bin", "sbin", "usr/bin"):
        (sub / directory).mkdir(parents=True)
    (sub / "bin/busybox").write_bytes(b"multi-call")
    expected = {"/bin/busybox"}
    for i in range(400):
        directory = ("bin", "sbin", "usr/bin")[i % 3]
        name = f"applet-{i:03d}-{'x' * 30}"
        os.link(sub / "bin/busybox", sub / directory / name)
        expected.add(f"/{directory}/{name}")
    inode = os.lstat(sub / "bin/busybox").st_ino
    paths = ioctl.inode_paths(sub, inode)
    assert sorted(paths) == sorted(expected)


def test_inode_paths_unknown_inode(base: Path) -> None:
    sub = base / "sub"
    btrfsutil.create_subvolume(str(sub))
    with pytest.raises(FileNotFoundError, match=str(sub)):
        ioctl.inode_paths(sub, 999_999)


# -- quotas -------------------------------------------------------------------------------------


def qgroup_table(mnt: Path) -> dict[str, list[str]]:
    """``btrfs qgroup show -re --raw``: qgroupid -> [rfer, excl, max_rfer, max_excl, ...]."""
    out = subprocess.run(
        ["btrfs", "qgroup", "show", "-re", "--raw", str(mnt)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
    return {row[0]: row[1:] for row in rows}


def fill(path: Path, size: int) -> None:
    with open(path, "wb") as handle:
        for _ in range(size // MiB):
            handle.write(os.urandom(MiB))
            os.fsync(handle.fileno())


def test_quota_lifecycle(quota_root: Path) -> None:
    mnt = quota_root
    assert not ioctl.quota_enabled(mnt)
    btrfsutil.create_subvolume(str(mnt / "early"))
    with pytest.raises(OSError, match="BTRFS_IOC_QGROUP_LIMIT"):
        ioctl.limit_referenced(mnt / "early", 8 * MiB)
    ioctl.enable_quota(mnt)
    try:
        assert ioctl.quota_enabled(mnt)
        ioctl.enable_quota(mnt)  # idempotent
        _limits_and_qgroups(mnt)
    finally:
        ioctl.disable_quota(mnt)
    assert not ioctl.quota_enabled(mnt)
    btrfsutil.delete_subvolume(str(mnt / "early"))


def _limits_and_qgroups(mnt: Path) -> None:
    sub = mnt / "limited"
    btrfsutil.create_subvolume(str(sub))
    subvol_id = btrfsutil.subvolume_id(str(sub))
    ioctl.limit_referenced(sub, 8 * MiB)
    assert qgroup_table(mnt)[f"0/{subvol_id}"][2] == str(8 * MiB)
    with pytest.raises(OSError, match="quota exceeded"):  # the limit is enforced
        fill(sub / "big", 32 * MiB)
    ioctl.limit_referenced(sub, None)
    assert qgroup_table(mnt)[f"0/{subvol_id}"][2] == "none"
    with pytest.raises(ValueError, match="positive"):
        ioctl.limit_referenced(sub, 0)
    # A live subvolume's qgroup cannot go; once the subvolume is dropped it can, or is gone.
    with pytest.raises(OSError, match="BTRFS_IOC_QGROUP_CREATE") as busy:
        ioctl.qgroup_destroy(mnt, subvol_id)
    assert busy.value.errno == errno.EBUSY
    btrfsutil.delete_subvolume(str(sub))
    deadline = time.monotonic() + 60
    while not ioctl.forget_qgroup(mnt, subvol_id):
        assert time.monotonic() < deadline, "qgroup of a deleted subvolume stays busy"
        btrfsutil.sync(str(mnt))  # a commit wakes the cleaner, which drops the subvolume
        time.sleep(0.1)
    assert f"0/{subvol_id}" not in qgroup_table(mnt)
    assert ioctl.forget_qgroup(mnt, subvol_id)  # an unknown qgroup is fine
    # Higher-level qgroups come and go on request.
    level_one = (1 << 48) | 100
    ioctl.qgroup_create(mnt, level_one)
    assert "1/100" in qgroup_table(mnt)
    ioctl.qgroup_destroy(mnt, level_one)
    assert "1/100" not in qgroup_table(mnt)
    with pytest.raises(FileNotFoundError):
        ioctl.qgroup_destroy(mnt, level_one)


def test_forget_qgroup_without_quotas(quota_root: Path) -> None:
    assert not ioctl.quota_enabled(quota_root)
    assert ioctl.forget_qgroup(quota_root, 300)


def test_simple_quotas(quota_root: Path) -> None:
    mnt = quota_root
    try:
        ioctl.enable_quota(mnt, simple=True)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            pytest.skip(f"kernel without simple quotas (6.7+): {err}")
        raise
    try:
        assert ioctl.quota_enabled(mnt)
        sub = mnt / "squota"
        btrfsutil.create_subvolume(str(sub))
        ioctl.limit_referenced(sub, 16 * MiB)
        assert qgroup_table(mnt)[f"0/{btrfsutil.subvolume_id(str(sub))}"][2] == str(16 * MiB)
        btrfsutil.delete_subvolume(str(sub))
    finally:
        ioctl.disable_quota(mnt)
    assert not ioctl.quota_enabled(mnt)
