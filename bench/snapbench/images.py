"""The images the scenarios use, built offline: busybox plus ``N`` small files, as a tar.

The file image is ``/data/d<i>/f<j>``: 100 directories (fewer for tiny N) of equal share of the
files, ~20 bytes each, written straight to a file so that a million entries never sit in memory.
Changes are made by ``sh`` in a container: ``echo >>`` onto existing files, spread over the
directories, so ``docker diff`` reports exactly one ``C`` line per changed file (plus its
directories).
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from snapdriver.testing.dockerd import busybox_rootfs_tar

MTIME = 1_700_000_000
_CHANGED = re.compile(r"C /data/d\d+/f\d+")


@dataclass(frozen=True)
class FileLayout:
    """``files`` files spread evenly over ``dirs`` directories under ``/data``."""

    files: int
    dirs: int

    @classmethod
    def for_files(cls, files: int) -> FileLayout:
        if files < 1:
            raise ValueError("an image needs at least one file")
        dirs = min(100, files)
        return cls(files - files % dirs, dirs)

    @property
    def per_dir(self) -> int:
        return self.files // self.dirs

    def can_change(self, count: int) -> bool:
        """Whether ``count`` files can be changed as ``dirs_used`` x ``per_dir_used``."""
        used = min(count, self.dirs)
        return count % used == 0 and count // used <= self.per_dir

    def change_script(self, count: int) -> str:
        """A busybox ``sh`` script that appends a line to exactly ``count`` existing files."""
        if not self.can_change(count):
            raise ValueError(f"cannot change {count} files of a {self.files}-file layout")
        used = min(count, self.dirs)
        per = count // used
        return (
            f"for d in $(seq 0 {used - 1}); do for f in $(seq 0 {per - 1}); do "
            "echo changed >> /data/d$d/f$f; done; done"
        )


def changed_files(diff_output: str) -> int:
    """How many ``/data`` files a ``docker diff`` output reports as changed."""
    return sum(1 for line in diff_output.splitlines() if _CHANGED.fullmatch(line.strip()))


def _directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
    return info


def write_file_image(path: Path, layout: FileLayout) -> None:
    """Stream busybox's root fs plus ``layout``'s files into a tar at ``path``."""
    with (
        tarfile.open(fileobj=io.BytesIO(busybox_rootfs_tar()), mode="r") as base,
        tarfile.open(path, mode="w", format=tarfile.GNU_FORMAT) as tar,
    ):
        for member in base:
            tar.addfile(member, base.extractfile(member) if member.isfile() else None)
        tar.addfile(_directory("data"))
        for d in range(layout.dirs):
            tar.addfile(_directory(f"data/d{d}"))
            for f in range(layout.per_dir):
                data = f"file {d:02d}/{f:06d} v1\n".encode()
                info = tarfile.TarInfo(f"data/d{d}/f{f}")
                info.size, info.mode, info.mtime = len(data), 0o644, MTIME
                tar.addfile(info, io.BytesIO(data))


def write_build_context(directory: Path, base: str, files: int = 50) -> None:
    """A classic-builder context of 7 steps: FROM, RUN, COPY, COPY, RUN, ENV, CMD."""
    (directory / "data").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (directory / "data" / f"item{i}.txt").write_text(f"item {i}\n")
    (directory / "a.txt").write_text("hello from the build context\n")
    (directory / "Dockerfile").write_text(
        f"FROM {base}\n"
        "RUN mkdir -p /app && echo built > /app/stamp\n"
        "COPY a.txt /app/\n"
        "COPY data/ /app/data/\n"
        "RUN cat /app/a.txt > /app/copy && ls /app/data | wc -l > /app/count\n"
        "ENV GREETING=hello\n"
        'CMD ["sh", "-c", "echo $GREETING"]\n'
    )
