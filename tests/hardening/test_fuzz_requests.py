"""Malformed requests on every endpoint: never a crash, never a traceback, always ``{"Err"}``.

The plugin runs as its own process on a real backend, btrfs (the session's loop image, on the
host) or ZFS (a root dataset of its own, in the lab), and hypothesis throws bodies and queries at
it over the unix socket: wrong types, missing fields, huge bodies, IDs with ``/``, ``..``, NUL or
bytes that are not UTF-8. What valid-looking requests happen to create is removed afterwards, so
the tiers' leak checks judge the plugin, not the fuzzer. On ZFS the module took about 1.5 guest
minutes, with other lab guests beside it (a request is milliseconds; the few Creates that
succeed are a dataset each).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapdriver.graphdriver.client import PluginCallError, PluginClient
from snapdriver.testing.process import PluginProcess
from tests.storage import Space, Storage

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
#: Per backend: requests tried, server errors, tracebacks.
TRIED: dict[str, Counter[str]] = {}

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
def process(space: Space, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginProcess]:
    storage = space.new_home("fuzz")
    plugin = PluginProcess(space.backend, tmp_path_factory.mktemp("fuzz"))
    plugin.start()
    TRIED[space.backend] = Counter()
    try:
        with plugin.client() as client:
            init = {"Home": str(storage.home), "Opts": storage.init_options or None}
            client.call("GraphDriver.Init", init)
        yield plugin
        remove_stored(plugin, storage)
    finally:
        plugin.stop()


def remove_stored(plugin: PluginProcess, storage: Storage) -> None:
    """Remove whatever the fuzzer's valid-looking Creates made, children before parents."""
    with PluginClient(plugin.address, timeout=60) as client:
        for _ in range(10):
            left = storage.stored()
            if not left:
                return
            for layer in left:
                with contextlib.suppress(PluginCallError):
                    client.call("GraphDriver.Remove", {"ID": layer})


def tally(process: PluginProcess) -> Counter[str]:
    return TRIED[process.backend]


def check_reply(tried: Counter[str], method: str, status: int, body: bytes) -> None:
    tried["requests"] += 1
    if status >= 500:
        tried["server_errors"] += 1
    if b"Traceback" in body:
        tried["tracebacks"] += 1
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
    check_reply(tally(process), method, status, reply)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(layer=st.binary(max_size=40), parent=st.binary(max_size=40), tar=st.binary(max_size=2048))
def test_apply_diff_queries_and_bodies(
    process: PluginProcess, layer: bytes, parent: bytes, tar: bytes
) -> None:
    path = f"GraphDriver.ApplyDiff?id={quote_from_bytes(layer)}&parent={quote_from_bytes(parent)}"
    with PluginClient(process.address, timeout=60) as client:
        status, reply = client.raw(path, tar)
    check_reply(tally(process), "GraphDriver.ApplyDiff", status, reply)


def test_still_serving_and_figure(process: PluginProcess, figure: Callable[[str], None]) -> None:
    with PluginClient(process.address) as client:
        assert client.call("Plugin.Activate") == {"Implements": ["GraphDriver"]}
    tried = tally(process)
    figure(
        f"MALFORMED REQUESTS ({process.backend}): {tried['requests']} tried, "
        f"{tried['server_errors']} crashes (5xx), {tried['tracebacks']} tracebacks reaching the "
        "client"
    )
    assert tried["server_errors"] == 0 and tried["tracebacks"] == 0
