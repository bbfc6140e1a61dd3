"""``snapdriver.hostfs``: what is mounted where, checked against real tmpfs mounts."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapdriver.hostfs import is_below, mount_of, mounts_below
from snapdriver.testing.loopfs import unmount_below


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    """tmpfs mounts at ``a``, ``a/b c`` (a space: mountinfo escapes it), twice at ``a/b c/d``
    (stacked), and at ``ab``, which shares a prefix with ``a`` but is not below it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount tmpfs")
    root = tmp_path.resolve()
    try:
        for rel in ("a", "a/b c", "a/b c/d", "a/b c/d", "ab"):
            (root / rel).mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "t", root / rel], check=True)
        yield root
    finally:
        unmount_below(root)


def test_mounts_below_is_by_path_and_deepest_first(tree: Path) -> None:
    below = [m.target for m in mounts_below(tree / "a")]
    assert below == [str(tree / p) for p in ("a/b c/d", "a/b c/d", "a/b c", "a")]
    assert [m.target for m in mounts_below(tree / "ab")] == [str(tree / "ab")]
    assert {m.fstype for m in mounts_below(tree)} == {"tmpfs"}


def test_mount_of_finds_the_innermost(tree: Path) -> None:
    assert mount_of(tree / "a/b c/d/not-yet").target == str(tree / "a/b c/d")
    assert mount_of(tree / "a/x").target == str(tree / "a")


def test_mount_of_skips_a_mount_hidden_by_a_later_bind_over_its_parent(tree: Path) -> None:
    """What dockerd does to a data root that is not a mount point: a bind onto itself, which
    hides what was mounted inside it. The deepest mount point is then not what ``path`` is on."""
    inner = tree / "a/inner"
    inner.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "r", inner], check=True)
    assert mount_of(inner / "x").fstype == "ramfs"
    subprocess.run(["mount", "--bind", tree / "a", tree / "a"], check=True)
    found = mount_of(inner / "x")
    assert (found.target, found.fstype) == (str(tree / "a"), "tmpfs")
    assert os.statvfs(inner).f_blocks == os.statvfs(tree / "a").f_blocks  # the kernel agrees


def test_unmount_below_releases_stacks_and_keeps_neighbours(tree: Path) -> None:
    unmount_below(tree / "a")
    assert mounts_below(tree / "a") == []
    assert [m.target for m in mounts_below(tree)] == [str(tree / "ab")]


@pytest.mark.parametrize(
    ("target", "root", "inside"),
    [("/a", "/a", True), ("/a/b", "/a/", True), ("/ab", "/a", False), ("/x", "/", True)],
)
def test_is_below(target: str, root: str, inside: bool) -> None:
    assert is_below(target, root) is inside
