"""Scenarios 8 and 9: plugin calls no docker command isolates, made on snapdriver's socket.

8. Create (a btrfs snapshot) on a parent of a million files against Create on an empty parent:
   a snapshot must cost the same whatever the parent holds.
9. The plugin's peak memory while it unpacks a 2 GiB ApplyDiff and while it streams that layer
   back as a Diff: both must stream, never hold the layer. The peak is VmHWM, reset through
   ``/proc/PID/clear_refs`` before each call.

The layers are made through the same dockerd-less API dockerd uses, next to dockerd's own.
"""

from __future__ import annotations

import os
import statistics
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from snapbench import results as m
from snapbench.config import Config
from snapbench.env import vm_hwm_kib
from snapdriver.graphdriver.client import PluginClient
from snapdriver.testing.process import PluginProcess

Record = Callable[[m.Metric, float], None]
Log = Callable[[str], None]
#: Create is fast: time more of them than the other scenarios' repeats.
CREATE_RUNS = 9
STREAM_FILE_MIB = 64


def create_on_big_parent(plugin: PluginProcess, cfg: Config, record: Record, log: Log) -> None:
    big, empty = "sdbench-big-parent", "sdbench-empty-parent"
    with plugin.client() as client:
        try:
            _create(client, big)
            _create(client, empty)
            started = time.perf_counter()
            _populate(client, big, cfg.create_files)
            log(f"    wrote {cfg.create_files:,} files in {time.perf_counter() - started:.0f}s")
            times: dict[int, list[float]] = {0: [], cfg.create_files: []}
            for run in range(max(cfg.repeat, CREATE_RUNS)):
                for parent, files in ((empty, 0), (big, cfg.create_files)):
                    seconds = _timed_child(client, parent, f"{parent}-child-{run}")
                    times[files].append(seconds)
                    record(m.create_on(files), seconds * 1000)
        finally:
            for layer in (big, empty):
                client.call("GraphDriver.Remove", {"ID": layer})
    ratio = statistics.median(times[cfg.create_files]) / statistics.median(times[0])
    record(m.create_ratio(cfg.create_files), ratio)
    log(f"    Create on the {cfg.create_files:,}-file parent / on an empty one: {ratio:.2f}x")


def stream_memory(plugin: PluginProcess, cfg: Config, record: Record, log: Log) -> None:
    pid = plugin.pid
    if pid is None:
        raise RuntimeError("the plugin is not running")
    layer, expected = "sdbench-stream", cfg.stream_mib * 1024 * 1024
    with plugin.client() as client:
        _create(client, layer)
        try:
            _reset_peak(pid)
            client.apply_diff(layer, "", generated_tar(cfg.stream_mib))
            record(m.stream_rss("ApplyDiff", cfg.stream_mib), _peak_mib(pid))
            _reset_peak(pid)
            streamed = sum(len(chunk) for chunk in client.diff_stream(layer))
            record(m.stream_rss("Diff", cfg.stream_mib), _peak_mib(pid))
        finally:
            client.call("GraphDriver.Remove", {"ID": layer})
    if streamed < expected:
        raise RuntimeError(f"the Diff was {streamed:,} bytes, less than the {expected:,} applied")
    log(f"    {cfg.stream_mib:,} MiB ApplyDiff then Diff: peak RSS measured around each")


def _create(client: PluginClient, layer: str, parent: str = "") -> None:
    client.call("GraphDriver.Create", {"ID": layer, "Parent": parent, "StorageOpt": {}})


def _timed_child(client: PluginClient, parent: str, child: str) -> float:
    started = time.perf_counter()
    _create(client, child, parent)
    seconds = time.perf_counter() - started
    client.call("GraphDriver.Remove", {"ID": child})
    return seconds


def _populate(client: PluginClient, layer: str, files: int) -> None:
    """``files`` small files in directories of 1,000, written through the layer's mount."""
    root = Path(client.call("GraphDriver.Get", {"ID": layer, "MountLabel": ""})["Dir"])
    try:
        for index in range(files):
            if index % 1000 == 0:
                directory = root / f"d{index // 1000}"
                directory.mkdir()
            fd = os.open(directory / f"f{index}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"%d\n" % index)
            os.close(fd)
    finally:
        client.call("GraphDriver.Put", {"ID": layer})
    os.sync()  # so the timed snapshots do not pay for this writeback


def generated_tar(mib: int) -> Iterator[bytes]:
    """A tar of ``mib`` MiB in files of 64 MiB, made as it is sent (random, 1 MiB reused)."""
    chunk = os.urandom(1024 * 1024)
    directory = tarfile.TarInfo("stream")
    directory.type, directory.mode, directory.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
    yield directory.tobuf(format=tarfile.GNU_FORMAT)
    remaining, index = mib, 0
    while remaining > 0:
        size = min(STREAM_FILE_MIB, remaining)
        info = tarfile.TarInfo(f"stream/f{index}")
        info.size, info.mode, info.mtime = size * len(chunk), 0o644, 1_700_000_000
        yield info.tobuf(format=tarfile.GNU_FORMAT)
        for _ in range(size):
            yield chunk  # a whole number of MiB: no padding needed
        remaining -= size
        index += 1
    yield bytes(1024)


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5\n")


def _peak_mib(pid: int) -> float:
    kib = vm_hwm_kib(pid)
    if kib is None:
        raise RuntimeError(f"no VmHWM for process {pid}")
    return kib / 1024
