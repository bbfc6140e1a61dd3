"""The guest's initramfs: busybox, the virtio/9p/overlay modules, the two guest stages.

Keyed by the stage scripts (vagrant/guest/) and the module list, separately from the rootfs:
changing a stage makes a new initramfs in well under a second.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import LabError, log
from .hostfs import ensure_host
from .keys import initrd_key
from .paths import LabPaths

# Modules the initramfs needs (with their dependencies).
INITRD_MODULES = "virtio_pci 9pnet_virtio 9p overlay"
# An initramfs no run has booted for this long is deleted (each run touches its own). Generous:
# checkouts of older lab versions may share the cache, and a file deleted between their check and
# qemu's start would fail their boot.
UNUSED_INITRD_HOURS = 24


def stages(paths: LabPaths) -> tuple[bytes, bytes]:
    """Stage 1 (/init, busybox) and stage 2 (/lab-init, PID 1 in the guest rootfs)."""
    guest = paths.vagrant / "guest"
    return (guest / "stage1.sh").read_bytes(), (guest / "stage2.sh").read_bytes()


def insmod_lines(show_depends: str) -> list[tuple[str, str]]:
    """(module file, arguments) from ``modprobe --show-depends``; builtins need nothing."""
    found = []
    for line in show_depends.splitlines():
        kind, _, rest = line.partition(" ")
        path, _, args = rest.strip().partition(" ")
        if kind == "insmod" and path:
            found.append((path, args.strip()))
    return found


def unpacked_name(path: str) -> str:
    """The module's name in the initramfs: compressed modules are stored plain."""
    name = os.path.basename(path)
    for suffix in (".xz", ".zst", ".gz"):
        if name.endswith(".ko" + suffix):
            return name.removesuffix(suffix)
    if name.endswith(".ko"):
        return name
    raise LabError(f"unexpected module file {path}")


def copy_module(src: str, dest: Path) -> None:
    """Copy one module file, decompressing it (insmod in busybox wants it plain)."""
    if src.endswith(".ko.xz"):
        dest.write_bytes(lzma.decompress(Path(src).read_bytes()))
    elif src.endswith(".ko.gz"):
        dest.write_bytes(gzip.decompress(Path(src).read_bytes()))
    elif src.endswith(".ko.zst"):
        ensure_host("zstd:zstd")
        with dest.open("wb") as out:
            subprocess.run(["zstd", "-qdc", src], stdout=out, check=True)
    else:
        shutil.copyfile(src, dest)


def add_modules(tree: Path, rootfs: Path, kver: str) -> None:
    """The modules and ``/modules.list`` (one ``file args`` line each, in load order)."""
    seen: set[str] = set()
    lines = []
    for module in INITRD_MODULES.split():
        argv = ["modprobe", "-d", str(rootfs), "-S", kver, "--show-depends", module]
        shown = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        for path, args in insmod_lines(shown):
            name = unpacked_name(path)
            if name in seen:
                continue
            seen.add(name)
            copy_module(path, tree / "lib/modules" / name)
            lines.append(f"{name} {args}\n")
    (tree / "modules.list").write_text("".join(lines))


def fill_tree(tree: Path, paths: LabPaths, kver: str) -> None:
    """The initramfs' files: directories, busybox, modules, the two stages."""
    for sub in ("bin", "dev", "proc", "sys", "ro", "rw", "newroot", "lib/modules"):
        (tree / sub).mkdir(parents=True)
    shutil.copyfile(paths.rootfs / "bin/busybox", tree / "bin/busybox")
    os.chmod(tree / "bin/busybox", 0o755)
    add_modules(tree, paths.rootfs, kver)
    stage1, stage2 = stages(paths)
    for name, text in (("init", stage1), ("lab-init", stage2)):
        (tree / name).write_bytes(text)
        os.chmod(tree / name, 0o755)


def pack(tree: Path) -> bytes:
    """A gzip'd newc cpio archive of ``tree``."""
    listing = subprocess.run(["find", ".", "-print0"], cwd=tree, capture_output=True, check=True)
    archive = subprocess.run(
        ["cpio", "--null", "-o", "-H", "newc", "--quiet"],
        cwd=tree,
        input=listing.stdout,
        capture_output=True,
        check=True,
    )
    return gzip.compress(archive.stdout, compresslevel=1)


def build_initrd(paths: LabPaths) -> Path:
    """The initramfs for this cache and these stages, made when missing (atomically)."""
    cache = paths.cache
    stage1, stage2 = stages(paths)
    initrd = cache / f"initrd-{initrd_key(stage1, stage2, INITRD_MODULES)}.img"
    if initrd.exists() and initrd.stat().st_size > 0:
        os.utime(initrd)  # in use: see UNUSED_INITRD_HOURS
        return initrd
    kver = (cache / "kver").read_text().strip()
    ensure_host("modprobe:kmod", "cpio:cpio")
    with tempfile.TemporaryDirectory(prefix=".initrd-build.", dir=cache) as tmp:
        fill_tree(Path(tmp) / "tree", paths, kver)
        packed = Path(tmp) / "initrd.img"
        packed.write_bytes(pack(Path(tmp) / "tree"))
        packed.rename(initrd)
    drop_old_initrds(cache, initrd)
    log(f"initramfs {initrd.name} ({initrd.stat().st_size / 2**20:.1f} MiB, kernel {kver})")
    return initrd


def drop_old_initrds(cache: Path, keep: Path) -> None:
    """Delete initramfs files of other lab versions that no run has booted for a long while."""
    cutoff = time.time() - UNUSED_INITRD_HOURS * 3600
    for old in cache.glob("initrd-*.img"):
        if old != keep and old.stat().st_mtime < cutoff:
            old.unlink(missing_ok=True)
