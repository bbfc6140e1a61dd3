"""fsync latency of dockerd-like metadata writes on a btrfs and an ext4 loop filesystem.

dockerd keeps its own metadata (BuildKit's bolt databases, the image and layer stores) under its
data root, which for a btrfs-backed driver is on btrfs. This times what those writes cost on each
filesystem alone, with no storage driver running: a 4 KiB overwrite and fsync of one file, and the
create-write-fsync-rename of a new file, as bbolt and dockerd's atomic writes do.

    sudo .venv/bin/python bench/fsync_floor.py --runs 300
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from snapdriver.testing.loopfs import loop_filesystem


def overwrite_fsync(directory: Path, runs: int) -> list[float]:
    fd = os.open(directory / "db", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        times = []
        for i in range(runs):
            os.pwrite(fd, os.urandom(4096), (i % 16) * 4096)
            start = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - start)
        return times
    finally:
        os.close(fd)


def atomic_writes(directory: Path, runs: int) -> list[float]:
    times = []
    for i in range(runs):
        start = time.perf_counter()
        tmp = directory / f".f{i}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, os.urandom(512))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / f"f{i}")
        times.append(time.perf_counter() - start)
    return times


PROBES = (("overwrite+fdatasync", overwrite_fsync), ("atomic write", atomic_writes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    for fstype in ("btrfs", "ext4"):
        with loop_filesystem(fstype, 2048) as mount:
            for name, probe in PROBES:
                times = sorted(probe(mount, args.runs))
                p50 = statistics.median(times) * 1000
                p90 = times[int(len(times) * 0.9)] * 1000
                print(f"{fstype:6} {name:20} p50 {p50:6.3f} ms, p90 {p90:6.3f} ms")


if __name__ == "__main__":
    main()
