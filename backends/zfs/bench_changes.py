"""Measure Changes on a big layer: the native ``zfs diff`` path against Docker's tree walk.

A parent layer of ``--files`` small files (100 per directory, like moby's graphtest), a child
clone with ``--changed`` of them modified; each method runs ``--repeat`` times and the median is
reported. Both answers are checked to be equal. Needs root and a pool (the lab)::

    vagrant/lab run -t 1800 -- 'modprobe zfs && truncate -s 4G /tmp/b.img &&
        zpool create -f sdbench /tmp/b.img && SNAPDRIVER_ZPOOL=sdbench
        PYTHONPATH=/work/main:/work/main/backends/zfs python3 backends/zfs/bench_changes.py'
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from snapdriver_zfs import ZfsBackend

from snapdriver.driver import Driver
from snapdriver.layers.changes import Change, walk_changes
from snapdriver.plugins import Backend


def populate(root: Path, count: int) -> list[Path]:
    """``directory-N/file-M``, 64 bytes each; returns the files."""
    files = []
    for i in range(count):
        directory = root / f"directory-{i - i % 100}"
        if i % 100 == 0:
            directory.mkdir()
        path = directory / f"file-{i}"
        path.write_bytes(i.to_bytes(8, "little") * 8)
        files.append(path)
    return files


def drop_caches() -> None:
    """Empty the page, dentry and inode caches (ZFS's ARC only shrinks, it is not emptied)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(
    label: str, call: Callable[[], list[Change]], repeat: int, cold: bool
) -> tuple[float, list[Change]]:
    times: list[float] = []
    result: list[Change] = []
    for _ in range(repeat):
        if cold:
            drop_caches()
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    runs = ", ".join(f"{t * 1000:.1f}" for t in times)
    print(f"{label}: median {statistics.median(times) * 1000:.1f} ms (runs: {runs} ms)")
    return statistics.median(times), result


async def bench(args: argparse.Namespace, root: str, home: Path) -> None:
    driver = Driver(Backend.load(ZfsBackend()), home / "state", argparse.Namespace(dataset=root))
    await driver.init(str(home / "home"), [])
    plugin = driver.backend.pm.get_plugin("backend")
    assert isinstance(plugin, ZfsBackend)
    await driver.create("parent", None)
    parent_dir = await driver.get("parent")
    start = time.perf_counter()
    files = populate(parent_dir, args.files)
    print(f"populated {args.files} files in {time.perf_counter() - start:.1f} s")
    await driver.create("child", "parent")
    child_dir = await driver.get("child")
    step = max(1, len(files) // args.changed)
    for path in files[::step][: args.changed]:
        with open(child_dir / path.relative_to(parent_dir), "ab") as handle:
            handle.write(b"changed")

    def native() -> list[Change]:
        found = plugin.snapdriver_changes("child", child_dir, "parent", parent_dir)
        assert found is not None, "the native path declined (see the log)"
        return list(found)

    def walk() -> list[Change]:
        return walk_changes(child_dir, parent_dir)

    fast, native_result = timed("native zfs diff", native, args.repeat, args.cold)
    slow, walk_result = timed("walk_changes", walk, args.repeat, args.cold)
    assert native_result == walk_result, "the two answers differ"
    print(f"{len(walk_result)} changes, equal answers; speed-up x{slow / fast:.0f}")
    for layer in ("child", "parent"):
        await driver.put(layer)
        await driver.remove(layer)
    driver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--changed", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="drop caches before each run")
    parser.add_argument("--pool", default=os.environ.get("SNAPDRIVER_ZPOOL"))
    args = parser.parse_args()
    if not args.pool:
        parser.error("give --pool or set SNAPDRIVER_ZPOOL")
    root = f"{args.pool}/bench{secrets.token_hex(4)}"
    subprocess.run(["zfs", "create", "-o", "mountpoint=legacy", root], check=True)
    try:
        with tempfile.TemporaryDirectory() as home:
            asyncio.run(bench(args, root, Path(home)))
    finally:
        subprocess.run(["zfs", "destroy", "-R", root], check=False)


if __name__ == "__main__":
    main()
