"""Running a real ``snapdriver`` daemon (the CLI, in its own process) for tests."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from snapdriver.graphdriver.client import PluginClient
from snapdriver.graphdriver.serve import bind_unix_socket

#: Unix sockets of the plugins this process started, for leak checks.
SOCKETS: list[Path] = []
#: What the fork server imports once, for :class:`ForkedPluginProcess` (missing ones are skipped).
PRELOAD = ["snapdriver.cli", "snapdriver_btrfs", "snapdriver_zfs", "libzfs_core"]


class Child(Protocol):
    """The part of :class:`subprocess.Popen` a :class:`PluginProcess` uses."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class PluginProcess:
    """``python -m snapdriver --backend NAME`` on a private unix socket, restartable.

    ``socket_activated``: this object binds the socket once and hands it to every start as fd 3
    with ``LISTEN_FDS``/``LISTEN_PID``, as systemd does for a socket unit, so it never goes away
    between a stop and the next start (calls made meanwhile wait in its backlog).
    """

    def __init__(
        self,
        backend: str,
        workdir: Path,
        extra_args: Sequence[str] = (),
        *,
        name: str | None = None,
        socket_path: Path | None = None,
        listen: str | None = None,
        socket_activated: bool = False,
    ) -> None:
        self.backend = backend
        self.name = name or f"sdtest{uuid.uuid4().hex[:8]}"
        self.workdir = workdir
        self.socket = socket_path or workdir / f"{self.name}.sock"
        self.state_dir = workdir / "state"
        self.log_path = workdir / "plugin.log"
        self.extra_args = list(extra_args)
        self.listen = listen
        SOCKETS.append(self.socket)
        self.socket_activated = socket_activated
        self._listener: socket.socket | None = None
        self._proc: Child | None = None

    @property
    def address(self) -> str:
        return self.listen or f"unix://{self.socket}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "snapdriver", *self.arguments()]

    def arguments(self) -> list[str]:
        return [
            "--backend",
            self.backend,
            "--name",
            self.name,
            "--listen",
            "systemd:" if self.socket_activated else self.address,
            "--state-dir",
            str(self.state_dir),
            "--log-level",
            "debug",
            *self.extra_args,
        ]

    def start(self, timeout: float | None = None) -> None:
        # Python starts slowly in an emulated guest (over a minute under TCG with a busy host).
        if timeout is None:
            timeout = float(os.environ.get("SNAPDRIVER_START_TIMEOUT", "180"))
        self._proc = self._spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"snapdriver exited early:\n{self.log_tail()}")
            if self._listening():
                return
            time.sleep(0.05)
        raise RuntimeError(f"snapdriver did not start in {timeout}s:\n{self.log_tail()}")

    def _spawn(self) -> Child:
        command = self.command()
        keep: tuple[int, ...] = ()
        if self.socket_activated:
            command, keep = self._activated(command)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        child = subprocess.Popen(
            command, stdout=log, stderr=log, env=os.environ.copy(), pass_fds=keep
        )
        log.close()
        return child

    def _activated(self, command: list[str]) -> tuple[list[str], tuple[int, ...]]:
        """``command`` started as systemd starts a socket unit's service: the socket as fd 3."""
        if self._listener is None:
            self._listener = bind_unix_socket(self.socket, None)
            self._listener.listen(128)
        fd = self._listener.fileno()
        move = "" if fd == 3 else f"3<&{fd} {fd}<&-"
        # LISTEN_PID must be the daemon's own pid: the shell's, which exec keeps.
        script = f'export LISTEN_FDS=1 LISTEN_PID=$$; exec "$@" {move}'
        return ["bash", "-c", script, "snapdriver", *command], (fd,)

    @property
    def pid(self) -> int | None:
        """The running daemon's process ID, or None when it is not running."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _listening(self) -> bool:
        url = urlsplit(self.address)
        if url.scheme == "tcp":  # possibly TLS: a TCP connect is all we can check here
            with socket.socket() as probe:
                return probe.connect_ex((url.hostname or "", url.port or 0)) == 0
        if not self.socket.exists():
            return False
        try:
            with PluginClient(self.address, timeout=2) as client:
                client.call("Plugin.Activate")
        except OSError:
            return False
        return True

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        code = self._proc.returncode
        self._proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a crash."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop, and release the socket a socket-activated plugin was given."""
        self.stop()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self.socket.unlink(missing_ok=True)

    def client(self) -> PluginClient:
        return PluginClient(self.address)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class ForkedPluginProcess(PluginProcess):
    """The same daemon, forked from a server that has imported it already, not exec'd.

    Only Python's start-up is skipped: each start runs the CLI's ``main`` in a new process, so a
    SIGKILL and a restart are as real as with :class:`PluginProcess`. Under the lab's TCG
    emulation the imports alone take ~17 s, which would make a few dozen restarts cost a tier.
    """

    def _spawn(self) -> Child:
        if self.socket_activated:
            raise NotImplementedError("socket activation is for exec'd plugins (PluginProcess)")
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)  # used when the server starts, the first time
        child = context.Process(
            target=_run_cli,
            args=(self.arguments(), str(self.log_path)),
            name=self.name,
            daemon=True,  # stopped, not waited for, should the test process exit first
        )
        child.start()
        return ForkedChild(child)


def _run_cli(argv: list[str], log_path: str) -> None:
    """The forked child: the CLI's ``main``, its output to the log as with :class:`Popen`."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    from snapdriver.cli import main

    sys.exit(main(argv))


class ForkedChild:
    """A :class:`Child` over a :mod:`multiprocessing` process."""

    def __init__(self, process: BaseProcess) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        assert self._process.pid is not None, "not started"
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired("snapdriver", timeout or 0)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self._process.kill()
