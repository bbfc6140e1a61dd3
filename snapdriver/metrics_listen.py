"""The metrics listener: ``GET /metrics`` over TCP or a unix socket, on the daemon's event loop.

``--metrics-listen`` takes ``HOST:PORT`` (``127.0.0.1:9323``, ``[::1]:9323``, ``:9323`` for every
interface; ``http://`` before it is allowed) or ``unix:///path.sock`` for a scraper on the same
node (nothing listens on the network). The unix socket is made mode 0600 (0660 and owned by
``--metrics-group`` if given, for a scraper that does not run as root) and replaced if stale.

prometheus-client's aiohttp handler serves the registry from the same event loop as the front, so
the core's state is read at scrape time without a lock or a thread of its own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from snapdriver import metrics
from snapdriver.errors import ConfigError

if TYPE_CHECKING:
    from aiohttp import web

    from snapdriver.core import Core

USAGE = "expected HOST:PORT, [IPv6]:PORT, :PORT or unix:///path.sock"


@dataclass(frozen=True)
class MetricsAddress:
    """A TCP ``host`` (empty: every interface) and ``port``, or a unix socket ``path``."""

    host: str = ""
    port: int = 0
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> MetricsAddress:
        if text.startswith("unix:"):
            path = urlsplit(text).path
            if not text.startswith("unix://") or not path.startswith("/") or path.endswith("/"):
                raise _bad(text, "a unix socket needs an absolute path: unix:///run/x.sock")
            return cls(path=Path(path))
        rest = text.removeprefix("http://")  # as it is printed
        if "://" in rest:
            raise _bad(text, USAGE)
        host, sep, port = rest.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise _bad(text, USAGE)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host or "[" in host or "]" in host or "/" in host:
            raise _bad(text, "write an IPv6 address in brackets: [::1]:9323")
        return cls(host=host, port=int(port))

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"--metrics-listen {text!r}: {why}")


@contextlib.asynccontextmanager
async def metrics_serving(
    address: MetricsAddress | str | None, core: Core, backend: str = "", group: int | None = None
) -> AsyncIterator[str | None]:
    """Measure ``core`` and serve the metrics at ``address`` until the block exits.

    With no address, nothing is measured and nothing listens (yields None). Yields where it
    listens (with the port TCP chose for port 0). A bad or busy address is a :class:`ConfigError`.
    ``group`` may read a unix socket (mode 0660); it is an error for a TCP address.
    """
    if address is None:
        yield None
        return
    if isinstance(address, str):
        address = MetricsAddress.parse(address)
    if group is not None and address.path is None:
        raise ConfigError(f"--metrics-group is for a unix:// --metrics-listen, not {address}")
    registry = metrics.enable(backend)
    metrics.watch_core(core)
    from aiohttp import web
    from prometheus_client.aiohttp import make_aiohttp_handler

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_get("/", _index)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    bound: list[Path] = []  # the socket to remove at the end: only one this made
    try:
        yield await _start(runner, address, bound, group)
    finally:
        await runner.cleanup()
        for path in bound:
            path.unlink(missing_ok=True)
        metrics.disable()


async def _start(
    runner: web.AppRunner, address: MetricsAddress, bound: list[Path], group: int | None
) -> str:
    from aiohttp import web

    from snapdriver.sockets import bind_unix_socket

    site: web.BaseSite
    try:
        if address.path is not None:
            site = web.SockSite(runner, bind_unix_socket(address.path, group))
            bound.append(address.path)
        else:
            site = web.TCPSite(runner, address.host or None, address.port)
        await site.start()
    except OSError as err:
        # asyncio words a bind error its own way ("error while attempting to bind on ..."):
        # the plain reason is what a person needs, the address is said already.
        reason = os.strerror(err.errno) if err.errno and err.errno > 0 else err.strerror or err
        raise ConfigError(f"cannot serve metrics on {address}: {reason}") from err
    if address.path is None and address.port == 0:
        port = runner.addresses[0][1]
        address = MetricsAddress(address.host, port)
    return f"{address}/metrics"


async def _index(request: web.Request) -> web.Response:
    from aiohttp import web

    return web.Response(text="snapdriver metrics: GET /metrics\n")
