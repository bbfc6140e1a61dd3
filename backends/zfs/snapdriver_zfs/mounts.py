"""mount(2) and umount2(2) for layer datasets, and what ``/proc/self/mountinfo`` says is mounted.

Mounts are made in the plugin's own mount namespace, which is dockerd's (the plugin runs on the
host), so the directories Get returns are visible to dockerd without any propagation tricks.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from snapdriver.hostfs import mounts

MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _raise(call: str, path: Path | str) -> None:
    code = ctypes.get_errno()
    raise OSError(code, f"{call} {path}: {os.strerror(code)}", str(path))


def mount_dataset(dataset: str, target: Path, label: str = "") -> None:
    """Mount a ``mountpoint=legacy`` dataset at ``target`` (what ``mount -t zfs`` does)."""
    data = f'context="{label}"'.encode() if label else None
    if _libc.mount(dataset.encode(), os.fsencode(target), b"zfs", 0, data) != 0:
        _raise("mount", target)


def detach(target: Path | str) -> bool:
    """Lazily unmount ``target`` (MNT_DETACH never fails with EBUSY); False if not a mount."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOENT):
        return False
    _raise("umount2", target)
    return False  # unreachable; keeps mypy's return analysis simple


def targets_of(dataset: str) -> list[str]:
    """Where ``dataset`` is mounted in this namespace, innermost last."""
    return [m.target for m in mounts() if m.fstype == "zfs" and m.source == dataset]


def is_mounted(dataset: str, target: Path) -> bool:
    """True if the topmost mount at ``target`` is ``dataset``."""
    at = [m for m in mounts() if m.target == os.fspath(target)]
    return bool(at) and at[-1].fstype == "zfs" and at[-1].source == dataset
