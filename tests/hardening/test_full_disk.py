"""A full filesystem is an ordinary error: on a small real btrfs or ZFS, over the plugin's socket.

An ApplyDiff bigger than the filesystem must fail with one clear line, its half-made layer's space
must be free again when the reply arrives, and the plugin must keep serving: Remove of the failed
layer and the next ApplyDiff work. With the disk filled by a container's writable layer instead,
the plugin must keep serving, start again (after a SIGKILL and after a clean stop) and remove
layers, which is how the user gets space back.

Both backends run it: btrfs on a loop image of ``SNAPDRIVER_FULL_DISK_MB`` (on the host), ZFS on
a pool of its own with about ``SNAPDRIVER_ZFS_FULL_DISK_MB`` for layers (in the lab; see
tests/storage.py). The ZFS side is smaller because every byte costs guest time under TCG: the whole
module there took 7.5 guest minutes (448 s, with other lab guests beside it).
"""

from __future__ import annotations

import errno
import io
import os
import random
import re
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import btrfsutil
import pytest
from snapdriver_btrfs.testing import wait_for_cleaner

from snapdriver.errors import NoSpaceError
from snapdriver.graphdriver.client import PluginCallError
from snapdriver.layers.state import LayerStore, Status, read_copy
from snapdriver.testing.conformance import Plugin, new_id
from snapdriver.testing.loopfs import can_make_loop_filesystems
from snapdriver.testing.process import PluginProcess
from tests.conftest import skip_tier
from tests.storage import Space, open_space

pytestmark = pytest.mark.slow
MiB = 1 << 20
SIZE_MB = {
    "btrfs": int(os.environ.get("SNAPDRIVER_FULL_DISK_MB", "400")),
    "zfs": int(os.environ.get("SNAPDRIVER_ZFS_FULL_DISK_MB", "200")),
}
#: ENOSPC on a full filesystem or pool (a size limit's EDQUOT has its own test, last).
FULL = "no space left on device"
NO_SPACE = re.compile(FULL + r" while applying layer ([0-9a-f]+) after (\d+) bytes")


def small_tar(seed: int, files: int = 4, size: int = 4096) -> bytes:
    rng = random.Random(seed)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(files):
            info = tarfile.TarInfo(f"small/f{i}")
            info.size = size
            tar.addfile(info, io.BytesIO(rng.randbytes(size)))
    return buffer.getvalue()


def big_tar(total: int, file_size: int = 8 * MiB) -> Iterator[bytes]:
    """A layer tar of ``total`` bytes of incompressible files, streamed, never held in memory."""
    rng = random.Random(total)
    for i in range(total // file_size):
        info = tarfile.TarInfo(f"blob/{i:04d}")
        info.size = file_size
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        for _ in range(file_size // MiB):  # whole MiBs: no padding needed
            yield rng.randbytes(MiB)
    yield b"\0" * 1024


def fill_directory(root: Path) -> int:
    """Write into ``root`` until the filesystem refuses, as a container would; bytes written."""
    written = 0
    for i in range(10_000):
        try:
            with open(root / f"fill-{i}", "wb") as handle:
                for _ in range(16):
                    handle.write(os.urandom(MiB))
                    written += MiB
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            return written
    raise AssertionError("the filesystem never filled up")


def wait_for_free(space: Space, at_least: int, timeout: float = 60) -> float:
    started = time.monotonic()
    while space.free() < at_least:
        assert time.monotonic() - started < timeout, f"only {space.free() >> 20} MiB free"
        os.sync()
        time.sleep(0.2)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def small(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Space]:
    """A small filesystem (btrfs) or pool (zfs)."""
    reason = can_make_loop_filesystems() if backend == "btrfs" else None
    if reason:
        skip_tier("btrfs", reason)
    with open_space(backend, tmp_path_factory.mktemp("full-homes"), SIZE_MB[backend]) as space:
        yield space


def btrfs_only(space: Space, why: str) -> None:
    if space.backend != "btrfs":
        pytest.skip(f"btrfs only: {why}")


@pytest.fixture
def plugin(small: Space, tmp_path: Path) -> Iterator[Plugin]:
    process = PluginProcess(small.backend, tmp_path)
    process.start()
    storage = small.new_home("full")
    plugin = Plugin(process, storage.home)
    try:
        opts = storage.init_options
        plugin.call("Init", Home=str(storage.home), Opts=opts, UIDMaps=None, GIDMaps=None)
        yield plugin
        for layer in plugin.call("Status")["Status"]:
            assert layer  # the plugin still answers at the end
    finally:
        plugin.client.close()
        process.stop()
        assert "Traceback" not in process.log_path.read_text(errors="replace"), process.log_tail()


def reclaim_seconds(plugin: Plugin) -> float:
    found = re.findall(r"given back in ([0-9.]+) s", plugin.process.log_path.read_text())
    assert found, "the plugin did not log giving the space back"
    return float(found[-1])


def read_small(plugin: Plugin, layer: str, seed: int) -> None:
    root = plugin.get(layer)
    try:
        with tarfile.open(fileobj=io.BytesIO(small_tar(seed))) as expected:
            for member in expected.getmembers():
                source = expected.extractfile(member)
                assert source is not None
                assert (root / member.name).read_bytes() == source.read()
    finally:
        plugin.put(layer)


def test_an_apply_bigger_than_the_disk_fails_cleanly(
    plugin: Plugin, small: Space, figure: Callable[[str], None]
) -> None:
    base = new_id()
    plugin.create(base)
    plugin.client.apply_diff(base, "", small_tar(1))
    free_before = small.free()
    layer = new_id()
    plugin.create(layer, base)
    started = time.monotonic()
    with pytest.raises(PluginCallError) as failed:
        plugin.client.apply_diff(layer, base, big_tar(SIZE_MB[small.backend] * 3 // 2 * MiB))
    reply_s = time.monotonic() - started
    message = str(failed.value)
    match = NO_SPACE.search(message)
    assert match and match.group(1) == layer, message
    assert "\n" not in message and int(match.group(2)) > 0
    free_after = small.free()  # at the reply, with no waiting of our own
    assert free_after >= free_before - 8 * MiB, (free_before >> 20, free_after >> 20)
    assert plugin.call("Exists", ID=layer) == {"Exists": False}
    plugin.remove(layer)  # dockerd's clean-up after a failed ApplyDiff
    again = new_id()
    plugin.create(again, base)
    plugin.client.apply_diff(again, base, small_tar(2))
    read_small(plugin, again, 2)
    read_small(plugin, base, 1)
    for gone in (again, base):
        plugin.remove(gone)
    figure(
        f"FULL DISK ({small.label}): ApplyDiff failed after {int(match.group(2)) >> 20} MiB "
        f"with one line; reply {reply_s:.1f} s, space given back in {reclaim_seconds(plugin):.2f} "
        f"s; free {free_before >> 20} MiB before, {free_after >> 20} MiB at the reply"
    )


def expect_no_space_or_success(call: Callable[[], object]) -> bool:
    """On a full disk a tiny write may still fit in metadata; if it fails, it says why."""
    try:
        call()
    except PluginCallError as err:
        message = str(err)
    else:
        return True
    assert re.search(FULL, message) and "\n" not in message, message
    return False


def test_the_plugin_serves_restarts_and_removes_on_a_full_disk(
    plugin: Plugin, small: Space, figure: Callable[[str], None]
) -> None:
    base = new_id()
    plugin.create(base)
    plugin.client.apply_diff(base, "", small_tar(3))
    container = new_id()
    plugin.create(container, base, rw=True)
    free_before = small.free()
    written = fill_directory(plugin.get(container))
    outcomes = []
    # Calls that write the record (Create, Get/Put's counts, ApplyDiff) on the full disk.
    for _ in range(3):
        read_small(plugin, base, 3)
    time.sleep(1)  # the reference counts' write behind meets the full disk
    extra = new_id()
    outcomes.append(expect_no_space_or_success(lambda: plugin.create(extra, base)))
    if outcomes[-1]:  # ZFS clones into a full pool: the clone takes no data
        plugin.remove(extra)
    layer = new_id()
    if expect_no_space_or_success(lambda: plugin.create(layer, base)):
        applied = expect_no_space_or_success(
            lambda: plugin.client.apply_diff(layer, base, small_tar(4, files=64, size=MiB))
        )
        outcomes.append(applied)
        plugin.remove(layer)
    assert plugin.process.pid is not None, "the plugin died on the full disk"
    plugin.client.close()
    plugin.process.kill()
    plugin.process.start()  # SIGKILLed on a full disk: must start, without a new Init
    plugin.client = plugin.process.client()
    assert plugin.call("Exists", ID=container) == {"Exists": True}
    read_small(plugin, base, 3)
    plugin.restart()  # a clean stop and start on the full disk
    assert plugin.call("Exists", ID=base) == {"Exists": True}
    plugin.put(container)
    plugin.remove(container)  # how the user gets space back
    waited = wait_for_free(small, free_before - 16 * MiB)
    assert plugin.call("Exists", ID=container) == {"Exists": False}
    after = new_id()
    plugin.create(after, base)
    plugin.client.apply_diff(after, base, small_tar(5))
    read_small(plugin, after, 5)
    plugin.restart()  # the deletion written while the disk was full is on disk now
    assert plugin.call("Exists", ID=container) == {"Exists": False}
    read_small(plugin, after, 5)
    for gone in (after, base):
        plugin.remove(gone)
    figure(
        f"FULL DISK ({small.label}): filled by a container ({written >> 20} MiB), plugin "
        f"served, restarted after SIGKILL and SIGTERM, removed it ({waited:.1f} s to free space); "
        f"writes on the full disk succeeded {sum(outcomes)} of {len(outcomes)}"
    )


def add_until_refused(store: LayerStore) -> None:
    for i in range(1000):  # the last free pages of the log may still take a few
        store.add(f"{i:064x}", None, None)


def test_the_layer_record_on_a_full_disk(small: Space) -> None:
    """Opens and reads; a refused write changes nothing; a deletion waits for space."""
    btrfs_only(small, "the record lives in Home, which is on the layers' filesystem only there")
    small_fs = Path(small.place)
    home = small_fs / f"record-{uuid.uuid4().hex[:8]}"
    home.mkdir()
    store = LayerStore(home)
    kept, gone = "a" * 64, "b" * 64
    for layer in (kept, gone):
        store.add(layer, None, None)
        store.set_status(layer, Status.READY)
    store.close()
    filler = home / "filler"
    btrfsutil.create_subvolume(str(filler))
    try:
        fill_directory(filler)
        store = LayerStore(home)  # opens on the full disk: no -shm to map, nothing to write
        try:
            before = store.all()
            assert {r.id for r in before} == {kept, gone}
            with pytest.raises(NoSpaceError, match="no space left on device"):
                add_until_refused(store)
            added = {r.id for r in store.all()} - {kept, gone}
            assert {r.id for r in read_copy(home)} == {kept, gone} | added, "mirror != disk"
            store.delete(gone)  # never refused: the mirror forgets it now
            assert store.get(gone) is None and store.deletions_pending()
            assert gone in {r.id for r in read_copy(home)}
        finally:
            store.close()
        store = LayerStore(home)  # and after a restart, still on the full disk
        store.close()
    finally:
        btrfsutil.delete_subvolume(str(filler))
        btrfsutil.sync(str(small_fs))
        wait_for_cleaner(small_fs)  # the filler's space is free only once the cleaner dropped it
        btrfsutil.sync(str(small_fs))
    store = LayerStore(home)
    try:
        store.delete(gone)  # written now that there is space
        assert not store.deletions_pending()
        assert gone not in {r.id for r in read_copy(home)}
        assert kept in {r.id for r in read_copy(home)}
    finally:
        store.close()


def test_a_size_limit_is_the_same_error(
    small: Space, tmp_path: Path, figure: Callable[[str], None]
) -> None:
    """A layer's size limit (a btrfs qgroup, a ZFS dataset quota) reached in ApplyDiff: EDQUOT,
    one line, storage gone.

    Last in the module: on btrfs it switches quotas on for the filesystem.
    """
    process = PluginProcess(small.backend, tmp_path)
    process.start()
    storage = small.new_home("quota")
    plugin = Plugin(process, storage.home)
    limit = {"btrfs": "btrfs qgroup", "zfs": "zfs dataset quota"}[small.backend]
    try:
        opts = ["btrfs.enable_quota=true"] if small.backend == "btrfs" else storage.init_options
        plugin.call("Init", Home=str(storage.home), Opts=opts, UIDMaps=None, GIDMaps=None)
        layer = new_id()
        plugin.create(layer, size="16M")
        with pytest.raises(PluginCallError) as failed:
            plugin.client.apply_diff(layer, "", big_tar(64 * MiB))
        message = failed.value.message
        assert message.startswith(f"disk quota exceeded while applying layer {layer} after ")
        assert plugin.call("Exists", ID=layer) == {"Exists": False}
        assert layer not in storage.stored(), "the failed layer's storage is kept"
        plugin.remove(layer)
        again = new_id()
        plugin.create(again, size="16M")
        plugin.client.apply_diff(again, "", small_tar(6))
        read_small(plugin, again, 6)
        plugin.remove(again)
        figure(f"FULL DISK ({limit} 16 MiB): {message.split(' while ')[0]}, one line")
    finally:
        plugin.client.close()
        process.stop()
