"""``--log-format``: text stays as it was; json is one object per line with the call's fields."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from snapdriver.graphdriver.app import create_app
from snapdriver.graphdriver.driver import GraphDriver
from snapdriver.logs import JsonFormatter
from snapdriver.observe import Call
from snapdriver.plugins import Backend
from snapdriver.testing.process import PluginProcess

A = "a" * 64


def configured(log_format: str, code: str) -> str:
    """stderr of a process that configures logging as the CLI does, then runs ``code``."""
    script = (
        "import logging, warnings\n"
        "from snapdriver import logs\n"
        f"logs.configure('info', {log_format!r}, 'unit')\n"
        f"{code}\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_text_is_byte_for_byte_what_it_was() -> None:
    code = (
        "logging.getLogger('snapdriver').info('serving %s', 'x')\n"
        "logging.getLogger('snapdriver.core').warning('two\\nlines')\n"
        "logging.getLogger('snapdriver.calls').debug('not at info')"
    )
    expected = "snapdriver[unit] INFO snapdriver: serving x\n"
    expected += "snapdriver[unit] WARNING snapdriver.core: two\nlines\n"
    assert configured("text", code) == expected


def test_json_is_one_object_per_line_with_exceptions_and_warnings() -> None:
    code = (
        "log = logging.getLogger('snapdriver.core')\n"
        "log.warning('two\\nlines')\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n    log.exception('boom')\n"
        "warnings.warn('careful')"
    )
    lines = configured("json", code).splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3
    first, boom, warned = records
    assert first["message"] == "two\nlines" and first["level"] == "warning"
    assert first["logger"] == "snapdriver.core" and first["plugin"] == "unit"
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert "ZeroDivisionError" in boom["exception"] and boom["level"] == "error"
    assert warned["logger"] == "py.warnings" and "careful" in warned["message"]


Records = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def json_records() -> Iterator[Records]:
    """Records of every logger at DEBUG so far, formatted as --log-format json formats them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("unit"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_calls_log_their_call_layer_outcome_and_duration(
    tmp_path: Path, json_records: Records
) -> None:
    async def scenario() -> None:
        driver = GraphDriver(Backend.load("copydir"), tmp_path / "state")
        async with TestClient(TestServer(create_app(driver))) as client:
            for path, body in (
                ("/GraphDriver.Init", {"Home": str(tmp_path / "home")}),
                ("/GraphDriver.Create", {"ID": A, "Parent": ""}),
                ("/GraphDriver.Get", {"ID": A}),
                ("/GraphDriver.Put", {"ID": "b" * 64}),
                ("/GraphDriver.Create", {"ID": A, "Parent": ""}),  # refused: it exists
            ):
                response = await client.post(path, data=json.dumps(body), headers={"Host": ""})
                await response.read()

    asyncio.run(scenario())
    records = json_records()
    calls = {r["call"]: r for r in records if r["logger"] == "snapdriver.calls"}
    get = calls["GraphDriver.Get"]
    assert get["front"] == "graphdriver" and get["layer"] == A and get["outcome"] == "ok"
    assert isinstance(get["duration"], float) and get["duration"] >= 0
    assert "layer" not in calls["GraphDriver.Init"]
    assert calls["GraphDriver.Put"]["layer"] == "b" * 64
    assert calls["GraphDriver.Create"]["outcome"] == "LayerExistsError"  # the last Create
    refusal = next(r for r in records if r["message"].startswith("/GraphDriver.Create failed"))
    assert refusal["call"] == "GraphDriver.Create" and refusal["layer"] == A
    assert refusal["outcome"] == "LayerExistsError" and "duration" not in refusal


def test_records_inside_a_call_in_a_worker_thread_carry_its_fields() -> None:
    formatter = JsonFormatter("unit")
    seen: list[dict[str, Any]] = []

    def hook() -> None:  # as a backend hook logs, in asyncio.to_thread
        record = logging.LogRecord("snapdriver_x", logging.INFO, __file__, 1, "in hook", (), None)
        seen.append(json.loads(formatter.format(record)))

    async def front() -> None:
        with Call("containerd", "Prepare") as call:
            call.layer = "k1"
            await asyncio.to_thread(hook)
        await asyncio.to_thread(hook)  # after the call: no fields

    asyncio.run(front())
    inside, outside = seen
    assert (inside["front"], inside["call"], inside["layer"]) == ("containerd", "Prepare", "k1")
    assert "call" not in outside and "outcome" not in inside


def test_the_daemon_logs_json_from_start_to_stop(tmp_path: Path) -> None:
    plugin = PluginProcess("copydir", tmp_path, ["--log-format", "json"])
    plugin.start()
    try:
        with plugin.client() as client:
            client.call("GraphDriver.Init", {"Home": str(tmp_path / "home")})
            client.call("GraphDriver.Create", {"ID": A, "Parent": ""})
    finally:
        assert plugin.stop() == 0
    records = [json.loads(line) for line in plugin.log_path.read_text().splitlines()]
    messages = [r["message"] for r in records]
    assert any(m.startswith("serving backend copydir") for m in messages)
    assert messages[-1] == "stopped"
    create = next(r for r in records if r.get("call") == "GraphDriver.Create")
    assert create["layer"] == A and create["outcome"] == "ok"
