"""Docker's change-list rules, walked on real directories."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapdriver.layers.changes import (
    Change,
    ChangeKind,
    ConfinedTree,
    WalkTooLarge,
    changes_from_candidates,
    changes_size,
    sort_changes,
    walk_changes,
)
from snapdriver.testing.trees import chain, create

A, C, D = ChangeKind.ADD, ChangeKind.MODIFY, ChangeKind.DELETE


def pairs(changes: list[Change]) -> list[tuple[str, int]]:
    return [(c.path, int(c.kind)) for c in changes]


def build(root: Path) -> None:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "file").write_text("one")
    (root / "dir" / "sub" / "leaf").write_text("leaf")
    (root / "becomes-dir").write_text("x")
    (root / "becomes-file").mkdir()
    (root / "becomes-file" / "child").write_text("x")
    (root / "same").write_text("same")


def edit(root: Path) -> None:
    (root / "dir" / "file").write_text("changed, longer")
    (root / "dir" / "added").write_text("new")
    (root / "becomes-dir").unlink()
    (root / "becomes-dir").mkdir()
    (root / "becomes-dir" / "inner").write_text("x")
    (root / "becomes-file" / "child").unlink()
    (root / "becomes-file").rmdir()
    (root / "becomes-file").write_text("now a file")
    os.system(f"rm -rf {root / 'dir' / 'sub'}")


def copy_tree(source: Path, target: Path) -> None:
    os.system(f"cp -a {source} {target}")


def test_walk_follows_dockers_rules(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    build(old)
    copy_tree(old, new)
    edit(new)
    assert pairs(walk_changes(new, old)) == [
        ("/becomes-dir", C),
        ("/becomes-dir/inner", A),
        ("/becomes-file", C),  # a dir replaced by a file: one Modify, no Delete of its child
        ("/dir", C),  # ancestor of changes
        ("/dir/added", A),
        ("/dir/file", C),
        ("/dir/sub", D),  # topmost only
    ]


def test_candidates_give_the_walks_answer(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    build(old)
    copy_tree(old, new)
    edit(new)
    candidates = [
        "/dir/file",
        "/dir/added",
        "/becomes-dir",
        "/becomes-file/child",
        "/becomes-file",
        "/dir/sub/leaf",
        "/dir/sub",
        "/same",
    ]
    assert changes_from_candidates(new, old, candidates) == walk_changes(new, old)


def test_no_parent_means_everything_added(tmp_path: Path) -> None:
    build(tmp_path)
    changes = walk_changes(tmp_path, None)
    assert all(c.kind == A for c in changes)
    assert len(changes) == 8


def test_size_counts_hard_links_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 100)
    os.link(tmp_path / "a", tmp_path / "b")
    (tmp_path / "d").mkdir()
    changes = [Change(p, A) for p in ("/a", "/b", "/d")] + [Change("/gone", D)]
    assert changes_size(tmp_path, changes) == 100


def test_directory_mtime_alone_is_no_change(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "d").mkdir(parents=True)
    copy_tree(old, new)
    os.utime(new / "d", (0, 0))
    assert walk_changes(new, old) == []


# -- very deep trees: no recursion to the tree's depth, no whole path longer than PATH_MAX ------

DEPTH = 2000


@pytest.fixture
def deep_tmp(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, emptied by ``rm -rf`` afterwards: Python 3.11's ``shutil.rmtree``, which
    pytest cleans old temporary directories with, recurses per level and fails on these trees."""
    yield tmp_path
    subprocess.run(
        ["rm", "-rf", "--one-file-system", "--", *map(str, tmp_path.iterdir())], check=True
    )


def build_deep(root: Path, name: str) -> None:
    """A ``DEPTH``-deep chain with a file ``f`` at levels 500, 1000 and 1500."""
    root.mkdir()
    for level, fd in chain(root, name, DEPTH, make=True):
        if level in (500, 1000, 1500):
            create(fd, "f", b"f")


def edit_deep(root: Path, name: str) -> None:
    """Add at the bottom, delete at 500, grow at 1000, replace a file by a directory at 1500."""
    for level, fd in chain(root, name, DEPTH, make=False):
        if level == 500:
            os.unlink("f", dir_fd=fd)
        elif level == 1000:
            os.unlink("f", dir_fd=fd)
            create(fd, "f", b"grown")
        elif level == 1500:
            os.unlink("f", dir_fd=fd)
            os.mkdir("f", dir_fd=fd)
            create(fd, "g", b"g")
        elif level == DEPTH:
            create(fd, "new", b"n")


def expected_deep(name: str) -> list[Change]:
    """What Docker reports for ``edit_deep``: every level is an ancestor of /.../new."""
    at = ["/".join(["", *[name] * level]) for level in range(DEPTH + 1)]
    return sort_changes(
        [
            *(Change(directory, C) for directory in at[1:]),
            Change(at[500] + "/f", D),
            Change(at[1000] + "/f", C),
            Change(at[1500] + "/f", C),  # a file that became a directory: one Modify
            Change(at[1500] + "/g", A),
            Change(at[DEPTH] + "/new", A),
        ]
    )


# "d" stays below PATH_MAX (depth alone); "dd" puts the deepest paths at 6,000 bytes.
@pytest.mark.parametrize("name", ["d", "dd"])
def test_walk_at_depth_2000(deep_tmp: Path, name: str) -> None:
    old, new = deep_tmp / "old", deep_tmp / "new"
    build_deep(old, name)
    build_deep(new, name)
    edit_deep(new, name)
    expected = expected_deep(name)
    longest = max(len(os.fsencode(c.path)) for c in expected)
    assert longest > 4096 if name == "dd" else longest < 4096
    assert walk_changes(new, old) == expected
    candidates = [c.path for c in expected if not c.path.endswith(f"/{name}")]
    assert changes_from_candidates(new, old, candidates) == expected
    # Every entry of the new tree is in the list above, except what was deleted.
    everything = sort_changes(Change(c.path, A) for c in expected if c.kind != D)
    assert walk_changes(new, None) == everything


def test_confined_lookup_at_depth_2000(deep_tmp: Path) -> None:
    """The deepest entry first, with nothing cached: no recursion per level."""
    build_deep(deep_tmp / "t", "dd")
    with ConfinedTree(str(deep_tmp / "t")) as tree:
        deep = "/dd" * 1500
        st = tree.lstat(deep + "/f")
        assert st is not None and st.st_size == 1
        assert tree.is_dir(deep)
        assert tree.lstat(deep + "/f/below") is None
        assert tree.lstat("/dd" * 500 + "/f") is not None  # back up 1,000 levels


def test_confined_tree_never_follows_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "t" / "real").mkdir(parents=True)
    (tmp_path / "t" / "real" / "x").write_bytes(b"x")
    (tmp_path / "t" / "link").symlink_to("real")
    (tmp_path / "t" / "abs").symlink_to(tmp_path / "t" / "real")
    with ConfinedTree(str(tmp_path / "t")) as tree:
        assert tree.lstat("/real/x") is not None
        assert tree.lstat("/link/x") is None
        assert tree.lstat("/abs/x") is None
        assert not tree.is_dir("/link")
        with pytest.raises(NotADirectoryError), tree.scandir("/link"):
            pass
        with pytest.raises(ValueError, match="clean"):
            tree.lstat("/real/../../etc")


def test_cursor_restarts_when_its_directory_moves_out(tmp_path: Path) -> None:
    """A renamed directory's ".." leads elsewhere: the cursor goes back by the root instead."""
    root, outside = tmp_path / "t", tmp_path / "outside"
    (root / "a" / "b" / "c").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "y").write_bytes(b"1")
    (tmp_path / "y").write_bytes(b"decoy: two levels above c once it is outside")
    with ConfinedTree(str(root)) as tree:
        assert tree.lstat("/a/b/c/x") is None  # the cursor now sits in c
        (root / "a" / "b" / "c").rename(outside / "c")
        st = tree.lstat("/a/y")
        assert st is not None and st.st_size == 1


def test_walk_with_a_limit_answers_small_trees_and_refuses_larger(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    for root in (old, new):
        (root / "d").mkdir(parents=True)
        for i in range(10):
            (root / "d" / f"f{i}").write_text("same")
    (new / "d" / "f3").write_text("changed")
    (new / "added").mkdir()
    (new / "added" / "x").write_text("x")
    full = walk_changes(new, old)
    assert walk_changes(new, old, limit=24) == full  # / 2 + 1, added/ 1, d/ 10 + 10
    with pytest.raises(WalkTooLarge):
        walk_changes(new, old, limit=23)
    with pytest.raises(WalkTooLarge):
        walk_changes(new, old, limit=10)  # met in d/, before the walk's end
    with ConfinedTree(str(new)) as tree:  # a huge directory is not read to its end
        assert len(tree.scan("/d", limit=3)) == 4
        assert len(tree.scan("/d")) == 10
