"""What a run measured: samples per metric and driver, failures, peak memory, and the machine."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, order=True)
class Metric:
    """One measured quantity; ``param`` is the image size or the number of changed files."""

    scenario: int  # 1-9 as in the README; 0 for context rows (CLI floor, import)
    key: str
    param: int
    unit: str  # "s", "ms", "req/s", "x" (a ratio) or "MiB"
    title: str

    @property
    def higher_is_better(self) -> bool:
        return self.unit == "req/s"


def cli_floor() -> Metric:
    return Metric(0, "a-cli", 0, "s", "`docker version` (CLI start + one API call: the floor)")


def image_import(files: int) -> Metric:
    return Metric(0, "b-import", files, "s", f"`docker import` of the {files:,}-file image")


def diff_by_size(files: int) -> Metric:
    return Metric(1, "diff", files, "s", f"`docker diff`, 10 changed files, {files:,}-file image")


def commit(files: int) -> Metric:
    return Metric(
        2, "commit", files, "s", f"`docker commit`, 10 changed files, {files:,}-file image"
    )


def diff_by_changes(changed: int, files: int) -> Metric:
    return Metric(
        3,
        "diff-changes",
        changed,
        "s",
        f"`docker diff`, {changed:,} of the {files:,} files changed",
    )


def run_true() -> Metric:
    return Metric(4, "run", 0, "s", "`docker run --rm IMAGE true` (busybox image)")


def build() -> Metric:
    return Metric(5, "build", 0, "s", "`docker build`, 7 steps, classic builder, `--no-cache`")


def build_kit() -> Metric:
    return Metric(5, "build-kit", 0, "s", "`docker build`, same 7 steps, BuildKit, `--no-cache`")


def rpc_round_trip(clients: int) -> Metric:
    return Metric(6, "rpc-a-rt", clients, "ms", f"plugin Get+Put round trip p50, {clients} clients")


def rpc_request(clients: int) -> Metric:
    return Metric(
        6, "rpc-b-req", clients, "ms", f"plugin request (Get or Put) p50, {clients} clients"
    )


def rpc_request_p99(clients: int) -> Metric:
    return Metric(
        6, "rpc-c-p99", clients, "ms", f"plugin request (Get or Put) p99, {clients} clients"
    )


def rpc_rate(clients: int) -> Metric:
    return Metric(6, "rpc-d-rate", clients, "req/s", f"plugin requests/s, {clients} clients")


def image_load(files: int, mib: int) -> Metric:
    return Metric(7, "load", files, "s", f"`docker load` of a {mib:,} MiB image of {files:,} files")


def cpu(of: Metric, whose: str) -> Metric:
    """CPU seconds spent during each timed run of ``of``: ``"all"`` (every process and kernel
    thread on the machine) or ``"plugin"`` (its own process)."""
    what = {"all": "the whole machine", "plugin": "the plugin process"}[whose]
    return Metric(of.scenario, f"{of.key}-cpu-{whose}", of.param, "s", f"  CPU time of {what}")


def create_on(files: int) -> Metric:
    parent = f"a parent of {files:,} files" if files else "an empty parent"
    return Metric(8, "create-a", files, "ms", f"plugin Create (snapshot) on {parent}")


def create_ratio(files: int) -> Metric:
    return Metric(
        8, "create-b", files, "x", f"plugin Create on a {files:,}-file parent / on an empty one"
    )


def stream_rss(call: str, mib: int) -> Metric:
    key = {"ApplyDiff": "rss-a", "Diff": "rss-b"}[call]
    return Metric(9, key, mib, "MiB", f"plugin peak RSS during a {mib:,} MiB {call}")


@dataclass
class Results:
    """Everything the report is written from; saved as JSON next to it."""

    drivers: list[str]
    samples: dict[Metric, dict[str, list[float]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    peak_rss_kib: dict[str, dict[str, int]] = field(default_factory=dict)
    diff_digests: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    driver_runs: dict[str, dict[str, str]] = field(default_factory=dict)
    driver_status: dict[str, str] = field(default_factory=dict)
    machine: dict[str, str] = field(default_factory=dict)
    command: str = ""  # the bench/run command line that measured these

    @classmethod
    def load(cls, path: Path) -> Results:
        """What :meth:`save` wrote."""
        data = json.loads(path.read_text())
        names = Metric.__dataclass_fields__
        results = cls(
            drivers=data["drivers"],
            **{key: data[key] for key in _SAVED if key in data},
        )
        for row in data["samples"]:
            metric = Metric(**{key: row[key] for key in names})
            results.samples.setdefault(metric, {})[row["driver"]] = row["samples"]
        return results

    def add(self, metric: Metric, driver: str, value: float) -> None:
        self.samples.setdefault(metric, {}).setdefault(driver, []).append(value)

    def median(self, metric: Metric, driver: str) -> float | None:
        values = self.samples.get(metric, {}).get(driver)
        return statistics.median(values) if values else None

    def metrics(self, scenario: int | None = None, key: str | None = None) -> list[Metric]:
        return sorted(
            m
            for m in self.samples
            if (scenario is None or m.scenario == scenario) and (key is None or m.key == key)
        )

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def to_json(self) -> dict[str, Any]:
        return {
            "drivers": self.drivers,
            **{key: getattr(self, key) for key in _SAVED},
            "samples": [
                {
                    **asdict(metric),
                    "driver": driver,
                    "samples": values,
                    "median": statistics.median(values),
                }
                for metric in sorted(self.samples)
                for driver, values in self.samples[metric].items()
            ],
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")


#: The fields saved as they are (``drivers`` and ``samples`` apart).
_SAVED = (
    "command",
    "machine",
    "failures",
    "notes",
    "peak_rss_kib",
    "diff_digests",
    "driver_runs",
    "driver_status",
)
