"""Host-side safety: mounts below a path, deletion inside the cache only, the cache lock."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from snapdriver.hostfs import mounts_below

from .errors import LabError, log


def _targets_below(top: Path) -> list[str]:
    return [mount.target for mount in mounts_below(top)]


def umount_under(top: Path) -> bool:
    """Lazily unmount everything at or below ``top``; True when nothing is left.

    A lazy unmount detaches at once and never follows into the host's /dev (the chroot has its
    own tmpfs there); deletion uses ``rm --one-file-system`` anyway.
    """
    if str(top) in ("", "/"):
        return True
    for _ in range(3):
        left = _targets_below(top)
        if not left:
            return True
        for point in left:
            subprocess.run(["umount", "-l", point], stderr=subprocess.DEVNULL, check=False)
    return not _targets_below(top)


def inside(path: Path, base: Path) -> bool:
    """Whether ``path`` is strictly below ``base`` (by name: no symlink is followed)."""
    return path != base and str(path).startswith(str(base).rstrip("/") + "/")


def safe_rm(path: Path, cache_base: Path) -> None:
    """Remove a directory inside the cache, only after every mount below it is gone."""
    if not inside(path, cache_base):
        raise LabError(f"refusing to remove '{path}' (not inside {cache_base})")
    if not os.path.lexists(path):
        return
    if not umount_under(path):
        left = " ".join(_targets_below(path))
        raise LabError(f"cannot unmount everything below {path}; refusing to delete it: {left}")
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)


class CacheLock:
    """``flock`` on ``CACHE/.lock``: shared for runs, exclusive for a build (as in the bash lab)."""

    def __init__(self, cache: Path) -> None:
        cache.mkdir(parents=True, exist_ok=True)
        self.path = cache / ".lock"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def take(self, exclusive: bool) -> None:
        """Take (or convert to) the lock, saying so when another lab process holds it."""
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another lab process on {self.path.parent}")
            fcntl.flock(self.fd, mode)

    def close(self) -> None:
        """Release the lock."""
        os.close(self.fd)


def need_root() -> None:
    """Refuse unless root."""
    if os.geteuid() != 0:
        raise LabError("run as root (debootstrap, chroot and the cache in /var/cache need it)")


def apt_install(packages: list[str]) -> None:
    """Install Debian packages (CI starts from a fresh Debian bookworm)."""
    log(f"installing host packages: {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "-q", "update"], env=env, check=True)
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    subprocess.run(install, env=env, check=True)


def ensure_host(*specs: str) -> None:
    """Install the packages whose command is missing: ``ensure_host("cpio:cpio", ...)``."""
    missing = [pkg for cmd, _, pkg in (s.partition(":") for s in specs) if not shutil.which(cmd)]
    if missing:
        apt_install(missing)


def ensure_host_file(path: Path, package: str) -> None:
    """Install ``package`` when ``path`` is missing."""
    if not path.exists():
        apt_install([package])


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` by renaming a new file over it: a symlink there is replaced, never followed
    (the rootfs and the checkout may hold links that point into the host)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cache_dirs(cache_base: Path) -> list[Path]:
    """The cache directories below the base (not hidden ones, as the shell's ``*/`` had it)."""
    if not cache_base.is_dir():
        return []
    return sorted(p for p in cache_base.iterdir() if p.is_dir() and not p.name.startswith("."))


def tail(path: Path, lines: int) -> str:
    """The last lines of a log file ("" when it is missing)."""
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""
