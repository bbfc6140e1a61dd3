"""Benchmark: the plugin's CPU time for one ApplyDiff, as ``docker load`` and ``docker import``
make it.

A real plugin (``python -m snapdriver --backend btrfs``, log level info) on a btrfs loop image
gets Init, then for each run Create of a fresh layer and ApplyDiff of a layer tar sent as dockerd
sends it: a chunked HTTP POST to ``/GraphDriver.ApplyDiff?id=...`` cut where dockerd cuts it
(see :func:`dockerd_chunks`; ``--chunk N`` sends chunks of N bytes instead). Measured is the CPU
time (user + system, from ``/proc/PID/stat``) the plugin process spends during the call, not wall
time: the machine is shared and noisy, and CPU time is what another tenant of the host loses.
Peak RSS (``VmHWM``, reset before each call) and wall time are printed beside it. Each case runs
``--repeat`` times and the median is reported; the layer is removed (and the filesystem synced)
between runs.

The cases:

- ``load``: the layer of bench scenario 7 (``docker load``): ``--load-files`` files of random
  bytes, ``--load-mib`` MiB in all, in directories of 1,000.
- ``import``: the file image of bench scenarios 1-3 (``docker import``): busybox plus
  ``--import-files`` files of ~20 bytes in 100 directories.

The tars are written once into ``--tars`` and reused. ``--profile DIR`` adds one unmeasured run
per case under py-spy (collapsed stacks in ``DIR/apply-CASE.txt``), or with ``--perf`` under perf
(``DIR/apply-CASE.perf``: native and kernel functions), and prints where the samples were. py-spy
samples only the thread holding the GIL (``--gil``): Python's share, without the system calls
that release the GIL, which perf shows. Needs root. From the repository root, with the venv::

    .venv/bin/python bench/apply_cpu.py                      # both cases, 3 runs each
    .venv/bin/python bench/apply_cpu.py --cases load --profile bench/out
    .venv/bin/python bench/apply_cpu.py --repeat 1 --profile bench/out --perf
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from snapbench.env import vm_hwm_kib
from snapbench.images import FileLayout, write_file_image, write_load_layer

from snapdriver.protocol.client import PluginClient
from snapdriver.testing.loopfs import can_make_loop_filesystems, loop_filesystem
from snapdriver.testing.process import PluginProcess

_TICK = os.sysconf("SC_CLK_TCK")
_NO_DATA = {tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE}
_NO_DATA.add(tarfile.FIFOTYPE)


@dataclass
class Run:
    """One measured ApplyDiff."""

    case: str
    cpu_s: float
    user_s: float
    sys_s: float
    loop_s: float  # of which the main thread's, which runs the event loop (aiohttp)
    wall_s: float
    peak_rss_mib: float
    size: int


def cpu_times(pid: int, task: int | None = None) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` (all its threads, and waited children),
    or of its thread ``task`` alone."""
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    with open(path) as stat:
        fields = stat.read().rpartition(")")[2].split()
    # After the name: state is field 3, so utime, stime, cutime, cstime are 14-17 (1-based).
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return (utime + cutime) / _TICK, (stime + cstime) / _TICK


def make_tar(tars: Path, case: str, args: argparse.Namespace) -> Path:
    """The case's layer tar in ``tars``, written unless an earlier run left it there."""
    tars.mkdir(parents=True, exist_ok=True)
    if case == "load":
        path = tars / f"load-{args.load_files}-{args.load_mib}.layer.tar"
    else:
        path = tars / f"import-{args.import_files}.tar"
    if path.exists():
        return path
    print(f"writing {path}", flush=True)
    partial = path.with_suffix(".partial")
    if case == "load":
        write_load_layer(partial, args.load_files, args.load_mib)
    else:
        write_file_image(partial, FileLayout.for_files(args.import_files))
    partial.rename(path)
    return path


def fixed_chunks(path: Path, size: int) -> Iterator[bytes]:
    """The tar in chunks of ``size`` bytes."""
    with open(path, "rb", buffering=0) as tar:
        while chunk := tar.read(size):
            yield chunk


def dockerd_chunks(path: Path) -> Iterator[bytes]:
    """The tar in the HTTP chunks dockerd 20.10 sends for ``docker load`` and ``docker import``.

    dockerd does not copy the layer in big blocks: its layer store hands the driver the read
    end of tar-split's pipe (``asm.NewInputTarStream``), and every read that tar-split's Go tar
    reader makes of the layer becomes one write into that pipe, one ``Read`` by net/http, and one
    HTTP chunk. The tar reader reads a header as one block of 512 bytes, file data through
    ``io.Copy`` (32 KiB at most, up to the entry's end), and the padding after it through
    ``io.Discard`` (8 KiB at most). The layer comes through a 32 KiB ``bufio.Reader``, which
    returns short reads at the edges of its 32 KiB windows of the file.
    """
    with open(path, "rb") as tar:
        data = memoryview(mmap.mmap(tar.fileno(), 0, prot=mmap.PROT_READ))
    try:
        yield from _go_reads(data)
    finally:
        data.release()


def _go_reads(data: memoryview) -> Iterator[bytes]:
    pos, zero_blocks = 0, 0
    window = 32 * 1024

    def read(want: int, most: int) -> Iterator[bytes]:
        nonlocal pos
        end = min(pos + want, len(data))
        while pos < end:
            stop = min(end, pos + most, (pos // window + 1) * window)
            yield bytes(data[pos:stop])
            pos = stop

    while pos < len(data) and zero_blocks < 2:
        header = data[pos : pos + 512]
        yield from read(512, 512)
        if header == bytes(512):
            zero_blocks += 1
            continue
        info = tarfile.TarInfo.frombuf(bytes(header), "utf-8", "surrogateescape")
        # Links, devices, directories and FIFOs carry no data, whatever their size field says.
        size = 0 if info.type in _NO_DATA else info.size
        yield from read(size, 32 * 1024)
        yield from read(-size % 512, 8 * 1024)
    yield from read(len(data) - pos, 32 * 1024)  # tar-split copies what follows the end


def expected_size(path: Path) -> int:
    """What ApplyDiff must return: the sum of the entries' sizes (``tarfile`` reads it here)."""
    with tarfile.open(path, mode="r|") as tar:
        return sum(member.size for member in tar)


def apply_once(
    plugin: PluginProcess,
    client: PluginClient,
    case: str,
    tar: Path,
    chunk: int,
    *,
    before_remove: Callable[[], None] = lambda: None,
) -> Run:
    pid = plugin.pid
    if pid is None:
        raise RuntimeError(f"the plugin is not running:\n{plugin.log_tail()}")
    layer = f"apply-{case}-{uuid.uuid4().hex[:12]}"
    client.call("GraphDriver.Create", {"ID": layer, "Parent": "", "StorageOpt": {}})
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5\n")  # resets VmHWM
        user0, sys0 = cpu_times(pid)
        loop0 = sum(cpu_times(pid, pid))
        started = time.perf_counter()
        body = dockerd_chunks(tar) if chunk == 0 else fixed_chunks(tar, chunk)
        size = client.apply_diff(layer, "", body)
        wall = time.perf_counter() - started
        user1, sys1 = cpu_times(pid)
        loop = sum(cpu_times(pid, pid)) - loop0
        peak = (vm_hwm_kib(pid) or 0) / 1024
        before_remove()
    finally:
        client.call("GraphDriver.Remove", {"ID": layer})
        os.sync()  # the next run should not pay for this one's writeback
    user, system = user1 - user0, sys1 - sys0
    return Run(case, user + system, user, system, loop, wall, peak, size)


@contextlib.contextmanager
def running_plugin(workdir: Path, fs_mib: int) -> Iterator[PluginProcess]:
    """A btrfs plugin, initialised on a fresh loop image, stopped and released after."""
    with loop_filesystem("btrfs", size_mb=fs_mib) as mnt:
        plugin = PluginProcess("btrfs", workdir, ["--log-level", "info"])
        plugin.start()
        try:
            with plugin.client() as client:
                init: dict[str, object] = {"Home": str(mnt / "home"), "Opts": []}
                client.call("GraphDriver.Init", init | {"UIDMaps": None, "GIDMaps": None})
            yield plugin
        finally:
            plugin.stop()


def profile_once(
    plugin: PluginProcess, client: PluginClient, case: str, tar: Path, args: argparse.Namespace
) -> None:
    """One more run under py-spy (Python stacks) or perf (native and kernel functions); the
    profile goes to ``--profile`` and its top functions are printed."""
    out = Path(args.profile) / f"apply-{case}.{'perf' if args.perf else 'txt'}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.perf:
        command = ["perf", "record", "-F", "499", "-g", "-p", str(plugin.pid), "-o", str(out)]
    else:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        command = [spy, "record", "--pid", str(plugin.pid), "--rate", "200", "--gil"]
        command += ["--nonblocking", "--format", "raw", "--output", str(out)]
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop() -> None:
        recorder.send_signal(2)
        _, err = recorder.communicate(timeout=120)
        if not out.exists():
            raise RuntimeError(f"{command[0]} wrote no profile: {err.decode(errors='replace')}")

    time.sleep(1.0)  # the profiler attaches
    try:
        apply_once(plugin, client, case, tar, args.chunk, before_remove=stop)
    finally:
        if recorder.returncode is None:
            recorder.kill()
            recorder.wait()
    print(f"\nprofile of {case} ({out}):")
    if args.perf:
        report = ["perf", "report", "-i", str(out), "--stdio", "--no-children"]
        report += ["--sort", "dso,sym", "-g", "none", "--percent-limit", "0.7"]
        lines = subprocess.run(report, capture_output=True, text=True, check=False).stdout
        print("\n".join(line for line in lines.splitlines() if line and line[0] != "#"))
    else:
        print_py_spy(out)


def _frame_name(frame: str) -> str:
    """``function (path/file.py:line)`` as ``function file.py:line``."""
    return frame.partition(" (")[0] + " " + frame.rpartition("/")[2].rstrip(")")


def print_py_spy(path: Path, top: int = 25) -> None:
    """Self and total shares of the functions in py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [_frame_name(frame) for frame in stack.split(";")[1:]]
        samples += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    print(f"  {samples} samples; self% total% function")
    for frame, count in own.most_common(top):
        print(f"  {100 * count / samples:5.1f} {100 * total[frame] / samples:5.1f}  {frame}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="load,import", help="load, import or both")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--load-files", type=int, default=50_000)
    parser.add_argument("--load-mib", type=int, default=1000)
    parser.add_argument("--import-files", type=int, default=100_000)
    parser.add_argument(
        "--chunk", type=int, default=0, help="send chunks of this size, not dockerd's (0)"
    )
    parser.add_argument("--tars", type=Path, default=Path("/var/tmp/snapdriver-bench/apply-cpu"))
    parser.add_argument("--fs-mib", type=int, default=8192, help="btrfs loop image size")
    parser.add_argument("--profile", help="directory for a profile of one extra run per case")
    parser.add_argument("--perf", action="store_true", help="profile with perf, not py-spy")
    parser.add_argument("--json", type=Path, help="write every run here")
    args = parser.parse_args(argv)
    reason = can_make_loop_filesystems()
    if reason is not None:
        raise SystemExit(f"cannot make a btrfs loop image: {reason}")
    cases = [c for c in args.cases.split(",") if c]
    tars = {case: make_tar(args.tars, case, args) for case in cases}
    runs: list[Run] = []
    workdir = args.tars / f"plugin-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True)
    try:
        with running_plugin(workdir, args.fs_mib) as plugin, plugin.client() as client:
            for case in cases:
                expected = expected_size(tars[case])
                for _ in range(args.repeat):
                    run = apply_once(plugin, client, case, tars[case], args.chunk)
                    if run.size != expected:
                        raise RuntimeError(f"{case}: ApplyDiff said {run.size}, not {expected}")
                    print(
                        f"{case}: cpu {run.cpu_s:.2f} s (user {run.user_s:.2f}, sys"
                        f" {run.sys_s:.2f}; event loop {run.loop_s:.2f}), wall"
                        f" {run.wall_s:.2f} s, peak RSS {run.peak_rss_mib:.0f} MiB",
                        flush=True,
                    )
                    runs.append(run)
                if args.profile:
                    profile_once(plugin, client, case, tars[case], args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\nmedian of", args.repeat, "runs:")
    for case in cases:
        mine = [r for r in runs if r.case == case]
        cpu = statistics.median(r.cpu_s for r in mine)
        user = statistics.median(r.user_s for r in mine)
        system = statistics.median(r.sys_s for r in mine)
        loop = statistics.median(r.loop_s for r in mine)
        peak = max(r.peak_rss_mib for r in mine)
        times = f"cpu {cpu:.2f} s (user {user:.2f}, sys {system:.2f}; event loop {loop:.2f})"
        print(f"  {case}: {times}, peak RSS {peak:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
