"""Malformed requests on every endpoint: never a crash, never a traceback, always ``{"Err"}``.

The plugin runs as its own process (the example copydir backend under a temporary Home, so what
valid-looking requests create stays in the test's directory) and hypothesis throws bodies and
queries at it over the unix socket: wrong types, missing fields, huge bodies, IDs with ``/``,
``..``, NUL or bytes that are not UTF-8.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapdriver.graphdriver.client import PluginClient
from snapdriver.testing.process import PluginProcess

ENDPOINTS = [
    "Create",
    "CreateReadWrite",
    "Remove",
    "Get",
    "Put",
    "Exists",
    "Status",
    "GetMetadata",
    "Cleanup",
    "Diff",
    "Changes",
    "DiffSize",
    "Capabilities",
]
FIELDS = ["ID", "Parent", "MountLabel", "StorageOpt", "Home", "Opts", "UIDMaps", "GIDMaps"]
TRIED = {"requests": 0, "server_errors": 0, "tracebacks": 0}

hostile_ids = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        ["", ".", "..", "../etc", "a/b", "/abs", "x\x00y", "a" * 5000, "-init", "é", " ", "a\nb"]
    ),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | hostile_ids,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
bodies = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5).map(
        lambda d: json.dumps(d).encode()
    ),
    st.builds(lambda n: b'{"ID":"' + b"a" * n + b'"}', st.integers(0, 3 << 20)),
    st.just(b'{"ID": "\\ud800"}'),
    st.just(b"\xff\xfe{}"),
)


@pytest.fixture(scope="module")
def process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginProcess]:
    workdir = tmp_path_factory.mktemp("fuzz")
    plugin = PluginProcess("copydir", workdir)
    plugin.start()
    with plugin.client() as client:
        client.call("GraphDriver.Init", {"Home": str(workdir / "home"), "Opts": None})
    yield plugin
    plugin.stop()


def check_reply(method: str, status: int, body: bytes) -> None:
    TRIED["requests"] += 1
    if status >= 500:
        TRIED["server_errors"] += 1
    if b"Traceback" in body:
        TRIED["tracebacks"] += 1
    assert status < 500, f"{method}: server error {status}: {body[:200]!r}"
    assert b"Traceback" not in body
    if status == 200 and method == "GraphDriver.Diff":
        return
    reply = json.loads(body)
    if status != 200:
        assert set(reply) == {"Err"} and reply["Err"] and "\n" not in reply["Err"], reply


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(ENDPOINTS), body=bodies)
def test_json_endpoints(process: PluginProcess, endpoint: str, body: bytes) -> None:
    method = f"GraphDriver.{endpoint}"
    with PluginClient(process.address, timeout=60) as client:
        status, reply = client.raw(method, body)
    check_reply(method, status, reply)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(layer=st.binary(max_size=40), parent=st.binary(max_size=40), tar=st.binary(max_size=2048))
def test_apply_diff_queries_and_bodies(
    process: PluginProcess, layer: bytes, parent: bytes, tar: bytes
) -> None:
    path = f"GraphDriver.ApplyDiff?id={quote_from_bytes(layer)}&parent={quote_from_bytes(parent)}"
    with PluginClient(process.address, timeout=60) as client:
        status, reply = client.raw(path, tar)
    check_reply("GraphDriver.ApplyDiff", status, reply)


def test_still_serving_and_figure(process: PluginProcess, figure: Callable[[str], None]) -> None:
    with PluginClient(process.address) as client:
        assert client.call("Plugin.Activate") == {"Implements": ["GraphDriver"]}
    figure(
        f"MALFORMED REQUESTS: {TRIED['requests']} tried, {TRIED['server_errors']} crashes "
        f"(5xx), {TRIED['tracebacks']} tracebacks reaching the client"
    )
    assert TRIED["server_errors"] == 0 and TRIED["tracebacks"] == 0
