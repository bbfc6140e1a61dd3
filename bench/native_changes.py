"""Benchmark: native_changes (btrfs send) against walk_changes (both trees) on a big layer.

Builds a 100,000-file parent (100 directories x 1,000 files of ~20 bytes) on a btrfs loop image,
changes 10 files in a child, freezes both, and prints the median of 5 warm runs of each differ.
Needs root and btrfs-progs; run from the repository root:

    PYTHONPATH=.:backends/btrfs python bench/native_changes.py [--files 100000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import btrfsutil
from snapdriver_btrfs import ioctl
from snapdriver_btrfs.native import native_changes

from snapdriver.layers.changes import Change, walk_changes
from snapdriver.testing.loopfs import can_make_loop_filesystems, loop_filesystem

FILES_PER_DIR = 1000


def build_parent(root: Path, files: int) -> None:
    for index in range(files):
        directory = root / f"d{index // FILES_PER_DIR:03d}"
        if index % FILES_PER_DIR == 0:
            directory.mkdir()
        (directory / f"f{index % FILES_PER_DIR:04d}").write_bytes(b"%020d" % index)


def change_ten_files(child: Path) -> None:
    """7 appends, 1 chmod, 1 delete and 1 new file, in different directories."""
    for n in range(7):
        with open(child / f"d{n * 11:03d}/f0007", "ab") as handle:
            handle.write(b"appended\n")
    (child / "d080/f0001").chmod(0o600)
    (child / "d090/f0002").unlink()
    (child / "d095/new-file").write_bytes(b"new\n")


def median_seconds(run: Callable[[], list[Change]], runs: int) -> tuple[float, list[Change]]:
    result = run()  # warm-up: caches hot, as in the "warm" column of the research notes
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    reason = can_make_loop_filesystems()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    with loop_filesystem("btrfs", size_mb=4096) as mnt:
        parent, parent_ro, child = mnt / "parent", mnt / "parent.ro", mnt / "child"
        btrfsutil.create_subvolume(str(parent))
        start = time.perf_counter()
        build_parent(parent, args.files)
        print(f"built {args.files} files in {time.perf_counter() - start:.1f} s")
        btrfsutil.create_snapshot(str(parent), str(parent_ro), read_only=True)
        btrfsutil.create_snapshot(str(parent_ro), str(child))
        change_ten_files(child)
        btrfsutil.set_subvolume_read_only(str(child), True)
        os.sync()
        stream = ioctl.send_stream(child, parent=parent_ro)
        native_s, native = median_seconds(lambda: native_changes(child, parent_ro), args.runs)
        walk_s, walked = median_seconds(lambda: walk_changes(child, parent_ro), args.runs)
        assert native == walked, "native and walk disagree"
        print(f"no-data stream: {len(stream)} bytes; {len(native)} Docker changes")
        print(f"native_changes: {native_s * 1000:8.1f} ms (median of {args.runs}, warm)")
        print(f"walk_changes:   {walk_s * 1000:8.1f} ms (median of {args.runs}, warm)")
        print(f"speed-up:       {walk_s / native_s:8.0f}x")
        for subvolume in (child, parent_ro):
            btrfsutil.set_subvolume_read_only(str(subvolume), False)
        for subvolume in (child, parent_ro, parent):
            btrfsutil.delete_subvolume(str(subvolume))
    return 0


if __name__ == "__main__":
    sys.exit(main())
