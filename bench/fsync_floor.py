"""fsync latency of dockerd-like metadata writes on a btrfs and an ext4 loop filesystem.

dockerd keeps its own metadata (BuildKit's bolt databases, the image and layer stores) under its
data root, which for a btrfs-backed driver is on btrfs. This times what those writes cost on each
filesystem alone, with no storage driver running: a 4 KiB overwrite and fsync of one file, and the
create-write-fsync-rename of a new file, as bbolt and dockerd's atomic writes do. On btrfs also
while another thread makes and deletes a snapshot every 20 ms, as a build's Creates do.

    sudo .venv/bin/python bench/fsync_floor.py --runs 300
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import btrfsutil

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


@contextlib.contextmanager
def snapshots_meanwhile(mount: Path) -> Iterator[None]:
    """A thread that snapshots a small subvolume and deletes the snapshot, every 20 ms."""
    base, stop = mount / "base", threading.Event()
    btrfsutil.create_subvolume(str(base))
    for i in range(60):
        (base / f"f{i}").write_bytes(b"x" * 100)

    def churn() -> None:
        n = 0
        while not stop.wait(0.02):
            snap = mount / f"snap{n}"
            btrfsutil.create_snapshot(str(base), str(snap))
            btrfsutil.delete_subvolume(str(snap))
            n += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        btrfsutil.delete_subvolume(str(base))


PROBES = (("overwrite+fdatasync", overwrite_fsync), ("atomic write", atomic_writes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    for fstype, churn in (("btrfs", False), ("btrfs", True), ("ext4", False)):
        with loop_filesystem(fstype, 2048) as mount:
            label = fstype + (" + snapshots" if churn else "")
            for name, probe in PROBES:
                with snapshots_meanwhile(mount) if churn else contextlib.nullcontext():
                    times = sorted(probe(mount, args.runs))
                p50 = statistics.median(times) * 1000
                p90 = times[int(len(times) * 0.9)] * 1000
                print(f"{label:17} {name:20} p50 {p50:6.3f} ms, p90 {p90:6.3f} ms")


if __name__ == "__main__":
    main()
