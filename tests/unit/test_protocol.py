"""The aiohttp application over a real socket, with the example copydir backend on tmp."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from snapdriver.errors import RequestError
from snapdriver.graphdriver.app import create_app
from snapdriver.graphdriver.driver import GraphDriver
from snapdriver.graphdriver.types import InitRequest, LayerRequest
from snapdriver.plugins import Backend

ID = "a" * 64
Client = TestClient[Any, Any]


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def with_client(tmp_path: Path, scenario: object) -> object:
    backend = Backend.load("copydir")
    app = create_app(GraphDriver(backend, tmp_path / "state"))
    async with TestClient(TestServer(app)) as client:
        return await scenario(client)  # type: ignore[operator]


async def post(client: Client, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    response = await client.post(path, data=body, headers={"Host": ""})
    return response.status, json.loads(await response.read())


def test_calls_before_init_get_a_json_error(tmp_path: Path) -> None:
    async def scenario(client: Client) -> None:
        status, body = await post(client, "/GraphDriver.Get", b'{"ID":"%s"}\n' % ID.encode())
        assert status == 503 and "Init" in body["Err"]

    run(with_client(tmp_path, scenario))


@pytest.mark.parametrize(
    ("path", "body", "status", "text"),
    [
        ("/GraphDriver.Create", b"{not json", 400, "not valid JSON"),
        ("/GraphDriver.Create", b"[1,2]", 400, "JSON object"),
        ("/GraphDriver.Create", b'{"ID": 5}', 400, "ID must be a string"),
        ("/GraphDriver.Create", b'{"ID": "a/b"}', 400, "invalid layer ID"),
        ("/GraphDriver.Create", b'{"ID": "x\\u0000y"}', 400, "invalid layer ID"),
        ("/GraphDriver.Create", b'{"ID": "ok", "StorageOpt": {"size": 3}}', 400, "StorageOpt"),
        ("/GraphDriver.Init", b'{"Home": 7}', 400, "Home must be a string"),
        ("/GraphDriver.Nope", b"{}", 404, "does not serve"),
        ("/GraphDriver.Create", b" " * (2 << 20), 413, ""),
    ],
)
def test_malformed_requests_get_json_errors(
    tmp_path: Path, path: str, body: bytes, status: int, text: str
) -> None:
    async def scenario(client: Client) -> None:
        got, reply = await post(client, path, body)
        assert got == status and set(reply) == {"Err"} and text in reply["Err"]

    run(with_client(tmp_path, scenario))


def test_init_with_nulls_then_layer_lifecycle(tmp_path: Path) -> None:
    home = tmp_path / "home"

    async def scenario(client: Client) -> None:
        init = {"Home": str(home), "Opts": None, "UIDMaps": None, "GIDMaps": None}
        assert await post(client, "/GraphDriver.Init", json.dumps(init).encode()) == (200, {})
        assert await post(client, "/GraphDriver.Create", b'{"ID":"%s"}\n' % ID.encode()) == (
            200,
            {},
        )
        status, got = await post(client, "/GraphDriver.Get", b'{"ID":"%s"}' % ID.encode())
        assert status == 200 and Path(got["Dir"]).is_dir()
        response = await client.post(f"/GraphDriver.ApplyDiff?id={ID}&parent=", data=b"")
        assert (response.status, await response.json()) == (200, {"Size": 0})
        response = await client.get("/GraphDriver.Status")
        assert response.status == 405
        assert (await post(client, "/GraphDriver.Remove", b'{"ID":"%s"}' % ID.encode()))[0] == 200

    run(with_client(tmp_path, scenario))


def test_malformed_userns_maps_are_refused_clearly(tmp_path: Path) -> None:
    async def scenario(client: Client) -> None:
        for maps, expected in (
            ([{"container_id": 0, "host_id": 100000}], "UIDMaps entry"),
            ([{"container_id": 0, "host_id": 100000, "size": 0}], "UIDMaps entry"),
            ([{"container_id": 1, "host_id": 100000, "size": 10}], "container root"),
            ("0:100000:65536", "UIDMaps must be a list"),
        ):
            init = {"Home": str(tmp_path / "h"), "Opts": [], "UIDMaps": maps, "GIDMaps": None}
            status, body = await post(client, "/GraphDriver.Init", json.dumps(init).encode())
            assert status == 400 and expected in body["Err"], body

    run(with_client(tmp_path, scenario))


def test_request_types_decode_dockers_omissions() -> None:
    assert LayerRequest.decode({"ID": ID}) == LayerRequest(ID)
    assert LayerRequest.from_query({"id": ID, "parent": ""}).parent is None
    assert InitRequest.decode({"Home": "/h", "Opts": None}).options == ()
    with pytest.raises(RequestError):
        LayerRequest.decode({})
    with pytest.raises(RequestError):
        LayerRequest.from_query({"id": ".."})


@pytest.mark.parametrize(
    ("path", "body"),
    [("/Plugin.Activate", b""), ("/GraphDriver.Get", b"{}"), ("/GraphDriver.Nope", b"{}")],
)
def test_every_reply_closes_its_connection(tmp_path: Path, path: str, body: bytes) -> None:
    # dockerd resends a call that failed on a reused connection with an empty body.
    async def scenario(client: Client) -> None:
        response = await client.post(path, data=body, headers={"Host": ""})
        await response.read()
        assert response.headers.get("Connection", "").lower() == "close"

    run(with_client(tmp_path, scenario))


def test_debug_logging_times_every_call(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The call profile of bench/buildkit.md: one debug record per call, also a failed one."""

    async def scenario(client: Client) -> None:
        await post(client, "/GraphDriver.Get", b'{"ID":"%s"}\n' % ID.encode())
        await post(client, "/GraphDriver.Capabilities", b"{}")

    with caplog.at_level(logging.DEBUG, logger="snapdriver.calls"):
        run(with_client(tmp_path, scenario))
    calls = [r for r in caplog.records if r.name == "snapdriver.calls"]
    assert [(r.call, r.outcome) for r in calls] == [  # type: ignore[attr-defined]
        ("GraphDriver.Get", "NotInitialisedError"),
        ("GraphDriver.Capabilities", "ok"),
    ]
    assert all(r.getMessage().endswith(" ms") for r in calls)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="snapdriver.calls"):
        run(with_client(tmp_path, scenario))
    assert not [r for r in caplog.records if r.name == "snapdriver.calls"]
