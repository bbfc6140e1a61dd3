"""What the btrfs backend's walk-first Changes costs: on small trees (it answers) and on a large
one (it gives up after ``SMALL_WALK`` entries and the send stream answers).

    sudo .venv/bin/python bench/walk_limit.py --runs 7

Through the Core on a btrfs loop filesystem: a small base (60 entries) and a large one (20,000
files), each with a child that changes one file and adds one. Reported: the median time of
Changes with the walk first (as shipped) and with the send stream only (``SMALL_WALK = 0``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import time
from pathlib import Path

from snapdriver import BackendConfig
from snapdriver.core import Core
from snapdriver.plugins import Backend
from snapdriver.testing.conformance import add_many_files
from snapdriver.testing.loopfs import loop_filesystem

btrfs_backend = importlib.import_module("snapdriver_btrfs.backend")


async def pair(core: Core, name: str, files: int) -> tuple[str, str]:
    base, child = name + "0" * (64 - len(name)), name + "1" * (64 - len(name))
    await core.create(base, None)
    add_many_files(await core.get(base), files, seed=3)
    await core.put(base)
    await core.create(child, base)
    child_dir = await core.get(child)
    (child_dir / "directory-0" / "file-1").write_bytes(b"changed")
    (child_dir / "added").write_bytes(b"new")
    await core.put(child)
    return child, base


async def timed(core: Core, child: str, base: str, runs: int) -> float:
    await core.changes(child, base)  # warm
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        await core.changes(child, base)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def measure(home: Path, runs: int) -> None:
    core = Core(Backend.load("btrfs"), "bench")
    await core.open(BackendConfig(home))
    shipped = btrfs_backend.SMALL_WALK
    try:
        for name, files in (("a", 60), ("b", 20_000)):
            child, base = await pair(core, name, files)
            walk_first = await timed(core, child, base, runs)
            btrfs_backend.SMALL_WALK = 0
            send_only = await timed(core, child, base, runs)
            btrfs_backend.SMALL_WALK = shipped
            print(
                f"{files:>6} files: walk first {walk_first:7.2f} ms, send stream only "
                f"{send_only:7.2f} ms (medians of {runs}; SMALL_WALK = {shipped})"
            )
    finally:
        for record in reversed(core.records()):
            await core.remove(record.id)
        core.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with loop_filesystem("btrfs", 2048) as mount:
        asyncio.run(measure(mount / "home", args.runs))


if __name__ == "__main__":
    main()
