"""``snapdriver doctor``: check a host for what would stop snapdriver, and say what to do.

Each check is one function taking a :class:`Host` and returning one
:class:`~snapdriver.hookspec.Finding`; the backend adds its own through ``snapdriver_doctor``. A
check that depends on something another check found missing (the orphan sweep needs the plugin's
socket) reports SKIP rather than a second problem. Exit status 1 if any check is WARN or FAIL.
"""

from __future__ import annotations

import argparse
import grp
import importlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from snapdriver import config
from snapdriver.errors import BackendLoadError, ConfigError, SnapdriverError
from snapdriver.graphdriver.client import PluginClient, unix_path
from snapdriver.graphdriver.driver import DEFAULT_ORPHAN_AGE, INIT_NAME, InitRecord
from snapdriver.graphdriver.serve import PLUGIN_DIR
from snapdriver.hookspec import PROBLEMS, BackendConfig, Finding, Level
from snapdriver.hostfs import Mount, is_below, mount_of, mounts, nearest_existing
from snapdriver.plugins import Backend

#: The filesystem type each built-in backend needs its Home on.
FSTYPES = {"btrfs": "btrfs", "zfs": "zfs"}
DOCKER_DATA_ROOT = Path("/var/lib/docker")
CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
DAEMON_JSON = Path("/etc/docker/daemon.json")
DEFAULT_MIN_FREE = 10.0  # percent of the data root's filesystem
#: ``--userns-remap=default`` names this user and group (dockerd makes them at its start).
DEFAULT_REMAP_USER = "dockremap"


@dataclass
class Host:
    """What to check and where to look (the paths are parameters so tests can point elsewhere)."""

    backend: str
    name: str = "snapdriver"
    front: str = "graphdriver"
    data_root: Path | None = None
    listen: str | None = None
    state_dir: Path | None = None
    storage_opts: list[str] = field(default_factory=list)
    min_free: float = DEFAULT_MIN_FREE
    containerd_config: Path = CONTAINERD_CONFIG
    daemon_json: Path = DAEMON_JSON
    proc: Path = Path("/proc")
    etc: Path = Path("/etc")
    dev: Path = Path("/dev")
    sys_module: Path = Path("/sys/module")
    orphan_age: float = DEFAULT_ORPHAN_AGE
    dockerd_pid: int | None = None
    timeout: float = 10.0
    #: The command line and config file as the daemon would parse them, with the backend's flags.
    backend_args: argparse.Namespace = field(default_factory=argparse.Namespace)
    _dockerd: list[Dockerd] | None = None

    @property
    def address(self) -> str:
        if self.listen:
            return self.listen
        if self.front == "containerd":
            return "unix:///run/snapdriver/containerd.sock"
        return f"unix://{PLUGIN_DIR / self.name}.sock"

    @property
    def home(self) -> Path:
        """Where the layers live: Docker's ``<data-root>/<name>``, or containerd's ``--root``."""
        if self.front == "containerd":
            return self.data_root or Path("/var/lib/snapdriver/containerd")
        base = self.data_root or self.dockerd_data_root()
        remapped = self.remapped_root()
        # Under userns-remap dockerd keeps everything in <data-root>/<uid>.<gid>/.
        return (base / f"{remapped[0]}.{remapped[1]}" if remapped else base) / self.name

    def remapped_root(self) -> tuple[int, int] | None:
        """The host UID and GID of containers' root under dockerd's userns-remap, if any."""
        setting = self.dockerd_settings().userns_remap
        if not setting:
            return None
        user, group = remap_names(setting)
        uid, gid = subid_start(self.etc / "subuid", user), subid_start(self.etc / "subgid", group)
        return (uid, gid) if uid is not None and gid is not None else None

    @property
    def state(self) -> Path:
        return self.state_dir or Path("/var/lib/snapdriver") / self.name

    def dockerds(self) -> list[Dockerd]:
        if self._dockerd is None:
            found = find_dockerd(self.proc)
            self._dockerd = [d for d in found if self.dockerd_pid in (None, d.pid)]
        return self._dockerd

    def dockerd_settings(self) -> DockerdSettings:
        running = self.dockerds()
        return DockerdSettings.of(running[0] if running else None, self.daemon_json)

    def dockerd_data_root(self) -> Path:
        return self.dockerd_settings().data_root or DOCKER_DATA_ROOT


# -- dockerd: its processes and its settings -------------------------------------------------------


@dataclass(frozen=True)
class Dockerd:
    pid: int
    argv: list[str]
    exe: str
    environ: dict[str, str]


def find_dockerd(proc: Path) -> Iterator[Dockerd]:
    """Every process whose argv[0] is ``dockerd`` (by base name), as /proc shows it."""
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            if Path(argv[0].decode(errors="replace")).name != "dockerd":
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
            exe = os.readlink(entry / "exe")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        env = dict(e.decode(errors="replace").partition("=")[::2] for e in environ if b"=" in e)
        yield Dockerd(int(entry.name), [a.decode(errors="replace") for a in argv], exe, env)


def flag_values(argv: Sequence[str], *names: str) -> list[str]:
    """Values of ``--flag VALUE``, ``--flag=VALUE`` and ``-s VALUE`` forms in ``argv``."""
    found = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in names and eq:
            found.append(value)
        elif arg in names and i + 1 < len(argv):
            found.append(argv[i + 1])
    return found


@dataclass(frozen=True)
class DockerdSettings:
    """What dockerd runs with: its command line over its ``daemon.json``."""

    source: str
    experimental: bool
    storage_driver: str | None
    data_root: Path | None
    storage_opts: list[str]
    userns_remap: str | None = None

    @classmethod
    def of(cls, dockerd: Dockerd | None, default_json: Path) -> DockerdSettings:
        argv = dockerd.argv if dockerd else []
        path = Path((flag_values(argv, "--config-file") or [str(default_json)])[-1])
        data = read_daemon_json(path)
        driver = _last(flag_values(argv, "--storage-driver", "-s"), data.get("storage-driver"))
        root = _last(flag_values(argv, "--data-root", "-g", "--graph"), data.get("data-root"))
        opts = flag_values(argv, "--storage-opt") or list(data.get("storage-opts") or [])
        named = f"{path}{'' if path.exists() else ' (absent)'}"
        source = f"dockerd pid {dockerd.pid} and {named}" if dockerd else named
        experimental = "--experimental" in argv or "--experimental=true" in argv
        return cls(
            source,
            experimental or data.get("experimental") is True,
            driver,
            Path(root) if root else None,
            [str(o) for o in opts],
            _last(flag_values(argv, "--userns-remap"), data.get("userns-remap")) or None,
        )


def _last(given: list[str], fallback: object) -> str | None:
    """The last of a repeated flag (dockerd's rule), else the daemon.json value."""
    if given:
        return given[-1]
    return str(fallback) if fallback is not None else None


def remap_names(setting: str) -> tuple[str, str]:
    """The user and group of ``--userns-remap`` (``USER[:GROUP]``; ``default``: dockremap)."""
    user, _, group = setting.partition(":")
    if user == "default":
        return DEFAULT_REMAP_USER, DEFAULT_REMAP_USER
    return user, group or user


def subid_start(path: Path, name: str) -> int | None:
    """The lowest start of ``name``'s ranges in /etc/subuid or /etc/subgid: what container
    root maps to, since dockerd sorts the ranges before it lays them out."""
    starts = []
    number = _id_of(name, user=path.name == "subuid")
    with_id = {name} if number is None else {name, str(number)}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in with_id and fields[1].isdigit():
            starts.append(int(fields[1]))
    return min(starts, default=None)


def _id_of(name: str, user: bool) -> int | None:
    """A user's or group's numeric ID (subid files may name either), None if unknown."""
    try:
        return pwd.getpwnam(name).pw_uid if user else grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def read_daemon_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: dockerd's own check says which, at its start
    return data if isinstance(data, dict) else {}


# -- the checks ------------------------------------------------------------------------------------


def check_kernel(host: Host) -> Finding:
    """The kernel can mount the backend's filesystem."""
    name = "kernel support"
    if host.backend == "btrfs":
        filesystems = (host.proc / "filesystems").read_text().split()
        if "btrfs" in filesystems:
            return Finding(name, "OK", "btrfs is in /proc/filesystems")
        return Finding(name, "FAIL", "btrfs is not in /proc/filesystems", "modprobe btrfs")
    if host.backend == "zfs":
        missing = [str(p) for p in (host.dev / "zfs", host.sys_module / "zfs") if not p.exists()]
        if not missing:
            return Finding(name, "OK", "/dev/zfs and the zfs module are present")
        return Finding(
            name,
            "FAIL",
            f"the zfs module is not loaded ({', '.join(missing)} missing)",
            "apt-get install zfs-dkms zfsutils-linux && modprobe zfs",
        )
    return Finding(name, "SKIP", f"nothing known to check for backend {host.backend!r}")


def check_filesystem(host: Host) -> Finding:
    """The backend's Home is (or will be made) on the filesystem the backend needs."""
    name = "data root filesystem"
    want = FSTYPES.get(host.backend)
    if want is None:
        return Finding(name, "SKIP", f"backend {host.backend!r} names no filesystem")
    mount = mount_of(host.home)
    where = f"{host.home} is on {mount.fstype} ({mount.target})"
    if mount.fstype == want:
        data_root = host.data_root or host.dockerd_data_root()
        if host.front == "graphdriver" and _inside_a_plain_directory(mount, data_root):
            return Finding(
                name,
                "WARN",
                f"{where}, inside the data root {data_root}, which is not a mount point",
                f"make {data_root} a mount point (its own volume, or mount --bind it onto "
                f"itself) before mounting {want} inside it: dockerd bind-mounts a data root "
                "that is not one onto itself at start, which hides what is mounted inside",
            )
        return Finding(name, "OK", where)
    hidden = _hidden_mount(host.home, want, mount)
    if hidden is not None:
        return Finding(
            name,
            "FAIL",
            f"{where}: the {want} mounted at {hidden.target} is hidden by a later mount",
            f"make {mount.target} a mount point before mounting {want} inside it (dockerd "
            "bind-mounts a data root that is not one onto itself at start)",
        )
    move = (
        "dockerd --data-root DIR (in daemon.json: data-root)"
        if host.front == "graphdriver"
        else "snapdriver containerd --root DIR"
    )
    return Finding(name, "FAIL", f"{where}, not {want}", f"put it on {want}: {move}")


def _inside_a_plain_directory(mount: Mount, data_root: Path) -> bool:
    """``mount`` is mounted below ``data_root``, and ``data_root`` is not a mount point."""
    root = os.path.realpath(data_root)
    if mount.target == root or not is_below(mount.target, root):
        return False
    return all(m.target != root for m in mounts())


def _hidden_mount(home: Path, fstype: str, reached: Mount) -> Mount | None:
    """A ``fstype`` mount at ``home`` or above it, below the ``reached`` one's mount point, that
    a lookup of ``home`` no longer reaches (one above that point is merely mounted over)."""
    real = os.path.realpath(nearest_existing(home))
    return next(
        (
            m
            for m in mounts()
            if m.fstype == fstype
            and is_below(real, m.target)
            and is_below(m.target, reached.target)
            and m.target != reached.target
        ),
        None,
    )


def _command_version(*cmd: str) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else None


def check_tools(host: Host) -> Finding:
    """The backend's command-line tools are installed (btrfs-progs, zfsutils)."""
    name = "tools"
    if host.backend == "btrfs":
        found = _command_version("btrfs", "--version")
        fix = "apt-get install btrfs-progs"
    elif host.backend == "zfs":
        found = _command_version("zfs", "version")
        fix = "apt-get install zfsutils-linux"
    else:
        return Finding(name, "SKIP", f"nothing known to check for backend {host.backend!r}")
    if found is None:
        return Finding(name, "FAIL", f"the {host.backend} command does not run", fix)
    return Finding(name, "OK", found)


def check_library(host: Host) -> Finding:
    """The Python binding the backend uses imports (btrfsutil; libzfs_core, optional)."""
    name = "library"
    level: Level = "FAIL"  # but libzfs_core is optional: the zfs command does all it does
    if host.backend == "btrfs":
        module, fix = "btrfsutil", "pip install 'snapdriver[btrfs]' (libbtrfsutil)"
    elif host.backend == "zfs":
        module, level, fix = "libzfs_core", "WARN", "apt-get install python3-pyzfs (faster calls)"
    else:
        return Finding(name, "SKIP", f"nothing known to check for backend {host.backend!r}")
    try:
        importlib.import_module(module)
    except Exception as err:  # an ImportError, or a binding that fails against its C library
        return Finding(name, level, f"import {module} fails: {err}", fix)
    return Finding(name, "OK", f"{module} {_dist_version(module)}")


def _dist_version(module: str) -> str:
    for dist in (module, "pyzfs"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "(version unknown)"


def storage_options(host: Host) -> list[str]:
    """``KEY=VALUE`` storage options from the command line and (graphdriver) dockerd's."""
    opts = [*host.storage_opts]
    if host.front == "graphdriver":
        opts += host.dockerd_settings().storage_opts
    return opts


def size_options(host: Host) -> list[str]:
    """The storage options that ask for a size limit."""
    return [o for o in storage_options(host) if o.partition("=")[0].split(".")[-1] == "size"]


def check_quota(host: Host) -> Finding:
    """A configured size limit can be enforced (btrfs: quotas are on, or may be switched on)."""
    name = "quota"
    if host.backend != "btrfs":
        return Finding(name, "SKIP", f"not checked for backend {host.backend!r}")
    sizes = size_options(host)
    if not sizes:
        return Finding(name, "OK", "no size limit configured")
    from snapdriver_btrfs import ioctl

    root = nearest_existing(host.home)
    try:
        enabled = ioctl.quota_enabled(root)
    except OSError as err:
        return Finding(name, "SKIP", f"cannot read the quota state of {root}: {err}")
    if enabled:
        return Finding(name, "OK", f"{', '.join(sizes)} configured; quotas are on at {root}")
    opts = storage_options(host)
    if any(o.replace(" ", "") == "btrfs.enable_quota=true" for o in opts):
        return Finding(name, "OK", f"{', '.join(sizes)}: quotas will be switched on (enable_quota)")
    return Finding(
        name,
        "FAIL",
        f"{', '.join(sizes)} configured but btrfs quotas are off at {root}",
        f"btrfs quota enable {root} (or --storage-opt btrfs.enable_quota=true)",
    )


def check_free_space(host: Host) -> Finding:
    """The data root's filesystem has more than ``min_free`` percent free."""
    name = "free space"
    root = nearest_existing(host.home)
    stat = os.statvfs(root)
    free, total = stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize
    percent = 100.0 * free / total if total else 0.0
    detail = f"{_size(free)} of {_size(total)} free ({percent:.1f} %) at {root}"
    if percent >= host.min_free:
        return Finding(name, "OK", detail)
    return Finding(
        name,
        "WARN",
        f"{detail}, below {host.min_free:g} %",
        "free space: docker system prune, or grow the filesystem",
    )


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{count} B"
        value /= 1024
    raise AssertionError("unreachable")


_DOCKER_VERSION = re.compile(r"Docker version (\d+)\.(\d+)\.(\S+?),")


def check_dockerd_version(host: Host) -> Finding:
    """dockerd runs and its version still loads graphdriver plugins."""
    name = "dockerd version"
    running = host.dockerds()
    if not running:
        return Finding(
            name, "WARN", "no dockerd is running", "start dockerd (systemctl start docker)"
        )
    dockerd = running[0]
    found = _command_version(dockerd.exe, "--version") or ""
    match = _DOCKER_VERSION.search(found)
    if not match:
        return Finding(
            name,
            "WARN",
            f"dockerd pid {dockerd.pid} ({dockerd.exe}) does not tell its version: {found!r}",
            "check which program runs as dockerd",
        )
    return _judge_version(name, int(match[1]), found, dockerd.environ)


def _judge_version(name: str, major: int, found: str, environ: dict[str, str]) -> Finding:
    if major < 20:
        return Finding(name, "WARN", f"{found}: older than 20.10, untested", "use Docker 20.10-26")
    if major >= 28:
        return Finding(
            name,
            "FAIL",
            f"{found}: Docker 28 removed graphdriver plugins",
            "use Docker 20.10-27, or the containerd front (snapdriver containerd)",
        )
    if major == 27 and environ.get("DOCKERD_DEPRECATED_GRAPHDRIVER_PLUGINS") != "1":
        return Finding(
            name,
            "FAIL",
            f"{found}: Docker 27 loads graphdriver plugins only when asked",
            "set DOCKERD_DEPRECATED_GRAPHDRIVER_PLUGINS=1 in dockerd's environment",
        )
    return Finding(name, "OK", found)


def check_dockerd_experimental(host: Host) -> Finding:
    """dockerd runs with ``--experimental`` (graphdriver plugins need it)."""
    name = "dockerd experimental"
    settings = host.dockerd_settings()
    if settings.experimental:
        return Finding(name, "OK", f"experimental is on ({settings.source})")
    return Finding(
        name,
        "FAIL",
        f"experimental is off ({settings.source})",
        f'dockerd --experimental, or "experimental": true in {host.daemon_json}',
    )


def check_dockerd_driver(host: Host) -> Finding:
    """dockerd names this plugin as its storage driver."""
    name = "dockerd storage driver"
    settings = host.dockerd_settings()
    driver = settings.storage_driver
    if driver is not None and (driver == host.name or driver.split(":")[0] == host.name):
        return Finding(name, "OK", f"{driver} ({settings.source})")
    said = f"storage driver is {driver}" if driver else "no storage driver is set"
    return Finding(
        name,
        "FAIL",
        f"{said} ({settings.source}), not {host.name}",
        f'dockerd --storage-driver {host.name}, or "storage-driver": "{host.name}" '
        f"in {host.daemon_json}",
    )


def check_socket(host: Host) -> Finding:
    """The plugin answers on its socket (graphdriver: Plugin.Activate; containerd: a Stat)."""
    name = "plugin socket"
    unit = (
        "snapdriver containerd"
        if host.front == "containerd"
        else "systemctl start snapdriver.socket"
    )
    start = f"start snapdriver ({unit}), or check --listen ({host.address})"
    try:
        if host.front == "containerd":
            return _probe_snapshotter(host, start)
        with PluginClient(host.address, timeout=host.timeout) as client:
            reply = client.call("Plugin.Activate")
    except (OSError, ValueError, SnapdriverError) as err:
        return Finding(name, "FAIL", f"nothing answers at {host.address}: {err}", start)
    if "GraphDriver" not in reply.get("Implements", []):
        return Finding(name, "FAIL", f"{host.address} is not a graphdriver: {reply}", start)
    return Finding(name, "OK", f"{host.address} answers Plugin.Activate")


def check_userns_remap(host: Host) -> Finding:
    """dockerd's userns-remap has subordinate IDs, and matches the maps of the recorded Init."""
    name = "userns-remap"
    setting = host.dockerd_settings().userns_remap
    try:
        record = InitRecord.load(host.state)
    except ConfigError:
        record = None  # the Init record check reports it
    recorded = record.idmap.root if record and record.idmap else None
    if not setting:
        if recorded is None:
            return Finding(name, "OK", "dockerd does not remap user namespaces")
        return Finding(
            name,
            "WARN",
            f"the recorded Init remapped root to {_pair(recorded)}, dockerd does not remap now: "
            f"its layers in {record and record.home} are not the ones dockerd will use",
            "start dockerd with the --userns-remap it had, or accept a new, empty layer store",
        )
    return _judge_remap(host, setting, recorded)


def _judge_remap(host: Host, setting: str, recorded: tuple[int, int] | None) -> Finding:
    name, (user, group) = "userns-remap", remap_names(setting)
    root = host.remapped_root()
    if root is None:
        if setting.partition(":")[0] == "default":
            return Finding(
                name, "OK", f"--userns-remap=default: dockerd adds {user}'s IDs at start"
            )
        return Finding(
            name,
            "FAIL",
            f"--userns-remap={setting}: no range for {user} in {host.etc / 'subuid'} "
            f"or for {group} in {host.etc / 'subgid'}",
            f"add {user}:100000:65536 to {host.etc / 'subuid'} and {group}:100000:65536 to "
            f"{host.etc / 'subgid'}, then restart dockerd",
        )
    where = f"root is {_pair(root)}, layers in {host.home}"
    if recorded is not None and recorded != root:
        return Finding(
            name,
            "WARN",
            f"{where}, but the recorded Init remapped root to {_pair(recorded)}",
            "dockerd will send Init for the new Home; the old Home's layers stay until removed",
        )
    return Finding(name, "OK", f"--userns-remap={setting}: {where}")


def _pair(ids: tuple[int, int]) -> str:
    return f"{ids[0]}:{ids[1]}"


def _probe_snapshotter(host: Host, start: str) -> Finding:
    """A Stat of a key nobody made: a snapshotter answers NOT_FOUND, anything else is wrong."""
    import grpc  # only the containerd front's checks need gRPC

    from snapdriver.containerd.proto import snapshots_pb2 as pb
    from snapdriver.containerd.service import SERVICE

    name, probe = "plugin socket", f"snapdriver-doctor-{os.getpid()}"
    unix_path(host.address)  # ValueError for an address that is not unix://
    with grpc.insecure_channel(host.address) as channel:
        stat = channel.unary_unary(
            f"/{SERVICE}/Stat",
            request_serializer=pb.StatSnapshotRequest.SerializeToString,
            response_deserializer=pb.StatSnapshotResponse.FromString,
        )
        try:
            stat(pb.StatSnapshotRequest(snapshotter=host.name, key=probe), timeout=host.timeout)
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.NOT_FOUND:
                return Finding(name, "OK", f"{host.address} answers the snapshots API")
            if code == grpc.StatusCode.UNAVAILABLE:
                detail = f"nothing answers at {host.address}: {err.details()}"
                return Finding(name, "FAIL", detail, start)
            detail = f"{host.address} answered Stat with {code.name}: {err.details()}"
            return Finding(name, "FAIL", detail, start)
    return Finding(name, "FAIL", f"{host.address} says a snapshot {probe!r} exists", start)


def check_init_record(host: Host) -> Finding:
    """The recorded Init (graphdriver front) names a Home that exists on the right filesystem."""
    name = "Init record"
    path = host.state / INIT_NAME
    fix = f"rm {path} and restart dockerd (it sends Init again)"
    try:
        record = InitRecord.load(host.state)
    except ConfigError as err:
        return Finding(name, "FAIL", str(err), fix)
    if record is None:
        return Finding(name, "OK", f"no Init recorded at {path} yet")
    if not record.home.is_dir():
        return Finding(name, "FAIL", f"{path} names Home {record.home}, which is gone", fix)
    want, fstype = FSTYPES.get(host.backend), mount_of(record.home).fstype
    if want and fstype != want:
        detail = f"{path} names Home {record.home}, on {fstype}, not {want}"
        return Finding(name, "FAIL", detail, fix)
    return Finding(name, "OK", f"Home {record.home} ({fstype})")


def check_orphans(host: Host) -> Finding:
    """The running plugin holds no orphan layers (a dry-run sweep)."""
    name = "orphan layers"
    try:
        with PluginClient(host.address, timeout=host.timeout) as client:
            reply = client.call("Snapdriver.Sweep", {"DryRun": True, "MinAge": host.orphan_age})
    except (OSError, ValueError, SnapdriverError) as err:
        return Finding(name, "SKIP", f"not checked, the plugin does not answer ({err})")
    orphans = reply.get("Removed") or []
    if not orphans:
        return Finding(name, "OK", "none")
    return Finding(
        name,
        "WARN",
        f"{len(orphans)} orphan layer(s): {', '.join(orphans[:3])}{' ...' * (len(orphans) > 3)}",
        f"snapdriver sweep --name {host.name}" + (f" --listen {host.listen}" * bool(host.listen)),
    )


def check_containerd_config(host: Host) -> Finding:
    """containerd's config names this snapshotter in ``[proxy_plugins]`` at its socket."""
    name = "containerd proxy_plugins"
    path, socket_path = host.containerd_config, unix_path(host.address)
    snippet = (
        f'add to {path}: [proxy_plugins.{host.name}] type = "snapshot" '
        f'address = "{socket_path}", then systemctl restart containerd'
    )
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return Finding(name, "FAIL", f"{path} does not exist", snippet)
    except (OSError, tomllib.TOMLDecodeError) as err:
        return Finding(name, "FAIL", f"{path} is unreadable: {err}", f"fix {path}")
    entry = data.get("proxy_plugins", {}).get(host.name)
    if not isinstance(entry, dict):
        return Finding(name, "FAIL", f"{path} has no [proxy_plugins.{host.name}]", snippet)
    if entry.get("type") != "snapshot" or entry.get("address") != socket_path:
        said = f"type {entry.get('type')!r}, address {entry.get('address')!r}"
        return Finding(name, "FAIL", f"[proxy_plugins.{host.name}] has {said}", snippet)
    return Finding(name, "OK", f"[proxy_plugins.{host.name}] at {socket_path} in {path}")


def check_backend(host: Host) -> list[Finding]:
    """What the backend itself checks (``snapdriver_doctor``), with the settings it would get."""
    try:
        backend = Backend.load(host.backend)
    except BackendLoadError as err:
        return [Finding("backend", "FAIL", str(err), "see the library check above")]
    options = dict(o.partition("=")[::2] for o in storage_options(host))
    return backend.doctor(BackendConfig(host.home, options, host.backend_args))


Check = Callable[[Host], Finding | list[Finding]]
COMMON: list[Check] = [
    check_kernel,
    check_filesystem,
    check_tools,
    check_library,
    check_quota,
    check_free_space,
    check_backend,
]
FRONT_CHECKS: dict[str, list[Check]] = {
    "graphdriver": [
        check_dockerd_version,
        check_dockerd_experimental,
        check_dockerd_driver,
        check_socket,
        check_userns_remap,
        check_init_record,
        check_orphans,
    ],
    "containerd": [check_socket, check_containerd_config],
}


def run_checks(host: Host) -> list[Finding]:
    """Every check for the host's front; a check that crashes is reported, not raised."""
    results: list[Finding] = []
    for check in COMMON + FRONT_CHECKS[host.front]:
        try:
            found = check(host)
            results += found if isinstance(found, list) else [found]
        except Exception as err:  # a broken check must not hide the others' findings
            name = check.__name__.removeprefix("check_").replace("_", " ")
            results.append(Finding(name, "FAIL", f"the check itself failed: {err!r}"))
    return results


# -- the command -----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(
        prog="snapdriver doctor",
        description="Check this host for what snapdriver needs; print a fix for each problem. "
        "Exit status 1 if any check is WARN or FAIL.",
    )
    found.add_argument("--front", choices=sorted(FRONT_CHECKS), default="graphdriver")
    found.add_argument("--backend", help="storage backend (default: from the config file)")
    found.add_argument("--name", default="snapdriver", help="plugin name (default: snapdriver)")
    found.add_argument("--data-root", type=Path, help="dockerd's data root (default: dockerd's)")
    found.add_argument("--root", type=Path, help="containerd front: where snapshots are kept")
    found.add_argument("--listen", help="the plugin's address (default: its unix socket)")
    found.add_argument("--state-dir", type=Path, help="default: /var/lib/snapdriver/NAME")
    found.add_argument("--storage-opt", action="append", default=[], help="KEY=VALUE, repeatable")
    found.add_argument("--min-free", type=float, default=DEFAULT_MIN_FREE, help="percent")
    found.add_argument(
        "--orphan-age",
        type=float,
        default=DEFAULT_ORPHAN_AGE,
        help="count unreferenced layers older than this many seconds (default: %(default)s)",
    )
    found.add_argument("--dockerd-pid", type=int, help="the dockerd to check (default: any)")
    found.add_argument("--containerd-config", type=Path, default=CONTAINERD_CONFIG)
    found.add_argument("--daemon-json", type=Path, default=DAEMON_JSON)
    config.add_config_flag(found)
    return found


def host_from_argv(argv: Sequence[str]) -> Host:
    """The host to check: flags over environment over the config file's settings of the front."""
    flags = parser()
    front = flags.parse_known_args(argv)[0].front
    file, args = config.early(flags, argv, front)
    if not args.backend:
        raise ConfigError("--backend is required (or backend in the config file)")
    try:
        backend = Backend.load(args.backend)
    except BackendLoadError:
        pass  # the library and backend checks say why; its own flags are not known then
    else:
        args = config.with_backend(flags, argv, file, front, backend).args
    return Host(
        backend=args.backend,
        name=args.name,
        front=front,
        data_root=args.root if front == "containerd" else args.data_root,
        listen=args.listen,
        state_dir=args.state_dir,
        storage_opts=list(args.storage_opt),
        min_free=args.min_free,
        orphan_age=args.orphan_age,
        dockerd_pid=args.dockerd_pid,
        containerd_config=args.containerd_config,
        daemon_json=args.daemon_json,
        backend_args=args,
    )


def main(argv: Sequence[str]) -> int:
    try:
        host = host_from_argv(argv)
    except ConfigError as err:
        print(f"snapdriver doctor: error: {err}", file=sys.stderr)
        return 2
    results = run_checks(host)
    for result in results:
        print(result.line())
    problems = sum(r.level in PROBLEMS for r in results)
    print(f"{problems} problem(s)" if problems else "no problems found")
    return 1 if problems else 0
