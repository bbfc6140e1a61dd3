"""What is mounted where, read from ``/proc/self/mountinfo``: the one place that parses it.

``mount_of`` answers which filesystem holds a path; ``mounts_below`` what is mounted at or below
one (the question every cleanup and leak check asks). Standard library only: the lab's launcher
(``vagrant/lab``) loads this file on its own, without the snapdriver package and its dependencies.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    target: str
    fstype: str
    source: str
    options: str
    mount_id: int = 0
    parent_id: int = 0  # the mount this one is mounted on (the one below it in a stack)


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal ``\\ooo``; nothing else
    (a path's other bytes, UTF-8 or not, are as they are)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field) if "\\" in field else field


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts a ``/proc/PID/mountinfo`` text lists, in its order (a stack bottom first)."""
    found = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 6 or len(tail) < 2:
            continue
        target, options = _unescape(fields[4]), fields[5]
        mount_id, parent_id = int(fields[0]), int(fields[1])
        found.append(Mount(target, tail[0], _unescape(tail[1]), options, mount_id, parent_id))
    return found


def mounts() -> list[Mount]:
    """This process's mounts, from ``/proc/self/mountinfo``."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
        return parse_mountinfo(handle.read())


def is_below(target: str, root: str | os.PathLike[str]) -> bool:
    """True if mount point ``target`` is ``root`` itself or inside it (by path, not prefix)."""
    top = os.fspath(root).rstrip("/") or "/"
    return target == top or target.startswith(top.rstrip("/") + "/")


def mounts_below(*roots: str | os.PathLike[str], table: list[Mount] | None = None) -> list[Mount]:
    """Mounts at or below any of ``roots``, deepest first (the order to unmount them in).

    Roots are compared as given: pass the real path (no symlinks) a mount point would show.
    ``table`` is :func:`mounts` unless given.
    """
    listed = mounts() if table is None else table
    found = [m for m in listed if any(is_below(m.target, root) for root in roots)]
    # mountinfo lists a stack bottom first: reversed, a stable sort keeps the top one first.
    return sorted(reversed(found), key=lambda m: m.target.count("/"), reverse=True)


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing ancestor (a Home dockerd has not made yet)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_of(path: Path) -> Mount:
    """The mount that holds ``path`` (or would hold it, if it does not exist yet).

    The one a lookup of ``path`` reaches, which is not always the deepest mount point above it:
    a mount made later over an ancestor hides it (dockerd bind-mounts its data root onto itself
    at start, hiding a filesystem mounted inside it before). So the mount tree is walked down
    the path, from parent to child mount, as the kernel does.
    """
    real = os.path.realpath(nearest_existing(path))
    listed = mounts()
    on: dict[tuple[int, str], Mount] = {}
    for mount in listed:  # of two on the same parent and point, the later one is on top
        on[(mount.parent_id, mount.target)] = mount
    ids = {mount.mount_id for mount in listed}
    current = next((m for m in listed if m.target == "/" and m.parent_id not in ids), None)
    if current is None:
        raise FileNotFoundError(f"no mount holds {path}")
    parts = [p for p in real.split("/") if p]
    for depth in range(len(parts) + 1):
        point = "/" + "/".join(parts[:depth])
        while (upper := on.get((current.mount_id, point))) is not None:
            current = upper  # a mount on this point, or one stacked on it
    return current
