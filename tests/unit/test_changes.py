"""Docker's change-list rules, walked on real directories."""

from __future__ import annotations

import os
from pathlib import Path

from snapdriver.layers.changes import (
    Change,
    ChangeKind,
    changes_from_candidates,
    changes_size,
    walk_changes,
)

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
