"""A real dockerd 20.10 session on the btrfs backend, scraped between steps: the numbers move.

The plugin runs with ``--metrics-listen unix://...`` and ``--log-format json``. Each step (import,
run, docker diff, commit, remove, a plugin restart under dockerd) is followed by a scrape, and the
difference from the scrape before must be what the step does: ApplyDiff calls and bytes on
import, Get and mounts on run, native change lists on diff, exported bytes on commit, references
back to zero on removal, a resumed start after the restart. Every line of the plugin's log must
then be one JSON object.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapdriver.testing.dockerd import BUSYBOX, Dockerd
from snapdriver.testing.metrics import Samples, scrape
from snapdriver.testing.process import PluginProcess

pytestmark = [pytest.mark.dockerd, pytest.mark.slow]
NAME = f"sdmetrics{os.getpid()}"
CALLS = "snapdriver_call_duration_seconds_count"
CHANGES = "snapdriver_changes_duration_seconds_count"


@dataclass
class Session:
    dockerd: Dockerd
    plugin: PluginProcess
    metrics: str

    def docker(self, *args: str) -> str:
        return self.dockerd.docker(*args).stdout

    def scrape(self) -> Samples:
        return scrape(self.metrics)


def calls(samples: Samples, method: str, outcome: str = "ok") -> float:
    return samples.get(CALLS, front="graphdriver", method=f"GraphDriver.{method}", outcome=outcome)


@pytest.fixture(scope="module")
def session(
    btrfs_mount: Path, dockerd_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Session]:
    workdir = tmp_path_factory.mktemp("metrics")
    (workdir / "plugin").mkdir()
    address = f"unix://{workdir}/metrics.sock"
    plugin = PluginProcess(
        "btrfs",
        workdir / "plugin",
        ["--metrics-listen", address, "--log-format", "json"],
        name=NAME,
        socket_path=Path(f"/run/docker/plugins/{NAME}.sock"),
    )
    plugin.start()
    dockerd = Dockerd(workdir / "dockerd", NAME, data_root=btrfs_mount / "metrics-docker")
    try:
        dockerd.start()
        yield Session(dockerd, plugin, address)
    finally:
        _remove_everything(dockerd)
        dockerd.stop()
        plugin.stop()


def _remove_everything(dockerd: Dockerd) -> None:
    containers = dockerd.docker("ps", "-a", "-q", check=False).stdout.split()
    if containers:
        dockerd.docker("rm", "-f", *containers, check=False)
    dockerd.docker("container", "prune", "-f", check=False)
    tags = dockerd.docker("images", "--format", "{{.Repository}}:{{.Tag}}", check=False)
    if tags.stdout.split():
        dockerd.docker("rmi", *tags.stdout.split(), check=False)  # newest image first
    dockerd.docker("image", "prune", "-a", "-f", check=False)


def test_a_docker_session_moves_the_numbers(session: Session) -> None:
    start = session.scrape()
    assert calls(start, "Init") == 1
    assert start.get("snapdriver_resumed") == 0
    assert start.get("snapdriver_start_duration_seconds") > 0
    assert start.get("snapdriver_layers", status="ready") == 0

    session.dockerd.import_busybox("bb:1")
    imported = session.scrape()
    assert calls(imported, "ApplyDiff") - calls(start, "ApplyDiff") == 1
    applied = imported.get("snapdriver_diff_bytes_total", direction="applied")
    assert applied >= BUSYBOX.stat().st_size  # the tar holds the busybox binary
    assert imported.get("snapdriver_layers", status="ready") == 1

    session.docker(
        "run", "-d", "--name", "m1", "--network", "none", "bb:1",
        "sh", "-c", "echo hi > /hello; rm /bin/touch; sleep 600",
    )  # fmt: skip
    _wait_for_diff(session, "m1", "A /hello")
    running = session.scrape()
    assert calls(running, "Get") > calls(imported, "Get")
    assert running.get("snapdriver_layers", status="ready") == 3  # image, -init, container
    assert running.get("snapdriver_mounted_layers") >= 1
    assert running.get("snapdriver_layer_references", holder="front") >= 1

    before_diff = session.scrape()
    diff = session.docker("diff", "m1").splitlines()
    assert {"A /hello", "D /bin/touch"} <= set(diff)
    diffed = session.scrape()
    assert calls(diffed, "Changes") > calls(before_diff, "Changes")
    assert diffed.get(CHANGES, source="native") > before_diff.get(CHANGES, source="native")
    assert diffed.get(CHANGES, source="walk") == before_diff.get(CHANGES, source="walk")
    assert diffed.get(CHANGES, source="error") == 0

    session.docker("commit", "m1", "bb:m1")
    committed = session.scrape()
    assert calls(committed, "Diff") > calls(diffed, "Diff")
    assert committed.get("snapdriver_diff_bytes_total", direction="exported") >= 1024
    assert calls(committed, "ApplyDiff") - calls(diffed, "ApplyDiff") == 1
    assert committed.get("snapdriver_diff_bytes_total", direction="applied") > applied

    session.docker("rm", "-f", "m1")
    removed = session.scrape()
    assert calls(removed, "Put") > calls(committed, "Put")
    assert calls(removed, "Remove") - calls(committed, "Remove") == 2  # -init and container
    assert removed.get("snapdriver_layers", status="ready") == 2  # bb:1 and the commit
    assert removed.get("snapdriver_mounted_layers") == 0
    assert removed.get("snapdriver_layer_references", holder="front") == 0
    assert removed.sum(CALLS) == removed.sum(CALLS, outcome="ok"), "no call may have failed"


def test_a_restarted_plugin_says_it_resumed(session: Session) -> None:
    session.plugin.restart()  # dockerd sends no new Init
    restarted = session.scrape()
    assert restarted.get("snapdriver_resumed") == 1
    assert restarted.get("snapdriver_start_duration_seconds") > 0
    assert restarted.get("snapdriver_orphan_sweeps_total") == 1  # the sweep at resume
    assert restarted.get("snapdriver_layers", status="ready") == 2
    assert calls(restarted, "Init") == 0
    out = session.docker("run", "--rm", "--network", "none", "bb:m1", "cat", "/hello")
    assert out.strip() == "hi"
    assert calls(session.scrape(), "Get") >= 1


def test_the_plugin_log_is_one_json_object_per_line(session: Session) -> None:
    lines = session.plugin.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # fails on any line that is not JSON
    assert all({"time", "level", "logger", "plugin", "message"} <= set(r) for r in records)
    applies = [r for r in records if r.get("call") == "GraphDriver.ApplyDiff" and "duration" in r]
    assert applies and all(len(r["layer"]) == 64 and r["outcome"] == "ok" for r in applies)
    assert any(r["message"].startswith("serving backend btrfs") for r in records)


def _wait_for_diff(session: Session, container: str, line: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while line not in session.docker("diff", container).splitlines():
        if time.monotonic() > deadline:
            raise AssertionError(f"{line!r} never showed in docker diff {container}")
        time.sleep(0.2)
