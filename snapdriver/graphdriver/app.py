"""The aiohttp application that serves Docker's GraphDriver plugin protocol.

Every call is ``POST /<Iface>.<Method>``. Replies are JSON with a trailing newline, except Diff,
which streams the raw tar. One middleware turns every exception into ``{"Err": "..."}`` with a
non-200 status, so dockerd always gets a message it can show and never an HTML page or a
traceback. Requests are served concurrently: dockerd streams a Diff on one connection while it
sends the same bytes to ApplyDiff on another.

Every reply closes its connection. dockerd's plugin client (moby ``pkg/plugins``) retries a call
that failed in transport by sending the request again from a buffer the first attempt already
drained, so the retry carries an empty body ("ID is required"). A kept-alive connection that the
plugin closes while dockerd starts writing on it — at every restart — fails exactly that way; a
fresh connection per call fails only with "connection refused", before any byte is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import IO, Any, cast

from aiohttp import web

from snapdriver import metrics
from snapdriver.errors import (
    ArchiveError,
    BackendError,
    ConfigError,
    LayerBusyError,
    LayerExistsError,
    LayerNotFoundError,
    NoSpaceError,
    NotInitialisedError,
    QuotaNotSupportedError,
    RequestError,
    SnapdriverError,
)
from snapdriver.graphdriver.driver import DEFAULT_ORPHAN_AGE, GraphDriver
from snapdriver.graphdriver.types import (
    CONTENT_TYPE,
    MANIFEST,
    InitRequest,
    LayerRequest,
    decode_object,
    encode_changes,
    encode_error,
)
from snapdriver.observe import CURRENT, Call, set_layer
from snapdriver.streams import ThreadReader

log = logging.getLogger(__name__)
DRIVER = web.AppKey("driver", GraphDriver)
routes = web.RouteTableDef()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: The front's name in metrics and logs.
FRONT = "graphdriver"


#: Made once: ``json.dumps`` with non-default separators builds a new encoder on every call.
_encode = json.JSONEncoder(separators=(",", ":")).encode


def reply(data: Any, status: int = 200) -> web.Response:
    """JSON the way Go's encoder writes it: compact, newline-terminated."""
    body = _encode(data) + "\n"
    return web.Response(status=status, body=body.encode(), content_type=CONTENT_TYPE)


async def _layer_request(request: web.Request) -> LayerRequest:
    req = LayerRequest.decode(decode_object(await request.read()))
    set_layer(req.id)
    return req


def _driver(request: web.Request) -> GraphDriver:
    return request.app[DRIVER]


#: The HTTP status of each kind of error; the nearest class in an error's MRO decides.
STATUS: dict[type[SnapdriverError], int] = {
    ConfigError: 400,
    RequestError: 400,
    QuotaNotSupportedError: 400,
    ArchiveError: 400,
    LayerNotFoundError: 404,
    LayerExistsError: 409,
    LayerBusyError: 409,
    NotInitialisedError: 503,
    NoSpaceError: 507,
    BackendError: 500,
}


def http_status(err: SnapdriverError) -> int:
    return next((STATUS[c] for c in type(err).__mro__ if c in STATUS), 500)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place exceptions become protocol errors, and each call is observed."""
    path = request.path
    with Call(FRONT, path[1:] if path in CALLS else "other") as call:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            call.outcome = "BadRequest"
            message = exc.reason
            if exc.status in (404, 405):
                message = f"snapdriver does not serve {request.method} {request.path}"
            return reply(encode_error(message), exc.status)
        except SnapdriverError as err:
            call.fail(err)
            log.info("%s failed: %s", request.path, err)
            return reply(encode_error(str(err)), http_status(err))
        except asyncio.CancelledError:
            raise
        except Exception as err:
            call.fail(err)
            log.exception("unexpected error in %s", request.path)
            text = f"internal error in {request.path.lstrip('/')}: {type(err).__name__}: {err}"
            return reply(encode_error(text), 500)


@routes.post("/Plugin.Activate")
async def activate(request: web.Request) -> web.Response:
    return reply(MANIFEST)


@routes.post("/GraphDriver.Init")
async def init(request: web.Request) -> web.Response:
    req = InitRequest.decode(decode_object(await request.read()))
    await _driver(request).init(req.home, req.options, req.uid_maps, req.gid_maps)
    return reply({})


@routes.post("/GraphDriver.Capabilities")
async def capabilities(request: web.Request) -> web.Response:
    return reply({"Capabilities": GraphDriver.capabilities()})


@routes.post("/GraphDriver.Create")
async def create(request: web.Request) -> web.Response:
    req = await _layer_request(request)
    await _driver(request).create(req.id, req.parent, req.storage_opt)
    return reply({})


@routes.post("/GraphDriver.CreateReadWrite")
async def create_read_write(request: web.Request) -> web.StreamResponse:
    # Create layers must be writable too (dockerd and BuildKit write into them): same call.
    return await create(request)


@routes.post("/GraphDriver.Remove")
async def remove(request: web.Request) -> web.Response:
    req = await _layer_request(request)
    await _driver(request).remove(req.id)
    return reply({})


@routes.post("/GraphDriver.Get")
async def get(request: web.Request) -> web.Response:
    req = await _layer_request(request)
    path = await _driver(request).get(req.id, req.mount_label)
    return reply({"Dir": str(path)})


@routes.post("/GraphDriver.Put")
async def put(request: web.Request) -> web.Response:
    req = await _layer_request(request)
    await _driver(request).put(req.id)
    return reply({})


@routes.post("/GraphDriver.Exists")
async def exists(request: web.Request) -> web.Response:
    req = await _layer_request(request)
    return reply({"Exists": await _driver(request).exists(req.id)})


@routes.post("/GraphDriver.Status")
async def status(request: web.Request) -> web.Response:
    pairs = await _driver(request).status()
    return reply({"Status": [list(p) for p in pairs]})


@routes.post("/GraphDriver.GetMetadata")
async def get_metadata(request: web.Request) -> web.Response:
    req = await _layer_request(request)
    return reply({"Metadata": await _driver(request).metadata(req.id)})


@routes.post("/GraphDriver.Cleanup")
async def cleanup(request: web.Request) -> web.Response:
    await _driver(request).cleanup()
    return reply({})


@routes.post("/GraphDriver.Changes")
async def changes(request: web.Request) -> web.Response:
    req = await _layer_request(request)
    return reply(encode_changes(await _driver(request).changes(req.id, req.parent)))


@routes.post("/GraphDriver.DiffSize")
async def diff_size(request: web.Request) -> web.Response:
    req = await _layer_request(request)
    return reply({"Size": await _driver(request).diff_size(req.id, req.parent)})


@routes.post("/GraphDriver.ApplyDiff")
async def apply_diff(request: web.Request) -> web.Response:
    req = LayerRequest.from_query(request.query)
    set_layer(req.id)
    # Unbuffered: apply_tar's reader buffers, and ThreadReader.read hands over what it gathered
    # without a copy (a BufferedReader here cost a copy of every byte: bench/apply-cpu.md).
    stream = cast(IO[bytes], ThreadReader(request.content, asyncio.get_running_loop()))
    try:
        size = await _driver(request).apply_diff(req.id, req.parent, stream)
    finally:
        # Whatever was not consumed (tar padding, or all of it after an error) must be read,
        # or it would be parsed as the next request on this kept-alive connection.
        while await request.content.readany():
            pass
        metrics.observe_bytes("applied", request.content.total_bytes)
    return reply({"Size": size})


@routes.post("/GraphDriver.Diff")
async def diff(request: web.Request) -> web.StreamResponse:
    req = await _layer_request(request)
    async with _driver(request).diff(req.id, req.parent) as job:
        response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        sent = 0

        async def write(chunk: bytes) -> None:
            nonlocal sent
            sent += len(chunk)
            await response.write(chunk)

        try:
            await job.stream(write)
        except (SnapdriverError, OSError) as err:
            # The status line is out: the only way left to signal failure is a broken stream.
            log.error("Diff of %s failed mid-stream: %s", req.id, err)
            _current_call_failed(err)
            if request.transport is not None:
                request.transport.abort()
            return response
        finally:
            metrics.observe_bytes("exported", sent)
        await response.write_eof()
        return response


@routes.post("/Snapdriver.Sweep")
async def sweep(request: web.Request) -> web.Response:
    """Not Docker's: reclaim orphan layers now (``snapdriver sweep``)."""
    data = decode_object(await request.read())
    min_age, dry_run = data.get("MinAge", DEFAULT_ORPHAN_AGE), data.get("DryRun", False)
    if not isinstance(min_age, int | float) or not isinstance(dry_run, bool):
        raise RequestError("MinAge must be a number of seconds and DryRun a boolean")
    removed = await _driver(request).sweep(float(min_age), dry_run)
    return reply({"Removed": removed})


def _current_call_failed(err: BaseException) -> None:
    call = CURRENT.get()
    if call is not None:
        call.fail(err)


#: The paths the app serves: the method label of their calls (any other path is "other").
CALLS = frozenset(route.path for route in routes if isinstance(route, web.RouteDef))


async def close_connection(request: web.Request, response: web.StreamResponse) -> None:
    """Send ``Connection: close`` on every reply (see the module docstring for why)."""
    response.force_close()
    # aiohttp has already chosen the headers when this signal runs: say it ourselves.
    response.headers["Connection"] = "close"


def create_app(driver: GraphDriver) -> web.Application:
    """The application factory: routes, the error middleware and the driver as typed state."""
    app = web.Application(middlewares=[error_middleware])
    app[DRIVER] = driver
    app.add_routes(routes)
    app.on_response_prepare.append(close_connection)

    async def lifecycle(app: web.Application) -> Any:
        yield
        driver = app[DRIVER]
        try:
            await driver.cleanup()  # as on dockerd's Cleanup: let the backend finish its work
        except Exception:
            log.exception("clean-up at shutdown failed")
        finally:
            driver.close()

    app.cleanup_ctx.append(lifecycle)
    return app


__all__ = ["DRIVER", "create_app", "http_status", "reply"]
