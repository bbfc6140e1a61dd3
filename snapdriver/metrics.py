"""Prometheus metrics: the one recording API every front and the core report through.

Nothing is measured until :func:`enable` is called (the CLI does when ``--metrics-listen`` is
given): until then every ``observe_*`` function returns at its first line, and prometheus-client
is not even imported, so a plugin without a metrics listener pays one global lookup per call.

A front records each call it serves with :func:`observe_call`, or, with its log fields too,
through :class:`snapdriver.observe.Call`::

    with Call("containerd", "Prepare") as call:   # outcome and duration recorded at exit
        call.layer = key
        ...

Method names are the front's own (``GraphDriver.Get``, ``Prepare``); outcomes come from
:func:`outcome_of`, so both fronts label their failures the same way. The names, types and labels
of every metric are listed in the README ("Operating snapdriver").

The native-diff seam is :data:`changes_timer`, a ``snapdriver.plugins`` entry-point plugin that
wraps the ``snapdriver_changes`` hook: the core's tree walk marks its answers
(:data:`snapdriver.plugins.WALKED`), so a native answer is told from the walk's. Every plugin
manager loads it, so importing this module stays cheap: no prometheus-client, no SQLite.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapdriver import __version__
from snapdriver.errors import SnapdriverError
from snapdriver.hookspec import hookimpl
from snapdriver.layers.changes import Change
from snapdriver.plugins import WALKED

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from snapdriver.core import Core

#: Seconds: a Get or Put on instant mounts takes well under a millisecond, an ApplyDiff minutes.
CALL_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
#: A native diff of a small change takes milliseconds; a walk of a big layer takes minutes.
CHANGES_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)
OUTCOME_OK = "ok"


def outcome_of(err: BaseException | None) -> str:
    """A call's outcome label: ``ok``, the snapdriver error's class name, or a general word.

    Bounded by the error classes in :mod:`snapdriver.errors`, so the label's values stay few.
    """
    if err is None:
        return OUTCOME_OK
    if isinstance(err, SnapdriverError):
        return type(err).__name__
    if isinstance(err, asyncio.CancelledError):
        return "cancelled"
    return "error"


class _Metrics:
    """The registry and its metrics, made once by :func:`enable`."""

    def __init__(self, backend: str) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )
        from prometheus_client.process_collector import ProcessCollector

        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        info = Gauge(
            "snapdriver_build_info",
            "Always 1: the version and backend.",
            ["version", "backend"],
            registry=r,
        )
        info.labels(__version__, backend).set(1)
        self.calls = Histogram(
            "snapdriver_call_duration_seconds",
            "Calls served, by front, method and outcome, and how long each took.",
            ["front", "method", "outcome"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.diff_bytes = Counter(
            "snapdriver_diff_bytes",
            "Bytes of layer tar streams: received by ApplyDiff (applied), sent by Diff (exported).",
            ["direction"],
            registry=r,
        )
        self.changes = Histogram(
            "snapdriver_changes_duration_seconds",
            "Change lists against a parent: answered natively by the backend, by the two-tree "
            "walk, or failed; and how long each took.",
            ["source"],
            buckets=CHANGES_BUCKETS,
            registry=r,
        )
        self.sweeps = Counter(
            "snapdriver_orphan_sweeps", "Orphan sweeps run (not dry runs).", registry=r
        )
        self.swept = Counter(
            "snapdriver_orphan_layers_removed", "Layers the orphan sweeps removed.", registry=r
        )
        self.start = Gauge(
            "snapdriver_start_duration_seconds", "Seconds from starting to serving.", registry=r
        )
        self.resumed = Gauge(
            "snapdriver_resumed",
            "1 if the front carried on from its recorded state (the last Init) at start.",
            registry=r,
        )
        # Label children looked up once: .labels() takes a lock and builds a key every time.
        self._call_children: dict[tuple[str, str, str], Any] = {}

    def call(self, front: str, method: str, outcome: str) -> Any:
        key = (front, method, outcome)
        child = self._call_children.get(key)
        if child is None:
            child = self._call_children[key] = self.calls.labels(front, method, outcome)
        return child


_metrics: _Metrics | None = None


def enable(backend: str = "") -> CollectorRegistry:
    """Start measuring (idempotent); returns the registry to serve."""
    global _metrics
    if _metrics is None:
        _metrics = _Metrics(backend)
    return _metrics.registry


def disable() -> None:
    """Stop measuring and forget every value (for tests)."""
    global _metrics
    _metrics = None


def enabled() -> bool:
    return _metrics is not None


def observe_call(front: str, method: str, outcome: str, seconds: float) -> None:
    """One call served by ``front``: ``method`` in the front's terms, ``outcome`` from
    :func:`outcome_of` (or ``ok``), and its duration."""
    if _metrics is None:
        return
    _metrics.call(front, method, outcome).observe(seconds)


def observe_bytes(direction: str, count: int) -> None:
    """Tar bytes of a layer: ``applied`` (received by ApplyDiff) or ``exported`` (sent by Diff)."""
    if _metrics is None or count <= 0:
        return
    _metrics.diff_bytes.labels(direction).inc(count)


def observe_changes(source: str, seconds: float) -> None:
    """A change list: ``native``, ``walk`` or ``error``."""
    if _metrics is None:
        return
    _metrics.changes.labels(source).observe(seconds)


def observe_sweep(removed: int) -> None:
    if _metrics is None:
        return
    _metrics.sweeps.inc()
    _metrics.swept.inc(removed)


def observe_start(seconds: float) -> None:
    if _metrics is not None:
        _metrics.start.set(seconds)


def observe_resumed(resumed: bool) -> None:
    if _metrics is not None:
        _metrics.resumed.set(int(resumed))


# -- the core's state, read at scrape time -------------------------------------------------------


@dataclass(eq=False)  # the registry keys its collectors by identity
class CoreCollector:
    """Layers by status, mounted layers and references held, from a :class:`Core` at each scrape.

    Read on the event loop that serves the scrape, the one the core runs on: no locks needed
    beyond the record's own.
    """

    core: Core

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        from snapdriver.layers.state import Status  # not at import: it loads sqlite3

        census = self.core.census()
        layers = GaugeMetricFamily(
            "snapdriver_layers", "Recorded layers by status.", labels=["status"]
        )
        for status in Status:
            layers.add_metric([status.value], census.layers.get(status, 0))
        yield layers
        yield GaugeMetricFamily(
            "snapdriver_mounted_layers",
            "Layers mounted now (a path handed out or an operation running).",
            value=census.mounted,
        )
        refs = GaugeMetricFamily(
            "snapdriver_layer_references",
            "References held on layers: by the front (a Get without its Put yet) and by the "
            "core's own running operations.",
            labels=["holder"],
        )
        refs.add_metric(["front"], census.refs)
        refs.add_metric(["core"], census.internal_refs)
        yield refs


def watch_core(core: Core) -> None:
    """Report ``core``'s layers, mounts and references at every scrape (after :func:`enable`)."""
    if _metrics is not None:
        _metrics.registry.register(CoreCollector(core))


# -- the native-diff seam: a snapdriver.plugins entry point -------------------------------------


class ChangesTimer:
    """Times every change list and tells native answers from the tree walk's.

    Registered through the ``snapdriver.plugins`` entry-point group (see pyproject.toml), like
    any third-party plugin: it is an example of that seam as much as a meter.
    """

    @hookimpl(wrapper=True)
    def snapdriver_changes(
        self, layer: str, layer_dir: Path, parent: str, parent_dir: Path
    ) -> Generator[None, Sequence[Change] | None, Sequence[Change] | None]:
        if _metrics is None:
            return (yield)
        token = WALKED.set(False)
        started = time.perf_counter()
        try:
            found = yield
        except BaseException:
            observe_changes("error", time.perf_counter() - started)
            raise
        else:
            source = "walk" if WALKED.get() else "native"
            observe_changes(source, time.perf_counter() - started)
            return found
        finally:
            WALKED.reset(token)


#: The object the ``snapdriver.plugins`` entry point ``metrics`` names.
changes_timer = ChangesTimer()

__all__: Sequence[str] = [
    "ChangesTimer",
    "CoreCollector",
    "changes_timer",
    "disable",
    "enable",
    "enabled",
    "observe_bytes",
    "observe_call",
    "observe_changes",
    "observe_resumed",
    "observe_start",
    "observe_sweep",
    "outcome_of",
    "watch_core",
]
