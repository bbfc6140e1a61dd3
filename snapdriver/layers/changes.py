"""Change lists with Docker's exact semantics.

Docker's ``archive.ChangesDirs`` decides what ``docker diff`` shows and what ``docker commit`` puts
in a layer. Its rules, reproduced here:

* a name only in the new tree is Added, and so is everything below an added directory;
* a name in both is Modified when ``stat_different`` says so or the ``security.capability`` xattrs
  differ (directory mtimes and sizes never count);
* a name only in the old tree is Deleted, topmost only, and only where the new parent is a
  directory (a directory replaced by a file yields one Modify, no Deletes);
* every directory above a change (except ``/``) is Modified unless already reported.

Two producers share these rules: :func:`walk_changes` (both trees walked, the oracle and the
fallback) and :func:`changes_from_candidates` (a native differ names the paths that may have
changed; each is judged by the same rule, so the output is identical at the cost of the change).
Both look through :class:`ConfinedTree` (directory fds, never whole paths, no recursion), so a
layer's depth and path lengths are bounded by memory only, not by ``PATH_MAX`` or the stack.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import itertools
import os
import stat
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

from snapdriver.layers.rootfs import lstat_at

CAPABILITY_XATTR = "security.capability"


class ChangeKind(enum.IntEnum):
    """Docker's ``archive.ChangeType`` values, as sent on the wire."""

    MODIFY = 0
    ADD = 1
    DELETE = 2


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of a change list: an absolute path inside the layer and what happened to it."""

    path: str
    kind: ChangeKind

    def sort_key(self) -> tuple[bytes, int]:
        """Go compares path bytes; so do we (``str`` order differs for surrogate-escaped names)."""
        return os.fsencode(self.path), int(self.kind)


def sort_changes(changes: Iterable[Change]) -> list[Change]:
    """Sort by path bytes, then kind: the order ``ExportChanges`` writes and we reply with."""
    return sorted(changes, key=Change.sort_key)


def stat_different(old: os.stat_result, new: os.stat_result) -> bool:
    """Docker's ``statDifferent``.

    Its directory test is ``mode & S_IFDIR == S_IFDIR``, which is also true for sockets and block
    devices; kept as is, because matching Docker's verdicts is the point.
    """
    if (
        old.st_mode != new.st_mode
        or old.st_uid != new.st_uid
        or old.st_gid != new.st_gid
        or old.st_rdev != new.st_rdev
    ):
        return True
    if old.st_mode & stat.S_IFDIR == stat.S_IFDIR:
        return False
    return old.st_size != new.st_size or not _same_time(old, new)


def _same_time(old: os.stat_result, new: os.stat_result) -> bool:
    """``sameFsTimeSpec``: nanoseconds count only when both sides have them."""
    old_s, old_ns = divmod(old.st_mtime_ns, 1_000_000_000)
    new_s, new_ns = divmod(new.st_mtime_ns, 1_000_000_000)
    return old_s == new_s and (old_ns == new_ns or 0 in (old_ns, new_ns))


def read_capability(path: str | Path) -> bytes | None:
    """The ``security.capability`` xattr of ``path`` (not following links), or None."""
    try:
        return os.getxattr(path, CAPABILITY_XATTR, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT, errno.EPERM):
            return None
        raise


def entry_changed(old_path: str, old: os.stat_result, new_path: str, new: os.stat_result) -> bool:
    """Docker's verdict for a name present in both trees."""
    return stat_different(old, new) or read_capability(old_path) != read_capability(new_path)


def with_ancestors(changes: Iterable[Change]) -> list[Change]:
    """Add a Modify for every directory above a change that is not itself reported, then sort."""
    result = {c.path: c for c in changes}
    for path in list(result):
        parent = os.path.dirname(path)
        while parent not in ("/", "") and parent not in result:
            result[parent] = Change(parent, ChangeKind.MODIFY)
            parent = os.path.dirname(parent)
    return sort_changes(result.values())


_T = TypeVar("_T")


class WalkTooLarge(Exception):
    """A walk given a limit met more entries than that: a native differ should answer."""


def walk_changes(
    new_root: str | Path, old_root: str | Path | None, limit: int | None = None
) -> list[Change]:
    """Docker's ``ChangesDirs(new, old)``: walk both trees; ``old_root=None`` is an empty tree.

    With ``limit``, raise :class:`WalkTooLarge` as soon as the walk has met more entries (both
    trees counted) than that, so a caller can try the walk first where trees may be small.
    """
    with ConfinedTree(os.fspath(new_root)) as new_tree:
        if old_root is None:
            return sort_changes(added_subtree(new_tree, "/"))
        with ConfinedTree(os.fspath(old_root)) as old_tree:
            return with_ancestors(_walk_both(new_tree, old_tree, limit))


def _walk_both(
    new_tree: ConfinedTree, old_tree: ConfinedTree, limit: int | None = None
) -> list[Change]:
    """The changes of a walk, without ancestors; an explicit stack, so depth costs no recursion."""
    found: list[Change] = []
    stack: list[tuple[str, bool]] = [("/", True)]  # (directory, whether the old one is one too)
    budget = _Budget(limit)
    while stack:
        directory, old_is_dir = stack.pop()
        new_entries = budget.spend(new_tree.scan(directory, budget.left))
        old_entries = budget.spend(old_tree.scan(directory, budget.left)) if old_is_dir else {}
        added_dirs: list[str] = []
        for name, new_st in new_entries.items():
            path = _join(directory, name)
            old_st = old_entries.pop(name, None)
            if old_st is None:
                found.append(Change(path, ChangeKind.ADD))
                if stat.S_ISDIR(new_st.st_mode):
                    added_dirs.append(path)
                continue
            # Linux's walker skips a name that is the same inode on the same device in both trees.
            if old_st.st_ino == new_st.st_ino and old_st.st_dev == new_st.st_dev:
                continue
            if stat_different(old_st, new_st) or (
                old_tree.capability_in(directory, name) != new_tree.capability_in(directory, name)
            ):
                found.append(Change(path, ChangeKind.MODIFY))
            if stat.S_ISDIR(new_st.st_mode):
                stack.append((path, stat.S_ISDIR(old_st.st_mode)))
        found.extend(Change(_join(directory, name), ChangeKind.DELETE) for name in old_entries)
        for path in added_dirs:  # after the loop, so the cursors stay here while comparing
            for change in added_subtree(new_tree, path):
                budget.spend({change.path: None})
                found.append(change)
    return found


class _Budget:
    """How many more entries a walk given a limit may meet; ``left`` is None without one."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit

    def spend(self, entries: dict[str, _T]) -> dict[str, _T]:
        if self.left is not None:
            self.left -= len(entries)
            if self.left < 0:
                raise WalkTooLarge("the trees have more entries than the walk's limit")
        return entries


def added_subtree(tree: ConfinedTree, path: str) -> Iterator[Change]:
    """An Add for every entry below ``path`` (a directory in ``tree``), at any depth."""
    for child, _ in tree.descendants(path):
        yield Change(child, ChangeKind.ADD)


def differs(
    new_tree: ConfinedTree,
    old_tree: ConfinedTree,
    path: str,
    new: os.stat_result,
    old: os.stat_result,
    *,
    old_path: str | None = None,
) -> bool:
    """:func:`entry_changed` for ``path`` (``old_path`` in the old tree, if another)."""
    if stat_different(old, new):
        return True
    return old_tree.capability(old_path or path) != new_tree.capability(path)


_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PROC_FD = "/proc/self/fd"


class ConfinedTree:
    """Lookups and listings inside one tree that never follow a symlink in any component.

    Candidate paths come from both trees, so ``a/b`` may cross a symlink ``a`` on one side; a
    plain ``lstat`` would follow it out of the layer. Whole paths never reach the kernel: a deep
    layer's exceed ``PATH_MAX``, and resolving each from the root costs its depth every time.
    Instead one ``O_PATH`` cursor moves down by name (``O_NOFOLLOW``) and up by ``..``, checked
    against the directory it came from (an fd per level would run out of descriptors on deep
    layers). Sorted or depth-first lookups cost about one step each. Use as a context manager, or
    :meth:`close`.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        _check_proc_fd()
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fds = [root_fd, -1]  # [root, cursor]; a list, so the finalizer sees the cursor move
        self._finalizer = weakref.finalize(self, _close_all, self._fds)
        st = os.fstat(root_fd)
        self._cache: dict[str, os.stat_result | None] = {"/": st}
        # Where the cursor is: each directory from the root down, with its (st_dev, st_ino).
        self._levels: list[tuple[str, tuple[int, int]]] = []
        self._restart()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the tree's file descriptors (also done when it is garbage collected)."""
        self._finalizer()

    def lstat(self, path: str) -> os.stat_result | None:
        """The entry at ``path``, or None if it or a non-directory ancestor is in the way."""
        if path in self._cache:
            return self._cache[path]
        parent, name = _split(path)
        result = lstat_at(self._fds[1], name) if self._enter(parent) else None
        self._cache[path] = result
        return result

    def is_dir(self, path: str) -> bool:
        st = self.lstat(path)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def capability(self, path: str) -> bytes | None:
        """The ``security.capability`` xattr of ``path``, or None (also if it is not there)."""
        return self.capability_in(*_split(path))

    def capability_in(self, directory: str, name: str) -> bytes | None:
        """:meth:`capability` of the entry ``name`` of ``directory``."""
        if not self._enter(directory):
            return None
        # The magic link names the cursor's directory; the final name is not followed.
        return read_capability(f"{_PROC_FD}/{self._fds[1]}/{name}")

    @contextlib.contextmanager
    def scandir(self, directory: str) -> Iterator[Iterator[os.DirEntry[str]]]:
        """The entries of ``directory``; ``NotADirectoryError`` if it is not a directory here."""
        if not self._enter(directory):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory in the tree", directory)
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._fds[1])
        try:
            with os.scandir(fd) as entries:  # their stat() needs fd, so it stays open until here
                yield entries
        finally:
            os.close(fd)

    def scan(self, directory: str, limit: int | None = None) -> dict[str, os.stat_result]:
        """Name -> lstat of every entry of ``directory``; with ``limit``, of at most one more
        than that (so a caller sees it was exceeded without reading a huge directory)."""
        with self.scandir(directory) as entries:
            some = entries if limit is None else itertools.islice(entries, max(limit, 0) + 1)
            return {e.name: e.stat(follow_symlinks=False) for e in some}

    def descendants(self, directory: str) -> Iterator[tuple[str, bool]]:
        """``(path, is_dir)`` of every entry below ``directory``, at any depth, depth first."""
        stack = [directory]
        while stack:
            current = stack.pop()
            with self.scandir(current) as entries:
                found = [(_join(current, e.name), e.is_dir(follow_symlinks=False)) for e in entries]
            for path, is_dir in found:
                yield path, is_dir
                if is_dir:
                    stack.append(path)

    def _enter(self, directory: str) -> bool:
        """Move the cursor to ``directory``; False if that is not a real directory here."""
        if directory == self._levels[-1][0]:
            return True  # the common case: one entry after another in the same directory
        while not _contains(self._levels[-1][0], directory):
            self._up()
        for name in _names_below(self._levels[-1][0], directory):
            try:  # O_DIRECTORY | O_NOFOLLOW: opens only a real directory, never a symlink
                fd, identity = _open_dir(self._fds[1], name)
            except OSError as err:
                if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return False
                raise
            self._move(fd)
            self._levels.append((_join(self._levels[-1][0], name), identity))
        return True

    def _up(self) -> None:
        fd, identity = _open_dir(self._fds[1], "..")
        if identity != self._levels[-2][1]:
            # Renamed while we were below it: ".." is no longer the way we came; start over.
            os.close(fd)
            self._restart()
            return
        self._move(fd)
        self._levels.pop()

    def _restart(self) -> None:
        fd, identity = _open_dir(self._fds[0], ".")
        self._move(fd)
        self._levels = [("/", identity)]

    def _move(self, fd: int) -> None:
        if self._fds[1] >= 0:
            os.close(self._fds[1])
        self._fds[1] = fd


def _close_all(fds: list[int]) -> None:
    for index, fd in enumerate(fds):
        if fd >= 0:
            os.close(fd)
            fds[index] = -1


def _open_dir(dir_fd: int, name: str) -> tuple[int, tuple[int, int]]:
    """An ``O_PATH`` fd of the directory ``name`` (never a symlink) and its (st_dev, st_ino)."""
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, (st.st_dev, st.st_ino)


@functools.cache
def _check_proc_fd() -> None:
    """Checked once: without ``/proc`` every capability would silently read as None."""
    if not os.path.isdir(_PROC_FD):
        raise OSError(errno.ENOENT, "snapdriver needs /proc mounted", _PROC_FD)


def _join(directory: str, name: str) -> str:
    return f"/{name}" if directory == "/" else f"{directory}/{name}"


def _split(path: str) -> tuple[str, str]:
    """``/a/b`` -> (``/a``, ``b``); refuses what could climb (``..``) or is no entry (``/``)."""
    parent, _, name = path.rpartition("/")
    if not path.startswith("/") or name in ("", ".", ".."):
        raise ValueError(f"not a clean absolute path in a tree: {path!r}")
    return parent or "/", name


def _contains(directory: str, path: str) -> bool:
    """Whether ``path`` is ``directory`` or below it (both absolute, clean)."""
    if directory in ("/", path):
        return True
    return path.startswith(directory) and path[len(directory)] == "/"


def _names_below(directory: str, path: str) -> list[str]:
    """The components of ``path`` below ``directory``, which contains it."""
    names = [name for name in path[len(directory) :].split("/") if name]
    if any(name in (".", "..") for name in names):
        raise ValueError(f"not a clean absolute path in a tree: {path!r}")
    return names


def changes_from_candidates(
    new_root: str | Path, old_root: str | Path, candidates: Iterable[str]
) -> list[Change]:
    """Judge each candidate path with Docker's rules; output equals :func:`walk_changes`.

    ``candidates`` must include every path that may differ between the trees (both names of a
    rename, every name of a changed hard-linked inode). Paths are absolute within the layer. Extra
    candidates are harmless; below an added directory the whole subtree is walked anyway.
    """
    with (
        ConfinedTree(os.fspath(new_root)) as new_tree,
        ConfinedTree(os.fspath(old_root)) as old_tree,
    ):
        return judge_candidates(new_tree, old_tree, candidates)


def judge_candidates(
    new_tree: ConfinedTree, old_tree: ConfinedTree, candidates: Iterable[str]
) -> list[Change]:
    """:func:`changes_from_candidates` on trees the caller already has open."""
    todo: set[str] = set()
    for candidate in candidates:
        path = os.path.normpath("/" + candidate.lstrip("/"))
        while path != "/" and path not in todo:
            todo.add(path)
            path = os.path.dirname(path)
    found: list[Change] = []
    covered: set[str] = set()  # directories whose whole subtree was reported as added
    # Sorted, each subtree's paths are consecutive: the trees' cursors move about one step each.
    for path in sorted(todo, key=os.fsencode):
        parent = os.path.dirname(path)
        if parent in covered or not (new_tree.is_dir(parent) and old_tree.is_dir(parent)):
            if parent in covered:
                covered.add(path)
            continue
        found.extend(_judge(new_tree, old_tree, path, covered))
    return with_ancestors(found)


def _judge(
    new_tree: ConfinedTree, old_tree: ConfinedTree, path: str, covered: set[str]
) -> list[Change]:
    """Changes at ``path``, whose parent is a directory in both trees."""
    new_st, old_st = new_tree.lstat(path), old_tree.lstat(path)
    if new_st is None:
        return [] if old_st is None else [Change(path, ChangeKind.DELETE)]
    if old_st is None:
        out = [Change(path, ChangeKind.ADD)]
    elif old_st.st_ino == new_st.st_ino and old_st.st_dev == new_st.st_dev:
        return []
    elif differs(new_tree, old_tree, path, new_st, old_st):
        out = [Change(path, ChangeKind.MODIFY)]
    else:
        out = []
    if stat.S_ISDIR(new_st.st_mode) and (old_st is None or not stat.S_ISDIR(old_st.st_mode)):
        covered.add(path)
        out.extend(added_subtree(new_tree, path))
    return out


def changes_size(new_root: str | Path, changes: Iterable[Change]) -> int:
    """Docker's ``ChangesSize``: bytes of added and modified non-directories, each inode once."""
    base = os.fspath(new_root)
    seen: set[int] = set()
    total = 0
    for change in changes:
        if change.kind == ChangeKind.DELETE:
            continue
        try:
            st = os.lstat(base + change.path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            continue
        if st.st_nlink > 1:
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        total += st.st_size
    return total
