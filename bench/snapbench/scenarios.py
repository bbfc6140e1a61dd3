"""The scenarios, run against one driver's dockerd; each time is the wall time of a docker CLI.

Every timed command is also checked (the diff lists exactly the changed files, the commit and
the build produce working images), so a driver that answers fast but wrong fails the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from snapbench import results as m
from snapbench.config import Config
from snapbench.env import (
    Environment,
    busy_cpu_seconds,
    process_cpu_seconds,
    settle_page_cache,
)
from snapbench.images import (
    LOAD_TAG,
    FileLayout,
    changed_files,
    file_image_tar,
    load_archive,
    load_file_size,
    write_build_context,
)
from snapbench.plugin_calls import create_on_big_parent, stream_memory
from snapbench.results import Results
from snapbench.rpc import get_put_load

SMALL_IMAGE = "sdbench-busybox"
#: Debian's docker.io CLI (20.10): it drives dockerd's built-in BuildKit.
BUILDKIT_CLI = "/usr/bin/docker"
CHANGES_IN_SCENARIO_1 = 10
#: Above this many files a committed image is checked by its history, not by running it (a run
#: on vfs copies the whole image).
CHECK_BY_RUNNING_UP_TO = 20_000


class ScenarioFailed(Exception):
    """A command succeeded but its result is wrong."""


class Runner:
    """Runs the selected scenarios on one :class:`Environment` and adds to :class:`Results`."""

    def __init__(
        self, env: Environment, config: Config, results: Results, log: Callable[[str], None]
    ) -> None:
        self.env = env
        self.config = config
        self.results = results
        self.log = log
        self.driver = env.spec.label

    # -- helpers -------------------------------------------------------------------------------

    def docker(self, *args: str, check: bool = True) -> str:
        return self.env.dockerd.docker(*args, check=check, timeout=self.config.timeout).stdout

    def timed(self, *args: str, buildkit: bool = False) -> tuple[float, str]:
        start = time.perf_counter()
        out = self.buildkit(*args) if buildkit else self.docker(*args)
        return time.perf_counter() - start, out

    def buildkit(self, *args: str) -> str:
        """A command through Debian's 20.10 CLI with ``DOCKER_BUILDKIT=1``: dockerd's built-in
        BuildKit (the CLI first on PATH needs a buildx it does not have)."""
        dockerd = self.env.dockerd
        done = subprocess.run(
            [BUILDKIT_CLI, "-H", dockerd.host, *args],
            capture_output=True,
            text=True,
            timeout=self.config.timeout,
            check=False,
            env={
                **os.environ,
                "DOCKER_BUILDKIT": "1",
                "DOCKER_CONFIG": str(dockerd.workdir / "cli"),
            },
        )
        if done.returncode != 0:
            raise ScenarioFailed(f"BuildKit: docker {args[0]} failed: {done.stderr.strip()[-500:]}")
        return done.stdout

    def measured(self, metric: m.Metric, *args: str, buildkit: bool = False) -> str:
        """Run a docker command and record its wall time and the CPU it cost: on the whole
        machine (what decides the wall time when the cores are shared) and in the plugin."""
        pid = self.env.plugin_pid
        busy, plugin = busy_cpu_seconds(), process_cpu_seconds(pid)
        seconds, out = self.timed(*args, buildkit=buildkit)
        self.results.add(m.cpu(metric, "all"), self.driver, busy_cpu_seconds() - busy)
        if pid is not None:
            self.results.add(
                m.cpu(metric, "plugin"), self.driver, process_cpu_seconds(pid) - plugin
            )
        self.record(metric, seconds)
        return out

    def record(self, metric: m.Metric, seconds: float) -> None:
        self.results.add(metric, self.driver, seconds)
        self.env.sample_rss()

    def log_median(self, metric: m.Metric) -> None:
        """The median and every run, so that the log alone serves if the run is cut short."""
        runs = self.results.samples[metric][self.driver]
        self.log(
            f"    {metric.title}: {self.results.median(metric, self.driver):.3f}s "
            f"(runs: {', '.join(f'{r:.3f}' for r in runs)})"
        )

    @contextlib.contextmanager
    def guarded(self, what: str) -> Iterator[None]:
        """Record a failure and go on with the next scenario; Ctrl-C still ends the run."""
        self.log(f"  {what}")
        try:
            yield
        except Exception as err:
            message = f"{self.driver}: {what}: {err}"
            self.log(f"  FAILED {message}\n{traceback.format_exc()}")
            self.results.fail(message)

    @contextlib.contextmanager
    def profiled(self, name: str) -> Iterator[None]:
        """py-spy the plugin for the duration (``--profile``, snapdriver only)."""
        pid = self.env.plugin_pid
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not self.config.profile or pid is None or not Path(spy).exists():
            yield
            return
        self.config.scratch_dir.mkdir(parents=True, exist_ok=True)
        svg = self.config.scratch_dir / f"profile-{name}.svg"
        proc = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                "250",
                "--threads",
                "--idle",
                "--output",
                str(svg),
                "--format",
                "flamegraph",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.log(f"    profile of the plugin: {svg}")

    # -- scenarios -----------------------------------------------------------------------------

    def run_all(self) -> None:
        cfg = self.config
        with self.guarded("CLI floor: docker version"):
            for _ in range(cfg.repeat):
                self.record(m.cli_floor(), self.timed("version")[0])
        if cfg.scenarios & {1, 2, 3}:
            for files in cfg.sizes:
                with self.guarded(f"scenarios 1-3 on the {files:,}-file image"):
                    self.file_image_scenarios(files)
        if cfg.scenarios & {4, 5}:
            with self.guarded("import the busybox image"):
                self.env.dockerd.import_busybox(SMALL_IMAGE)
        if 4 in cfg.scenarios:
            with self.guarded("scenario 4: docker run --rm true"):
                self.run_true()
        if 5 in cfg.scenarios:
            with self.guarded("scenario 5: docker build"):
                self.build()
        if 6 in cfg.scenarios and self.env.plugin is not None:
            with self.guarded("scenario 6: plugin Get/Put, concurrent clients"):
                self.get_put()
        if 7 in cfg.scenarios:
            with self.guarded(f"scenario 7: docker load of {cfg.load_mib:,} MiB"):
                self.load()
        if 8 in cfg.scenarios and self.env.plugin is not None:
            with self.guarded(f"scenario 8: Create on a {cfg.create_files:,}-file parent"):
                create_on_big_parent(self.env.plugin, cfg, self.record, self.log)
        if 9 in cfg.scenarios and self.env.plugin is not None:
            with self.guarded(f"scenario 9: plugin memory in {cfg.stream_mib:,} MiB streams"):
                stream_memory(self.env.plugin, cfg, self.record, self.log)

    def file_image_scenarios(self, files: int) -> None:
        cfg = self.config
        layout = FileLayout.for_files(files)
        tag = f"sdbench-files-{layout.files}"
        tar = file_image_tar(self.config.images_dir, layout, self.log)
        metric = m.image_import(layout.files)
        for run in range(cfg.import_repeat):
            if run:  # the image of the last run stays, for the scenarios below
                self.docker("rmi", tag)
            settle_page_cache(tar)
            with self.profiled(f"import-{layout.files}"):
                self.measured(metric, "import", str(tar), tag)
        self.log_median(metric)
        try:
            if cfg.scenarios & {1, 2}:
                with self.changed_container(tag, layout, CHANGES_IN_SCENARIO_1) as name:
                    if 1 in cfg.scenarios:
                        with self.profiled(f"diff-{layout.files}"):
                            self.diff(name, m.diff_by_size(layout.files), CHANGES_IN_SCENARIO_1)
                    if 2 in cfg.scenarios:
                        with self.profiled(f"commit-{layout.files}"):
                            self.commit(name, layout)
            if 3 in cfg.scenarios and files == cfg.files:
                for count in cfg.changes:
                    if not layout.can_change(count):
                        continue
                    with (
                        self.guarded(f"scenario 3: {count:,} changed files"),
                        self.changed_container(tag, layout, count) as name,
                        self.profiled(f"diff-{count}-of-{layout.files}"),
                    ):
                        self.diff(name, m.diff_by_changes(count, layout.files), count)
        finally:
            self.docker("rmi", "-f", tag)

    @contextlib.contextmanager
    def changed_container(self, image: str, layout: FileLayout, count: int) -> Iterator[str]:
        name = f"sdbench-c{count}"
        self.docker("rm", "-f", name, check=False)
        seconds, _ = self.timed(
            "run",
            "--name",
            name,
            "--network",
            "none",
            image,
            "sh",
            "-c",
            layout.change_script(count),
        )
        self.log(f"    container {name} changed {count:,} files ({seconds:.1f}s)")
        try:
            yield name
        finally:
            self.docker("rm", "-f", name)

    def diff(self, container: str, metric: m.Metric, expected: int) -> None:
        for i in range(self.config.repeat):
            seconds, out = self.timed("diff", container)
            found = changed_files(out)
            if found != expected:
                raise ScenarioFailed(f"docker diff listed {found} changed files, not {expected}")
            self.record(metric, seconds)
            if i == 0:
                digest = hashlib.sha256("\n".join(sorted(out.splitlines())).encode()).hexdigest()
                self.results.diff_digests.setdefault(metric.title, {})[self.driver] = digest[:16]
        self.log_median(metric)

    def commit(self, container: str, layout: FileLayout) -> None:
        metric = m.commit(layout.files)
        for i in range(self.config.repeat):
            image = f"sdbench-commit-{i}"
            seconds, _ = self.timed("commit", container, image)
            self.record(metric, seconds)
            if i == 0:
                self.check_commit(image, layout)
            self.docker("rmi", image)
        self.log_median(metric)

    def check_commit(self, image: str, layout: FileLayout) -> None:
        if layout.files <= CHECK_BY_RUNNING_UP_TO:
            out = self.docker("run", "--rm", "--network", "none", image, "cat", "/data/d0/f0")
            if "changed" not in out:
                raise ScenarioFailed(f"the committed image lacks the change: {out!r}")
            return
        sizes = self.docker("history", "--format", "{{.Size}}", image).split()
        if not sizes or sizes[0] in ("0B", "0"):
            raise ScenarioFailed(f"the committed layer is empty: docker history says {sizes}")

    def run_true(self) -> None:
        with self.profiled("run-rm"):  # one flame graph over every repeat
            for _ in range(self.config.repeat):
                self.measured(m.run_true(), "run", "--rm", "--network", "none", SMALL_IMAGE, "true")
        self.log(f"    {m.run_true().title}: {self.results.median(m.run_true(), self.driver):.3f}s")

    def build(self) -> None:
        context = self.config.workdir / "build-context"
        if not context.exists():
            write_build_context(context, SMALL_IMAGE)
        for i in range(self.config.repeat):
            image = f"sdbench-built-{i}"
            with self.profiled("build"):
                self.measured(
                    m.build(), "build", "--no-cache", "--network", "none", "-t", image, str(context)
                )
            if i == 0:
                out = self.docker("run", "--rm", "--network", "none", image, "cat", "/app/count")
                if out.strip() != "50":
                    raise ScenarioFailed(f"the built image counts {out.strip()!r} files, not 50")
            self.docker("rmi", image)
        self.log(f"    {m.build().title}: {self.results.median(m.build(), self.driver):.3f}s")
        self.build_kit(context)

    def build_kit(self, context: Path) -> None:
        """The same build with dockerd's built-in BuildKit, driven by Debian's 20.10 CLI (the
        CLI first on PATH needs a buildx it does not have). Its cache is pruned after each."""
        for i in range(self.config.repeat):
            image = f"sdbench-kit-{i}"
            with self.profiled("build-kit"):
                self.measured(
                    m.build_kit(),
                    *("build", "--no-cache", "--network", "none", "-t", image, str(context)),
                    buildkit=True,
                )
            if i == 0:
                out = self.docker("run", "--rm", "--network", "none", image, "cat", "/app/count")
                if out.strip() != "50":
                    raise ScenarioFailed(f"BuildKit's image counts {out.strip()!r} files, not 50")
            self.docker("rmi", image)
            self.docker("builder", "prune", "--all", "--force")
        median = self.results.median(m.build_kit(), self.driver)
        self.log(f"    {m.build_kit().title}: {median:.3f}s")

    def get_put(self) -> None:
        plugin = self.env.plugin
        assert plugin is not None
        clients, rounds = self.config.rpc_clients, self.config.rpc_rounds
        for _ in range(self.config.repeat):
            load = get_put_load(plugin.address, clients, rounds)
            self.record(m.rpc_round_trip(clients), load.round_trip_p50_ms)
            self.record(m.rpc_request(clients), load.request_p50_ms)
            self.record(m.rpc_request_p99(clients), load.request_p99_ms)
            self.record(m.rpc_rate(clients), load.requests_per_s)
        p50 = self.results.median(m.rpc_round_trip(clients), self.driver)
        rate = self.results.median(m.rpc_rate(clients), self.driver)
        self.log(f"    Get+Put p50 {p50:.2f} ms, {rate:.0f} requests/s")

    def load(self) -> None:
        cfg = self.config
        archive = load_archive(cfg.images_dir, cfg.load_files, cfg.load_mib, self.log)
        metric = m.image_load(cfg.load_files, cfg.load_mib)
        expected = cfg.load_files * load_file_size(cfg.load_files, cfg.load_mib)
        for _ in range(cfg.repeat):
            settle_page_cache(archive)
            with self.profiled("load"):
                self.measured(metric, "load", "-q", "-i", str(archive))
            size = int(self.docker("image", "inspect", "-f", "{{.Size}}", LOAD_TAG))
            if size < expected:
                raise ScenarioFailed(f"the loaded image is {size:,} bytes, not {expected:,}")
            self.docker("rmi", LOAD_TAG)
        self.log_median(metric)
