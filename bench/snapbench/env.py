"""One driver's private world: a loop filesystem, (for snapdriver) the plugin, and a dockerd.

Everything made here is released on the way out, also after an error, Ctrl-C or SIGTERM: the
teardown ignores further interrupts until dockerd, the plugin and the loop filesystem are gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from snapdriver.testing.dockerd import Dockerd
from snapdriver.testing.loopfs import data_root_with_layers, loop_filesystem
from snapdriver.testing.process import PluginProcess

PLUGIN_NAME = "sdbench"
PLUGIN_SOCKET = Path("/run/docker/plugins") / f"{PLUGIN_NAME}.sock"


@dataclass(frozen=True)
class DriverSpec:
    """A storage driver under test: its label in the results and how dockerd is told of it."""

    label: str
    storage_driver: str
    fstype: str
    plugin: bool = False
    #: dockerd's data root on a filesystem of this type, the layers' ``fstype`` filesystem
    #: mounted inside it where the plugin keeps them; None: both on the one filesystem.
    data_root_fstype: str | None = None

    @property
    def description(self) -> str:
        if self.plugin:
            where = "a dataset of its own" if self.on_zfs else self.fstype
            plugin = f"snapdriver --backend {self.fstype} (plugin `{self.storage_driver}`)"
            if self.data_root_fstype:
                return (
                    f"{plugin}, layers on {where} mounted in dockerd's data root on "
                    f"{self.data_root_fstype}"
                )
            return f"{plugin} on {where}"
        if self.on_zfs:
            return f"dockerd in-tree `{self.storage_driver}` on a dataset of its own"
        return f"dockerd in-tree `{self.storage_driver}` on {self.fstype}"

    @property
    def on_zfs(self) -> bool:
        """Its layers go to a root dataset on ``--zpool``, not to a loop filesystem."""
        return self.fstype == "zfs"


DRIVERS = (
    DriverSpec("snapdriver", PLUGIN_NAME, "btrfs", plugin=True),
    # What an operator can do and in-tree btrfs cannot: dockerd's own state (containers, image
    # store, BuildKit's databases, all fsynced often) on ext4, as overlay2's is.
    DriverSpec("snapdriver-ext4root", PLUGIN_NAME, "btrfs", plugin=True, data_root_fstype="ext4"),
    DriverSpec("btrfs", "btrfs", "btrfs"),
    DriverSpec("overlay2", "overlay2", "ext4"),
    DriverSpec("vfs", "vfs", "ext4"),
    DriverSpec("snapdriver-zfs", PLUGIN_NAME, "zfs", plugin=True),
    DriverSpec("zfs", "zfs", "zfs"),
)


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (``VmHWM``) of a live process, in KiB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM for a teardown that must finish; restore the handlers after."""
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def raise_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so the same clean-up paths run as for Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


@dataclass
class Environment:
    """A running dockerd (and plugin) for one driver, with its data root on ``mount``."""

    spec: DriverSpec
    workdir: Path
    mount: Path
    dockerd: Dockerd
    plugin: PluginProcess | None = None
    peak_rss_kib: dict[str, int] = field(default_factory=dict)

    @property
    def plugin_pid(self) -> int | None:
        return self.plugin.pid if self.plugin is not None else None

    @property
    def dockerd_pid(self) -> int | None:
        try:
            return int(self.dockerd.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def sample_rss(self) -> None:
        """Record VmHWM of the plugin and dockerd (peak since start, so any time is fine)."""
        for name, pid in (("plugin", self.plugin_pid), ("dockerd", self.dockerd_pid)):
            kib = vm_hwm_kib(pid) if pid is not None else None
            if kib is not None:
                self.peak_rss_kib[name] = max(kib, self.peak_rss_kib.get(name, 0))


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent not idle since boot (``/proc/stat``)."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, stat.readline().split()[1:8])
    # Not steal: that is time the hypervisor gave to someone else.
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int | None) -> float:
    """User plus system time of a live process (0 when there is none)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # Fields after the parenthesised name; utime and stime are the 14th and 15th.
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _alive(pid: int | None) -> bool:
    return pid is not None and Path(f"/proc/{pid}").exists()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _end_group(pgid: int, log: Callable[[str], None]) -> None:
    """dockerd runs in its own session (pgid == its pid); end what it left (containerd, shims)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if not _group_alive(pgid):
            return
        log(f"  process group {pgid} outlived dockerd: sending {sig.name}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.1)


def _teardown(env: Environment, log: Callable[[str], None]) -> None:
    dockerd_pid = env.dockerd_pid
    if env.plugin is not None and env.plugin_pid is None and _alive(dockerd_pid):
        # Ctrl-C reaches the plugin too (same process group). dockerd calls the plugin while it
        # shuts down, so bring it back for that rather than let dockerd retry for half a minute.
        log("  plugin is gone: restarting it so dockerd can shut down cleanly")
        with contextlib.suppress(Exception):
            env.plugin.stop()
            env.plugin.start()
    env.sample_rss()
    pgid = dockerd_pid if _alive(dockerd_pid) else None
    with contextlib.suppress(Exception):
        env.dockerd.stop()
    if pgid is not None:
        _end_group(pgid, log)
    if env.plugin is not None:
        with contextlib.suppress(Exception):
            env.plugin.stop()
    exec_root = env.dockerd.exec_root
    if exec_root.is_dir():
        subprocess.run(["umount", "-R", "-l", str(exec_root)], capture_output=True, check=False)
        shutil.rmtree(exec_root, ignore_errors=True)


def settle_page_cache(keep: Path) -> None:
    """Write back and drop the page cache, then read ``keep`` (the tar about to be loaded) back.

    Before each scenario that writes a whole image (``docker load``, ``docker import``). On this
    VM, page cache that grows into memory the guest has not used lately costs a fault in the
    host for each page, charged as system time to whichever process writes it: the plugin's
    CPU for one load fell from 6.72 to 4.84 s with the cache dropped before it, and a writer's
    samples in ``copy_folio_from_iter_atomic`` from 45% to 6% (bench/goals.md). Without this,
    what a driver is charged depends on what ran before it.
    """
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    with open(keep, "rb") as tar:
        while tar.read(1 << 20):  # the CLI's read of it stays a page-cache read, as before
            pass


@contextlib.contextmanager
def zfs_filesystem(pool: str, mnt: Path) -> Iterator[Path]:
    """A fresh root dataset ``POOL/bench<hex>`` mounted at ``mnt``, destroyed with all below it.

    Docker's data root goes on it, as in Docker's own ZFS set-up, so both zfs drivers find their
    root dataset from the data root.
    """
    from snapdriver_zfs.testing import scratch_root  # the zfs backend is an optional install

    with scratch_root("bench", pool) as root:
        mnt.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "zfs", root, str(mnt)], check=True, capture_output=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", "-R", str(mnt)], check=False, capture_output=True)


def filesystem(
    spec: DriverSpec, workdir: Path, sizes_mb: dict[str, int], zpool: str | None
) -> contextlib.AbstractContextManager[Path]:
    """Where ``spec``'s dockerd keeps its data root: a loop filesystem, or a ZFS root dataset."""
    if spec.data_root_fstype:
        return split_filesystems(spec, sizes_mb)
    if not spec.on_zfs:
        return loop_filesystem(spec.fstype, sizes_mb.get(spec.fstype, 0))
    if zpool is None:
        raise RuntimeError(f"{spec.label} needs a pool (--zpool)")
    return zfs_filesystem(zpool, workdir / "mnt")


@contextlib.contextmanager
def split_filesystems(spec: DriverSpec, sizes_mb: dict[str, int]) -> Iterator[Path]:
    """The data root on a ``data_root_fstype`` loop filesystem, the layers on a ``fstype`` one
    mounted in it where the plugin's Home will be (the data root made a mount point first)."""
    assert spec.data_root_fstype is not None
    with data_root_with_layers(
        spec.storage_driver,
        root_fstype=spec.data_root_fstype,
        layers_fstype=spec.fstype,
        root_mb=sizes_mb[spec.data_root_fstype],
        layers_mb=sizes_mb[spec.fstype],
    ) as data_root:
        yield data_root.parent  # environment() puts the data root at MOUNT/docker


@contextlib.contextmanager
def own_containerd(workdir: Path, log: Callable[[str], None]) -> Iterator[list[str]]:
    """A containerd started for dockerd (``--own-containerd``); yields dockerd's options for it.

    dockerd gives the containerd it starts itself a fixed 15 s and exits when that is not enough:
    in the emulated ZFS lab beside three other guests it failed three starts running
    (2026-12-06). Started here, containerd is waited for as long as it takes; dockerd then only
    connects to it and runs its containers there, in a namespace of their own.
    """
    from snapdriver.testing.containerd import Containerd  # imports grpc: only when asked for

    containerd = Containerd(workdir / "containerd", {})
    started = time.monotonic()
    containerd.start(timeout=900)
    log(f"  containerd of its own up in {time.monotonic() - started:.1f}s")
    try:
        yield [
            *("--containerd", str(containerd.address)),
            *("--containerd-namespace", containerd.namespace),
            *("--containerd-plugins-namespace", f"{containerd.namespace}-plugins"),
        ]
    finally:
        containerd.close()


@contextlib.contextmanager
def environment(
    spec: DriverSpec,
    workdir: Path,
    fs_sizes_mb: dict[str, int],
    zpool: str | None,
    log: Callable[[str], None],
    *,
    containerd: bool = False,
) -> Iterator[Environment]:
    """Make the filesystem, start the plugin (first), containerd (if asked for) and dockerd;
    undo it all after."""
    workdir.mkdir(parents=True, exist_ok=True)
    stack = contextlib.ExitStack()
    env: Environment | None = None
    try:
        mount = stack.enter_context(filesystem(spec, workdir, fs_sizes_mb, zpool))
        # Stopped after dockerd (the stack closes after the teardown below).
        dockerd_args = stack.enter_context(own_containerd(workdir, log)) if containerd else []
        if spec.on_zfs:
            log(f"  root dataset on pool {zpool} mounted at {mount}")
        else:
            for fstype in {spec.fstype, spec.data_root_fstype or spec.fstype}:
                log(f"  {fstype} loop filesystem ({fs_sizes_mb[fstype]} MiB, sparse)")
            log(f"  dockerd's data root on {spec.data_root_fstype or spec.fstype} at {mount}")
        plugin = None
        if spec.plugin:
            (workdir / "plugin").mkdir(exist_ok=True)
            plugin = PluginProcess(
                spec.fstype,
                workdir / "plugin",
                name=PLUGIN_NAME,
                socket_path=PLUGIN_SOCKET,
                # The helper defaults to debug logging, which a daemon in service would not use;
                # SNAPBENCH_PLUGIN_LOG=debug logs every call with its time (bench/buildkit.md).
                extra_args=["--log-level", os.environ.get("SNAPBENCH_PLUGIN_LOG", "info")],
            )
        data_root = mount / ("docker-intree" if spec.label == "btrfs" else "docker")
        dockerd = Dockerd(
            workdir / "dockerd", spec.storage_driver, data_root=data_root, extra_args=dockerd_args
        )
        env = Environment(spec, workdir, mount, dockerd, plugin)
        if plugin is not None:
            plugin.start()
        dockerd.start(timeout=180)  # a minute is not enough in the emulated ZFS lab
        found = dockerd.docker("info", "--format", "{{.Driver}}").stdout.strip()
        if found != spec.storage_driver:
            raise RuntimeError(
                f"dockerd reports storage driver {found!r}, not {spec.storage_driver!r}"
            )
        yield env
    finally:
        with interrupts_deferred():
            if env is not None:
                _teardown(env, log)
            stack.close()
