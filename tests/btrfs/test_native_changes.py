"""native_changes against the tree walk, on a real btrfs loop filesystem.

Every scenario builds a parent subvolume, freezes a read-only snapshot of it, edits a writable
snapshot (the "child") and freezes that too; then the send-stream differ must give exactly the list
Docker's walk gives. Scenarios include the two adversarial experiments of
docs/native-diff.md §3.2 and §3.3 and a Hypothesis property test over random trees and edits.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapdriver.layers.changes import Change, walk_changes
from snapdriver.testing.trees import chain, create

btrfsutil = pytest.importorskip("btrfsutil", reason="python3-btrfsutil is needed for subvolumes")

from snapdriver_btrfs import ioctl  # noqa: E402
from snapdriver_btrfs.native import MAX_SEND_DEPTH, native_changes  # noqa: E402
from snapdriver_btrfs.sendstream import SendStreamError, parse_stream  # noqa: E402

pytestmark = pytest.mark.btrfs

# Parent entries get this mtime: long ago, with nanoseconds, so that any edit in the child moves
# mtime, and equal-size files have identical mtimes (Docker's swap blind spot stays reachable).
PARENT_MTIME_NS = 1_600_000_000_500_000_000
Build = Callable[[Path], None]


@pytest.fixture(scope="module")
def btrfs_root(btrfs_mount: Path) -> Iterator[Path]:
    """This module's directory on the session's btrfs loop filesystem (tests/conftest.py, which
    skips loudly, or fails under SNAPDRIVER_REQUIRE_TIERS=btrfs, when it cannot make one)."""
    root = Path(tempfile.mkdtemp(prefix="native-changes-", dir=btrfs_mount))
    yield root
    shutil.rmtree(root)


def set_parent_mtimes(root: Path) -> None:
    """Give every entry below ``root`` the same old mtime (symlinks themselves, not targets)."""
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            os.utime(
                os.path.join(directory, name),
                ns=(PARENT_MTIME_NS, PARENT_MTIME_NS),
                follow_symlinks=False,
            )


@contextlib.contextmanager
def layer_pair(
    root: Path, build: Build, edit: Build, *, keep_mtimes: bool = False
) -> Iterator[tuple[Path, Path]]:
    """``(child_ro, parent_ro)``: a frozen parent built by ``build`` and a frozen edited child."""
    base = Path(tempfile.mkdtemp(prefix="pair-", dir=root))
    parent, parent_ro, child = base / "parent", base / "parent.ro", base / "child"
    try:
        btrfsutil.create_subvolume(str(parent))
        build(parent)
        if not keep_mtimes:
            set_parent_mtimes(parent)
        btrfsutil.create_snapshot(str(parent), str(parent_ro), read_only=True)
        btrfsutil.create_snapshot(str(parent_ro), str(child))
        edit(child)
        btrfsutil.set_subvolume_read_only(str(child), True)
        yield child, parent_ro
    finally:
        for subvolume in (child, parent_ro, parent):
            if os.path.lexists(subvolume):
                # A read-only subvolume cannot lose its nested subvolumes.
                btrfsutil.set_subvolume_read_only(str(subvolume), False)
                btrfsutil.delete_subvolume(str(subvolume), recursive=True)
        shutil.rmtree(base)


def compare(root: Path, build: Build, edit: Build) -> list[Change]:
    """Assert native == walk for one scenario; return the list."""
    with layer_pair(root, build, edit) as (child, parent):
        walked = walk_changes(child, parent)
        native = native_changes(child, parent)
    assert native == walked, _difference(native, walked)
    return native


def _difference(native: list[Change], walked: list[Change]) -> str:
    only_native = sorted(set(native) - set(walked), key=Change.sort_key)
    only_walk = sorted(set(walked) - set(native), key=Change.sort_key)
    return f"only native: {render(only_native)[:20]}; only walk: {render(only_walk)[:20]}"


def render(changes: list[Change]) -> list[str]:
    """Docker's ``docker diff`` notation: ``C /etc``."""
    return [f"{'CAD'[c.kind]} {c.path}" for c in changes]


def write(path: Path, data: bytes | str = b"x", mode: int | None = None) -> None:
    """Create or overwrite a regular file, never through a symlink."""
    path.parent.mkdir(parents=True, exist_ok=True)
    put(path, data.encode() if isinstance(data, str) else data, os.O_CREAT | os.O_TRUNC)
    if mode is not None:
        path.chmod(mode)


def append(path: Path, data: bytes) -> None:
    put(path, data, os.O_APPEND)


def put(path: Path, data: bytes, flags: int) -> None:
    """Write with ``O_NOFOLLOW``: these trees hold symlinks to absolute paths."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def capability(raw_caps: int) -> bytes:
    """A VFS_CAP_REVISION_2 ``security.capability`` value with effective set."""
    return struct.pack("<IIIII", 0x02000001, raw_caps, 0, 0, 0)


CAP_NET_RAW = 1 << 13
CAP_NET_BIND = 1 << 10


# -- docs/native-diff.md §3.2: mixed changes ----------------------------------------------------


def build_experiment_1(p: Path) -> None:
    write(p / "etc/hosts", "127.0.0.1 localhost\n")
    os.setxattr(p / "etc/hosts", "user.color", b"blue")
    write(p / "etc/app.conf", "a=1\n")
    write(p / "etc/oldname", "old\n")
    write(p / "etc/perm", "secret\n", 0o600)
    write(p / "usr/bin/tool", "#!/bin/sh\n", 0o755)
    write(p / "usr/bin/keep", "keep\n")
    os.symlink("../etc/hosts", p / "usr/hosts-link")
    write(p / "deep/a/b/c/leaf1", "1")
    write(p / "deep/a/b/c/leaf2", "2")
    write(p / "deep/a/top", "top")
    write(p / "var/log/syslog", "boot\n")
    os.mkfifo(p / "var/fifo")
    write(p / "opt/orig", "original\n")
    os.link(p / "opt/orig", p / "opt/hard")
    write(p / "opt/becomesdir", "file\n")


def edit_experiment_1(c: Path) -> None:
    write(c / "etc/newfile", "new\n")
    write(c / "newdir/sub/file", "f\n")
    append(c / "var/log/syslog", b"more\n")
    (c / "etc/perm").chmod(0o644)
    os.chown(c / "usr/bin/keep", 1000, 1000)
    (c / "etc/app.conf").unlink()
    (c / "etc/oldname").rename(c / "etc/newname")
    (c / "opt/becomesdir").unlink()
    write(c / "opt/becomesdir/f", "in dir\n")
    shutil.rmtree(c / "deep/a")
    os.setxattr(c / "etc/hosts", "user.color", b"red")
    os.link(c / "usr/bin/tool", c / "usr/bin/tool2")
    (c / "usr/hosts-link").unlink()
    os.symlink("../etc/newfile", c / "usr/hosts-link")
    append(c / "opt/orig", b"appended\n")
    (c / "var/fifo").unlink()


EXPERIMENT_1 = """C /deep D /deep/a C /etc D /etc/app.conf A /etc/newfile A /etc/newname
D /etc/oldname C /etc/perm A /newdir A /newdir/sub A /newdir/sub/file C /opt C /opt/becomesdir
A /opt/becomesdir/f C /opt/hard C /opt/orig C /usr C /usr/bin C /usr/bin/keep A /usr/bin/tool2
C /usr/hosts-link C /var D /var/fifo C /var/log C /var/log/syslog"""


def expected(text: str) -> list[str]:
    words = text.split()
    return [f"{kind} {path}" for kind, path in zip(words[::2], words[1::2], strict=True)]


def test_experiment_1_mixed_changes(btrfs_root: Path) -> None:
    with layer_pair(btrfs_root, build_experiment_1, edit_experiment_1) as (child, parent):
        stream = ioctl.send_stream(child, parent=parent)
        walked = walk_changes(child, parent)
        native = native_changes(child, parent)
    # The stream really is adversarial: orphan names, and no line at all for /opt/hard.
    paths = [c.path for c in parse_stream(stream) if c.attrs]
    assert any(re.fullmatch(rb"o\d+-\d+-\d+", p.split(b"/")[0]) for p in paths)
    assert b"opt/hard" not in paths
    assert native == walked, _difference(native, walked)
    assert render(native) == expected(EXPERIMENT_1)


# -- docs/native-diff.md §3.3: adversarial renames ----------------------------------------------


def build_experiment_2(p: Path) -> None:
    write(p / "movefile", "move me\n")
    write(p / "a/f2", "f2\n")
    write(p / "a/inner/f1", "f1\n")
    write(p / "x/k1", "k1\n")
    write(p / "x/k2", "k2\n")
    (p / "x/keepdir").mkdir()
    write(p / "x/same", "same\n")
    write(p / "dirtofile/sub/q", "q\n")
    write(p / "sw1", "one\n")
    write(p / "sw2", "two\n")
    write(p / "caps/ping", "ping\n", 0o755)
    write(p / "touchme", "touch\n")
    write(p / "y/hlsrc", "hl\n")
    write(p / "reuse", "reuse\n")


def edit_experiment_2(c: Path) -> None:
    (c / "movefile").rename(c / "a/movefile")
    (c / "a").rename(c / "b")
    saved = c.parent / "same.saved"
    shutil.copy2(c / "x/same", saved)
    shutil.rmtree(c / "x")
    (c / "x").mkdir()
    write(c / "x/k1", "k1 recreated\n")
    shutil.copy2(saved, c / "x/same")
    saved.unlink()
    shutil.rmtree(c / "dirtofile")
    write(c / "dirtofile", "now file")
    (c / "sw1").rename(c / "swtmp")
    (c / "sw2").rename(c / "sw1")
    (c / "swtmp").rename(c / "sw2")
    os.setxattr(c / "caps/ping", "security.capability", capability(CAP_NET_RAW))
    os.utime(c / "touchme")
    os.link(c / "y/hlsrc", c / "hl_other")
    (c / "y/hlsrc").unlink()
    (c / "reuse").unlink()
    write(c / "reuse/in", "in\n")
    os.mknod(c / "chardev", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    os.mknod(c / "sock", stat.S_IFSOCK | 0o755)


# docs/native-diff.md says 23 but lists these 22; /sw1 and /sw2 (equal size, same mtime) and
# /x/same (copied with its mtime) are invisible to Docker.
EXPERIMENT_2 = """D /a A /b A /b/f2 A /b/inner A /b/inner/f1 A /b/movefile C /caps C /caps/ping
A /chardev C /dirtofile A /hl_other D /movefile C /reuse A /reuse/in A /sock C /touchme C /x
C /x/k1 D /x/k2 D /x/keepdir C /y D /y/hlsrc"""


def test_experiment_2_adversarial_renames(btrfs_root: Path) -> None:
    native = compare(btrfs_root, build_experiment_2, edit_experiment_2)
    assert render(native) == expected(EXPERIMENT_2)


# -- focused scenarios --------------------------------------------------------------------------


def test_hard_links(btrfs_root: Path) -> None:
    def build(p: Path) -> None:
        write(p / "h/a", "shared\n")
        os.link(p / "h/a", p / "h/b")
        (p / "other/deep").mkdir(parents=True)
        os.link(p / "h/a", p / "other/deep/c")
        write(p / "m/x", "mode\n")
        (p / "n").mkdir()
        os.link(p / "m/x", p / "n/y")
        write(p / "gone/one", "1\n")
        os.link(p / "gone/one", p / "gone/two")
        write(p / "plain", "plain\n")

    def edit(c: Path) -> None:
        append(c / "h/b", b"grown\n")  # all three names change, two are never in the stream
        (c / "m/x").chmod(0o600)  # metadata only: both names change
        (c / "gone/one").unlink()  # one name gone, the other unchanged
        os.link(c / "plain", c / "plain2")  # a new name only
        (c / "newdir").mkdir()
        os.link(c / "h/a", c / "newdir/d")

    native = compare(btrfs_root, build, edit)
    assert {"C /h/a", "C /h/b", "C /other/deep/c", "C /m/x", "C /n/y"} <= set(render(native))
    assert "D /gone/one" in render(native)
    assert "C /gone/two" not in render(native)


def test_many_hard_links_beyond_ino_paths_buffer(btrfs_root: Path) -> None:
    """An inode with more names than INO_PATHS returns (4 KiB) still yields every name."""
    names = [f"link-{i:04d}-{'n' * 40}" for i in range(300)]

    def build(p: Path) -> None:
        write(p / "bin/busybox", "multi-call\n", 0o755)
        for name in names:
            os.link(p / "bin/busybox", p / "bin" / name)

    def edit(c: Path) -> None:
        (c / "bin/busybox").chmod(0o700)

    native = compare(btrfs_root, build, edit)
    assert len(native) == len(names) + 2  # every name plus /bin


def test_directory_renames(btrfs_root: Path) -> None:
    def build(p: Path) -> None:
        for top in ("a", "b", "c", "d", "e", "keep"):
            write(p / top / "common", f"{top}\n")
            write(p / top / f"only-{top}", "x\n")
            write(p / top / "sub/deeper/leaf", f"{top} leaf\n")
        (p / "empty").mkdir()
        write(p / "z/inner/f", "z\n")

    def edit(c: Path) -> None:
        # Swap two directories: Docker compares their contents name by name.
        (c / "a").rename(c / "tmp")
        (c / "b").rename(c / "a")
        (c / "tmp").rename(c / "b")
        # A directory replaced by a renamed one.
        shutil.rmtree(c / "c")
        (c / "d").rename(c / "c")
        # A renamed directory over an empty directory, and into another directory.
        (c / "e").rename(c / "empty")
        (c / "z").rename(c / "keep/z")
        # Its child moved out again after the move.
        (c / "keep/z/inner").rename(c / "inner-out")
        (c / "keep/sub").rename(c / "keep/sub2")

    compare(btrfs_root, build, edit)


def test_file_to_dir_and_dir_to_file(btrfs_root: Path) -> None:
    def build(p: Path) -> None:
        write(p / "f2d", "file\n")
        write(p / "d2f/x/y/z", "deep\n")
        write(p / "d2f/w", "w\n")
        write(p / "link2d", "l\n")
        os.symlink("f2d", p / "sym2dir")
        write(p / "d2sym/k", "k\n")

    def edit(c: Path) -> None:
        (c / "f2d").unlink()
        write(c / "f2d/inside/more", "more\n")
        shutil.rmtree(c / "d2f")
        write(c / "d2f", "now a file\n")
        (c / "sym2dir").unlink()
        write(c / "sym2dir/in", "in\n")
        shutil.rmtree(c / "d2sym")
        os.symlink("/nonexistent-snapdriver-test", c / "d2sym")

    native = compare(btrfs_root, build, edit)
    assert "C /d2f" in render(native)
    assert not any(line.startswith("D /d2f/") for line in render(native))
    assert "A /f2d/inside/more" in render(native)


def test_deep_tree_deletes(btrfs_root: Path) -> None:
    def build(p: Path) -> None:
        path = p / "root"
        for depth in range(8):
            path = path / f"level{depth}"
            for i in range(5):
                write(path / f"f{i}", f"{depth}.{i}\n")
        write(p / "moved/sub/sub/f", "f\n")
        write(p / "moved/keep", "k\n")

    def edit(c: Path) -> None:
        shutil.rmtree(c / "root/level0/level1")
        (c / "moved").rename(c / "moved2")
        shutil.rmtree(c / "moved2/sub")

    native = compare(btrfs_root, build, edit)
    assert "D /root/level0/level1" in render(native)
    assert not any("level2" in line for line in render(native))


def test_capability_xattrs(btrfs_root: Path) -> None:
    def build(p: Path) -> None:
        for name in ("set", "change", "drop", "same", "user-only", "linked"):
            write(p / "bin" / name, f"{name}\n", 0o755)
        for name in ("change", "drop", "same"):
            os.setxattr(p / "bin" / name, "security.capability", capability(CAP_NET_RAW))
        (p / "sbin").mkdir()
        os.link(p / "bin/linked", p / "sbin/linked")

    def edit(c: Path) -> None:
        os.setxattr(c / "bin/set", "security.capability", capability(CAP_NET_RAW))
        os.setxattr(c / "bin/change", "security.capability", capability(CAP_NET_BIND))
        os.removexattr(c / "bin/drop", "security.capability")
        os.setxattr(c / "bin/same", "security.capability", capability(CAP_NET_RAW))
        os.setxattr(c / "bin/user-only", "user.note", b"ignored by Docker")
        os.setxattr(c / "bin/linked", "security.capability", capability(CAP_NET_RAW))

    native = compare(btrfs_root, build, edit)
    assert set(render(native)) == {
        "C /bin",
        "C /bin/set",
        "C /bin/change",
        "C /bin/drop",
        "C /bin/linked",
        "C /sbin",
        "C /sbin/linked",
    }


def test_devices_fifos_sockets(btrfs_root: Path) -> None:
    def build(p: Path) -> None:
        (p / "dev").mkdir()
        os.mknod(p / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(p / "dev/zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
        os.mknod(p / "dev/loop9", stat.S_IFBLK | 0o660, os.makedev(7, 9))
        os.mknod(p / "dev/loop8", stat.S_IFBLK | 0o660, os.makedev(7, 8))
        os.mkfifo(p / "dev/fifo")
        os.mkfifo(p / "dev/fifo2")
        os.mknod(p / "dev/sock", stat.S_IFSOCK | 0o755)

    def edit(c: Path) -> None:
        (c / "dev/zero").unlink()  # same name, other device number
        os.mknod(c / "dev/zero", stat.S_IFCHR | 0o666, os.makedev(1, 7))
        os.utime(c / "dev/loop9")  # mtime of a block device: Docker ignores it (S_IFDIR bit)
        os.chown(c / "dev/loop8", 0, 6)
        (c / "dev/fifo").chmod(0o600)
        (c / "dev/fifo2").unlink()  # fifo -> socket
        os.mknod(c / "dev/fifo2", stat.S_IFSOCK | 0o755)
        (c / "dev/sock").unlink()
        os.mknod(c / "dev/tty", stat.S_IFCHR | 0o620, os.makedev(5, 0))

    native = compare(btrfs_root, build, edit)
    assert set(render(native)) == {
        "C /dev",
        "C /dev/zero",
        "C /dev/loop8",
        "C /dev/fifo",
        "C /dev/fifo2",
        "D /dev/sock",
        "A /dev/tty",
    }


def test_same_second_same_size_rewrite_is_modified(btrfs_root: Path) -> None:
    """The walk misses this rewrite; the stream does not.

    The parent file's mtime is a whole second (zero nanoseconds, as from a tar without sub-second
    times). The child rewrites it with the same number of bytes within that second, so Docker's
    ``sameFsTimeSpec`` (equal seconds, and either side's nanoseconds 0) and equal size make the
    walk report nothing. The stream says the data was written, so native_changes reports Modify,
    for every name of the inode.
    """
    whole_second = 1_700_000_000 * 10**9
    same_second = whole_second + 250_000_000

    def build(p: Path) -> None:
        write(p / "app/config", "aaaa")
        (p / "etc").mkdir()
        os.link(p / "app/config", p / "etc/config")
        write(p / "app/untouched", "bbbb")
        for name in ("app/config", "app/untouched"):
            os.utime(p / name, ns=(whole_second, whole_second))

    def edit(c: Path) -> None:
        write(c / "app/config", "cccc")
        os.utime(c / "app/config", ns=(same_second, same_second))

    with layer_pair(btrfs_root, build, edit, keep_mtimes=True) as (child, parent):
        walked = walk_changes(child, parent)
        native = native_changes(child, parent)
    assert walked == []  # Docker's blind spot
    assert render(native) == ["C /app", "C /app/config", "C /etc", "C /etc/config"]


def test_nested_subvolumes(btrfs_root: Path) -> None:
    """Known limitation: a nested subvolume is an empty directory in a snapshot of a layer.

    send never crosses into another subvolume and never names one, so native_changes finds them by
    scanning the directories the stream touched. The backend diffs read-only snapshots, where a
    nested subvolume is an empty directory (inode 2); there native and walk agree. A walk of the
    live writable layer would also list the nested subvolume's contents.
    """

    def build(p: Path) -> None:
        (p / "d").mkdir()
        btrfsutil.create_subvolume(str(p / "d/old"))

    with layer_pair(btrfs_root, build, lambda c: None) as (child, parent):
        btrfsutil.set_subvolume_read_only(str(child), False)
        # As Docker-in-Docker does: one subvolume out, another with a name as long in.
        (child / "d/old").rmdir()
        btrfsutil.create_subvolume(str(child / "d/new"))
        btrfsutil.create_subvolume(str(child / "nested"))
        write(child / "nested/inner", "in\n")
        snapshot = child.parent / "child.snap"
        btrfsutil.create_snapshot(str(child), str(snapshot), read_only=True)
        try:
            assert os.listdir(snapshot / "nested") == []
            native = native_changes(snapshot, parent)
            walked = walk_changes(snapshot, parent)
            live = walk_changes(child, parent)
        finally:
            btrfsutil.delete_subvolume(str(snapshot))
    assert native == walked, _difference(native, walked)
    assert render(native) == ["C /d", "A /d/new", "D /d/old", "A /nested"]
    assert "A /nested/inner" in render(live)


def test_writable_layer_is_refused(btrfs_root: Path) -> None:
    """send needs read-only subvolumes; the kernel's EPERM reaches the caller as OSError."""
    with layer_pair(btrfs_root, lambda p: write(p / "f"), lambda c: None) as (child, parent):
        btrfsutil.set_subvolume_read_only(str(child), False)
        try:
            with pytest.raises(PermissionError, match=re.escape(str(child))):
                native_changes(child, parent)
        finally:
            btrfsutil.set_subvolume_read_only(str(child), True)


def test_no_changes(btrfs_root: Path) -> None:
    assert compare(btrfs_root, build_experiment_1, lambda c: None) == []


# -- a 2,000-deep layer: native and walk in about linear time, paths beyond PATH_MAX ----------

DEPTH = 2000


def build_deep(p: Path) -> None:
    for level, fd in chain(p, "d", DEPTH, make=True):
        if level == 10:
            os.mkdir("s", dir_fd=fd)
            os.mkdir("s/t", dir_fd=fd)
            create(fd, "s/t/u")
        elif level == 300:
            os.symlink("/etc", "l", dir_fd=fd)  # the parent side of l/passwd must not follow it
        elif level in (500, 1000, 1500):
            create(fd, "f")


def edit_deep(c: Path) -> None:
    for level, fd in chain(c, "d", DEPTH, make=False):
        if level == 10:
            os.unlink("s/t/u", dir_fd=fd)
            os.rmdir("s/t", dir_fd=fd)
            os.rmdir("s", dir_fd=fd)
        elif level == 300:
            os.unlink("l", dir_fd=fd)
            os.mkdir("l", dir_fd=fd)
            create(fd, "l/passwd")
        elif level == 500:
            os.unlink("f", dir_fd=fd)
        elif level == 1000:
            put_at(fd, "f", b"grown", os.O_APPEND)
        elif level == 1500:
            os.rename("f", "g", src_dir_fd=fd, dst_dir_fd=fd)
        elif level == DEPTH - 1:
            os.mkdir("x", dir_fd=fd)
            create(fd, "x/y")
        elif level == DEPTH:
            create(fd, "new")


def put_at(dir_fd: int, name: str, data: bytes, flags: int) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def levels(name: str) -> list[str]:
    """The chain's directory at each level, as layer paths ("" for the root)."""
    return ["/".join(["", *[name] * level]) for level in range(DEPTH + 1)]


def docker_order(changes: list[str]) -> list[str]:
    return sorted(changes, key=lambda line: (os.fsencode(line[2:]), "CAD".index(line[0])))


def test_2000_deep_layer(btrfs_root: Path) -> None:
    """Changes from the top to the bottom of a 2,000-deep chain (4,000-byte paths)."""
    with layer_pair(btrfs_root, build_deep, edit_deep, keep_mtimes=True) as (child, parent):
        walked = walk_changes(child, parent)
        native = native_changes(child, parent, max_depth=None)
    at = levels("d")
    expected = [f"C {directory}" for directory in at[1:]]  # all above /.../new
    expected += [f"D {at[10]}/s", f"C {at[300]}/l", f"A {at[300]}/l/passwd", f"D {at[500]}/f"]
    expected += [f"C {at[1000]}/f", f"D {at[1500]}/f", f"A {at[1500]}/g"]
    expected += [f"A {at[DEPTH - 1]}/x", f"A {at[DEPTH - 1]}/x/y", f"A {at[DEPTH]}/new"]
    assert render(walked) == docker_order(expected)
    assert native == walked, _difference(native, walked)


def test_deep_layer_stops_the_send(btrfs_root: Path) -> None:
    """Past ``MAX_SEND_DEPTH`` the send stops (its cost grows with depth) and the walk answers."""

    def edit(c: Path) -> None:
        for level, fd in chain(c, "d", MAX_SEND_DEPTH + 20, make=True):
            if level == MAX_SEND_DEPTH + 20:
                create(fd, "bottom")

    with layer_pair(btrfs_root, lambda p: None, edit) as (child, parent):
        with pytest.raises(SendStreamError, match=f"over {MAX_SEND_DEPTH} directories deep"):
            native_changes(child, parent)
        assert not [t for t in threading.enumerate() if t.name == "btrfs-send"]
        shallow = native_changes(child, parent, max_depth=MAX_SEND_DEPTH + 21)
        assert shallow == walk_changes(child, parent)
    assert len(shallow) == MAX_SEND_DEPTH + 21  # every directory and the file


def build_long(p: Path) -> None:
    for level, fd in chain(p, "dd", DEPTH, make=True):
        if level in (1000, DEPTH):
            create(fd, "f")


def edit_long(c: Path) -> None:
    """Changes where the stream's paths fit in PATH_MAX, with 6,000-byte paths below them."""
    for level, fd in chain(c, "dd", DEPTH, make=False):
        if level == 1000:
            put_at(fd, "f", b"grown", os.O_APPEND)
        elif level == 1200:
            os.rename("dd", "moved", src_dir_fd=fd, dst_dir_fd=fd)
            break


def test_paths_longer_than_path_max(btrfs_root: Path) -> None:
    """Both differs list a renamed directory's 800-deep subtree, down to 6,000-byte paths."""
    with layer_pair(btrfs_root, build_long, edit_long, keep_mtimes=True) as (child, parent):
        walked = walk_changes(child, parent)
        native = native_changes(child, parent, max_depth=None)
    at = levels("dd")
    moved = [at[1200] + "/moved" + "/dd" * below for below in range(DEPTH - 1200)]
    expected = [f"C {directory}" for directory in at[1:1201]]  # all above the rename
    expected += [f"C {at[1000]}/f", f"D {at[1200]}/dd", f"A {moved[-1]}/f"]
    expected += [f"A {directory}" for directory in moved]
    assert render(walked) == docker_order(expected)
    assert native == walked, _difference(native, walked)
    assert len(os.fsencode(f"{moved[-1]}/f")) > 6000


def test_change_beyond_path_max(btrfs_root: Path) -> None:
    """btrfs send cannot name a path over PATH_MAX (ENAMETOOLONG): the walk answers instead."""

    def edit(c: Path) -> None:
        for level, fd in chain(c, "dd", DEPTH, make=False):
            if level == DEPTH:
                create(fd, "new")

    with layer_pair(btrfs_root, build_long, edit, keep_mtimes=True) as (child, parent):
        walked = walk_changes(child, parent)
        failure: int | None = None
        try:
            native = native_changes(child, parent, max_depth=None)
        except OSError as err:
            native, failure = walked, err.errno
    at = levels("dd")
    assert render(walked) == [f"C {d}" for d in at[1:]] + [f"A {at[DEPTH]}/new"]
    assert failure in (None, errno.ENAMETOOLONG)  # None: a kernel that can send such paths
    assert native == walked, _difference(native, walked)


# -- property test ------------------------------------------------------------------------------

NAMES = ["a", "b", "c", "o257-7-0", "x y", os.fsdecode(b"\xff")]
CONTENTS = [b"", b"1", b"22", b"33", b"4444", b"hello world"]
# The absolute target does not exist on any host: even a stray follow could not write through it.
SYMLINK_TARGETS = ["a", "../b", "/nonexistent-snapdriver-test/x", "x y/c"]
MODES = [0o600, 0o644, 0o755, 0o4755]
# None of these share a second with PARENT_MTIME_NS, so a rewrite always moves mtime.
EDIT_MTIMES_NS = [1_500_000_000 * 10**9, 1_700_000_000_250_000_000, 1_600_000_001 * 10**9]
OPS = [
    "file",
    "mkdir",
    "symlink",
    "hardlink",
    "special",
    "remove",
    "rename",
    "chmod",
    "chown",
    "write",
    "append",
    "truncate",
    "utime",
    "xattr",
    "swap",
    "replace",
]
PARENT_EXTRA_OPS = ["hardlink", "hardlink", "chmod", "chown", "xattr", "special"]
SPECIALS = [
    (stat.S_IFIFO, 0),
    (stat.S_IFSOCK, 0),
    (stat.S_IFCHR, os.makedev(1, 3)),
    (stat.S_IFBLK, os.makedev(7, 0)),
]
LEAVES = st.one_of(
    st.tuples(st.just("file"), st.sampled_from(CONTENTS)),
    st.tuples(st.just("symlink"), st.sampled_from(SYMLINK_TARGETS)),
    st.tuples(st.just("special"), st.sampled_from(range(len(SPECIALS)))),
)
TREES = st.dictionaries(
    st.sampled_from(NAMES),
    st.recursive(
        LEAVES,
        lambda kids: st.tuples(st.just("dir"), st.dictionaries(st.sampled_from(NAMES), kids)),
        max_leaves=25,
    ),
    min_size=1,
)


def make_tree(directory: Path, tree: dict[str, Any]) -> None:
    """Materialise a drawn tree: name -> ("dir", {...}) | ("file", bytes) | ("symlink", target)
    | ("special", index into SPECIALS)."""
    for name, (kind, value) in tree.items():
        path = directory / name
        if kind == "dir":
            path.mkdir()
            make_tree(path, value)
        elif kind == "file":
            put(path, value, os.O_CREAT | os.O_EXCL)
        elif kind == "symlink":
            os.symlink(value, path)
        else:
            mode, device = SPECIALS[value]
            os.mknod(path, mode | 0o644, device)


def entries(root: Path) -> list[str]:
    """Every path below ``root``, relative, in a stable order."""
    found: list[str] = []
    for directory, dirs, files in os.walk(root):
        rel = os.path.relpath(directory, root)
        found.extend(os.path.normpath(os.path.join(rel, n)) for n in sorted(dirs + files))
    return sorted(found)


def directories(root: Path) -> list[str]:
    return ["."] + [e for e in entries(root) if stat.S_ISDIR(os.lstat(root / e).st_mode)]


def apply_random_edit(root: Path, data: st.DataObject, op: str) -> None:
    """One random filesystem operation; impossible ones (rename into itself, ...) are no-ops."""
    existing = entries(root)
    target = (
        root / data.draw(st.sampled_from(directories(root))) / data.draw(st.sampled_from(NAMES))
    )
    try:
        _apply(root, data, op, existing, target)
    except (FileExistsError, IsADirectoryError, NotADirectoryError, FileNotFoundError):
        pass
    except OSError as err:  # EINVAL, ENOTEMPTY, EXDEV from impossible renames and links
        if err.errno not in (errno.EINVAL, errno.ENOTEMPTY, errno.EXDEV, errno.EMLINK):
            raise


def _apply(root: Path, data: st.DataObject, op: str, existing: list[str], target: Path) -> None:
    if op == "file":
        put(target, data.draw(st.sampled_from(CONTENTS)), os.O_CREAT | os.O_EXCL)
    elif op == "mkdir":
        target.mkdir()
    elif op == "symlink":
        os.symlink(data.draw(st.sampled_from(SYMLINK_TARGETS)), target)
    elif op == "special":
        kind, device = data.draw(st.sampled_from(SPECIALS))
        os.mknod(target, kind | 0o644, device)
    elif not existing:
        return
    else:
        _apply_to_existing(root, data, op, root / data.draw(st.sampled_from(existing)), target)


def _apply_to_existing(root: Path, data: st.DataObject, op: str, path: Path, target: Path) -> None:
    mode = os.lstat(path).st_mode
    if op in ("swap", "replace"):
        other = root / data.draw(st.sampled_from(entries(root)))
        if path == other or path in other.parents or other in path.parents:
            return
        if op == "swap":  # what renameat2(RENAME_EXCHANGE) would do, in three renames
            os.rename(path, root / ".swap")
            os.rename(other, path)
            os.rename(root / ".swap", other)
        else:  # the adversarial `rm -rf other; mv path other`
            remove(other)
            os.rename(path, other)
    elif op == "hardlink" and not stat.S_ISDIR(mode):
        os.link(path, target, follow_symlinks=False)
    elif op == "remove":
        remove(path)
    elif op == "rename":
        os.rename(path, target)
    elif op == "chmod" and not stat.S_ISLNK(mode):
        path.chmod(data.draw(st.sampled_from(MODES)))
    elif op == "chown":
        ids = data.draw(st.sampled_from([(0, 0), (1000, 1000), (0, 1000)]))
        os.chown(path, *ids, follow_symlinks=False)
    elif op == "utime":
        mtime = data.draw(st.sampled_from(EDIT_MTIMES_NS))
        os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
    elif stat.S_ISREG(mode):
        _apply_to_file(data, op, path)


def remove(path: Path) -> None:
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _apply_to_file(data: st.DataObject, op: str, path: Path) -> None:
    """Edit a regular file (checked with lstat by the caller; nothing here follows a link)."""
    if op == "write":
        put(path, data.draw(st.sampled_from(CONTENTS)), os.O_TRUNC)
    elif op == "append":
        append(path, data.draw(st.sampled_from(CONTENTS[1:])))
    elif op == "truncate":
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, data.draw(st.sampled_from([0, 1, 3, 20])))
        finally:
            os.close(fd)
    elif op == "xattr":
        caps = data.draw(st.sampled_from([None, CAP_NET_RAW, CAP_NET_BIND]))
        if caps is None:
            with contextlib.suppress(OSError):
                os.removexattr(path, "security.capability", follow_symlinks=False)
        else:
            os.setxattr(path, "security.capability", capability(caps), follow_symlinks=False)


@settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_random_trees_and_edits_match_the_walk(btrfs_root: Path, data: st.DataObject) -> None:
    """Random parent trees, random edit sequences: native_changes == walk_changes, exactly."""
    tree = data.draw(TREES, label="parent tree")
    parent_ops = data.draw(st.lists(st.sampled_from(PARENT_EXTRA_OPS), max_size=6), label="parent")
    child_ops = data.draw(st.lists(st.sampled_from(OPS), min_size=5, max_size=25), label="child")

    def build(p: Path) -> None:
        make_tree(p, tree)
        for op in parent_ops:
            apply_random_edit(p, data, op)

    def edit(c: Path) -> None:
        for op in child_ops:
            apply_random_edit(c, data, op)

    compare(btrfs_root, build, edit)
