"""The daemon lifecycle: a front is served until SIGTERM, and systemd hears READY and STOPPING."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from snapdriver.daemon import run


class RecordingFront:
    def __init__(self) -> None:
        self.events: list[str] = []

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        self.events.append("open")
        try:
            yield "nowhere"
        finally:
            self.events.append("closed")


def test_run_serves_until_sigterm_and_notifies_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    front = RecordingFront()

    async def main() -> int:
        task = asyncio.create_task(run(front, "a test front"))
        loop = asyncio.get_running_loop()
        ready = await asyncio.wait_for(loop.sock_recv(listener, 64), 10)
        assert ready == b"READY=1" and front.events == ["open"]
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(task, 10)

    try:
        assert asyncio.run(main()) == 0
        assert listener.recv(64) == b"STOPPING=1"
    finally:
        listener.close()
    assert front.events == ["open", "closed"]
