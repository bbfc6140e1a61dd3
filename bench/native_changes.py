"""Benchmark: a backend's native Changes against Docker's tree walk, on a big layer.

Through the graphdriver front, as the plugin runs it: a parent layer of ``--files`` small files
(graphtest's ``directory-N/file-M``, 100 per directory), a child layer with ``--changed`` of them
changed (appends, plus a chmod, a delete and a new file in every ten), both mounted with Get.
Then the backend plugin's own ``snapdriver_changes`` hook (the core's walk fallback left out, so
a native differ that declines is an error, not a silent walk) and ``walk_changes`` of the same two
directories each run ``--runs`` times; both answers must be equal, the medians are printed.
Warm by default (one untimed run first); ``--cold`` drops the page, dentry and inode caches before
every run. Needs root. From the repository root, with the project venv:

    .venv/bin/python bench/native_changes.py --backend btrfs            # on a btrfs loop image
    .venv/bin/python bench/native_changes.py --backend zfs --pool POOL  # or SNAPDRIVER_ZPOOL

ZFS runs in the lab (see vagrant/README.md), on a pool made in the guest::

    vagrant/lab run -t 3000 -- 'truncate -s 4G /tmp/b.img && zpool create -f sdbench /tmp/b.img
        && .venv/bin/python bench/native_changes.py --backend zfs --pool sdbench --runs 3'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from snapdriver.graphdriver.driver import GraphDriver
from snapdriver.layers.changes import Change, walk_changes
from snapdriver.plugins import Backend, TreeWalkChanges
from snapdriver.testing.conformance import add_many_files
from snapdriver.testing.loopfs import can_make_loop_filesystems, loop_filesystem

#: The kinds of change made in the child, in turn: mostly content, as a container's writes are.
KINDS = ("append",) * 7 + ("chmod", "delete", "new")
NativeDiffer = Callable[[str, Path, str, Path], list[Change]]


@dataclass
class Storage:
    """Where the GraphDriver keeps its layers: its Home and the backend's command-line flags."""

    home: Path
    flags: list[str]


@contextlib.contextmanager
def btrfs_storage(args: argparse.Namespace) -> Iterator[Storage]:
    reason = can_make_loop_filesystems()
    if reason is not None:
        raise SystemExit(f"cannot make a btrfs loop image: {reason}")
    with loop_filesystem("btrfs", size_mb=4096) as mnt:
        yield Storage(mnt / "home", [])


@contextlib.contextmanager
def zfs_storage(args: argparse.Namespace) -> Iterator[Storage]:
    """A fresh root dataset ``POOL/bench<hex>``, destroyed with everything in it afterwards."""
    from snapdriver_zfs.testing import scratch_root

    if not args.pool:
        raise SystemExit("--backend zfs needs --pool POOL or SNAPDRIVER_ZPOOL")
    with scratch_root("bench", args.pool) as root, tempfile.TemporaryDirectory() as home:
        yield Storage(Path(home), ["--dataset", root])


STORAGE = {"btrfs": btrfs_storage, "zfs": zfs_storage}


def change_files(child: Path, files: int, changed: int) -> None:
    """Change ``changed`` of the parent's files in ``child``, spread over the directories."""
    for k in range(changed):
        i = k * files // changed
        path = child / f"directory-{i - i % 100}" / f"file-{i}"
        kind = KINDS[k % len(KINDS)]
        if kind == "append":
            with open(path, "ab") as handle:
                handle.write(b"changed\n")
        elif kind == "chmod":
            path.chmod(0o600)
        elif kind == "delete":
            path.unlink()
        else:
            path.with_name(f"new-{i}").write_bytes(b"new\n")


def native_differ(backend: Backend) -> NativeDiffer:
    """The backend's ``snapdriver_changes`` without the core's walk: None is an error here."""
    walk = [p for p in backend.pm.get_plugins() if isinstance(p, TreeWalkChanges)]
    hook = backend.pm.subset_hook_caller("snapdriver_changes", remove_plugins=walk)

    def native(layer: str, layer_dir: Path, parent: str, parent_dir: Path) -> list[Change]:
        found = hook(layer=layer, layer_dir=layer_dir, parent=parent, parent_dir=parent_dir)
        if found is None:
            raise SystemExit(f"{backend.name} declined to answer natively (see its warning)")
        return list(found)

    return native


def drop_caches() -> None:
    """Empty the page, dentry and inode caches (ZFS's ARC is only shrunk, not emptied)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(
    call: Callable[[], list[Change]], runs: int, cold: bool
) -> tuple[list[float], list[Change]]:
    """Seconds of each of ``runs`` calls, and the last answer; warm runs follow an untimed one."""
    result: list[Change] = [] if cold else call()
    times = []
    for _ in range(runs):
        if cold:
            drop_caches()
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return times, result


def report(label: str, times: Sequence[float], how: str) -> float:
    median = statistics.median(times)
    runs = ", ".join(f"{t * 1000:.1f}" for t in times)
    print(f"{label:<26} median {median * 1000:9.1f} ms ({how}, {len(times)} runs: {runs} ms)")
    return median


async def layers(driver: GraphDriver, files: int, changed: int) -> tuple[Path, Path]:
    """Make the parent and the child and Get both: (child dir, parent dir)."""
    await driver.create("parent", None)
    parent_dir = await driver.get("parent")
    start = time.perf_counter()
    add_many_files(parent_dir, files, seed=0)
    print(f"parent: {files} files in {time.perf_counter() - start:.1f} s")
    await driver.put("parent")
    await driver.create("child", "parent")
    child_dir = await driver.get("child")
    change_files(child_dir, files, changed)
    return child_dir, await driver.get("parent")


async def bench(args: argparse.Namespace, storage: Storage, state: Path) -> None:
    backend = Backend.load(args.backend)
    flags = argparse.ArgumentParser()
    backend.add_options(flags)
    driver = GraphDriver(backend, state, flags.parse_args(storage.flags))
    await driver.init(str(storage.home), [])
    try:
        child_dir, parent_dir = await layers(driver, args.files, args.changed)
        native = native_differ(backend)
        how = "cold" if args.cold else "warm"
        native_times, native_answer = timed(
            lambda: native("child", child_dir, "parent", parent_dir), args.runs, args.cold
        )
        walk_times, walk_answer = timed(
            lambda: walk_changes(child_dir, parent_dir), args.runs, args.cold
        )
        if native_answer != walk_answer:
            raise SystemExit(f"the answers differ:\n{native_answer}\n{walk_answer}")
        print(f"{len(walk_answer)} Docker changes, the same from both")
        fast = report(f"native ({args.backend} hook)", native_times, how)
        slow = report("walk_changes", walk_times, how)
        print(f"speed-up: {slow / fast:.0f}x")
        for layer in ("child", "parent"):
            await driver.put(layer)
        for layer in ("child", "parent"):
            await driver.remove(layer)
        await driver.cleanup()
    finally:
        driver.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=sorted(STORAGE), required=True)
    parser.add_argument("--files", type=int, default=100_000, help="files in the parent layer")
    parser.add_argument("--changed", type=int, default=10, help="files changed in the child")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each differ")
    parser.add_argument("--cold", action="store_true", help="drop caches before every run")
    parser.add_argument("--pool", default=os.environ.get("SNAPDRIVER_ZPOOL"), help="zfs: pool")
    args = parser.parse_args()
    if not 0 < args.changed <= args.files:
        parser.error("--changed must be between 1 and --files")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with STORAGE[args.backend](args) as storage, tempfile.TemporaryDirectory() as state:
        asyncio.run(bench(args, storage, Path(state)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
