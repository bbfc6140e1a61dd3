"""Sixteen docker clients hammering one dockerd on snapdriver's btrfs backend (four on ZFS, in
the lab), with a plugin restart in the middle.

Each thread loops ``docker run`` (a container that writes a file), ``docker commit``, ``docker rm``
and ``docker rmi`` of the committed image for ``SNAPDRIVER_LOAD_SECONDS`` (300 by default). Half
way through, the plugin process is restarted under the running dockerd (which sends no new Init).
It is restarted as systemd restarts it behind the socket unit (``systemd/snapdriver.socket``): the
socket stays bound and calls made in the gap wait for the new process. With a bare unix socket
there is a gap in which dockerd's dial fails, and dockerd's retry of a streamed ``ApplyDiff``
(``docker commit``, ``docker pull``) resends a body its first attempt closed ("io: read/write on
closed pipe"): no plugin can make that call succeed. Every docker command must succeed: a failure
is counted and reported with its message, never retried.

Afterwards everything is removed, dockerd and the plugin are stopped, and nothing may be left:
no mount under the data root or the exec root, no subvolume in the plugin's Home nor in
``btrfs subvolume list``, no loop device backed by a file of this run, and no qgroup left stale
(its subvolume gone): quotas are on (``btrfs.enable_quota=true``) and every container is run
with a size limit, so every container layer has a qgroup with a limit.

On ZFS the same scenario is shorter: ``SNAPDRIVER_ZFS_LOAD_SECONDS`` (120 by default) with
:data:`ZFS_THREADS` clients, because the lab guest is one emulated CPU shared by dockerd, the
plugin and every client; the whole module is estimated at about 6 guest minutes there, not
measured yet (dockerd's start and the final clean-up included). Each container's size limit is
a dataset quota, and afterwards no dataset or snapshot may be left below the root dataset
(qgroups and loop devices are btrfs's).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from snapdriver_btrfs.testing import layer_subvolumes, quotas_enabled, stale_qgroups
from snapdriver_zfs.testing import everything_below

from snapdriver.graphdriver.client import PluginCallError
from snapdriver.hostfs import mounts_below
from snapdriver.testing.dockerd import Dockerd
from snapdriver.testing.process import PluginProcess
from tests.conftest import require_dockerd
from tests.storage import Space

pytestmark = [pytest.mark.dockerd, pytest.mark.slow]
# Per run: dockerd finds the plugin by this name in /run/docker/plugins, shared by concurrent runs.
NAME = f"sdload{os.getpid()}"
IMAGE = "bb:load"
THREADS = 16
SECONDS = float(os.environ.get("SNAPDRIVER_LOAD_SECONDS", "300"))
ZFS_THREADS = 4
ZFS_SECONDS = float(os.environ.get("SNAPDRIVER_ZFS_LOAD_SECONDS", "120"))
#: One docker command may wait this long (dockerd queues behind the other fifteen threads).
COMMAND_TIMEOUT = 600.0


def lines(*cmd: str) -> list[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return [line for line in done.stdout.splitlines() if line.strip()]


def targets_below(*roots: Path) -> list[str]:
    return [mount.target for mount in mounts_below(*roots)]


@dataclass
class Tally:
    """Operations done and errors seen, from sixteen threads."""

    ops: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self, op: str) -> None:
        with self.lock:
            self.ops[op] += 1

    def failed(self, op: str, detail: str) -> None:
        with self.lock:
            self.errors.append(f"{time.strftime('%H:%M:%S')} {op}: {detail}")


@dataclass
class Env:
    dockerd: Dockerd
    plugin: PluginProcess
    space: Space
    data_root: Path
    home: Path
    workdir: Path
    loops_before: set[str]
    stale_before: set[str]

    @property
    def btrfs(self) -> bool:
        return self.space.backend == "btrfs"

    @property
    def mount(self) -> Path:
        return Path(self.space.place)

    def leftover_layers(self) -> list[str]:
        """Subvolumes in Home or anywhere below the data root; datasets below the root."""
        if not self.btrfs:
            return everything_below(self.space.place)
        subvolumes = os.listdir(self.home / "subvolumes")
        prefix = f"{self.data_root.name}/{NAME}/"
        listed = [os.path.basename(p) for p in layer_subvolumes(self.mount, prefix)]
        return sorted(set(subvolumes) | set(listed))


@pytest.fixture(scope="module")
def env(
    space: Space, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    require_dockerd(request, space.backend)
    workdir = tmp_path_factory.mktemp("load")
    (workdir / "plugin").mkdir()
    btrfs = space.backend == "btrfs"
    loops_before = set(lines("losetup", "-a"))
    stale_before = stale_qgroups(Path(space.place)) if btrfs else set()
    plugin = PluginProcess(
        space.backend,
        workdir / "plugin",
        space.plugin_args,
        name=NAME,
        socket_path=Path(f"/run/docker/plugins/{NAME}.sock"),
        socket_activated=True,
    )
    data_root = Path(space.place) / "load-docker" if btrfs else workdir / "data"
    # Quotas on: leaked qgroups are what users of Docker's btrfs driver complain about most.
    quota = ["--storage-opt", "btrfs.enable_quota=true"] if btrfs else []
    dockerd = Dockerd(workdir / "dockerd", NAME, data_root=data_root, extra_args=quota)
    plugin.start()
    try:
        dockerd.start(timeout=60 if btrfs else 180)
        dockerd.import_busybox(IMAGE)
        yield Env(
            dockerd, plugin, space, data_root, data_root / NAME, workdir, loops_before, stale_before
        )
    finally:
        dockerd.stop()
        plugin.stop()
        _reclaim(plugin, space.at(data_root / NAME).stored)
        plugin.close()
        if dockerd.exec_root.is_dir() and not targets_below(dockerd.exec_root):
            shutil.rmtree(dockerd.exec_root, ignore_errors=True)  # dockerd leaves it in /run


def _reclaim(plugin: PluginProcess, stored: Callable[[], list[str]]) -> None:
    """After the figures are taken: remove what the run left, so later tiers start clean."""
    if not stored():
        return
    plugin.start()
    try:
        with plugin.client() as client:
            for _ in range(10):  # children before parents: a parent refuses while it has any
                left = stored()
                if not left:
                    break
                for layer in left:
                    with contextlib.suppress(PluginCallError):
                        client.call("GraphDriver.Remove", {"ID": layer})
    finally:
        plugin.stop()


def worker(index: int, dockerd: Dockerd, deadline: float, tally: Tally) -> None:
    """run, commit, rm, rmi until the deadline; a failed step ends that round, unretried."""
    round_ = 0
    while time.monotonic() < deadline:
        container, tag = f"load-{index}-{round_}", f"load/t{index}:{round_}"
        steps = (
            ("run", ("run", "--name", container, "--network", "none", "--storage-opt",
                     "size=256M", IMAGE, "sh", "-c", "echo $RANDOM > /f")),
            ("commit", ("commit", container, tag)),
            ("rm", ("rm", container)),
            ("rmi", ("rmi", tag)),
        )  # fmt: skip
        for op, args in steps:
            try:
                done = dockerd.docker(*args, check=False, timeout=COMMAND_TIMEOUT)
            except subprocess.TimeoutExpired:
                tally.failed(op, f"{container}: no answer in {COMMAND_TIMEOUT:.0f} s")
                break
            except Exception as err:  # a thread must not die silently
                tally.failed(op, f"{container}: the docker CLI could not run: {err!r}")
                break
            if done.returncode != 0:
                tally.failed(op, f"{container}: {done.stderr.strip() or done.stdout.strip()}")
                break
            tally.done(op)
        round_ += 1


def remove_everything(dockerd: Dockerd) -> list[str]:
    """Remove every container and image (children before parents); what could not be removed."""
    containers = dockerd.docker("ps", "-aq").stdout.split()
    if containers:
        dockerd.docker("rm", "-f", *containers, check=False)
    for _ in range(10):  # an image with dependent children is refused: go round again
        images = sorted(set(dockerd.docker("images", "-aq").stdout.split()))
        if not images:
            break
        for image in images:
            dockerd.docker("rmi", "-f", image, check=False)
    dockerd.docker("image", "prune", "-a", "-f", check=False)
    left = dockerd.docker("ps", "-aq").stdout.split()
    left += dockerd.docker("images", "-aq").stdout.split()
    return left


def test_sixteen_clients_with_a_plugin_restart(env: Env, figure: Callable[[str], None]) -> None:
    tally = Tally()
    threads_n, seconds = (THREADS, SECONDS) if env.btrfs else (ZFS_THREADS, ZFS_SECONDS)
    start = time.monotonic()
    deadline = start + seconds
    threads = [
        threading.Thread(
            target=worker, args=(i, env.dockerd, deadline, tally), name=f"load-{i}", daemon=True
        )
        for i in range(threads_n)
    ]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, start + seconds / 2 - time.monotonic()))
    restarted_at = time.monotonic() - start
    env.plugin.restart()  # dockerd sends no new Activate or Init
    restart_took = time.monotonic() - start - restarted_at
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start

    not_removed = remove_everything(env.dockerd)
    env.dockerd.stop()
    env.plugin.stop()

    mounts = targets_below(env.data_root, env.dockerd.exec_root)
    leftover = env.leftover_layers()
    # Only loop devices backed by files of this run count: other sessions may be making theirs.
    ours = (str(env.workdir), str(env.data_root))
    loops = sorted(
        line
        for line in set(lines("losetup", "-a")) - env.loops_before
        if any(path in line for path in ours)
    )
    quota_on = quotas_enabled(env.mount) if env.btrfs else True
    stale = sorted(stale_qgroups(env.mount) - env.stale_before) if env.btrfs else []
    ops = sum(tally.ops.values())
    kind = "subvolumes" if env.btrfs else "datasets"
    figure(
        f"LOAD ({env.space.backend}): {ops} ops in {elapsed:.0f} s, {len(tally.errors)} errors, "
        f"leftovers: mounts={len(mounts)} {kind}={len(leftover)}"
        + (f" qgroups={len(stale)}" if env.btrfs else "")
        + ("" if quota_on else " (quotas are off on this filesystem)")
    )
    figure(
        f"LOAD detail ({env.space.backend}): {threads_n} threads, ops {dict(tally.ops)}, plugin "
        f"restarted at {restarted_at:.0f} s (took {restart_took:.1f} s), loop devices="
        f"{len(loops)}, left by docker={len(not_removed)}"
    )
    for error in tally.errors[:20]:
        figure(f"LOAD error: {error}")
    for name in leftover[:20]:
        figure(f"LOAD leftover {kind[:-1]}: {name}")
    for name in stale[:20]:
        figure(f"LOAD stale qgroup: {name}")
    assert tally.ops["run"] > 0 and tally.ops["rmi"] > 0, "no round completed"
    assert not_removed == [], f"docker could not remove {not_removed}"
    assert not tally.errors, f"{len(tally.errors)} docker commands failed: {tally.errors[:5]}"
    assert mounts == [], mounts
    assert leftover == [], f"{kind} left for {env.home}: {leftover}"
    assert loops == [], loops
    assert quota_on, "dockerd's btrfs.enable_quota=true did not turn quotas on"
    assert stale == [], f"qgroups left stale: {stale[:10]}"
