"""userns-remap through the graphdriver front on btrfs: owners shifted in and back out."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import tarfile
import uuid
from pathlib import Path

import pytest

from snapdriver.errors import ArchiveError
from snapdriver.graphdriver.driver import GraphDriver
from snapdriver.layers.apply import apply_tar
from snapdriver.layers.archive import export_tree
from snapdriver.layers.idmap import IDRange
from snapdriver.plugins import Backend

pytestmark = pytest.mark.btrfs
BASE, CHILD, BAD = "a" * 64, "b" * 64, "c" * 64
MAP = [IDRange(0, 100000, 65536)]
OWNERS = {"root-file": 0, "user-file": 1000, "nobody-dir": 65534, "nobody-dir/in": 1000}


def layer_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, owner in OWNERS.items():
            info = tarfile.TarInfo(name)
            info.uid = info.gid = owner
            info.mtime = 1_600_000_000
            if name == "nobody-dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                data = name.encode()
                info.size, info.mode = len(data), 0o4755 if owner == 0 else 0o640
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def diff_bytes(driver: GraphDriver, layer: str, parent: str | None) -> bytes:
    chunks: list[bytes] = []

    async def consume(chunk: bytes) -> None:
        chunks.append(chunk)

    async with driver.diff(layer, parent) as job:
        await job.stream(consume)
    return b"".join(chunks)


def owners(data: bytes) -> dict[str, tuple[int, int, int]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name.rstrip("/"): (m.uid, m.gid, m.mode & 0o7777) for m in tar}


def without_names(data: bytes) -> list[tuple[object, ...]]:
    """Every header field but the user and group names, and every byte of data."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [
            (m.name, m.type, m.mode, m.uid, m.gid, m.mtime, m.size, m.linkname, m.pax_headers)
            + ((tar.extractfile(m).read(),) if m.isreg() else ())  # type: ignore[union-attr]
            for m in tar
        ]


async def check_base(driver: GraphDriver, home: Path, tmp_path: Path) -> Path:
    await driver.create(BASE, None)
    # dockerd's remapped root gets through the Home to the layer roots, which it owns.
    for directory in (home, home / "subvolumes"):
        st = os.stat(directory)
        assert st.st_gid == 100000 and st.st_mode & 0o010, directory
    base = home / "subvolumes" / BASE
    assert (os.stat(base).st_uid, os.stat(base).st_gid) == (100000, 100000)

    await driver.apply_diff(BASE, None, io.BytesIO(layer_tar()))
    for name, owner in OWNERS.items():
        st = os.lstat(base / name)
        assert (st.st_uid, st.st_gid) == (100000 + owner, 100000 + owner), name
    assert os.stat(base / "root-file").st_mode & stat.S_ISUID  # chown came before chmod

    exported = await diff_bytes(driver, BASE, None)
    got = owners(exported)
    for name, owner in OWNERS.items():
        mode = 0o755 if name == "nobody-dir" else 0o4755 if owner == 0 else 0o640
        assert got[name] == (owner, owner, mode), name

    # The same tree unmapped (host IDs = container IDs) exports the same tar, but for the
    # names, which Docker too looks up from the stored (host) IDs.
    plain = tmp_path / "plain"
    plain.mkdir()
    apply_tar(plain, io.BytesIO(layer_tar()))
    os.chmod(plain, os.stat(base).st_mode & 0o7777)
    os.utime(plain, ns=(os.stat(base).st_atime_ns, os.stat(base).st_mtime_ns))
    unmapped: list[bytes] = []
    export_tree(plain, unmapped.append)
    assert without_names(exported) == without_names(b"".join(unmapped))
    return base


async def check_child(driver: GraphDriver) -> None:
    """A child's diff (ExportChanges) shifts too; Changes see no IDs at all."""
    await driver.create(CHILD, BASE)
    child = await driver.get(CHILD)
    assert (os.stat(child).st_uid, os.stat(child).st_gid) == (100000, 100000)
    (child / "added").write_text("new")
    os.chown(child / "added", 100000 + 33, 100000 + 44)
    os.chown(child / "user-file", 100000 + 65534, 100000)
    await driver.put(CHILD)
    got = owners(await diff_bytes(driver, CHILD, BASE))
    assert got["added"][:2] == (33, 44) and got["user-file"][:2] == (65534, 0)
    changed = {c.path for c in await driver.changes(CHILD, BASE)}
    assert changed == {"/added", "/user-file"}


async def check_unmapped_ids(driver: GraphDriver, base: Path) -> None:
    # A file the host's root made in the layer cannot be exported, as in Docker.
    os.chown(base / "user-file", 0, 0)
    with pytest.raises(ArchiveError, match="Host UID 0 cannot be mapped"):
        await diff_bytes(driver, BASE, None)
    # A tar owner outside the map fails the apply.
    await driver.create(BAD, None)
    bad = io.BytesIO()
    with tarfile.open(fileobj=bad, mode="w") as tar:
        info = tarfile.TarInfo("far")
        info.uid = 70000
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ArchiveError, match="Container UID 70000 cannot be mapped"):
        await driver.apply_diff(BAD, None, io.BytesIO(bad.getvalue()))


def test_apply_and_diff_shift_owners(btrfs_mount: Path, tmp_path: Path) -> None:
    home = btrfs_mount / f"userns-{uuid.uuid4().hex[:8]}"
    state = tmp_path / "state"

    async def main() -> None:
        driver = GraphDriver(Backend.load("btrfs"), state)
        await driver.init(str(home), [], MAP, MAP)
        try:
            base = await check_base(driver, home, tmp_path)
            await check_child(driver)
            await check_unmapped_ids(driver, base)
            for layer in (BAD, CHILD, BASE):
                await driver.remove(layer)
        finally:
            driver.close()

        # A restarted plugin resumes with the maps from the Init record.
        again = GraphDriver(Backend.load("btrfs"), state)
        try:
            assert await again.resume()
            assert again.core.idmap is not None and again.core.idmap.root == (100000, 100000)
            await again.create(BASE, None)
            assert os.stat(home / "subvolumes" / BASE).st_uid == 100000
            await again.remove(BASE)
        finally:
            again.close()

    asyncio.run(main())
