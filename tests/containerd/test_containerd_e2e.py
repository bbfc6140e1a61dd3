"""A real containerd 1.6 with snapdriver's containerd front as its proxy snapshotter, driven by ctr.

The scenario follows what a user of ``ctr`` (or nerdctl, or Docker on the containerd image store)
does: import an image, run containers, restart the front and containerd under a running container,
work in two namespaces, remove images and let containerd's garbage collector reclaim every
snapshot, and run the graphdriver front beside it on the same host without either touching the
other's layers. The tests run in file order and share one containerd and one front.

The same scenario runs first against a control, containerd's own native snapshotter served by a
small Go program (tests/containerd/suite/refserver): a step that fails there is the test's fault.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from snapdriver_btrfs.testing import subvolume_paths

from snapdriver.hostfs import mounts_below
from snapdriver.testing import gosuite
from snapdriver.testing.conformance import Plugin
from snapdriver.testing.containerd import (
    ADDED,
    DOOMED,
    KEPT,
    RUN_ROOT,
    Containerd,
    ContainerdFront,
    busybox_image_layers,
    layer_tar,
    oci_image_tar,
)
from snapdriver.testing.dockerd import BUSYBOX
from snapdriver.testing.process import PluginProcess

pytestmark = [pytest.mark.containerd, pytest.mark.slow]
SNAPSHOTTER = "snapdriver"
IMAGE = "docker.io/snapdriver/busybox:e2e"
MARKER = b"snapdriver containerd e2e"
# Per run: runc keeps its state by namespace and container ID under /run/containerd/runc.
NS_A, NS_B = f"sd{os.getpid()}a", f"sd{os.getpid()}b"
LAYERS = 3
GC_TIMEOUT = 120.0
REFSERVER = Path(__file__).parent / "suite" / "refserver"


@dataclass
class Env:
    containerd: Containerd
    front: ContainerdFront
    mnt: Path
    image_tar: Path
    control: bool = False
    #: What the front keeps below its root with no snapshot at all (set once it has started).
    baseline: list[str] = field(default_factory=list)

    def ctr(self, *args: str, ns: str = NS_A, check: bool = True) -> str:
        try:
            return self.containerd.ctr(*args, namespace=ns, check=check).stdout
        except RuntimeError as err:
            raise AssertionError(f"{err}\n{self.logs()}") from None

    def run(self, container: str, script: str, ns: str = NS_A) -> list[str]:
        """``ctr run --rm``: the container's output lines."""
        args = ("--snapshotter", SNAPSHOTTER, IMAGE, container, "sh", "-c", script)
        return self.output(("run",), ("--rm", *args), ns=ns)

    def exec(self, task: str, exec_id: str, script: str) -> list[str]:
        """``ctr tasks exec`` in ``task``: the process's output lines."""
        return self.output(("tasks", "exec"), ("--exec-id", exec_id, task, "sh", "-c", script))

    def output(self, verb: tuple[str, ...], args: tuple[str, ...], ns: str = NS_A) -> list[str]:
        """The output of a ``ctr run`` or ``tasks exec`` as the shim wrote it to a file: ctr's
        own copy through its FIFOs of a short-lived process's output came back empty under load
        (2 in 8 runs)."""
        log = self.mnt / f"ctr-out-{uuid.uuid4().hex[:8]}.log"
        try:
            self.ctr(*verb, "--log-uri", f"file://{log}", *args, ns=ns)
            return log.read_text().splitlines()
        finally:
            log.unlink(missing_ok=True)

    def snapshots(self, ns: str = NS_A) -> dict[str, str]:
        """containerd's view: key -> kind, for this namespace and the front."""
        lines = self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", ns=ns).splitlines()[1:]
        return {line.split()[0]: line.split()[-1] for line in lines if line.strip()}

    def front_subvolumes(self) -> list[str]:
        """The front's truth on disk: subvolumes below its root (its layers, and whatever fixed
        subvolumes it keeps, which ``baseline`` records); the control's snapshot dirs."""
        if self.control:
            native = self.front.root / "snapshots"
            return sorted(str(path) for path in native.iterdir()) if native.exists() else []
        below = str(self.front.root.relative_to(self.mnt)) + "/"
        return sorted(p for p in subvolume_paths(self.mnt).values() if p.startswith(below))

    def front_mounts(self) -> list[str]:
        return mounts_under(self.front.root)

    def wait_for_front_subvolumes(self, count: int) -> list[str]:
        """containerd removes snapshots in its garbage collector, after the call that freed them."""
        deadline = time.monotonic() + GC_TIMEOUT
        found = self.front_subvolumes()
        while len(found) != count and time.monotonic() < deadline:
            # A Remove that failed (a rootfs the shim was still unmounting), or one asked for
            # while a collection was sweeping, waits for the next collection: ask for it.
            self.containerd.collect()
            time.sleep(0.2)
            found = self.front_subvolumes()
        return found

    def wait_for_the_front(self, timeout: float = 60.0) -> None:
        """containerd redials a restarted proxy snapshotter after a backoff of up to seconds;
        until then its calls to it fail UNAVAILABLE ("Error while dialing ... timeout")."""
        deadline = time.monotonic() + timeout
        args = ("snapshots", "--snapshotter", SNAPSHOTTER, "ls")
        while (done := self.containerd.ctr(*args, namespace=NS_A, check=False)).returncode:
            if time.monotonic() > deadline:
                raise AssertionError(f"containerd did not reach the front: {done.stderr}")
            time.sleep(0.5)

    def logs(self) -> str:
        listings = [
            f"--- ctr -n {ns} {' '.join(args)} ---\n"
            + self.containerd.ctr(*args, namespace=ns, check=False).stdout
            for ns in (NS_A, NS_B)
            for args in (
                ("containers", "ls"),
                ("tasks", "ls"),
                ("snapshots", "--snapshotter", SNAPSHOTTER, "ls"),
                ("leases", "ls"),
            )
        ]
        client = self.front.client()
        try:  # what the front itself names: a subvolume beyond these is no snapshot of it
            names = sorted(f"{i.name} {i.kind}" for i in client.list())
        except grpc.RpcError as err:
            names = [f"(List failed: {err})"]
        finally:
            client.close()
        listings.append("--- the front's own snapshots ---\n" + "\n".join(names))
        return "\n".join(listings) + (
            f"--- containerd log ---\n{self.containerd.log_tail()}\n"
            f"--- front log ---\n{self.front.log_tail()}"
        )


def mounts_under(path: Path) -> list[str]:
    return [m.target for m in mounts_below(path)]


@pytest.fixture(scope="module", params=["control", "btrfs"])
def env(
    request: pytest.FixtureRequest, btrfs_mount: Path, containerd_available: None
) -> Iterator[Env]:
    run = uuid.uuid4().hex[:8]
    root, socket_path = btrfs_mount / f"ctr-front-{run}", RUN_ROOT / f"front-{run}.sock"
    control = request.param == "control"
    if control:
        server = gosuite.build(REFSERVER, "refserver", test=False).path
        front = ContainerdFront(root, socket_path, backend="", program=[str(server)])
    else:
        front = ContainerdFront(root, socket_path, backend=request.param)
    containerd = Containerd(
        btrfs_mount / f"ctr-root-{run}", {SNAPSHOTTER: front.socket}, gc_deletion_threshold=1
    )
    image_tar = btrfs_mount / f"ctr-image-{run}.tar"
    image_tar.write_bytes(oci_image_tar(IMAGE, busybox_image_layers(MARKER)))
    env = Env(containerd, front, btrfs_mount, image_tar, control)
    try:
        front.start()
        env.baseline = env.front_subvolumes()
        containerd.start()
        yield env
    finally:
        containerd.close()
        front.close()
        image_tar.unlink(missing_ok=True)


def test_containerd_has_the_proxy_and_its_own_btrfs_snapshotter(env: Env) -> None:
    """Its root is on btrfs, so containerd's in-tree btrfs snapshotter loads beside the proxy
    (the benchmarks compare the two)."""
    plugins = [line.split() for line in env.ctr("plugins", "ls").splitlines()]
    status = {row[1]: row[-1] for row in plugins if row[0] == "io.containerd.snapshotter.v1"}
    assert status.get("btrfs") == "ok", status
    assert status.get(SNAPSHOTTER) == "ok", status


def test_import_unpacks_every_layer_into_the_front(env: Env) -> None:
    out = env.ctr("images", "import", "--snapshotter", SNAPSHOTTER, str(env.image_tar))
    assert "unpacking" in out and "done" in out
    kinds = env.snapshots()
    assert sorted(kinds.values()) == ["Committed"] * LAYERS
    assert len(env.front_subvolumes()) == len(env.baseline) + LAYERS


def test_run_sees_the_layers_the_whiteout_and_a_writable_rootfs(env: Env) -> None:
    script = (
        f"cat /{ADDED}; if [ -e /{DOOMED} ]; then echo present; else echo gone; fi; "
        f"cat /{KEPT}; echo written > /tmp/w; cat /tmp/w; echo more >> /{KEPT}; cat /{KEPT}"
    )
    lines = env.run("c1", script)
    assert lines == [MARKER.decode(), "gone", "kept", "written", "kept", "more"]
    # A second container gets a fresh rootfs from the same committed layers.
    assert env.run("c2", f"cat /{KEPT}; ls /tmp") == ["kept"]


def test_usage_reaches_the_front_for_every_snapshot(env: Env) -> None:
    sizes = usage(env)
    assert len(sizes) == LAYERS
    # The base layer holds busybox-static: its figure must account for that file at least.
    assert max(size for size, _ in sizes.values()) >= 0.9 * BUSYBOX.stat().st_size, sizes
    assert all(inodes > 0 for _, inodes in sizes.values()), sizes


def usage(env: Env, ns: str = NS_A) -> dict[str, tuple[int, int]]:
    """``ctr snapshots usage``: key -> (bytes, inodes), as the front answers Usage for each."""
    out = env.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "usage", "-b", ns=ns)
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    return {row[0]: (int(row[1]), int(row[2])) for row in rows}


def test_a_running_container_survives_a_restart_of_the_front(env: Env) -> None:
    env.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, IMAGE, "long", "sleep", "600")
    before = env.snapshots()
    assert before.get("long") == "Active"
    env.front.restart()
    env.wait_for_the_front()
    assert env.exec("long", "e1", f"cat /{ADDED}") == [MARKER.decode()]
    assert env.snapshots() == before
    # Every snapshot is still known to the front (Usage is answered by the front, not the DB) ...
    assert usage(env).keys() == before.keys()
    # ... and the front still mounts them: a new container on the same image.
    assert env.run("c3", f"cat /{ADDED}") == [MARKER.decode()]


def test_a_running_container_survives_a_restart_of_containerd(env: Env) -> None:
    before = env.snapshots()
    env.containerd.restart()
    tasks = env.ctr("tasks", "ls")
    assert any(line.split()[:1] == ["long"] and "RUNNING" in line for line in tasks.splitlines())
    assert env.exec("long", "e2", "echo alive") == ["alive"]
    assert env.snapshots() == before
    assert env.run("c4", f"cat /{KEPT}") == ["kept"]
    env.ctr("tasks", "kill", "-s", "SIGKILL", "long")
    _wait_for_task_exit(env, "long")
    env.ctr("tasks", "delete", "long")
    env.ctr("containers", "delete", "long")
    assert "long" not in env.snapshots()


def _wait_for_task_exit(env: Env, task: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = env.ctr("tasks", "ls").splitlines()
        if not any(line.split()[:1] == [task] and "RUNNING" in line for line in lines):
            return
        time.sleep(0.2)
    raise AssertionError(f"task {task} still running after SIGKILL")


def test_a_second_namespace_has_its_own_snapshots(env: Env) -> None:
    env.ctr("images", "import", "--snapshotter", SNAPSHOTTER, str(env.image_tar), ns=NS_B)
    assert sorted(env.snapshots(NS_B).values()) == ["Committed"] * LAYERS
    assert env.run("b1", f"cat /{ADDED}", ns=NS_B) == [MARKER.decode()]
    # The container snapshots are gone (run --rm) once containerd has collected them.
    found = env.wait_for_front_subvolumes(len(env.baseline) + 2 * LAYERS)
    assert len(found) == len(env.baseline) + 2 * LAYERS, f"{found}\n{env.logs()}"


def test_removing_an_image_in_one_namespace_leaves_the_other(env: Env) -> None:
    env.ctr("images", "rm", "--sync", IMAGE)
    assert env.snapshots() == {}
    found = env.wait_for_front_subvolumes(len(env.baseline) + LAYERS)
    assert len(found) == len(env.baseline) + LAYERS, f"{found}\n{env.logs()}"
    assert env.run("b2", f"cat /{KEPT}", ns=NS_B) == ["kept"]


def test_gc_reclaims_every_snapshot_and_mount(env: Env) -> None:
    env.ctr("images", "rm", "--sync", IMAGE, ns=NS_B)
    assert env.snapshots(NS_B) == {}
    assert env.wait_for_front_subvolumes(len(env.baseline)) == env.baseline
    assert env.front_mounts() == []
    assert mounts_under(env.containerd.state) == []


def test_both_fronts_on_one_host_leave_each_other_alone(
    env: Env, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A graphdriver plugin's layer survives containerd's GC, and the graphdriver's removals
    leave containerd's snapshots alone."""
    process = PluginProcess("btrfs", tmp_path_factory.mktemp("ctr-graphdriver"))
    home = env.mnt / f"ctr-graphdriver-{uuid.uuid4().hex[:8]}"
    process.start()
    plugin = Plugin(process, home)
    try:
        plugin.call("Init", Home=str(home), Opts=None, UIDMaps=None, GIDMaps=None)
        plugin.create("gdbase")
        plugin.client.apply_diff("gdbase", "", layer_tar({"graph/file": b"graphdriver\n"}))
        env.ctr("images", "import", "--snapshotter", SNAPSHOTTER, str(env.image_tar))
        env.ctr("images", "rm", "--sync", IMAGE)  # a full GC pass over the front
        assert env.wait_for_front_subvolumes(len(env.baseline)) == env.baseline
        directory = plugin.get("gdbase")
        assert (directory / "graph/file").read_bytes() == b"graphdriver\n"
        plugin.put("gdbase")
        env.ctr("images", "import", "--snapshotter", SNAPSHOTTER, str(env.image_tar))
        plugin.remove("gdbase")
        assert env.run("c5", f"cat /{ADDED}") == [MARKER.decode()]
        env.ctr("images", "rm", "--sync", IMAGE)
        assert env.wait_for_front_subvolumes(len(env.baseline)) == env.baseline
    finally:
        plugin.client.close()
        process.stop()
