"""The virtual-tree replay of a send stream, on hand-made command sequences (no btrfs needed)."""

from __future__ import annotations

import pytest
from snapdriver_btrfs.native import Candidates, Touched, stream_candidates
from snapdriver_btrfs.sendstream import Attr, Cmd, Command, SendStreamError


def cmd(kind: Cmd, path: bytes = b"", **attrs: bytes) -> Command:
    values: dict[int, bytes] = {Attr.PATH: path}
    values.update((Attr[name.upper()], value) for name, value in attrs.items())
    return Command(kind, values)


SNAPSHOT = Command(Cmd.SNAPSHOT, {Attr.PATH: b"child"})
END = Command(Cmd.END, {})


def replay(*commands: Command) -> Candidates:
    return stream_candidates([SNAPSHOT, *commands, END])


def test_orphans_resolve_to_original_paths() -> None:
    """``rm -rf deep/a`` as the kernel sends it: park under orphan names, then unlink."""
    found = replay(
        cmd(Cmd.RENAME, b"deep/a", path_to=b"o261-7-0"),
        cmd(Cmd.RENAME, b"o261-7-0/b", path_to=b"o262-7-0"),
        cmd(Cmd.RENAME, b"o262-7-0/c", path_to=b"o263-7-0"),
        cmd(Cmd.RMDIR, b"o262-7-0"),
        cmd(Cmd.UNLINK, b"o263-7-0/leaf1"),
        cmd(Cmd.RMDIR, b"o263-7-0"),
        cmd(Cmd.UNLINK, b"o261-7-0/top"),
        cmd(Cmd.RMDIR, b"o261-7-0"),
        cmd(Cmd.UTIMES, b"deep"),
    )
    # A name taken over is a candidate whether or not it existed (lstat settles it): the orphans.
    assert found.candidates == {
        "/o261-7-0",
        "/o262-7-0",
        "/o263-7-0",
        "/deep",
        "/deep/a",
        "/deep/a/b",
        "/deep/a/b/c",
        "/deep/a/b/c/leaf1",
        "/deep/a/top",
    }
    assert found.moved == []


def test_new_entries_are_named_at_their_final_path() -> None:
    found = replay(
        cmd(Cmd.MKDIR, b"o282-9-0", ino=b"\x1a\x01\0\0\0\0\0\0"),
        cmd(Cmd.RENAME, b"o282-9-0", path_to=b"newdir"),
        cmd(Cmd.MKFILE, b"o284-9-0"),
        cmd(Cmd.RENAME, b"o284-9-0", path_to=b"newdir/file"),
        cmd(Cmd.UPDATE_EXTENT, b"newdir/file"),
        cmd(Cmd.SYMLINK, b"o287-9-0", path_link=b"../etc/newfile"),
        cmd(Cmd.RENAME, b"o287-9-0", path_to=b"usr/hosts-link"),
    )
    assert {"/newdir", "/newdir/file", "/usr/hosts-link"} <= found.candidates
    assert Touched("/newdir/file", None, rewritten=False) in found.touched


def test_renamed_directory_carries_its_subtree() -> None:
    """``mv movefile a/movefile; mv a b``: later paths under b/ resolve to originals under a/."""
    found = replay(
        cmd(Cmd.RENAME, b"a", path_to=b"b"),
        cmd(Cmd.LINK, b"b/movefile", path_link=b"movefile"),
        cmd(Cmd.UNLINK, b"movefile"),
        cmd(Cmd.CHMOD, b"b/inner/f1"),
    )
    assert {"/a", "/b", "/b/movefile", "/movefile", "/b/inner/f1", "/a/inner/f1"} <= (
        found.candidates
    )
    assert found.moved == [("/b", "/a")]
    assert Touched("/b/inner/f1", "/a/inner/f1", rewritten=False) in found.touched


def test_swap_through_an_orphan() -> None:
    found = replay(
        cmd(Cmd.RENAME, b"sw2", path_to=b"o263-10-0"),
        cmd(Cmd.RENAME, b"sw1", path_to=b"sw2"),
        cmd(Cmd.RENAME, b"o263-10-0", path_to=b"sw1"),
    )
    assert found.candidates == {"/sw1", "/sw2", "/o263-10-0"}
    assert sorted(found.moved) == [("/sw1", "/sw2"), ("/sw2", "/sw1")]


def test_data_written_in_place_is_a_rewrite_but_not_after_a_move() -> None:
    found = replay(
        cmd(Cmd.UPDATE_EXTENT, b"etc/config"),
        cmd(Cmd.RENAME, b"var", path_to=b"var2"),
        cmd(Cmd.TRUNCATE, b"var2/log"),
        cmd(Cmd.CHOWN, b"etc/passwd"),
    )
    assert Touched("/etc/config", "/etc/config", rewritten=True) in found.touched
    assert Touched("/var2/log", "/var/log", rewritten=False) in found.touched
    assert Touched("/etc/passwd", "/etc/passwd", rewritten=False) in found.touched


def test_overwriting_an_unseen_original_counts_it_as_removed() -> None:
    found = replay(cmd(Cmd.RENAME, b"new", path_to=b"etc/hosts"))
    assert {"/etc/hosts", "/new"} <= found.candidates


def test_root_touch_is_reported_for_the_subvolume_scan() -> None:
    found = replay(cmd(Cmd.UTIMES, b""))
    assert found.touched == [Touched("/", "/", rewritten=False)]
    assert found.candidates == set()


@pytest.mark.parametrize(
    ("commands", "message"),
    [
        ([cmd(Cmd.UNLINK, b"gone"), cmd(Cmd.CHMOD, b"gone")], "does not exist"),
        ([cmd(Cmd.MKDIR, b"o1-1-0"), cmd(Cmd.CHMOD, b"o1-1-0/x")], "does not exist"),
        ([cmd(Cmd.CHMOD, b"a/../b")], r"\. or \.\."),
        ([cmd(Cmd.MKFILE, b"")], "subvolume root"),
        ([cmd(Cmd.RMDIR, b"")], "subvolume root"),
        ([Command(Cmd.SNAPSHOT, {Attr.PATH: b"again"})], "unexpected SNAPSHOT"),
        ([cmd(Cmd.RENAME, b"a")], "RENAME command without PATH_TO"),
    ],
)
def test_inconsistent_streams_raise(commands: list[Command], message: str) -> None:
    with pytest.raises(SendStreamError, match=message):
        replay(*commands)


def test_full_streams_are_refused() -> None:
    with pytest.raises(SendStreamError, match="expected an incremental stream, got SUBVOL"):
        stream_candidates([Command(Cmd.SUBVOL, {Attr.PATH: b"x"}), END])
