"""Property: the native ``zfs diff`` answer equals Docker's tree walk, on generated layers.

Each example builds a parent layer from random operations, clones a child from it, edits the
child at random (writes, chmod/chown, renames over existing names, type changes, hard links,
capabilities, names that zfs escapes) and compares the backend's own answer with
``walk_changes``. The backend may decline (hard links it cannot resolve); it must never be wrong.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import stat
import struct
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from snapdriver_zfs import ZfsBackend
from snapdriver_zfs.testing import Lab, remove_all

from snapdriver.graphdriver.driver import GraphDriver
from snapdriver.layers.changes import walk_changes

EXAMPLES = int(os.environ.get("SNAPDRIVER_ZFS_EXAMPLES", "30"))
NAMES = ["a", "b", "c", "sp ace", "tab\tx", "nl\nx", "back\\slash", "café", os.fsdecode(b"r\xff")]
# A valid v2 security.capability value (cap_net_bind_service permitted), or another one.
CAPS = [
    struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0),
    struct.pack("<IIIII", 0x02000000, 1, 0, 0, 0),
]

Op = tuple[str, int, int, str, int]


def op_strategy(kinds: list[str], most: int) -> st.SearchStrategy[list[Op]]:
    one = st.tuples(
        st.sampled_from(kinds),
        st.integers(0, 1 << 16),
        st.integers(0, 1 << 16),
        st.sampled_from(NAMES),
        st.integers(0, 5000),
    )
    return st.lists(one, max_size=most)


BUILD = ["dir", "dir", "file", "file", "symlink", "hardlink", "fifo"]
EDIT = [
    *BUILD,
    *["write", "append", "chmod", "chown", "touch", "remove", "rename", "to_file", "to_dir"],
    *["cap", "xattr"],
]


def entries(root: Path) -> tuple[list[Path], list[Path]]:
    """(directories including the root, everything else) below ``root``, in a stable order."""
    dirs: list[Path] = [root]
    others: list[Path] = []
    for top, subdirs, files in os.walk(root):
        dirs.extend(Path(top, d) for d in subdirs if not os.path.islink(os.path.join(top, d)))
        others.extend(Path(top, f) for f in files)
        others.extend(Path(top, d) for d in subdirs if os.path.islink(os.path.join(top, d)))
    return sorted(dirs, key=os.fsencode), sorted(others, key=os.fsencode)


def pick(items: list[Path], index: int) -> Path | None:
    return items[index % len(items)] if items else None


def apply_op(root: Path, op: Op) -> None:
    kind, i, j, name, size = op
    dirs, others = entries(root)
    where, thing = pick(dirs, i), pick(others, j)
    anything = pick(dirs[1:] + others, i)
    assert where is not None
    # Some operations fail by nature (a name that exists, a directory moved into itself).
    with contextlib.suppress(OSError):
        _apply(
            kind, where / name, size, thing=thing, anything=anything, dest=pick(dirs, j) or where
        )


def _apply(
    kind: str, new: Path, size: int, *, thing: Path | None, anything: Path | None, dest: Path
) -> None:
    if kind == "dir":
        new.mkdir()
    elif kind == "file":
        write_new(new, os.urandom(size))
    elif kind == "symlink":
        new.symlink_to(f"../target-{size}")
    elif kind == "fifo":
        os.mkfifo(new)
    elif kind == "hardlink" and thing is not None:
        os.link(thing, new, follow_symlinks=False)
    elif thing is not None and kind in ("write", "append", "cap", "xattr") and is_file(thing):
        _edit_file(kind, thing, size)
    elif anything is not None:
        _edit_entry(kind, anything, size, dest)


def is_file(path: Path) -> bool:
    """A regular file itself (``Path.is_file`` follows symlinks, and opening a FIFO blocks)."""
    return stat.S_ISREG(os.lstat(path).st_mode)


def write_new(path: Path, data: bytes) -> None:
    """Create ``path``; never opens what is there already (it may be a FIFO)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _edit_file(kind: str, path: Path, size: int) -> None:
    if kind == "write":
        path.write_bytes(os.urandom(size % 64))  # often the same size: mtime must tell
    elif kind == "append":
        with open(path, "ab") as handle:
            handle.write(b"+")
    elif kind == "cap":
        os.setxattr(path, "security.capability", CAPS[size % 2])
    else:
        os.setxattr(path, "user.note", str(size).encode())  # ignored by Docker


def _edit_entry(kind: str, path: Path, size: int, other_dir: Path) -> None:
    is_dir = path.is_dir() and not path.is_symlink()
    if kind == "chmod":
        if not path.is_symlink():  # Linux cannot chmod a symlink itself
            os.chmod(path, 0o700 | (size & 0o077))
    elif kind == "chown":
        os.chown(path, 1000 + size % 2, 1000, follow_symlinks=False)
    elif kind == "touch":
        os.utime(
            path,
            ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000 + size),
            follow_symlinks=False,
        )
    elif kind == "remove":
        shutil.rmtree(path) if is_dir else path.unlink()
    elif kind == "rename":
        os.rename(path, other_dir / NAMES[size % len(NAMES)])
    elif kind == "to_file":
        shutil.rmtree(path) if is_dir else path.unlink()
        write_new(path, b"now a file")
    elif kind == "to_dir" and not is_dir:
        path.unlink()
        path.mkdir()
        write_new(path / "inside", b"x")


class Reasons(logging.Handler):
    """Collects why the backend declined, to show in the output (-s)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen[re.sub(r"[pc][0-9]+", "<id>", record.getMessage())[:160]] += 1


@pytest.mark.zfs
@pytest.mark.slow
def test_native_changes_equal_the_walk(lab: Lab) -> None:
    driver = lab.driver()
    lab.run(driver.init(str(lab.home), [f"zfs.fsname={lab.root}"]))
    plugin = driver.backend.pm.get_plugin("backend")
    assert isinstance(plugin, ZfsBackend)
    numbers = itertools.count()
    outcomes: Counter[str] = Counter()
    reasons = Reasons()
    logging.getLogger("snapdriver_zfs").addHandler(reasons)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(build=op_strategy(BUILD, 16), edits=op_strategy(EDIT, 12))
    def check(build: list[Op], edits: list[Op]) -> None:
        lab.run(example(driver, plugin, next(numbers), (build, edits), outcomes))

    try:
        check()
    finally:
        logging.getLogger("snapdriver_zfs").removeHandler(reasons)
        lab.run(remove_all(driver))
        driver.close()
    print(f"native answers: {outcomes['native']}, declined: {outcomes['declined']}")
    for reason, count in reasons.seen.most_common():
        print(f"  declined {count}x: {reason}")
    assert outcomes["native"] > 0


async def example(
    driver: GraphDriver,
    plugin: ZfsBackend,
    n: int,
    ops: tuple[list[Op], list[Op]],
    outcomes: Counter[str],
) -> None:
    parent, child = f"p{n}", f"c{n}"
    build, edits = ops
    await driver.create(parent, None)
    try:
        parent_dir = await driver.get(parent)
        for op in build:
            apply_op(parent_dir, op)
        await driver.create(child, parent)
        try:
            child_dir = await driver.get(child)
            for op in edits:
                apply_op(child_dir, op)
            native = plugin.snapdriver_changes(child, child_dir, parent, parent_dir)
            expected = walk_changes(child_dir, parent_dir)
            outcomes["declined" if native is None else "native"] += 1
            if native is not None:
                assert list(native) == expected
            else:  # the core's own route must then give the walk's answer
                assert await driver.changes(child, parent) == expected
            await driver.put(child)
        finally:
            await driver.remove(child)
        await driver.put(parent)
    finally:
        await driver.remove(parent)


def test_generated_operations_run_on_plain_directories(tmp_path: Path) -> None:
    """The generator itself, without ZFS: every operation applies or is skipped cleanly."""
    for number, kind in enumerate(EDIT):
        root = tmp_path / f"{number}-{kind}"
        root.mkdir()
        for i, name in enumerate(NAMES):
            apply_op(root, ("dir" if i % 3 == 0 else "file", i, i, name, 10 * i))
        apply_op(root, (kind, 1, 2, "zz", 7))
        assert stat.S_ISDIR(os.lstat(root).st_mode)
