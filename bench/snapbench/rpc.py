"""Scenario 6: the plugin's Get/Put round trip over its unix socket, ``clients`` at once.

Each client is a process of its own with its own layer, and does ``Get`` then ``Put`` in a loop,
as dockerd does when it mounts and unmounts a container's layer. Every call is a new connection,
as for dockerd: the plugin closes each after its reply.

The clients share the plugin's two cores, so what they cost is taken from the plugin, and dockerd's
client is Go. Python threads over ``http.client`` cost ~150-300 us of CPU per request (up to
three quarters of the plugin's own) and topped out at ~3,000-4,800 requests/s against a server
that does nothing. So each client here is a forked process that sends request bytes built once
over a raw socket and reads the reply by its ``Content-Length``: ~40-60 us per request and
~11,000-20,000 requests/s against that server (bench/README.md, scenario 6).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import socket
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from typing import Any

from snapdriver.graphdriver.client import ACCEPT, PluginClient, unix_path

WARM_UP = 5
#: How long a client waits for one reply (and the others for the clients' warm-up) at most.
TIMEOUT = 60.0
#: Releases a client process's timed rounds (set in each process as it starts).
_start: Barrier


@dataclass(frozen=True)
class LoadResult:
    round_trip_p50_ms: float
    request_p50_ms: float
    request_p99_ms: float
    requests_per_s: float


@dataclass(frozen=True)
class ClientTimes:
    """One client's measurements: seconds per pair and per request, and when it finished."""

    round_trips: list[float]
    requests: list[float]
    end: float


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def http_request(method: str, payload: dict[str, Any]) -> bytes:
    """``POST /method`` as dockerd's Go client writes it: JSON body, newline-terminated."""
    body = json.dumps(payload).encode() + b"\n"
    head = (
        f"POST /{method} HTTP/1.1\r\nHost: plugin\r\nUser-Agent: snapbench\r\n"
        f"Content-Length: {len(body)}\r\nAccept: {ACCEPT}\r\n\r\n"
    )
    return head.encode() + body


def call_raw(path: str, request: bytes) -> bytes:
    """Send ``request`` on a new connection; the reply's body, or RuntimeError if not 200."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"the plugin closed the connection after {data[:200]!r}")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = _content_length(head)
        while len(body) < length and (more := sock.recv(65536)):
            body += more
    if head[9:12] != b"200" or len(body) != length:
        # Not PluginCallError: what a client process raises must survive pickling.
        raise RuntimeError(f"{request.split(b' ', 2)[1].decode()}: {head[:12]!r} {body!r}")
    return body


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            return int(value)
    raise ValueError(f"reply without Content-Length: {head[:200]!r}")


def _client(path: str, layer: str, rounds: int) -> ClientTimes:
    """One client: ``WARM_UP`` pairs, the barrier, then ``rounds`` timed Get+Put pairs."""
    get = http_request("GraphDriver.Get", {"ID": layer, "MountLabel": ""})
    put = http_request("GraphDriver.Put", {"ID": layer})
    try:
        for _ in range(WARM_UP):
            if not json.loads(call_raw(path, get)).get("Dir"):
                raise RuntimeError(f"Get of {layer} gave no Dir")
            call_raw(path, put)
    except BaseException:
        _start.abort()  # nobody waits for a client that will never come
        raise
    _start.wait()
    round_trips: list[float] = []
    requests: list[float] = []
    clock = time.perf_counter
    for _ in range(rounds):
        start = clock()
        call_raw(path, get)
        middle = clock()
        call_raw(path, put)
        end = clock()
        round_trips.append(end - start)
        requests += (middle - start, end - middle)
    return ClientTimes(round_trips, requests, clock())


def _set_start(barrier: Barrier) -> None:
    global _start  # a barrier reaches a process only as it is made: not through the pool
    _start = barrier


def get_put_load(address: str, clients: int, rounds: int, prefix: str = "sdbench-rt") -> LoadResult:
    """``rounds`` Get+Put pairs per client, all clients released at once."""
    path = unix_path(address)
    layers = [f"{prefix}-{i}" for i in range(clients)]
    with PluginClient(address) as admin:
        for layer in layers:
            admin.call(
                "GraphDriver.Create",
                {"ID": layer, "Parent": "", "MountLabel": "", "StorageOpt": {}},
            )
    try:
        times, wall = _run_clients(path, layers, rounds)
    finally:
        with PluginClient(address) as admin:
            for layer in layers:
                admin.call("GraphDriver.Remove", {"ID": layer})
    all_round_trips = [v for t in times for v in t.round_trips]
    all_requests = [v for t in times for v in t.requests]
    return LoadResult(
        round_trip_p50_ms=statistics.median(all_round_trips) * 1000,
        request_p50_ms=statistics.median(all_requests) * 1000,
        request_p99_ms=_percentile(all_requests, 0.99) * 1000,
        requests_per_s=len(all_requests) / wall,
    )


def _run_clients(path: str, layers: list[str], rounds: int) -> tuple[list[ClientTimes], float]:
    """Every client's times, and the wall time from their release to the last one's end."""
    # Forked: the benchmark is one thread here, and a spawned child would re-run snapbench.
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(len(layers) + 1)
    with ProcessPoolExecutor(len(layers), context, _set_start, (barrier,)) as pool:
        futures = [pool.submit(_client, path, layer, rounds) for layer in layers]
        with contextlib.suppress(threading.BrokenBarrierError):  # the client's error follows
            barrier.wait(timeout=TIMEOUT)
        start = time.perf_counter()
        times = [future.result() for future in futures]
    # perf_counter is CLOCK_MONOTONIC: the clients' clocks and this one are the same clock.
    return times, max(t.end for t in times) - start
