"""``zfs diff`` output, and how it becomes Docker's exact change list.

``zfs diff -FH SNAP FS`` prints one tab-separated line per changed object::

    <+|-|M|R> <kind> <path> [<new path> | (+N)]

Paths carry the target's mountpoint as a prefix; every byte <= space, ``\\`` and >= 0x7F is
written as ``\\0ooo`` (older releases: ``\\ooo``). Each object is reported under one name only,
so the lines are treated as *candidates*: every directory whose entries changed is listed on
both sides to find link names ZFS does not print, and each candidate is then judged with Docker's
own rules by :func:`snapdriver.layers.changes.changes_from_candidates`. Where that cannot be
complete (a changed object with several names), :class:`Fallback` tells the caller to walk.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from snapdriver.layers.changes import (
    Change,
    ConfinedTree,
    differs,
    judge_candidates,
)

CHANGE_TYPES = frozenset("+-MR")
#: -F kinds: file, directory, symlink, fifo, socket, block, char, door, event port, unknown.
KINDS = frozenset("F/@|=BC>P?")
DELETE_QUEUE = b"(on_delete_queue)"
#: How zfs names the hidden directory that holds a file's extended attributes (xattr=dir).
XATTR_DIR = "<xattrdir>"
_ESCAPE = re.compile(rb"\\([0-3][0-7]{2})([0-7]?)")
_LINKS = re.compile(rb"\(([+-][0-9]+)\)")


class DiffFormatError(ValueError):
    """A line of ``zfs diff`` output that this parser does not understand."""


class Fallback(Exception):
    """The native answer would not be exact; the tree walk must answer instead."""


@dataclass(frozen=True, slots=True)
class DiffEntry:
    """One ``zfs diff`` line; paths are absolute inside the dataset (``/`` is its root)."""

    change: str  # "+" added, "-" removed, "M" modified, "R" renamed
    kind: str  # one of KINDS
    path: str
    new_path: str | None = None  # R only
    links: int | None = None  # M lines that report a link-count change, e.g. +1

    def paths(self) -> Iterator[str]:
        yield self.path
        if self.new_path is not None:
            yield self.new_path


# -- parsing -----------------------------------------------------------------------------------


def _needs_escape(value: int) -> bool:
    return value <= 0x20 or value == 0x5C or value >= 0x7F


def _decode_escape(match: re.Match[bytes]) -> bytes:
    three, extra = match.group(1), match.group(2)
    # "\0ooo" (4 digits) is the current format; a 4th digit after "\0oo" is only part of the
    # escape if the value is one zfs escapes, else it is "\ooo" (old format) plus a literal digit.
    if extra and three.startswith(b"0"):
        value = int(three[1:] + extra, 8)
        if value <= 0xFF and _needs_escape(value):
            return bytes([value])
    return bytes([int(three, 8)]) + extra


def unescape(raw: bytes) -> bytes:
    """Undo zfs's octal escapes (``\\0040`` or ``\\040`` is a space); other bytes pass as is."""
    return _ESCAPE.sub(_decode_escape, raw) if b"\\" in raw else raw


def relative_path(printed: bytes, mountpoint: bytes) -> str | None:
    """The path inside the dataset, from a printed path; None for an unnamed (deleted) object."""
    full = unescape(printed)
    base = mountpoint.rstrip(b"/")
    if full == base + DELETE_QUEUE:
        return None  # open but unlinked: it has no name Docker could see
    if full in (base, base + b"/"):
        return "/"
    if not full.startswith(base + b"/"):
        raise DiffFormatError(f"path {full!r} is not below the mountpoint {mountpoint!r}")
    return os.fsdecode(full[len(base) :])


def parse_line(line: bytes, mountpoint: bytes) -> DiffEntry | None:
    """One ``zfs diff -FH`` line (no trailing newline); None if it names no visible path."""
    fields = line.split(b"\t")
    if len(fields) < 3 or fields[0].decode(errors="replace") not in CHANGE_TYPES:
        raise DiffFormatError(f"unexpected zfs diff line {line!r}")
    change, kind = fields[0].decode(), fields[1].decode(errors="replace")
    if kind not in KINDS:
        raise DiffFormatError(f"unknown object kind {kind!r} in zfs diff line {line!r}")
    if change == "R":
        return _rename(line, fields, mountpoint)
    links = None
    if change == "M" and len(fields) == 4:
        found = _LINKS.fullmatch(fields[3])
        if found is None:
            raise DiffFormatError(f"unexpected link count in zfs diff line {line!r}")
        links = int(found.group(1))
    elif len(fields) != 3:
        raise DiffFormatError(f"unexpected field count in zfs diff line {line!r}")
    path = relative_path(fields[2], mountpoint)
    return None if path is None else DiffEntry(change, kind, path, links=links)


def _rename(line: bytes, fields: list[bytes], mountpoint: bytes) -> DiffEntry | None:
    if len(fields) != 4:
        raise DiffFormatError(f"unexpected rename line {line!r}")
    old, new = relative_path(fields[2], mountpoint), relative_path(fields[3], mountpoint)
    if old is None or new is None:
        # One side had no name (a file opened and linked later): the named side is a candidate.
        named = old or new
        return None if named is None else DiffEntry("M", fields[1].decode(), named)
    return DiffEntry("R", fields[1].decode(), old, new)


def parse_diff(output: bytes, mountpoint: str | bytes) -> list[DiffEntry]:
    """Every entry of ``zfs diff -FH`` output whose paths are below ``mountpoint``."""
    base = os.fsencode(mountpoint)
    entries = []
    for line in output.split(b"\n"):
        if line:
            entry = parse_line(line, base)
            if entry is not None:
                entries.append(entry)
    return entries


# -- from entries to Docker's change list --------------------------------------------------------


def native_changes(
    entries: Sequence[DiffEntry], layer_dir: str | Path, parent_dir: str | Path
) -> list[Change]:
    """Docker's change list from ``zfs diff`` entries; raises :class:`Fallback` if not exact.

    ``layer_dir`` must be the clone's mount and ``parent_dir`` the mount of the filesystem its
    origin snapshot was taken from, unchanged since then.
    """
    with Tree(os.fspath(layer_dir)) as layer, Tree(os.fspath(parent_dir)) as parent:
        _check_present(entries, layer, parent)
        candidates = expand_candidates(entries, layer, parent)
        check_named(entries, candidates, layer, parent)
        check_links(entries, candidates, layer, parent)
        return judge_candidates(layer, parent, candidates)


class Tree(ConfinedTree):
    """A mounted layer, looked up without following symlinks, plus directory listings."""

    def listing(self, directory: str) -> dict[str, int]:
        """Name -> inode of the entries of ``directory``; empty if it is not a directory."""
        if not self.is_dir(directory):
            return {}
        with self.scandir(directory) as found:
            return {e.name: e.inode() for e in found}

    def subtree(self, directory: str) -> Iterator[str]:
        """Every path below ``directory`` (a directory here), at any depth."""
        if self.is_dir(directory):
            for path, _ in self.descendants(directory):
                yield path


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


def xattr_owner(path: str) -> str | None:
    """The file whose extended attributes ``path`` holds (``/f/<xattrdir>/user.a`` -> ``/f``).

    With ``xattr=dir`` a setxattr changes hidden objects, which zfs prints below the file's path.
    """
    parts = path.split("/")
    if XATTR_DIR not in parts:
        return None
    return "/".join(parts[: parts.index(XATTR_DIR)]) or "/"


def candidate_paths(entry: DiffEntry) -> Iterator[str]:
    """The paths an entry names, and for an extended-attribute object also its owner."""
    for path in entry.paths():
        yield path
        owner = xattr_owner(path)
        if owner is not None:
            yield owner  # the literal path stays too: a file may really be named <xattrdir>


def _check_present(entries: Iterable[DiffEntry], layer: Tree, parent: Tree) -> None:
    """A path in neither tree means the output was misread or the trees moved on: don't guess."""
    for entry in entries:
        for path in entry.paths():
            where = xattr_owner(path) or path
            if all(tree.lstat(p) is None for tree in (layer, parent) for p in (path, where)):
                raise Fallback(f"zfs diff names {path!r}, which is in neither layer")


def check_named(
    entries: Iterable[DiffEntry], candidates: Iterable[str], layer: Tree, parent: Tree
) -> None:
    """Raise :class:`Fallback` if a changed object may live on under names nobody printed.

    zfs finds a name through the object's parent pointer, which goes stale once the directory of
    its latest link is removed; it then prints a name from before, or ``-`` for an object that
    still exists. So every reported file must be found among the candidates in the layer (by
    inode: zfs keeps object numbers in a clone), and a multiply linked file reported removed
    may live on under its other names.
    """
    found = {st.st_ino for st in map(layer.lstat, candidates) if st is not None}
    for entry in entries:
        if entry.kind == "/" or entry.change == "+" or xattr_owner(entry.path) is not None:
            continue  # one name per directory; new objects' names are all new entries
        before = parent.lstat(entry.path)
        if entry.change == "-":
            if before is not None and not stat.S_ISDIR(before.st_mode) and before.st_nlink > 1:
                raise Fallback(f"{entry.path} had {before.st_nlink} names; zfs says it went")
            continue
        now = layer.lstat(entry.new_path or entry.path)
        objects = {st.st_ino for st in (before, now) if st is not None}
        if len(objects) != 1 or not objects <= found:
            raise Fallback(f"zfs diff names {entry.path!r} for an object that is not there now")


def relisted(layer: Tree, parent: Tree, directory: str) -> Iterator[str]:
    """Names in ``directory`` that appeared, went, or point at another object.

    ZFS prints one name per object, so a new hard link shows only as ``M dir``; comparing the two
    listings finds every name that changed in a modified directory.
    """
    new, old = layer.listing(directory), parent.listing(directory)
    for name in new.keys() | old.keys():
        if new.get(name) != old.get(name):
            yield _join(directory, name)


def _replaced_dir(layer: Tree, parent: Tree, path: str) -> bool:
    """A directory in both trees that is not the same object: Docker compares them name by name."""
    new, old = layer.lstat(path), parent.lstat(path)
    return (
        new is not None
        and old is not None
        and stat.S_ISDIR(new.st_mode)
        and stat.S_ISDIR(old.st_mode)
        and new.st_ino != old.st_ino
    )


def expand_candidates(entries: Iterable[DiffEntry], layer: Tree, parent: Tree) -> set[str]:
    """Every path that may differ: the printed ones, changed names in modified directories, and
    whole subtrees of directories that were replaced by another directory of the same name."""
    todo: list[str] = []
    for entry in entries:
        todo.extend(candidate_paths(entry))
        if entry.change == "M" and entry.kind == "/":
            todo.extend(relisted(layer, parent, entry.path))
    found: set[str] = set()
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found.add(path)
        if path != "/" and _replaced_dir(layer, parent, path):
            todo.extend(layer.subtree(path))
            todo.extend(parent.subtree(path))
    return found


def check_links(
    entries: Iterable[DiffEntry], candidates: Iterable[str], layer: Tree, parent: Tree
) -> None:
    """Raise :class:`Fallback` if a changed object may have names that are not candidates.

    Unlisted names sit in unmodified directories, which point at the same objects on both
    sides; such a name changed exactly when its object did. So a multiply linked object is fine
    if it is new (all its names are new, in modified directories) or if its stat is unchanged.
    """
    new_objects = set()
    for entry in entries:
        st = layer.lstat(entry.path) if entry.change == "+" else None
        if st is not None:
            new_objects.add(st.st_ino)
    linked: dict[int, tuple[str, os.stat_result]] = {}
    before: dict[int, tuple[str, os.stat_result]] = {}
    for path in candidates:
        st, old = layer.lstat(path), parent.lstat(path)
        if st is not None and not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            linked.setdefault(st.st_ino, (path, st))
        if old is not None and not stat.S_ISDIR(old.st_mode):
            before.setdefault(old.st_ino, (path, old))
    for ino, (path, st) in linked.items():
        if ino in new_objects:
            continue
        if ino not in before:
            raise Fallback(f"{path} has {st.st_nlink} names and zfs diff reports only one")
        old_path, old = before[ino]
        if differs(layer, parent, path, st, old, old_path=old_path):
            raise Fallback(f"{path} changed and has {st.st_nlink} names; ZFS cannot list them")
