"""Benchmark: what per-call observation (metrics, log fields) costs Get and Put, in-process.

Three measurements, each the median of ``--rounds`` rounds of ``--pairs`` Get+Put pairs on one
layer of the example copydir backend (plain directories in a temporary Home; one Get is held
throughout, so every Get/Put stays on the event loop and no mount is made or dropped):

- ``driver``: ``GraphDriver.get``/``put`` awaited directly (the core's path; no front code).
- ``app``: the aiohttp app's Get and Put handlers called through the app's middleware with a
  prepared request (the front's path without a socket: where the instrumentation sits).
- ``socket``: real HTTP over a unix socket to the app served by aiohttp, from a client on the same
  event loop (one connection per call, as dockerd does).

``--metrics`` turns metrics on (as ``--metrics-listen`` does, without a listener). The script runs
unchanged against a tree without metrics (``PYTHONPATH=/path/to/old/tree``), so the same numbers
can be taken before and after::

    .venv/bin/python bench/metrics_overhead.py                 # this tree, no listener
    .venv/bin/python bench/metrics_overhead.py --metrics       # this tree, metrics on
    git archive be24d8d | tar -x -C /tmp/base
    PYTHONPATH=/tmp/base .venv/bin/python bench/metrics_overhead.py   # before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

import snapdriver
from snapdriver.graphdriver import app as graphdriver_app
from snapdriver.graphdriver.driver import GraphDriver
from snapdriver.plugins import Backend

LAYER = "b" * 64
PHASES = ("driver", "app", "socket")
Pair = Callable[[], Awaitable[None]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2000, help="Get+Put pairs per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--metrics", action="store_true", help="turn metrics on")
    parser.add_argument("--only", choices=PHASES, action="append", help="these measurements only")
    args = parser.parse_args()
    if args.metrics:
        from snapdriver import metrics

        metrics.enable("copydir")
    result = asyncio.run(measure(args.pairs, args.rounds, args.only or PHASES))
    result |= {"tree": str(Path(snapdriver.__file__).parent.parent), "metrics": args.metrics}
    print(json.dumps(result))
    return 0


async def measure(pairs: int, rounds: int, phases: Sequence[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sd-overhead-") as tmp:
        driver = GraphDriver(Backend.load("copydir"), Path(tmp) / "state")
        await driver.init(str(Path(tmp) / "home"), [])
        await driver.create(LAYER, None)
        await driver.get(LAYER)  # held: Get/Put pairs never mount or unmount
        app = graphdriver_app.create_app(driver)
        results = {}
        makers = {"driver": _driver_pair, "app": _app_pair, "socket": _socket_pair}
        for name in (p for p in PHASES if p in phases):  # socket last: it closes the driver
            async with makers[name](driver, app, Path(tmp)) as pair:
                results[name] = await _rounds(pair, pairs, rounds)
        if "socket" not in phases:
            driver.close()  # else the app's clean-up did
    return results


async def _rounds(pair: Pair, pairs: int, rounds: int) -> dict[str, float]:
    for _ in range(min(pairs, 200)):  # warm up
        await pair()
    per_pair = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(pairs):
            await pair()
        per_pair.append((time.perf_counter() - started) / pairs * 1e6)
    return {"median_us": round(statistics.median(per_pair), 2), "min_us": round(min(per_pair), 2)}


class _Context:
    """An async context manager yielding a pair function, with optional set-up and tear-down."""

    def __init__(self, pair: Pair, close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.pair, self.close = pair, close

    async def __aenter__(self) -> Pair:
        return self.pair

    async def __aexit__(self, *exc: object) -> None:
        if self.close is not None:
            await self.close()


def _driver_pair(driver: GraphDriver, app: web.Application, tmp: Path) -> _Context:
    async def pair() -> None:
        await driver.get(LAYER)
        await driver.put(LAYER)

    return _Context(pair)


def _app_pair(driver: GraphDriver, app: web.Application, tmp: Path) -> _Context:
    body = json.dumps({"ID": LAYER}).encode()
    middleware = graphdriver_app.error_middleware
    get, put = graphdriver_app.get, graphdriver_app.put

    def request(path: str) -> web.Request:
        req = make_mocked_request("POST", path, app=app)
        req._read_bytes = body  # what request.read() returns, every time: reusable
        return req

    get_request, put_request = request("/GraphDriver.Get"), request("/GraphDriver.Put")

    async def pair() -> None:
        status = (await middleware(get_request, get)).status
        status += (await middleware(put_request, put)).status
        if status != 400:
            raise RuntimeError(f"Get/Put failed: {status}")

    return _Context(pair)


def _socket_pair(driver: GraphDriver, app: web.Application, tmp: Path) -> _Context:
    path = tmp / "plugin.sock"
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    body = json.dumps({"ID": LAYER}).encode()

    async def call(method: str) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(
            f"POST /GraphDriver.{method} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/json\r\n\r\n".encode()
            + body
        )
        reply = await reader.read()  # the plugin closes every connection after its reply
        writer.close()
        if not reply.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(reply[:200].decode(errors="replace"))

    async def pair() -> None:
        await call("Get")
        await call("Put")

    class Serving(_Context):
        async def __aenter__(self) -> Pair:
            await runner.setup()
            await web.UnixSite(runner, str(path)).start()
            return pair

    return Serving(pair, runner.cleanup)  # last: the app's clean-up closes the driver


if __name__ == "__main__":
    sys.exit(main())
