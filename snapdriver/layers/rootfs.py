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
import shutil
import stat

_SYS_OPENAT2 = 437  # the same number on x86_64 and aarch64
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
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
    try:
        return open_dir_in_root(root_fd, rel)
    except FileNotFoundError:
        pass
    parent, _, name = rel.rpartition("/")
    parent_fd = make_dirs_in_root(root_fd, parent, mode)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=parent_fd)
        return open_in_root(parent_fd, name, os.O_RDONLY | os.O_DIRECTORY)
    finally:
        os.close(parent_fd)


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
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def split(rel: str) -> tuple[str, str]:
    """Split a clean relative path into (parent, name); the parent of ``a`` is ``""``."""
    parent, _, name = rel.rpartition("/")
    return parent, name
