"""Which mounted filesystem holds a path (read from ``/proc/self/mountinfo``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    target: str
    fstype: str
    source: str
    options: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal ``\\ooo``."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts() -> list[Mount]:
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 6 or len(tail) < 2:
                continue
            found.append(Mount(_unescape(fields[4]), tail[0], _unescape(tail[1]), fields[5]))
    return found


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
        inside = real == mount.target or real.startswith(mount.target.rstrip("/") + "/")
        if inside and (best is None or len(mount.target) >= len(best.target)):
            best = mount
    if best is None:
        raise FileNotFoundError(f"no mount holds {path}")
    return best
