"""Building and reading very deep test trees by directory fd: their paths exceed PATH_MAX.

Test helpers never follow a symlink and never write over an entry: a generated tree may hold
links that point anywhere on the host.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def chain(root: Path, name: str, depth: int, *, make: bool) -> Iterator[tuple[int, int]]:
    """``(level, fd)`` down ``root/name/name/...`` to ``depth``; each fd is valid until the next.

    With ``make`` each directory is created (``mkdir`` fails on anything already there).
    """
    fd = os.open(root, _DIR)
    try:
        for level in range(depth + 1):
            yield level, fd
            if level < depth:
                if make:
                    os.mkdir(name, dir_fd=fd)
                below = os.open(name, _DIR, dir_fd=fd)
                os.close(fd)
                fd = below
    finally:
        os.close(fd)


def create(dir_fd: int, name: str, data: bytes = b"x") -> None:
    """A new regular file: never through a symlink, never over an existing entry."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_at_depth(root: Path, name: str, depth: int, file: str) -> bytes:
    """The contents of ``file`` at the bottom of ``root/name/.../name`` (``depth`` levels)."""
    for level, fd in chain(root, name, depth, make=False):
        if level == depth:
            with open(os.open(file, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd), "rb") as handle:
                return handle.read()
    raise AssertionError("unreachable")
