"""Path operations confined to a layer's root, the way a chroot would confine them.

Docker unpacks layers inside a chroot; a threaded Python process cannot. ``openat2`` with
``RESOLVE_IN_ROOT`` gives the same guarantee per lookup: ``..`` and symlinks, absolute or not,
resolve as if the layer root were ``/``, so no name in a hostile tar can reach outside the layer.
Final path components are never followed: every operation here works on (parent fd, name).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

_SYS_OPENAT2 = 437  # the same number on x86_64 and aarch64
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


def open_in_root(root_fd: int, rel: str, flags: int = os.O_RDONLY) -> int:
    """Open ``rel`` below the directory ``root_fd`` with chroot-like resolution."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    path = os.fsencode(rel or ".")
    fd = _libc.syscall(_SYS_OPENAT2, root_fd, path, ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        code = ctypes.get_errno()
        if code == errno.ENOSYS:
            raise OSError(code, "openat2 is not available: snapdriver needs Linux 5.6 or newer")
        raise OSError(code, os.strerror(code), rel)
    return int(fd)


def open_dir_in_root(root_fd: int, rel: str) -> int:
    """Open the directory ``rel`` (``""`` is the root itself) below ``root_fd``."""
    return open_in_root(root_fd, rel, os.O_RDONLY | os.O_DIRECTORY)


def make_dirs_in_root(root_fd: int, rel: str, mode: int) -> int:
    """Like ``mkdir -p`` confined to the root; returns an fd of the final directory."""
    missing: list[str] = []
    existing = rel
    while True:  # up to the deepest directory that exists (a loop: trees may be very deep)
        try:
            fd = open_dir_in_root(root_fd, existing)
            break
        except FileNotFoundError:
            if not existing:
                raise
            existing, _, name = existing.rpartition("/")
            missing.append(name)
    for name in reversed(missing):
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, mode, dir_fd=fd)
            child = open_in_root(fd, name, os.O_RDONLY | os.O_DIRECTORY)
        finally:
            os.close(fd)
        fd = child
    return fd


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """lstat of ``name`` in ``dir_fd``, or None if it does not exist."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` and, for a directory, everything below it (never following
    symlinks). A missing name is fine."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    _prune([_Level(os.dup(dir_fd), "", [name], removing=True)], lambda _: False)


def prune_tree(dir_fd: int, rel: str, keep: Callable[[str], bool]) -> None:
    """Below the directory ``dir_fd`` (``rel`` in the layer), remove every entry whose path
    ``keep`` refuses, with all it holds, and look inside the directories it keeps."""
    fd = os.dup(dir_fd)
    try:
        names = os.listdir(fd)
    except OSError:
        os.close(fd)
        raise
    _prune([_Level(fd, rel, names, removing=False)], keep)


@dataclass
class _Level:
    """One open directory of a tree walk: its fd, path, names left to visit, and whether it
    goes too."""

    fd: int
    rel: str
    names: list[str]
    removing: bool


def _prune(stack: list[_Level], keep: Callable[[str], bool]) -> None:
    """The walk behind :func:`remove_at` and :func:`prune_tree`.

    An explicit stack, not recursion: a hostile layer may be deeper than Python's recursion
    limit. It holds one fd per level, and opens each directory with ``O_NOFOLLOW`` from its
    parent's fd, so it never leaves the tree it started in.
    """
    try:
        while stack:
            level = stack[-1]
            if not level.names:
                stack.pop()
                os.close(level.fd)
                if stack and level.removing:
                    os.rmdir(level.rel.rpartition("/")[2], dir_fd=stack[-1].fd)
                continue
            name = level.names.pop()
            path = f"{level.rel}/{name}" if level.rel else name
            removing = level.removing or not keep(path)
            st = lstat_at(level.fd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                fd = os.open(name, _DIR_FLAGS, dir_fd=level.fd)
                stack.append(_Level(fd, path, [], removing))
                stack[-1].names = os.listdir(fd)
            elif st is not None and removing:
                os.unlink(name, dir_fd=level.fd)
    finally:
        for level in stack:
            os.close(level.fd)


def split(rel: str) -> tuple[str, str]:
    """Split a clean relative path into (parent, name); the parent of ``a`` is ``""``."""
    parent, _, name = rel.rpartition("/")
    return parent, name
