"""The front-neutral core over plain directories: freezing (commit) and usage."""

from __future__ import annotations

import asyncio
import io
import shutil
import tarfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from snapdriver import BackendConfig, CreateRequest, hookimpl
from snapdriver import core as core_module
from snapdriver.core import FRONT_MARK, Core, Usage
from snapdriver.daemon import WORKER_THREADS
from snapdriver.errors import BackendError, ConfigError, LayerBusyError, LayerNotFoundError
from snapdriver.plugins import Backend

BASE, CHILD = "b" * 64, "c" * 64


class CopyBackend:
    """Layers as directories; a child starts as a copy of its parent. Records commits."""

    def __init__(self) -> None:
        self.root = Path()
        self.committed: list[str] = []

    @hookimpl
    def snapdriver_setup(self, config: BackendConfig) -> None:
        self.root = config.home / "dirs"
        self.root.mkdir(parents=True, exist_ok=True)

    @hookimpl
    def snapdriver_create(self, request: CreateRequest) -> None:
        target = self.root / request.layer
        if request.parent:
            shutil.copytree(self.root / request.parent, target, symlinks=True)
        else:
            target.mkdir()

    @hookimpl
    def snapdriver_remove(self, layer: str) -> None:
        shutil.rmtree(self.root / layer, ignore_errors=True)

    @hookimpl
    def snapdriver_mount(self, layer: str, mount_label: str) -> Path:
        return self.root / layer

    @hookimpl
    def snapdriver_unmount(self, layer: str) -> None:
        pass

    @hookimpl
    def snapdriver_layers(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir())

    @hookimpl
    def snapdriver_commit(self, layer: str) -> None:
        self.committed.append(layer)


def tar_of(files: dict[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def run_core(tmp_path: Path, backend: object, body: Callable[[Core], Awaitable[None]]) -> None:
    async def main() -> None:
        core = Core(Backend.load(backend), "test")
        await core.open(BackendConfig(tmp_path / "home"))
        try:
            await body(core)
        finally:
            core.close()

    asyncio.run(main())


def test_commit_freezes_a_layer_for_good(tmp_path: Path) -> None:
    backend = CopyBackend()

    async def body(core: Core) -> None:
        await core.create(BASE, None)
        await core.apply_diff(BASE, None, tar_of({"a": b"1"}))
        await core.commit(BASE)
        await core.commit(BASE)  # idempotent: a front re-freezes after a crash
        record = core.record(BASE)
        assert record is not None and record.frozen
        with pytest.raises(LayerBusyError, match="committed"):
            await core.get(BASE)
        with pytest.raises(LayerBusyError, match="committed"):
            await core.apply_diff(BASE, None, tar_of({"b": b"2"}))
        await core.create(CHILD, BASE)  # children of a frozen layer are writable
        assert (await core.get(CHILD) / "a").read_bytes() == b"1"
        await core.put(CHILD)
        with pytest.raises(LayerNotFoundError):
            await core.commit("d" * 64)

    run_core(tmp_path, backend, body)
    assert backend.committed == [BASE, BASE]

    async def reopened(core: Core) -> None:
        record = core.record(BASE)
        assert record is not None and record.frozen, "frozen is on disk, not only in memory"

    run_core(tmp_path, CopyBackend(), reopened)


def test_usage_counts_the_layers_own_content(tmp_path: Path) -> None:
    async def body(core: Core) -> None:
        await core.create(BASE, None)
        await core.apply_diff(BASE, None, tar_of({"big": b"x" * 5000, "d/small": b"y" * 10}))
        assert await core.usage(BASE) == Usage(size=5010, inodes=3)  # big, d, d/small
        await core.create(CHILD, BASE)
        assert await core.usage(CHILD) == Usage(0, 0), "a new child owns nothing yet"
        await core.apply_diff(CHILD, BASE, tar_of({"d/new": b"z" * 7, ".wh.big": b""}))
        # d changed (a new entry), d/new added, big deleted (counted in neither figure)
        assert await core.usage(CHILD) == Usage(size=7, inodes=2)

    run_core(tmp_path, CopyBackend(), body)


def test_apply_diffs_unpack_a_few_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many concurrent ApplyDiffs: at most APPLY_CONCURRENCY unpack at once (memory), all end."""
    running, most = 0, 0
    lock = threading.Lock()

    def slow_apply(layer_dir: Path, stream: object, idmap: object = None) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return 0

    monkeypatch.setattr(core_module, "apply_tar", slow_apply)
    layers = [f"{n:064x}" for n in range(3 * core_module.APPLY_CONCURRENCY)]

    async def body(core: Core) -> None:
        # As many threads as the daemon has, so only the core's limit can hold them back.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(WORKER_THREADS))
        for layer in layers:
            await core.create(layer, None)
        await asyncio.gather(*(core.apply_diff(layer, None, io.BytesIO()) for layer in layers))
        assert all(core.exists(layer) for layer in layers)

    run_core(tmp_path, CopyBackend(), body)
    assert most == core_module.APPLY_CONCURRENCY


def test_a_home_belongs_to_one_front(tmp_path: Path) -> None:
    """containerd's front removes layers it has no key for: it must never open dockerd's Home."""
    home = tmp_path / "home"

    async def main() -> None:
        graphdriver = Core(Backend.load(CopyBackend()), "graphdriver")
        await graphdriver.open(BackendConfig(home))
        await graphdriver.create(BASE, None)
        graphdriver.close()
        intruder = Core(Backend.load(CopyBackend()), "containerd")
        with pytest.raises(ConfigError, match="holds the graphdriver front's layers"):
            await intruder.open(BackendConfig(home))
        (home / FRONT_MARK).unlink()  # a Home from before the mark: its record says enough
        with pytest.raises(ConfigError, match="holds the graphdriver front's layers"):
            await intruder.open(BackendConfig(home))
        again = Core(Backend.load(CopyBackend()), "graphdriver")
        await again.open(BackendConfig(home))
        assert again.exists(BASE), "the layer survived, and its own front opens the Home"
        again.close()

    asyncio.run(main())


class SpaceBackend(CopyBackend):
    """Says how much space its layers have, and counts the waits for removed layers' space."""

    def __init__(self, free: int, total: int) -> None:
        super().__init__()
        self.space: tuple[int, int] | None = (free, total)
        self.reclaims = 0

    @hookimpl
    def snapdriver_free_space(self) -> tuple[int, int] | None:
        return self.space

    @hookimpl
    def snapdriver_reclaim(self, timeout: float) -> None:
        self.reclaims += 1


@pytest.mark.parametrize(
    ("free", "waits"),
    [(100 << 30, 0), (512 << 20, 1)],
    ids=["plenty", "short (the layers' space, not the record's)"],
)
def test_a_remove_waits_for_the_space_when_the_backend_is_short(
    tmp_path: Path, free: int, waits: int
) -> None:
    """The backend's own space decides (ZFS keeps layers in a pool, not beside the record)."""
    backend = SpaceBackend(free, 200 << 30)

    async def body(core: Core) -> None:
        await core.create(BASE, None)
        await core.remove(BASE)

    run_core(tmp_path, backend, body)
    assert backend.reclaims == waits


def test_without_an_answer_the_record_filesystem_decides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = SpaceBackend(0, 0)
    backend.space = None
    monkeypatch.setattr(core_module, "LOW_SPACE_BYTES", 1 << 60)  # any real filesystem is short

    async def body(core: Core) -> None:
        await core.create(BASE, None)
        await core.remove(BASE)

    run_core(tmp_path, backend, body)
    assert backend.reclaims == 1


class BrokenSpaceBackend(SpaceBackend):
    @hookimpl
    def snapdriver_free_space(self) -> tuple[int, int] | None:
        raise BackendError("cannot read the space of pool/root: I/O error")


def test_a_backend_that_cannot_tell_its_space_still_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The Remove succeeds; the record's filesystem decides the wait, and the log says why."""
    backend = BrokenSpaceBackend(0, 0)
    monkeypatch.setattr(core_module, "LOW_SPACE_BYTES", 1 << 60)

    async def body(core: Core) -> None:
        await core.create(BASE, None)
        await core.remove(BASE)
        assert core.record(BASE) is None

    run_core(tmp_path, backend, body)
    assert backend.reclaims == 1
    assert "cannot tell the free space of the layers" in caplog.text
