"""snapdriver as a managed (v2) Docker plugin on a real dockerd 20.10, as it is distributed.

The plugin is built with ``scripts/build-plugin`` (its Debian base cached per machine), then
``docker plugin create``, ``set`` and ``enable`` on a private dockerd running the vfs driver; that
dockerd restarts with ``--storage-driver sd/snapdriver:TAG`` (dockerd starts enabled plugins
before its layer store, so the plugin must be enabled first). Then import, run, a native
``docker diff`` (the plugin's metrics, served on a socket in its runtime directory, say the
change list came from the btrfs send stream, not a walk), a dockerd restart, and the release of
everything: images, the plugin, its mounts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapdriver.hostfs import mounts_below
from snapdriver.testing.dockerd import Dockerd
from snapdriver.testing.metrics import Samples, scrape
from tests.conftest import skip_tier

pytestmark = [pytest.mark.dockerd, pytest.mark.slow]
CHECKOUT = Path(__file__).resolve().parents[2]
PLUGIN = f"sd/snapdriver:t{os.getpid()}"
#: Where the plugin serves metrics inside its namespace: its runtime directory, a host directory.
METRICS = "unix:///run/docker/plugins/metrics.sock"
CHANGES = "snapdriver_changes_duration_seconds_count"
PLUGIN_RUNTIME = Path("/run/docker/plugins")
BUILD_TIMEOUT = 1800  # a first build on a slow mirror: debootstrap and the wheels


@dataclass
class Build:
    """The plugin directory scripts/build-plugin made, and what the build cost."""

    path: Path
    summary: str


@pytest.fixture(scope="session")
def plugin_build(
    dockerd_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Build]:
    """The plugin directory, built once per session through scripts/build-plugin (and removed
    after it: a root filesystem of 180 MiB)."""
    out = tmp_path_factory.mktemp("managed-build") / "plugin"
    started = time.monotonic()
    try:
        done = subprocess.run(
            [str(CHECKOUT / "scripts" / "build-plugin"), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        skip_tier("dockerd", f"the managed plugin was not built in {BUILD_TIMEOUT} s")
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        skip_tier("dockerd", f"scripts/build-plugin failed (exit {done.returncode}):\n{tail}")
    base = "cached" if "cached base" in done.stdout else "first"
    size = done.stdout.strip().splitlines()[-1].rpartition("rootfs ")[2]
    took = time.monotonic() - started
    yield Build(out, f"built in {took:.0f} s ({base} Debian base), rootfs {size}")
    shutil.rmtree(out)


@dataclass
class Managed:
    dockerd: Dockerd
    plugin_id: str
    summary: str

    def docker(self, *args: str, check: bool = True) -> str:
        return self.dockerd.docker(*args, check=check).stdout

    @property
    def host_home(self) -> Path:
        """The Home on the host: dockerd's ``propagated-mount`` of the plugin, plus its name."""
        return self.plugin_root / "propagated-mount" / PLUGIN

    @property
    def plugin_root(self) -> Path:
        return self.dockerd.data_root / "plugins" / self.plugin_id

    @property
    def runtime(self) -> Path:
        """The plugin's /run/docker/plugins: dockerd 20.10 keeps it on this fixed host path (not
        under its exec root) to keep socket paths short."""
        return PLUGIN_RUNTIME / self.plugin_id

    def metrics(self) -> Samples:
        return scrape(f"unix://{self.runtime / METRICS.rpartition('/')[2]}")


def use_driver(dockerd: Dockerd, driver: str) -> None:
    """Restart dockerd with another storage driver (plugins keep their enabled state)."""
    dockerd.stop()
    dockerd.storage_driver = driver
    dockerd.start()


def release(dockerd: Dockerd) -> None:
    """Let the plugin go: no container or image on it, a dockerd not using it, then remove it.

    Idempotent: the last test does it and asserts, the fixture does it again for a failed run.
    """
    if dockerd.storage_driver == PLUGIN:
        ids = dockerd.docker("ps", "-aq", check=False).stdout.split()
        if ids:
            dockerd.docker("rm", "-f", *ids, check=False)
        images = dockerd.docker("images", "-aq", check=False).stdout.split()
        if images:
            dockerd.docker("rmi", "-f", *images, check=False)
        use_driver(dockerd, "vfs")  # dockerd holds the plugin while it is its storage driver
    dockerd.docker("plugin", "disable", PLUGIN, check=False)
    dockerd.docker("plugin", "rm", "-f", PLUGIN, check=False)


@pytest.fixture(scope="module")
def managed(
    btrfs_mount: Path, plugin_build: Build, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Managed]:
    workdir = tmp_path_factory.mktemp("managed")
    dockerd = Dockerd(workdir / "dockerd", "vfs", data_root=btrfs_mount / "managed-docker")
    dockerd.start()
    try:
        started = time.monotonic()
        dockerd.docker("plugin", "create", PLUGIN, str(plugin_build.path))
        created = time.monotonic() - started
        settings = ("SNAPDRIVER_LOG_LEVEL=debug", f"SNAPDRIVER_METRICS_LISTEN={METRICS}")
        dockerd.docker("plugin", "set", PLUGIN, *settings)
        dockerd.docker("plugin", "enable", PLUGIN)
        plugin_id = dockerd.docker("plugin", "inspect", "-f", "{{.Id}}", PLUGIN).stdout.strip()
        use_driver(dockerd, PLUGIN)
        dockerd.import_busybox("bb:1")
        summary = f"{plugin_build.summary}, docker plugin create {created:.0f} s"
        yield Managed(dockerd, plugin_id, summary)
    finally:
        try:
            release(dockerd)
        finally:
            dockerd.stop()


def test_dockerd_uses_the_plugin(managed: Managed, figure: Callable[[str], None]) -> None:
    figure(f"managed plugin: {managed.summary}")
    info = managed.docker("info", "--format", "{{.Driver}} {{json .DriverStatus}}")
    assert info.startswith(PLUGIN) and '"Backend","btrfs"' in info, info
    listed = managed.docker("plugin", "ls", "--format", "{{.Name}} {{.Enabled}}")
    assert f"{PLUGIN} true" in listed
    # Init's Home is the propagated mount inside the plugin; its layers are on the host's btrfs.
    assert (managed.host_home / "subvolumes").is_dir()


def test_run_and_native_diff(managed: Managed) -> None:
    out = managed.docker(
        "run", "--network", "none", "--name", "c1", "bb:1",
        "sh", "-c", "echo hello > /hello; rm /bin/touch; mkdir -p /newdir/sub; echo done",
    )  # fmt: skip
    assert out.strip() == "done"
    before = managed.metrics()
    diff = set(managed.docker("diff", "c1").splitlines())
    after = managed.metrics()
    assert {"A /hello", "D /bin/touch", "C /bin", "A /newdir", "A /newdir/sub"} <= diff, diff
    assert after.get(CHANGES, source="native") > before.get(CHANGES, source="native")
    assert after.get(CHANGES, source="walk") == before.get(CHANGES, source="walk")
    assert after.get(CHANGES, source="error") == 0
    # Get's path is mapped to the host by dockerd: the container's layer is a subvolume there.
    full = managed.docker("inspect", "-f", "{{.Id}}", "c1").strip()
    layerdb = managed.dockerd.data_root / "image" / PLUGIN / "layerdb"
    layer = (layerdb / "mounts" / full / "mount-id").read_text().strip()
    assert (managed.host_home / "subvolumes" / layer / "hello").read_text() == "hello\n"


def test_dockerd_restart_keeps_images_and_containers(managed: Managed) -> None:
    managed.dockerd.restart()  # dockerd stops the plugin and starts it again with itself
    assert "bb:1" in managed.docker("images", "--format", "{{.Repository}}:{{.Tag}}")
    assert "A /hello" in managed.docker("diff", "c1")
    assert managed.docker("start", "-a", "c1").strip() == "done"
    again = managed.docker("run", "--rm", "--network", "none", "bb:1", "cat", "/etc/passwd")
    assert again.startswith("root:")


def test_release_leaves_nothing(managed: Managed) -> None:
    managed.docker("rm", "-f", "c1")
    managed.docker("rmi", "bb:1")
    assert managed.docker("images", "-qa").strip() == ""
    assert list((managed.host_home / "subvolumes").iterdir()) == []
    release(managed.dockerd)
    assert managed.docker("plugin", "ls", "-q").strip() == ""
    assert not managed.plugin_root.exists(), "the plugin's directory outlived docker plugin rm"
    assert not managed.runtime.exists(), "the plugin's runtime directory outlived it"
    # dockerd's own: its data root bound on itself as a shared mount for plugins, until it stops
    managed.dockerd.stop()
    left = [m.target for m in mounts_below(managed.dockerd.data_root, managed.runtime)]
    assert left == [], left
