"""The metrics listener and what it counts, served in-process over real sockets.

The graphdriver app runs on the example copydir backend (plain directories); its calls go over a
real socket and the metrics are scraped from the listener over another. The real-backend proof
(btrfs native diffs under dockerd) is tests/dockerd/test_dockerd_metrics.py.
"""

from __future__ import annotations

import asyncio
import grp
import json
import socket
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from snapdriver import hookimpl, metrics
from snapdriver.errors import ConfigError
from snapdriver.graphdriver.app import create_app
from snapdriver.graphdriver.driver import GraphDriver
from snapdriver.layers.changes import Change
from snapdriver.metrics_listen import MetricsAddress, metrics_serving
from snapdriver.plugins import Backend
from snapdriver.testing.metrics import Samples, fetch, scrape

A, B, C = "a" * 64, "b" * 64, "c" * 64
Client = TestClient[Any, Any]
CALL = "snapdriver_call_duration_seconds_count"


@pytest.fixture(autouse=True)
def _metrics_off() -> Iterator[None]:
    metrics.disable()
    yield
    metrics.disable()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9323", MetricsAddress("127.0.0.1", 9323)),
        ("localhost:0", MetricsAddress("localhost", 0)),
        (":9323", MetricsAddress("", 9323)),
        ("[::1]:9323", MetricsAddress("::1", 9323)),
        ("http://127.0.0.1:9323", MetricsAddress("127.0.0.1", 9323)),
        (
            "unix:///run/snapdriver/metrics.sock",
            MetricsAddress(path=Path("/run/snapdriver/metrics.sock")),
        ),
    ],
)
def test_addresses_parse(text: str, expected: MetricsAddress) -> None:
    assert MetricsAddress.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("9323", "expected HOST:PORT"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:http", "expected HOST:PORT"),
        ("127.0.0.1:65536", "expected HOST:PORT"),
        ("127.0.0.1:-1", "expected HOST:PORT"),
        ("::1:9323", "in brackets"),
        ("tcp://127.0.0.1:9323", "expected HOST:PORT"),
        ("http://[::1]", "expected HOST:PORT"),
        ("unix://relative.sock", "absolute path"),
        ("unix:/x.sock", "absolute path"),
        ("unix:///run/dir/", "absolute path"),
    ],
)
def test_bad_addresses_say_what_is_expected(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as caught:
        MetricsAddress.parse(text)
    assert repr(text) in str(caught.value) and "\n" not in str(caught.value)


def test_addresses_print_as_urls() -> None:
    assert str(MetricsAddress.parse("[::1]:9")) == "http://[::1]:9"
    assert str(MetricsAddress.parse("unix:///m.sock")) == "unix:///m.sock"


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The daemon (copydir) on a socket and a state directory in ``tmp_path``, with ``args``."""
    where = ["--listen", f"unix://{tmp_path}/p.sock", "--state-dir", str(tmp_path / "state")]
    return subprocess.run(
        [sys.executable, "-m", "snapdriver", "--backend", "copydir", *where, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_bad_address_is_a_one_line_start_up_error(tmp_path: Path) -> None:
    done = cli(tmp_path, "--metrics-listen", "localhost")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stdout == ""
    assert done.stderr.startswith("snapdriver: error: --metrics-listen 'localhost': expected")


def test_a_busy_port_is_a_one_line_start_up_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = cli(tmp_path, "--metrics-listen", f"127.0.0.1:{port}")
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[-1] == (
        f"snapdriver: error: cannot serve metrics on http://127.0.0.1:{port}: "
        "Address already in use"
    )
    assert not any(line.startswith(("Traceback", "snapdriver: error")) for line in lines[:-1])
    assert not (tmp_path / "p.sock").exists(), "the plugin must not start without its metrics"


def test_loading_a_backend_imports_neither_prometheus_client_nor_sqlite() -> None:
    code = (
        "import sys\n"
        "from snapdriver.plugins import Backend\n"
        "backend = Backend.load('copydir')\n"
        "assert backend.pm.get_plugin('metrics') is not None, backend.pm.list_name_plugin()\n"
        "print(sorted(m for m in ('prometheus_client', 'sqlite3') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"
    code = "import sys, snapdriver.cli, snapdriver.graphdriver.app\n"
    code += "print('prometheus_client' in sys.modules)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "False\n", "the daemon without a listener must not load it either"


def test_the_metrics_plugin_loads_through_the_entry_point_group() -> None:
    backend = Backend.load("copydir")
    assert backend.pm.get_plugin("metrics") is metrics.changes_timer
    assert not metrics.enabled()


class NativeDiffer:
    """A differ that answers for one layer only, as a native one answers what it can."""

    def __init__(self, layer: str) -> None:
        self.layer = layer

    @hookimpl(tryfirst=True)
    def snapdriver_changes(
        self, layer: str, layer_dir: Path, parent: str, parent_dir: Path
    ) -> Sequence[Change] | None:
        return [] if layer == self.layer else None


async def post(client: Client, path: str, body: dict[str, Any]) -> int:
    response = await client.post(path, data=json.dumps(body).encode(), headers={"Host": ""})
    await response.read()
    return response.status


Scenario = Callable[[Client, str], Awaitable[None]]


async def serve(tmp_path: Path, address: str, scenario: Scenario, group: int | None = None) -> None:
    backend = Backend.load("copydir")
    backend.pm.register(NativeDiffer(C))
    driver = GraphDriver(backend, tmp_path / "state")
    async with metrics_serving(address, driver.core, "copydir", group) as where:
        assert where is not None
        async with TestClient(TestServer(create_app(driver))) as client:
            await scenario(client, where.removesuffix("/metrics"))


async def calls(client: Client, home: Path) -> None:
    """Init, three layers, a Get, a failing Get, a walked and a native Changes, a bad path."""
    assert await post(client, "/GraphDriver.Init", {"Home": str(home)}) == 200
    for layer, parent in ((A, ""), (B, A), (C, A)):
        assert await post(client, "/GraphDriver.Create", {"ID": layer, "Parent": parent}) == 200
    assert await post(client, "/GraphDriver.Get", {"ID": B}) == 200
    assert await post(client, "/GraphDriver.Get", {"ID": "d" * 64}) == 404
    assert await post(client, "/GraphDriver.Changes", {"ID": B, "Parent": A}) == 200
    assert await post(client, "/GraphDriver.Changes", {"ID": C, "Parent": A}) == 200
    assert await post(client, "/GraphDriver.Nope", {}) == 404


def test_calls_layers_and_diffs_are_counted(tmp_path: Path) -> None:
    async def scenario(client: Client, where: str) -> None:
        before = await asyncio.to_thread(scrape, where)
        await calls(client, tmp_path / "home")
        during = await asyncio.to_thread(scrape, where)
        assert await post(client, "/GraphDriver.Put", {"ID": B}) == 200
        after = await asyncio.to_thread(scrape, where)
        check(before, during, after)

    asyncio.run(serve(tmp_path, "127.0.0.1:0", scenario))


def check(before: Samples, during: Samples, after: Samples) -> None:
    assert before.sum(CALL) == 0 and before.get("snapdriver_layers", status="ready") == 0
    get = {"front": "graphdriver", "method": "GraphDriver.Get"}
    assert during.get(CALL, **get, outcome="ok") == 1
    assert during.get(CALL, **get, outcome="LayerNotFoundError") == 1
    assert during.get(CALL, front="graphdriver", method="other", outcome="BadRequest") == 1
    assert during.get(CALL, front="graphdriver", method="GraphDriver.Create", outcome="ok") == 3
    assert during.get("snapdriver_changes_duration_seconds_count", source="walk") == 1
    assert during.get("snapdriver_changes_duration_seconds_count", source="native") == 1
    assert during.get("snapdriver_layers", status="ready") == 3
    assert during.get("snapdriver_mounted_layers") == 1
    assert during.get("snapdriver_layer_references", holder="front") == 1
    assert after.get(CALL, front="graphdriver", method="GraphDriver.Put", outcome="ok") == 1
    assert after.get("snapdriver_mounted_layers") == 0
    assert after.get("snapdriver_layer_references", holder="front") == 0
    assert after.get("snapdriver_build_info", version="0.1.0", backend="copydir") == 1
    assert after.get("process_open_fds") > 0


def test_applied_and_exported_bytes_on_a_unix_socket(tmp_path: Path) -> None:
    address = f"unix://{tmp_path}/metrics.sock"
    tar = _one_file_tar(b"x" * 10_000)

    async def scenario(client: Client, where: str) -> None:
        assert where == address
        mode = (tmp_path / "metrics.sock").stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        home = str(tmp_path / "home")
        assert await post(client, "/GraphDriver.Init", {"Home": home}) == 200
        assert await post(client, "/GraphDriver.Create", {"ID": A, "Parent": ""}) == 200
        response = await client.post(f"/GraphDriver.ApplyDiff?id={A}&parent=", data=tar)
        assert response.status == 200, await response.text()
        response = await client.post("/GraphDriver.Diff", data=json.dumps({"ID": A}))
        exported = len(await response.read())
        samples = await asyncio.to_thread(scrape, where)
        assert samples.get("snapdriver_diff_bytes_total", direction="applied") == len(tar)
        assert samples.get("snapdriver_diff_bytes_total", direction="exported") == exported
        assert exported > 10_000
        status, index = await asyncio.to_thread(fetch, where, "/")
        assert status == 200 and "/metrics" in index

    asyncio.run(serve(tmp_path, address, scenario))
    assert not (tmp_path / "metrics.sock").exists(), "the socket is removed at stop"


def _one_file_tar(data: bytes) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("file")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_a_live_metrics_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    with socket.socket(socket.AF_UNIX) as live:  # another process's metrics socket
        live.bind(str(path))
        live.listen()

        async def scenario(client: Client, where: str) -> None:
            raise AssertionError("must not serve")

        with pytest.raises(ConfigError, match="is in use"):
            asyncio.run(serve(tmp_path, f"unix://{path}", scenario))
        assert path.is_socket(), "the live socket of another process must stay"
    assert not metrics.enabled()


def test_recording_is_a_no_op_while_disabled() -> None:
    metrics.observe_call("graphdriver", "GraphDriver.Get", "ok", 0.1)
    metrics.observe_bytes("applied", 10)
    metrics.observe_sweep(3)
    registry = metrics.enable("x")
    text = _exposition(registry)
    assert "snapdriver_orphan_sweeps_total 0.0" in text
    assert "snapdriver_call_duration_seconds_count" not in text


def test_outcomes_are_few_and_named() -> None:
    from snapdriver.errors import LayerNotFoundError

    assert metrics.outcome_of(None) == "ok"
    assert metrics.outcome_of(LayerNotFoundError("x")) == "LayerNotFoundError"
    assert metrics.outcome_of(asyncio.CancelledError()) == "cancelled"
    assert metrics.outcome_of(KeyError("x")) == "error"


def _exposition(registry: Any) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def test_a_metrics_group_may_read_the_unix_socket(tmp_path: Path) -> None:
    group = next(g for g in grp.getgrall() if g.gr_gid != 0)  # not root's: the owner must move
    address = f"unix://{tmp_path}/metrics.sock"

    async def scenario(client: Client, where: str) -> None:
        info = (tmp_path / "metrics.sock").stat()
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == group.gr_gid
        assert (await asyncio.to_thread(scrape, where)).get(
            "snapdriver_layers", status="ready"
        ) == 0

    asyncio.run(serve(tmp_path, address, scenario, group=group.gr_gid))


def test_a_metrics_group_needs_a_unix_socket(tmp_path: Path) -> None:
    done = cli(tmp_path, "--metrics-listen", "127.0.0.1:0", "--metrics-group", "root")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "snapdriver: error: --metrics-group is for a unix:// --metrics-listen, not "
        "http://127.0.0.1:0"
    )
    done = cli(tmp_path, "--metrics-group", "no-such-group-x")
    assert done.stderr.splitlines()[-1] == (
        "snapdriver: error: --metrics-group 'no-such-group-x': no such group"
    )
