"""Builds the managed (v2) Docker plugin: a root filesystem and ``plugin/config.json``.

``scripts/build-plugin`` runs :func:`main`. The root filesystem is a Debian bookworm minbase made by
debootstrap from the host's own apt mirror, with Python, btrfs-progs and Debian's python3-btrfsutil,
and a venv at ``/opt/snapdriver`` holding snapdriver from this checkout. The debootstrap result is
cached under :data:`CACHE`, keyed by what goes into it, so a machine pays for it once; every build
then copies it and installs the checkout's wheel into the copy. The output directory holds
``rootfs/`` and ``config.json``, ready for ``docker plugin create NAME:TAG DIR``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from snapdriver.testing.lab import keys as lab_keys
from snapdriver.testing.loopfs import unmount_below

CHECKOUT = Path(__file__).resolve().parents[2]
CONFIG = CHECKOUT / "plugin" / "config.json"
CACHE = Path("/var/cache/snapdriver-plugin")
SUITE = "bookworm"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
#: What the plugin runs on: the venv's interpreter, btrfs-progs for the operator's eyes inside
#: the plugin (``docker plugin`` has no exec, but a debug shell via runc does), and Debian's
#: btrfsutil, whose PyPI namesake does not build against bookworm's libbtrfsutil.
PACKAGES = ("python3", "python3-venv", "python3-btrfsutil", "btrfs-progs")
#: Bumped when the recipe below changes what a cached base holds.
RECIPE = 1
VENV = "/opt/snapdriver"
#: Documentation, manuals and translations: a third of a minbase, never read by a daemon.
TRIMMED = ("usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt", "var/log")


class BuildError(RuntimeError):
    """The build cannot go on; the message says why."""


def host_mirror(suite: str = SUITE, sources: Path = Path("/etc/apt")) -> str:
    """The host's apt mirror for ``suite``, read as the lab reads it, else Debian's own."""
    return lab_keys.host_mirror(suite, sources) or FALLBACK_MIRROR


def base_key(mirror: str, suite: str = SUITE, packages: Sequence[str] = PACKAGES) -> str:
    """What a cached base depends on, hashed: its name under :data:`CACHE`."""
    inputs = {"mirror": mirror, "suite": suite, "packages": sorted(packages), "recipe": RECIPE}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One builder of the cache at a time (CI runs and helpers share the machine)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def run(*command: str | Path, log: str = "", env: dict[str, str] | None = None) -> None:
    """Run a build step, its output passed through; a failure names the step."""
    print(f"build-plugin: {log or ' '.join(map(str, command))}", flush=True)
    done = subprocess.run([str(part) for part in command], env=env, check=False)
    if done.returncode != 0:
        raise BuildError(
            f"{command[0]} failed (exit {done.returncode}): {' '.join(map(str, command))}"
        )


def cached_base(mirror: str, cache: Path = CACHE) -> Path:
    """The debootstrap result for ``mirror``, made once per machine and kept in ``cache``."""
    base = cache / f"{SUITE}-{base_key(mirror)}"
    with _locked(cache):
        if (base / "etc" / "debian_version").is_file():
            print(f"build-plugin: cached base {base}", flush=True)
            return base
        if shutil.which("debootstrap") is None:
            raise BuildError("debootstrap is not installed (apt-get install debootstrap)")
        partial = cache / f".{base.name}.partial"
        # An interrupted build's: debootstrap may have left its /proc and /sys mounted there.
        unmount_below(partial)
        shutil.rmtree(partial, ignore_errors=True)
        include = ",".join(PACKAGES)
        run("debootstrap", "--variant=minbase", f"--include={include}", SUITE, partial, mirror)
        trim(partial)
        partial.rename(base)
    return base


def trim(rootfs: Path) -> None:
    """Drop what a daemon never reads: manuals, translations, apt's caches, docs but licenses."""
    for name in TRIMMED:
        for child in (rootfs / name).glob("*"):
            _remove(child)
    for doc in (rootfs / "usr/share/doc").glob("*"):
        for child in doc.iterdir() if doc.is_dir() and not doc.is_symlink() else ():
            if child.name != "copyright":
                _remove(child)
    for child in (rootfs / "var/lib/apt/lists").glob("*"):
        _remove(child)


def _remove(path: Path) -> None:
    """Remove ``path`` itself: a symlink is unlinked, never followed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def build_wheels(wheelhouse: Path) -> None:
    """snapdriver's wheel from this checkout and its dependencies' (PyPI, PIP_FIND_LINKS)."""
    run(
        sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", wheelhouse, CHECKOUT,
        log=f"wheels of {CHECKOUT} and its dependencies",
    )  # fmt: skip


def install_venv(rootfs: Path, wheelhouse: Path) -> None:
    """The venv at :data:`VENV` inside ``rootfs``, from the wheelhouse only (no index)."""
    inside = rootfs / "tmp" / "wheels"
    shutil.copytree(wheelhouse, inside)
    # The host's pip settings (PIP_FIND_LINKS=/opt/wheels, ...) name host paths.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    pip = ("chroot", rootfs, f"{VENV}/bin/python", "-m", "pip")
    try:
        # system site-packages: Debian's btrfsutil lives there
        venv = ("chroot", rootfs, "/usr/bin/python3", "-m", "venv", "--system-site-packages", VENV)
        run(*venv, env=env)
        found = ("--no-index", "--no-cache-dir", "--find-links", "/tmp/wheels")
        run(*pip, "install", "-q", *found, "snapdriver", env=env)
        # a third of the venv, and nothing the daemon imports
        run(*pip, "uninstall", "-q", "-y", "pip", "setuptools", env=env)
        check = "import btrfsutil, snapdriver_btrfs; print('btrfs backend imports')"
        run("chroot", rootfs, f"{VENV}/bin/python", "-c", check, env=env)
    finally:
        shutil.rmtree(inside, ignore_errors=True)


def empty_dev(rootfs: Path) -> None:
    """The runtime gives the plugin its own /dev: debootstrap's nodes are not shipped."""
    for child in (rootfs / "dev").iterdir():
        _remove(child)


def build(out: Path, mirror: str, cache: Path = CACHE) -> int:
    """Make ``out`` (``rootfs/`` and ``config.json``); returns the root filesystem's bytes."""
    base = cached_base(mirror, cache)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rootfs = out / "rootfs"
    run("cp", "-a", "--reflink=auto", base, rootfs, log=f"copy {base} to {rootfs}")
    with tempfile.TemporaryDirectory(prefix="sd-wheels-") as wheelhouse:
        build_wheels(Path(wheelhouse))
        install_venv(rootfs, Path(wheelhouse))
    empty_dev(rootfs)
    shutil.copyfile(CONFIG, out / "config.json")
    return du_bytes(rootfs)


def du_bytes(path: Path) -> int:
    done = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/build-plugin",
        description="Build snapdriver's managed Docker plugin: DIR/rootfs and DIR/config.json "
        "for `docker plugin create NAME:TAG DIR`.",
    )
    parser.add_argument("--out", type=Path, default=CHECKOUT / "build" / "plugin")
    parser.add_argument("--mirror", help="Debian mirror (default: the host's apt source)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="debootstrap cache directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("build-plugin: must run as root (debootstrap and chroot)", file=sys.stderr)
        return 2
    mirror = args.mirror or host_mirror()
    print(f"build-plugin: mirror {mirror}", flush=True)
    try:
        size = build(args.out.absolute(), mirror, args.cache)
    except (BuildError, OSError) as err:
        print(f"build-plugin: FAILED: {err}", file=sys.stderr)
        return 1
    print(f"build-plugin: {args.out} ready, rootfs {size / 2**20:.0f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
