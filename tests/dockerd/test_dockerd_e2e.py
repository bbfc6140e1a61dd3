"""A real dockerd 20.10 on snapdriver's btrfs backend, driven with the docker CLI.

The scenario follows what users do: import, run, diff, commit, save/load, a classic build and a
BuildKit build, export, cp, ps -s, restarts of dockerd and of the plugin under it, parallel runs,
and removal of everything, after which no subvolume of snapdriver's may be left.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapdriver.testing.dockerd import Dockerd
from snapdriver.testing.process import PluginProcess

pytestmark = [pytest.mark.dockerd, pytest.mark.slow]
# Per run: dockerd finds the plugin by this name in /run/docker/plugins, shared by concurrent runs.
NAME = f"sde2e{os.getpid()}"


@dataclass
class Env:
    dockerd: Dockerd
    plugin: PluginProcess
    home: Path
    workdir: Path

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.dockerd.docker(*args, check=check)

    def run(self, *args: str) -> str:
        return self.docker("run", "--network", "none", *args).stdout


def subvolumes(home: Path) -> list[str]:
    found = home / "subvolumes"
    return sorted(p.name for p in found.iterdir()) if found.exists() else []


@pytest.fixture(scope="module")
def env(
    btrfs_mount: Path, dockerd_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("e2e")
    plugin = PluginProcess(
        "btrfs", workdir / "plugin", name=NAME, socket_path=Path(f"/run/docker/plugins/{NAME}.sock")
    )
    (workdir / "plugin").mkdir()
    plugin.start()
    dockerd = Dockerd(workdir / "dockerd", NAME, data_root=btrfs_mount / "e2e-docker")
    try:
        dockerd.start()
        dockerd.import_busybox("bb:1")
        yield Env(dockerd, plugin, btrfs_mount / "e2e-docker" / NAME, workdir)
    finally:
        dockerd.stop()
        plugin.stop()


def test_info_shows_the_plugin(env: Env) -> None:
    info = env.docker("info", "--format", "{{.Driver}} {{json .DriverStatus}}").stdout
    assert info.startswith(NAME) and '"Backend","btrfs"' in info


def test_run_diff_and_inspect(env: Env) -> None:
    out = env.run(
        "--name",
        "c1",
        "bb:1",
        "sh",
        "-c",
        "echo hello > /hello; rm /bin/touch; mkdir -p /newdir/sub; echo done",
    )
    assert out.strip() == "done"
    diff = env.docker("diff", "c1").stdout.split("\n")
    assert {"A /hello", "D /bin/touch", "C /bin", "A /newdir", "A /newdir/sub"} <= set(diff)
    assert not any("/etc/hosts" in line for line in diff), "init-layer files leaked into diff"
    data = env.docker("inspect", "-f", "{{.GraphDriver.Name}} {{.GraphDriver.Data}}", "c1")
    assert data.stdout.startswith(NAME) and "Subvolume" in data.stdout


def test_commit_and_run_committed_image(env: Env) -> None:
    env.docker("commit", "c1", "bb:committed")
    assert env.run("--rm", "bb:committed", "cat", "/hello").strip() == "hello"
    assert (
        env.run("--rm", "bb:committed", "sh", "-c", "test -e /bin/touch || echo gone").strip()
        == "gone"
    )


def test_save_then_load_under_another_tag(env: Env) -> None:
    archive = env.workdir / "committed.tar"
    env.docker("save", "-o", str(archive), "bb:committed")
    env.docker("rmi", "bb:committed")
    env.docker("load", "-i", str(archive))
    env.docker("tag", "bb:committed", "bb:loaded")
    env.docker("rmi", "bb:committed")
    assert env.run("--rm", "bb:loaded", "cat", "/hello").strip() == "hello"


@pytest.mark.parametrize("buildkit", [False, True], ids=["classic", "buildkit"])
def test_build_with_run_copy_env(env: Env, buildkit: bool) -> None:
    """The classic builder, and dockerd 20.10's built-in BuildKit (what current Docker users
    build with: it reaches the plugin through its own snapshotter adaptor, not the builder's)."""
    tag = "bb:buildkit" if buildkit else "bb:built"
    context = env.workdir / f"context-{tag.partition(':')[2]}"
    context.mkdir()
    (context / "file1.txt").write_text("copied\n")
    (context / "Dockerfile").write_text(
        "FROM bb:1\nRUN mkdir /built && echo from-run > /built/run.txt\n"
        'COPY file1.txt /built/\nENV GREETING=hi\nCMD ["cat", "/built/file1.txt"]\n'
    )
    # Debian's 20.10 CLI: the newer one first on PATH has no classic BuildKit client.
    done = subprocess.run(
        ["/usr/bin/docker", "-H", env.dockerd.host, "build", "--network", "none", "-t", tag, "."],
        capture_output=True,
        text=True,
        cwd=context,
        env={
            "DOCKER_BUILDKIT": "1" if buildkit else "0",
            "PATH": "/usr/bin:/bin:/usr/local/bin",
            "DOCKER_CONFIG": str(env.workdir / "cli"),
        },
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert env.run("--rm", tag).strip() == "copied"
    assert env.run("--rm", tag, "sh", "-c", "cat /built/run.txt; echo $GREETING").split() == [
        "from-run",
        "hi",
    ]
    layers = env.docker("inspect", "-f", "{{len .RootFS.Layers}}", tag).stdout.strip()
    # FROM's layer + RUN + COPY; ENV and CMD make empty diffs, which dockerd does not store.
    assert layers == "3"
    if buildkit:
        env.docker("builder", "prune", "--all", "--force")  # its cache holds layers too


def test_export_cp_and_ps_size(env: Env) -> None:
    env.docker("run", "-d", "--name", "c2", "--network", "none", "bb:1", "sleep", "600")
    try:
        source = env.workdir / "cp-in.txt"
        source.write_text("copied in\n")
        env.docker("cp", str(source), "c2:/cp-in.txt")
        assert env.docker("exec", "c2", "cat", "/cp-in.txt").stdout == "copied in\n"
        out = env.workdir / "cp-out"
        env.docker("cp", "c2:/cp-in.txt", str(out))
        assert out.read_text() == "copied in\n"
        exported = env.workdir / "c2.tar"
        env.docker("export", "-o", str(exported), "c2")
        with tarfile.open(exported) as tar:
            assert "cp-in.txt" in tar.getnames()
        sizes = env.docker("ps", "-s", "--filter", "name=c2", "--format", "{{.Size}}").stdout
        assert sizes.startswith("10B"), sizes
    finally:
        env.docker("rm", "-f", "c2")


def test_daemon_restart_keeps_containers(env: Env) -> None:
    env.dockerd.restart()
    assert "A /hello" in env.docker("diff", "c1").stdout
    assert env.docker("start", "-a", "c1").stdout.strip() == "done"


def test_plugin_restart_while_dockerd_runs(env: Env) -> None:
    env.plugin.restart()  # dockerd sends no new Activate or Init
    assert env.run("--rm", "bb:1", "echo", "after-restart").strip() == "after-restart"
    assert "A /hello" in env.docker("diff", "c1").stdout


def test_eight_parallel_runs(env: Env) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: env.run("--rm", "bb:1", "echo", f"run-{i}"), range(8)))
    assert sorted(o.strip() for o in outs) == sorted(f"run-{i}" for i in range(8))


def test_sweep_reclaims_layers_dockerd_forgot(env: Env) -> None:
    """dockerd leaks an -init layer when Get fails right after its create; make one the same way
    (CreateReadWrite on the image's top layer, no Get) and let the sweep command find it."""
    top = next(p for p in subvolumes(env.home) if not p.endswith("-init"))
    leaked = "f" * 64 + "-init"
    with env.plugin.client() as client:
        client.call("GraphDriver.CreateReadWrite", {"ID": leaked, "Parent": top})
    before = set(subvolumes(env.home))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "snapdriver",
            "sweep",
            "--listen",
            env.plugin.address,
            "--min-age",
            "0",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert leaked in done.stdout and done.stdout.startswith("removed 1 orphan")
    assert set(subvolumes(env.home)) == before - {leaked}
    assert env.run("--rm", "bb:1", "echo", "still-fine").strip() == "still-fine"
    assert "A /hello" in env.docker("diff", "c1").stdout


def test_removing_everything_leaves_no_subvolume(env: Env) -> None:
    env.docker("rm", "-f", "c1")
    env.docker("container", "prune", "-f")
    tags = env.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    env.docker("rmi", *tags)
    env.docker("image", "prune", "-a", "-f")
    assert env.docker("images", "-q", "-a").stdout.strip() == ""
    assert subvolumes(env.home) == []
