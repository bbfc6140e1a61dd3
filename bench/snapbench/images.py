"""The images the scenarios use, built offline: busybox plus ``N`` small files, as a tar.

The file image is ``/data/d<i>/f<j>``: 100 directories (fewer for tiny N) of equal share of the
files, ~20 bytes each, written straight to a file so that a million entries never sit in memory.
Changes are made by ``sh`` in a container: ``echo >>`` onto existing files, spread over the
directories, so ``docker diff`` reports exactly one ``C`` line per changed file (plus its
directories).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from snapdriver.testing.dockerd import busybox_rootfs_tar

MTIME = 1_700_000_000
#: The tag of the image in scenario 7's ``docker save`` archive.
LOAD_TAG = "sdbench-load:latest"
#: The smallest file of the load layer: each begins with its own 8-byte number.
LOAD_FILE_MIN = 8
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


def file_image_tar(directory: Path, layout: FileLayout, log: Callable[[str], None]) -> Path:
    """``layout``'s image tar in ``directory``, written unless an earlier run left it there."""
    path = directory / f"files-{layout.files}.tar"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        log(f"    writing {path} ({layout.dirs} dirs x {layout.per_dir} files)")
        partial = path.with_suffix(".partial")
        write_file_image(partial, layout)
        partial.rename(path)  # only a whole tar has the name that is reused
    return path


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


def load_archive(directory: Path, files: int, mib: int, log: Callable[[str], None]) -> Path:
    """Scenario 7's ``docker save`` archive (tag :data:`LOAD_TAG`) in ``directory``, written
    unless an earlier run (or ``bench/run --prepare``) left it there."""
    path = directory / f"load-{files}-{mib}.tar"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)  # --images DIR need not exist yet
        log(f"    writing {path} ({files:,} files, {mib:,} MiB)")
        partial = path.with_suffix(".partial")
        write_save_archive(partial, LOAD_TAG, files, mib)
        partial.rename(path)  # only a whole archive has the name that is reused
    return path


def load_file_size(files: int, mib: int) -> int:
    """Bytes in each file of the load layer (all equal; each starts with its 8-byte number)."""
    return mib * 1024 * 1024 // files


def write_save_archive(path: Path, tag: str, files: int, mib: int) -> None:
    """A ``docker save`` archive of one layer: ``files`` files of equal size, ``mib`` MiB in all.

    The contents are random (so no filesystem can share or compress them) and each file differs.
    The layer's digest is computed while it is written, as ``docker load`` checks it.
    """
    layer_path = path.with_suffix(".layer.tar")
    diff_id = write_load_layer(layer_path, files, mib)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
    }
    config_bytes = json.dumps(config).encode()
    config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": ["layer/layer.tar"]}]
    with tarfile.open(path, mode="w") as archive:
        archive.add(layer_path, "layer/layer.tar")
        for name, payload in (
            (config_name, config_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(payload), MTIME
            archive.addfile(info, io.BytesIO(payload))
    layer_path.unlink()


def write_load_layer(path: Path, files: int, mib: int) -> str:
    """The layer tar of :func:`write_save_archive` alone, at ``path``; returns its sha256."""
    size = load_file_size(files, mib)
    with open(path, "wb") as raw:
        hashing = _Hashing(raw)
        tar = tarfile.open(fileobj=hashing, mode="w|")  # type: ignore[call-overload]  # noqa: SIM115
        _write_load_layer(tar, files, size)
    return hashing.digest.hexdigest()


def _write_load_layer(tar: tarfile.TarFile, files: int, size: int) -> None:
    block = os.urandom(size)
    with tar:
        for d in range(0, files, 1000):
            tar.addfile(_directory(f"load/d{d // 1000}"))
            for f in range(d, min(d + 1000, files)):
                info = tarfile.TarInfo(f"load/d{d // 1000}/f{f}")
                info.size, info.mode, info.mtime = size, 0o644, MTIME
                data = f.to_bytes(LOAD_FILE_MIN, "little") + block[LOAD_FILE_MIN:]
                tar.addfile(info, io.BytesIO(data))


class _Hashing:
    """Enough of a file for ``tarfile`` to write to: hashes what goes through."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.digest = raw, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.raw.write(data)
