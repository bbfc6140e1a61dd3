"""Scenario 6: the plugin's Get/Put round trip over its unix socket, ``clients`` at once.

Each client is a thread with its own :class:`PluginClient` and its own layer, and does ``Get``
then ``Put`` in a loop, as dockerd does when it mounts and unmounts a container's layer. Every call
is a new connection, as for dockerd: the plugin closes each after its reply. The clients are
Python too, so the rate includes their own cost on the same two cores.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from dataclasses import dataclass

from snapdriver.protocol.client import PluginClient

WARM_UP = 5


@dataclass(frozen=True)
class LoadResult:
    round_trip_p50_ms: float
    request_p50_ms: float
    request_p99_ms: float
    requests_per_s: float


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def get_put_load(address: str, clients: int, rounds: int, prefix: str = "sdbench-rt") -> LoadResult:
    """``rounds`` Get+Put pairs per client, all clients released at once."""
    layers = [f"{prefix}-{i}" for i in range(clients)]
    with PluginClient(address) as admin:
        for layer in layers:
            admin.call(
                "GraphDriver.Create",
                {"ID": layer, "Parent": "", "MountLabel": "", "StorageOpt": {}},
            )
    round_trips: list[list[float]] = [[] for _ in layers]
    requests: list[list[float]] = [[] for _ in layers]
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        layer = layers[index]
        try:
            with PluginClient(address, timeout=60) as conn:
                for _ in range(WARM_UP):
                    conn.call("GraphDriver.Get", {"ID": layer, "MountLabel": ""})
                    conn.call("GraphDriver.Put", {"ID": layer})
                barrier.wait()
                for _ in range(rounds):
                    start = time.perf_counter()
                    conn.call("GraphDriver.Get", {"ID": layer, "MountLabel": ""})
                    middle = time.perf_counter()
                    conn.call("GraphDriver.Put", {"ID": layer})
                    end = time.perf_counter()
                    round_trips[index].append(end - start)
                    requests[index] += (middle - start, end - middle)
        except BaseException as err:
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    try:
        for thread in threads:
            thread.start()
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    finally:
        with PluginClient(address) as admin:
            for layer in layers:
                admin.call("GraphDriver.Remove", {"ID": layer})
    if errors:
        raise RuntimeError(f"Get/Put client failed: {errors[0]!r}") from errors[0]
    all_round_trips = [v for values in round_trips for v in values]
    all_requests = [v for values in requests for v in values]
    return LoadResult(
        round_trip_p50_ms=statistics.median(all_round_trips) * 1000,
        request_p50_ms=statistics.median(all_requests) * 1000,
        request_p99_ms=_percentile(all_requests, 0.99) * 1000,
        requests_per_s=len(all_requests) / wall,
    )
