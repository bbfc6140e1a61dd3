"""Docker's change list for a btrfs layer from the no-data send stream, in O(changes).

The stream (``btrfs send --no-data -p parent layer``) says which names and inodes changed, but in
the receiver's moving namespace: new inodes appear under orphan names (``o261-7-0``) and are then
renamed into place, deleted trees are parked under orphan names first, and a renamed directory
carries its subtree silently. :class:`_Replay` replays the commands on a sparse virtual tree whose
nodes remember their original path, which turns the stream into a set of candidate paths. Each
candidate is then judged by Docker's own rule on the two read-only snapshots
(:func:`snapdriver.layers.changes.changes_from_candidates`), so the result equals the tree walk.

One deliberate difference: a regular file whose data the stream rewrote in place (same inode in
both trees) is reported as modified even when Docker's size-and-mtime rule cannot see it (same
size, same second, old mtime with zero nanoseconds). The walk is blind there; the stream is not.
A file replaced by a new inode (``cp -p``, a tar extraction) keeps Docker's verdict: its mtime
was set on purpose, and reporting it would diverge from Docker where Docker is not wrong.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from snapdriver.layers.changes import (
    Change,
    ChangeKind,
    ConfinedTree,
    judge_candidates,
    with_ancestors,
)
from snapdriver_btrfs import ioctl
from snapdriver_btrfs.sendstream import Attr, Cmd, Command, SendStreamError, parse_chunks

__all__ = ["Candidates", "SendStreamError", "Touched", "native_changes", "stream_candidates"]

_SUBVOLUME_ROOT_INO = 256
_EMPTY_SUBVOLUME_INO = 2  # what a nested subvolume looks like inside a snapshot

_CREATE = frozenset({Cmd.MKFILE, Cmd.MKDIR, Cmd.MKNOD, Cmd.MKFIFO, Cmd.MKSOCK, Cmd.SYMLINK})
_DATA = frozenset(
    {Cmd.WRITE, Cmd.CLONE, Cmd.TRUNCATE, Cmd.UPDATE_EXTENT, Cmd.ENCODED_WRITE, Cmd.FALLOCATE}
)
_METADATA = frozenset(
    {
        Cmd.SET_XATTR,
        Cmd.REMOVE_XATTR,
        Cmd.CHMOD,
        Cmd.CHOWN,
        Cmd.UTIMES,
        Cmd.FILEATTR,
        Cmd.ENABLE_VERITY,
    }
)


#: Deeper than this, the walk answers first. The kernel builds every command's path by walking up
#: from the inode, so a send costs depth x entries: 2,000 nested directories took 48 s (full send)
#: to 165 s (incremental) of kernel time here, against half a second for the walk.
MAX_SEND_DEPTH = 256


def native_changes(
    layer_ro: Path, parent_ro: Path, *, max_depth: int | None = MAX_SEND_DEPTH
) -> list[Change]:
    """Docker's change list of ``layer_ro`` against ``parent_ro``, from a no-data send.

    Both must be read-only subvolumes (or snapshots) of one btrfs filesystem, and the caller needs
    ``CAP_SYS_ADMIN``. Raises :class:`SendStreamError` when the stream cannot be understood and
    :class:`OSError` when the kernel refuses the send (e.g. ``EPERM`` for a writable subvolume);
    either way the tree walk is the fallback. A path ``max_depth`` directories deep stops the
    send with :class:`SendStreamError` (None: no limit).
    """
    flags = ioctl.SEND_FLAG_NO_FILE_DATA
    with ioctl.send_chunks(layer_ro, parent=parent_ro, flags=flags) as chunks:
        # The stream comes straight from the kernel through a pipe, so there is nothing for its
        # CRCs to catch; pure-Python CRC32C would cost about a second per 1.6 MB of changes.
        commands = parse_chunks(chunks, verify_crc=False)
        found = stream_candidates(commands if max_depth is None else _shallow(commands, max_depth))
    # Both trees are looked up through one cursor each, shared by every step below: a path costs
    # about one step from the previous one, not its depth (layers can be thousands deep).
    with ConfinedTree(os.fspath(layer_ro)) as layer, ConfinedTree(os.fspath(parent_ro)) as parent:
        candidates, written = _look_closer(layer, parent, found)
        changes = judge_candidates(layer, parent, candidates)
        return _with_rewrites(layer, parent, changes, written)


def _shallow(commands: Iterator[Command], max_depth: int) -> Iterator[Command]:
    """``commands``, stopping the send with :class:`SendStreamError` once a path is too deep."""
    for command in commands:
        if command.attrs.get(Attr.PATH, b"").count(b"/") >= max_depth:
            raise SendStreamError(f"a path over {max_depth} directories deep; stopped the send")
        yield command


def _look_closer(
    layer: ConfinedTree, parent: ConfinedTree, found: Candidates
) -> tuple[set[str], set[str]]:
    """Candidates the stream does not name, and the names of files rewritten in place.

    Other names of changed hard-linked inodes, nested subvolumes in changed directories, and the
    contents of renamed directories where Docker compares them name by name.
    """
    candidates = set(found.candidates)
    written: set[str] = set()
    names_of: dict[int, list[str]] = {}  # inode -> all its names, asked once
    # In path order, so the cursors move little between lookups.
    for touched in sorted(found.touched, key=lambda t: os.fsencode(t.path)):
        if layer.is_dir(touched.path):
            if touched.orig is not None:  # a new directory is walked whole anyway
                candidates.update(_unnamed_subvolumes(layer, parent, touched))
            continue
        names = _other_names(layer, touched.path, names_of)
        candidates.update(names)
        if touched.rewritten:
            written.update(names)
    for final, orig in sorted(found.moved, key=lambda m: os.fsencode(m[0])):
        candidates.update(_moved_subtree(layer, parent, final, orig))
    return candidates, written


@dataclass(frozen=True, slots=True)
class Touched:
    """An entry whose inode the stream changed.

    ``path`` is its final path ("/" for the root), ``orig`` its original one (None if new), and
    ``rewritten`` whether its file data was written in place (neither renamed nor replaced).
    """

    path: str
    orig: str | None
    rewritten: bool


@dataclass
class Candidates:
    """What a replayed stream says about the layer, in layer paths (``/etc/hosts``).

    ``candidates``: paths that may differ. ``touched``: entries whose inode changed.
    ``moved``: ``(final, orig)`` of every entry renamed by the stream, whose subtree may need a
    closer look.
    """

    candidates: set[str] = field(default_factory=set)
    touched: list[Touched] = field(default_factory=list)
    moved: list[tuple[str, str]] = field(default_factory=list)


def stream_candidates(commands: Iterable[Command]) -> Candidates:
    """Replay an incremental stream's commands and collect the paths they may have changed."""
    replay = _Replay()
    for command in commands:
        replay.apply(command)
    return replay.result()


class _Node:
    """A name in the virtual tree; ``orig`` is its path in the parent snapshot, None if new."""

    __slots__ = ("data", "kids", "moved", "name", "orig", "parent", "touched", "vacated")

    def __init__(self, name: str, parent: _Node | None, orig: str | None) -> None:
        self.name = name
        self.parent = parent
        self.orig = orig
        self.kids: dict[str, _Node] = {}
        # Original names that left this directory: they must not be materialised again.
        self.vacated: set[str] = set()
        self.touched = False
        self.data = False
        self.moved = False


class _Replay:
    """The receiver's namespace, materialised lazily from the parent snapshot's names."""

    def __init__(self) -> None:
        self.root = _Node("", None, "")
        self.removed: set[str] = set()
        self.started = False

    def apply(self, command: Command) -> None:
        """Apply one command to the virtual tree."""
        cmd = command.cmd
        if not self.started:
            if cmd != Cmd.SNAPSHOT:
                raise SendStreamError(f"expected an incremental stream, got {cmd.name} first")
            self.started = True
            return
        if cmd in _CREATE or cmd == Cmd.LINK:
            parent, name = self._split(command.path)
            self._attach(parent, name, _Node(name, parent, None))
        elif cmd == Cmd.RENAME:
            node = self._lookup(command.path)
            self._detach(node)
            parent, name = self._split(command.raw(Attr.PATH_TO))
            self._attach(parent, name, node)
            node.moved = True
        elif cmd in (Cmd.UNLINK, Cmd.RMDIR):
            node = self._lookup(command.path)
            self._detach(node)
            self._forget(node)
        elif cmd in _DATA:
            node = self._lookup(command.path)
            node.touched = node.data = True
        elif cmd in _METADATA:
            self._lookup(command.path).touched = True
        elif cmd == Cmd.END:
            return
        else:
            raise SendStreamError(f"unexpected {cmd.name} command in an incremental stream")

    def _components(self, path: bytes) -> list[str]:
        # Decoded whole, not per part: a deep path has thousands of parts ("/" is never inside a
        # UTF-8 sequence, so the names are the same).
        names = [name for name in os.fsdecode(path).split("/") if name]
        if any(name in (".", "..") for name in names):
            raise SendStreamError(f"stream path {path!r} has a . or .. component")
        return names

    def _lookup(self, path: bytes) -> _Node:
        node = self.root
        for name in self._components(path):
            node = self._child(node, name, path)
        return node

    def _split(self, path: bytes) -> tuple[_Node, str]:
        names = self._components(path)
        if not names:
            raise SendStreamError("stream names the subvolume root as a new entry")
        node = self.root
        for name in names[:-1]:
            node = self._child(node, name, path)
        return node, names[-1]

    def _child(self, node: _Node, name: str, path: bytes) -> _Node:
        """``node``'s entry ``name``; an untouched original entry is materialised on first use."""
        kid = node.kids.get(name)
        if kid is not None:
            return kid
        if node.orig is None or name in node.vacated:
            raise SendStreamError(f"stream refers to {path!r}, which does not exist there")
        kid = _Node(name, node, f"{node.orig}/{name}")
        node.kids[name] = kid
        return kid

    def _attach(self, parent: _Node, name: str, node: _Node) -> None:
        """Put ``node`` at ``parent/name``, replacing whatever was there."""
        old = parent.kids.get(name)
        if old is not None:
            self._forget(old)
        elif parent.orig is not None and name not in parent.vacated:
            # An unseen original entry would be overwritten: it is gone, whether or not it existed.
            self.removed.add(f"{parent.orig}/{name}")
        parent.vacated.add(name)
        parent.kids[name] = node
        node.parent, node.name = parent, name

    def _detach(self, node: _Node) -> None:
        parent = node.parent
        if parent is None:
            raise SendStreamError("stream removes or renames the subvolume root")
        del parent.kids[node.name]
        parent.vacated.add(node.name)
        node.parent = None

    def _forget(self, node: _Node) -> None:
        """Record every original path in a removed subtree as deleted."""
        stack = [node]
        while stack:
            current = stack.pop()
            if current.orig is not None:
                self.removed.add(current.orig)
            stack.extend(current.kids.values())

    def result(self) -> Candidates:
        """Candidates from the final virtual tree and the removed original paths."""
        found = Candidates(candidates=set(self.removed))
        if self.root.touched:
            found.touched.append(Touched("/", "/", rewritten=False))
        stack = [(kid, "/" + name) for name, kid in self.root.kids.items()]
        while stack:
            node, path = stack.pop()
            if node.orig is None:
                found.candidates.add(path)
            elif node.orig != path:
                found.candidates.update((path, node.orig))
                if node.moved:
                    found.moved.append((path, node.orig))
            if node.touched:
                found.candidates.add(path)
                rewritten = node.data and node.orig == path
                found.touched.append(Touched(path, node.orig, rewritten))
            stack.extend((kid, f"{path}/{name}") for name, kid in node.kids.items())
        return found


def _other_names(layer: ConfinedTree, path: str, names_of: dict[int, list[str]]) -> list[str]:
    """``path`` and, for a non-directory with more links, every other name of its inode."""
    st = layer.lstat(path)
    if st is None or stat.S_ISDIR(st.st_mode) or st.st_nlink < 2:
        return [path]
    if st.st_ino not in names_of:
        try:
            names_of[st.st_ino] = ioctl.inode_paths(layer.root, st.st_ino)
        except OSError as err:
            raise SendStreamError(f"cannot list the names of {path}: {err}") from err
    return [path, *names_of[st.st_ino]]


def _unnamed_subvolumes(
    layer: ConfinedTree, parent: ConfinedTree, touched: Touched
) -> Iterator[str]:
    """Nested subvolumes in a changed directory, in both trees; send never names them.

    This costs a readdir of each changed directory (nothing cheaper tells: the directory's size
    cannot, as Docker-in-Docker swaps subvolumes whose names have the same length).
    """
    yield from _subvolume_entries(layer, touched.path)
    if touched.orig is not None and parent.is_dir(touched.orig):
        yield from _subvolume_entries(parent, touched.orig)


def _subvolume_entries(tree: ConfinedTree, directory: str) -> list[str]:
    """Entries of ``directory`` that are other subvolumes, which send never mentions.

    A live nested subvolume's root is inode 256; in a snapshot it is an empty directory with
    inode 2. Only directory entries are stat'ed (readdir reports the subvolume id as d_ino).
    """
    prefix = directory.rstrip("/")
    with tree.scandir(directory) as entries:
        return [
            f"{prefix}/{entry.name}"
            for entry in entries
            if entry.is_dir(follow_symlinks=False)
            and entry.stat(follow_symlinks=False).st_ino
            in (_EMPTY_SUBVOLUME_INO, _SUBVOLUME_ROOT_INO)
        ]


def _moved_subtree(
    layer: ConfinedTree, parent: ConfinedTree, final: str, orig: str
) -> Iterator[str]:
    """Paths below a renamed directory that Docker compares name by name.

    Docker compares a renamed directory's contents only where a directory stood in the parent at
    its new path, or stands in the layer at its old path; otherwise it reports one Add (with the
    subtree) and one Delete, which the candidates already give. Each entry is named at its new
    path and at its old one.
    """
    if not layer.is_dir(final):
        return
    if not (parent.is_dir(final) or layer.is_dir(orig)):
        return
    for child, _ in layer.descendants(final):
        yield child
        yield orig + child[len(final) :]


def _same_regular_file(layer: ConfinedTree, parent: ConfinedTree, path: str) -> bool:
    """Whether ``path`` is the same regular file (inode) in both trees; snapshots keep inodes."""
    new, old = layer.lstat(path), parent.lstat(path)
    return (
        new is not None
        and old is not None
        and stat.S_ISREG(new.st_mode)
        and stat.S_ISREG(old.st_mode)
        and new.st_ino == old.st_ino
    )


def _with_rewrites(
    layer: ConfinedTree, parent: ConfinedTree, changes: list[Change], written: set[str]
) -> list[Change]:
    """Add a Modify for each regular file rewritten in place that the stat rule let through."""
    reported = {change.path for change in changes}
    extra = [
        Change(path, ChangeKind.MODIFY)
        for path in written - reported
        if _same_regular_file(layer, parent, path)
    ]
    return with_ancestors([*changes, *extra]) if extra else changes
