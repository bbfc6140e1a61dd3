"""The guest's root filesystem: debootstrap, then provision.sh in a chroot, in resumable stages.

Stages leave stamps in the cache (``stamp.debootstrap``, ``stamp.provision``, ``stamp.ready``):
an interrupted debootstrap is wiped and redone, an interrupted provisioning resumed (provision.sh
is idempotent). What this module does is described by vagrant/build-recipe.txt, whose
``BUILD_RECIPE`` must be bumped when it changes (that is what keys the cache).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LabError, log
from .hostfs import ensure_host, ensure_host_file, replace_file, safe_rm, tail, umount_under
from .keys import host_mirror, recipe_value
from .paths import LabPaths

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# (name, major, minor) of the character devices the chroot's private /dev holds.
DEVICES = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
]
DEV_LINKS = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
]


def guest_sources(mirror: str, security: str | None, suite: str) -> str:
    """The guest's deb822 apt sources: main + contrib, plus security when the host has it."""
    stanza = (
        "Types: deb\nURIs: {uri}\nSuites: {suites}\nComponents: main contrib\n"
        f"Signed-By: {KEYRING}\n"
    )
    text = stanza.format(uri=mirror, suites=f"{suite} {suite}-updates")
    if security:
        text += "\n" + stanza.format(uri=security, suites=f"{suite}-security")
    return text


def mount(fstype: str, options: str, source: str, target: Path) -> None:
    """One mount, failing loudly."""
    subprocess.run(["mount", "-t", fstype, "-o", options, source, str(target)], check=True)


def mount_chroot(root: Path) -> None:
    """proc, sys and a private /dev: a small tmpfs with a few nodes and its own devpts.

    The host's /dev is never bind-mounted, so no cleanup path can ever reach it.
    """
    mount("proc", "nosuid,nodev,noexec", "lab-proc", root / "proc")
    mount("sysfs", "ro,nosuid,nodev,noexec", "lab-sys", root / "sys")
    mount("tmpfs", "mode=755,size=16m,nosuid", "lab-dev", root / "dev")
    dev = root / "dev"
    for name, major, minor in DEVICES:
        os.mknod(dev / name, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(dev / name, 0o666)  # mknod's mode passes through the umask
    for name, target in DEV_LINKS:
        os.symlink(target, dev / name)
    (dev / "pts").mkdir()
    (dev / "shm").mkdir()
    mount("devpts", "newinstance,ptmxmode=0666,mode=620", "lab-devpts", dev / "pts")
    os.symlink("pts/ptmx", dev / "ptmx")


@contextmanager
def chroot_mounted(root: Path) -> Iterator[None]:
    """The chroot's mounts for the duration of the block; never left behind (Ctrl-C included)."""
    umount_under(root)
    try:
        mount_chroot(root)
        yield
    finally:
        if not umount_under(root):
            raise LabError(f"could not unmount the chroot mounts below {root}")


def debootstrap(paths: LabPaths, suite: str, mirror: str) -> None:
    """A minbase rootfs (an earlier, interrupted one is wiped first)."""
    cache, rootfs = paths.cache, paths.rootfs
    for stamp in cache.glob("stamp.*"):
        stamp.unlink()
    safe_rm(rootfs, paths.cache_base)
    log(f"debootstrap {suite} -> {rootfs}")
    started = time.monotonic()
    argv = [
        "debootstrap",
        "--variant=minbase",
        "--components=main,contrib",
        suite,
        str(rootfs),
        mirror,
    ]
    with (cache / "debootstrap.log").open("wb") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        print(tail(cache / "debootstrap.log", 30), end="", file=sys.stderr)
        raise LabError(f"debootstrap failed (log: {cache / 'debootstrap.log'})")
    umount_under(rootfs)
    (cache / "stamp.debootstrap").touch()
    log(f"debootstrap done in {time.monotonic() - started:.0f} s")


def prepare_chroot(paths: LabPaths, suite: str, mirror: str) -> None:
    """Sources, resolver, hostname and provision.sh inside the rootfs."""
    rootfs = paths.rootfs
    security = host_mirror(f"{suite}-security")
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    sources = guest_sources(mirror, security, suite)
    replace_file(rootfs / "etc/apt/sources.list.d/debian.sources", sources.encode())
    with contextlib.suppress(OSError):  # the host's resolver, followed (may be a link into /run)
        replace_file(rootfs / "etc/resolv.conf", Path("/etc/resolv.conf").read_bytes())
    replace_file(rootfs / "etc/hostname", b"snapdriver-lab\n")
    provision = (paths.vagrant / "provision.sh").read_bytes()
    replace_file(rootfs / "root/provision.sh", provision, 0o755)


def provision(paths: LabPaths, suite: str, mirror: str) -> None:
    """provision.sh in the chroot, with a clean environment."""
    log(
        f"provisioning in the chroot (zfs-dkms build takes several minutes; log: "
        f"{paths.cache / 'provision.log'})"
    )
    started = time.monotonic()
    prepare_chroot(paths, suite, mirror)
    argv = [
        "chroot",
        str(paths.rootfs),
        "/usr/bin/env",
        "-i",
        "HOME=/root",
        "TERM=dumb",
        f"PATH={CHROOT_PATH}",
        "PROVISION_CHROOT=1",
        "PROVISION_LAB_ROOTFS=1",
        "/bin/bash",
        "/root/provision.sh",
    ]
    with chroot_mounted(paths.rootfs), (paths.cache / "provision.log").open("wb") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        print(tail(paths.cache / "provision.log", 40), end="", file=sys.stderr)
        raise LabError(
            f"provision.sh failed in the chroot (log: {paths.cache / 'provision.log'}). Re-run"
            " 'vagrant/lab build' to resume, or 'vagrant/lab clean' to start over."
        )
    (paths.cache / "stamp.provision").touch()
    log(f"provisioning done in {time.monotonic() - started:.0f} s")


def version_key(name: str) -> list[tuple[int, str]]:
    """A ``sort -V``-like key: digit runs compare as numbers."""
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"(\d+)", name) if p]


def zfs_kernel(rootfs: Path) -> str | None:
    """The newest kernel in the rootfs that has an image and a zfs module."""
    found = None
    modules = rootfs / "lib/modules"
    for kver in sorted((p.name for p in modules.iterdir()), key=version_key):
        has_image = (rootfs / f"boot/vmlinuz-{kver}").exists()
        if has_image and next((modules / kver).rglob("zfs.ko*"), None) is not None:
            found = kver
    return found


def finish(paths: LabPaths, started: float) -> None:
    """The final checks: a kernel image and a zfs.ko for it; then the ready stamp."""
    rootfs = paths.rootfs
    kver = zfs_kernel(rootfs)
    if kver is None:
        raise LabError(
            "the rootfs has no kernel with a zfs module; run 'vagrant/lab clean' and build again"
        )
    (paths.cache / "kver").write_text(kver + "\n")
    (paths.cache / "stamp.ready").touch()
    zfs = " ".join(p.name.removeprefix("zfs-") for p in sorted(rootfs.glob("usr/src/zfs-*")))
    du = subprocess.run(
        ["du", "-sh", "--one-file-system", str(rootfs)], capture_output=True, text=True, check=False
    ).stdout.split("\t")[0]
    log(
        f"guest ready: kernel {kver}, zfs {zfs}, rootfs {du}, build "
        f"{time.monotonic() - started:.0f} s"
    )


def build_rootfs(paths: LabPaths) -> None:
    """Build the cached rootfs, resuming from the stamps an earlier build left."""
    started = time.monotonic()
    ensure_host("debootstrap:debootstrap", "chroot:coreutils", "flock:util-linux")
    ensure_host_file(Path(KEYRING), "debian-archive-keyring")
    suite = recipe_value(paths.recipe, "SUITE")
    mirror = os.environ.get("LAB_MIRROR") or host_mirror(suite) or "http://deb.debian.org/debian"
    log(f"mirror: {mirror}")
    if not (paths.cache / "stamp.debootstrap").exists():
        debootstrap(paths, suite, mirror)
    if not (paths.cache / "stamp.provision").exists():
        provision(paths, suite, mirror)
    finish(paths, started)
