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
        found.append(Mount(_unescape(fields[4]), tail[0], _unescape(tail[1]), fields[5]))
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
    """The mount that holds ``path`` (or would hold it, if it does not exist yet)."""
    real = os.path.realpath(nearest_existing(path))
    best: Mount | None = None
    for mount in mounts():
        if is_below(real, mount.target) and (best is None or len(mount.target) >= len(best.target)):
            best = mount
    if best is None:
        raise FileNotFoundError(f"no mount holds {path}")
    return best
