"""The ``zfs diff -FH`` parser and the candidate logic, on plain directories: no ZFS needed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from snapdriver_zfs.diff import (
    DiffEntry,
    DiffFormatError,
    Fallback,
    native_changes,
    parse_diff,
    parse_line,
    unescape,
    xattr_owner,
)

from snapdriver.layers.changes import walk_changes

MNT = b"/var/lib/docker/snapdriver/mnt/abc"


def line(*fields: str) -> bytes:
    return "\t".join(fields).encode()


# -- lines ---------------------------------------------------------------------------------------


def test_lab_sample_output() -> None:
    """The output recorded in the lab (docs/environment.md section 3)."""
    output = (
        b"M\t/\t/lab/clone/dir\n"
        b"+\tF\t/lab/clone/dir/new\n"
        b"M\t/\t/lab/clone/\n"
        b"M\tF\t/lab/clone/a\n"
        b"R\tF\t/lab/clone/b\t/lab/clone/b2\n"
        b"-\tF\t/lab/clone/c\n"
        b"M\tF\t/lab/clone/dir/d\n"
        b"+\t/\t/lab/clone/newdir\n"
    )
    assert parse_diff(output, "/lab/clone") == [
        DiffEntry("M", "/", "/dir"),
        DiffEntry("+", "F", "/dir/new"),
        DiffEntry("M", "/", "/"),
        DiffEntry("M", "F", "/a"),
        DiffEntry("R", "F", "/b", "/b2"),
        DiffEntry("-", "F", "/c"),
        DiffEntry("M", "F", "/dir/d"),
        DiffEntry("+", "/", "/newdir"),
    ]


def test_empty_output() -> None:
    assert parse_diff(b"", "/m") == []


@pytest.mark.parametrize("root", [b"/m", b"/m/"])
def test_root_directory(root: bytes) -> None:
    assert parse_line(b"M\t/\t" + root, b"/m") == DiffEntry("M", "/", "/")


def test_mountpoint_given_with_trailing_slash() -> None:
    assert parse_line(b"+\tF\t/m/x", b"/m/") == DiffEntry("+", "F", "/x")


@pytest.mark.parametrize(("delta", "links"), [("(+1)", 1), ("(-2)", -2), ("(+12)", 12)])
def test_link_count_change(delta: str, links: int) -> None:
    entry = parse_line(line("M", "F", "/m/a", delta), b"/m")
    assert entry == DiffEntry("M", "F", "/a", links=links)


@pytest.mark.parametrize("kind", list("F/@|=BC?"))
def test_every_kind(kind: str) -> None:
    assert parse_line(line("+", kind, "/m/x"), b"/m") == DiffEntry("+", kind, "/x")


def test_rename() -> None:
    assert parse_line(line("R", "/", "/m/d1", "/m/sub/d2"), b"/m") == DiffEntry(
        "R", "/", "/d1", "/sub/d2"
    )


def test_mountpoint_prefix_is_a_whole_component() -> None:
    with pytest.raises(DiffFormatError):
        parse_line(b"+\tF\t/mnt2/x", b"/mnt")


# -- escapes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("printed", "name"),
    [
        (rb"a\0040b", b"a b"),  # 4 digits: OpenZFS 2.x
        (rb"a\040b", b"a b"),  # 3 digits: older releases
        (rb"tab\0011x", b"tab\tx"),
        (rb"nl\0012x", b"nl\nx"),
        (rb"back\0134slash", b"back\\slash"),
        (rb"caf\0303\0251", "café".encode()),
        (rb"raw\0377", b"raw\xff"),
        (rb"del\0177", b"del\x7f"),
        (rb"a\00401", b"a 1"),  # 4-digit escape, then a literal digit
        (rb"a\0401", b"a 1"),  # 3-digit escape, then a literal digit
        (rb"x\0123", b"x\n3"),  # \0123 would be 'S', which zfs never escapes: 3 digits + '3'
        (b"plain", b"plain"),
        (rb"lone\x", rb"lone\x"),  # a backslash that starts no escape (only with -h) stays
    ],
)
def test_unescape(printed: bytes, name: bytes) -> None:
    assert unescape(printed) == name


def test_escaped_names_become_fs_strings() -> None:
    output = b"+\tF\t/m/caf\\0303\\0251\n-\tF\t/m/raw\\0377\n+\t/\t/m/with\\0040space\n"
    assert [e.path for e in parse_diff(output, "/m")] == [
        "/café",
        os.fsdecode(b"/raw\xff"),
        "/with space",
    ]


def test_escaped_mountpoint() -> None:
    """zfs escapes the mountpoint too; it is compared after unescaping."""
    entry = parse_line(rb"M	F	/tmp/my\0040mnt/a\0040b", b"/tmp/my mnt")
    assert entry == DiffEntry("M", "F", "/a b")


# -- objects without a name ----------------------------------------------------------------------


def test_delete_queue_entries_are_dropped() -> None:
    output = b"+\tF\t/m(on_delete_queue)\n-\tF\t/m/gone\n"
    assert parse_diff(output, "/m") == [DiffEntry("-", "F", "/gone")]


def test_rename_from_the_delete_queue_keeps_the_named_side() -> None:
    entry = parse_line(line("R", "F", "/m(on_delete_queue)", "/m/linked"), b"/m")
    assert entry == DiffEntry("M", "F", "/linked")


# -- malformed -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"X\tF\t/m/a",  # unknown change type
        b"+\tQ\t/m/a",  # unknown kind
        b"+\t/m/a",  # no kind (-F missing)
        b"+\tF\t/m/a\textra",  # too many fields
        b"M\tF\t/m/a\t+1",  # link count without parentheses
        b"R\tF\t/m/a",  # rename with one path
        b"+\tF\t/elsewhere/a",  # not below the mountpoint
        b"cannot open 'x': dataset does not exist",
    ],
)
def test_malformed_lines(bad: bytes) -> None:
    with pytest.raises(DiffFormatError):
        parse_line(bad, b"/m")


# -- candidates on plain directories --------------------------------------------------------------
# Outside ZFS the two trees share no inodes, so every directory looks replaced and is compared
# name by name: slower than on ZFS, but the verdicts must still equal the tree walk.


def make_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (root / "etc" / "keep").write_text("same\n")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_text("#!/bin/sh\n")


def test_native_changes_match_the_walk(tmp_path: Path) -> None:
    parent, layer = tmp_path / "parent", tmp_path / "layer"
    make_tree(parent)
    make_tree(layer)
    for path in ("etc/keep", "bin/tool"):
        st = os.stat(parent / path)
        os.utime(layer / path, ns=(st.st_atime_ns, st.st_mtime_ns))
    (layer / "etc" / "hosts").write_text("changed\n")
    (layer / "bin" / "tool").unlink()
    (layer / "new").mkdir()
    (layer / "new" / "file").write_text("x")
    # Plain directories share no inodes, so the rewritten file is a new object, as zfs would say
    # of a file replaced by another.
    entries = [
        DiffEntry("-", "F", "/etc/hosts"),
        DiffEntry("+", "F", "/etc/hosts"),
        DiffEntry("M", "/", "/etc"),
        DiffEntry("-", "F", "/bin/tool"),
        DiffEntry("+", "/", "/new"),
        DiffEntry("+", "F", "/new/file"),
        DiffEntry("M", "/", "/"),
    ]
    assert native_changes(entries, layer, parent) == walk_changes(layer, parent)


def test_changed_hard_linked_file_falls_back(tmp_path: Path) -> None:
    parent, layer = tmp_path / "parent", tmp_path / "layer"
    make_tree(parent)
    make_tree(layer)
    os.link(layer / "etc" / "hosts", layer / "bin" / "hosts-link")
    with pytest.raises(Fallback):
        native_changes([DiffEntry("M", "F", "/etc/hosts", links=1)], layer, parent)


def test_object_printed_under_a_name_it_lost_falls_back(tmp_path: Path) -> None:
    """After its directory went, zfs may print a changed file under an old name."""
    parent, layer = tmp_path / "parent", tmp_path / "layer"
    make_tree(parent)
    make_tree(layer)
    (layer / "bin" / "tool").unlink()
    with pytest.raises(Fallback, match="not there now"):
        native_changes([DiffEntry("M", "F", "/bin/tool", links=-1)], layer, parent)


def test_removed_file_with_other_names_falls_back(tmp_path: Path) -> None:
    parent, layer = tmp_path / "parent", tmp_path / "layer"
    make_tree(parent)
    os.link(parent / "etc" / "keep", parent / "bin" / "keep")
    make_tree(layer)
    with pytest.raises(Fallback, match="names"):
        native_changes([DiffEntry("-", "F", "/etc/keep")], layer, parent)


def test_paths_in_neither_tree_fall_back(tmp_path: Path) -> None:
    parent, layer = tmp_path / "parent", tmp_path / "layer"
    make_tree(parent)
    make_tree(layer)
    with pytest.raises(Fallback):
        native_changes([DiffEntry("M", "F", "/etc/misread name")], layer, parent)


def test_candidates_never_cross_a_symlink(tmp_path: Path) -> None:
    """``/a`` is a directory in the parent and a symlink to ``/`` in the layer: nothing below
    ``/a`` may be looked up through the link (that would read the host's own files)."""
    parent, layer = tmp_path / "parent", tmp_path / "layer"
    (parent / "a" / "usr").mkdir(parents=True)
    layer.mkdir()
    (layer / "a").symlink_to("/")
    entries = [DiffEntry("-", "/", "/a/usr"), DiffEntry("-", "/", "/a"), DiffEntry("+", "@", "/a")]
    assert native_changes(entries, layer, parent) == walk_changes(layer, parent)


# -- extended attributes (xattr=dir) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "owner"),
    [
        ("/etc/hosts/<xattrdir>", "/etc/hosts"),
        ("/etc/hosts/<xattrdir>/security.capability", "/etc/hosts"),
        ("/<xattrdir>/user.a", "/"),
        ("/etc/hosts", None),
        ("/etc/<xattrdir>x", None),
    ],
)
def test_xattr_owner(path: str, owner: str | None) -> None:
    assert xattr_owner(path) == owner


def test_xattr_objects_make_their_file_a_candidate(tmp_path: Path) -> None:
    parent, layer = tmp_path / "parent", tmp_path / "layer"
    make_tree(parent)
    shutil.copytree(parent, layer)  # same mtimes: only what is changed below differs
    os.chmod(layer / "etc" / "hosts", 0o600)  # stands in for a changed security.capability
    entries = [
        DiffEntry("+", "/", "/etc/hosts/<xattrdir>"),
        DiffEntry("+", "F", "/etc/hosts/<xattrdir>/user.note"),
    ]
    expected = walk_changes(layer, parent)
    assert [c.path for c in expected] == ["/etc", "/etc/hosts"]
    assert native_changes(entries, layer, parent) == expected
