"""The one lifecycle of a snapdriver daemon, whichever front it runs.

Start (the front opens or resumes its storage and starts listening), serve until SIGTERM or
SIGINT, then drain and close (the front stops listening, lets calls in flight finish, and closes
its record). The CLI only parses and wires; a front supplies :meth:`Front.serving`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from snapdriver import metrics

log = logging.getLogger("snapdriver")
#: Long ApplyDiff, Diff and Usage calls each hold a worker thread; keep plenty for short calls.
WORKER_THREADS = 32


class Front(Protocol):
    def serving(self) -> contextlib.AbstractAsyncContextManager[str]:
        """Open storage and listen; yield where; on exit stop listening, drain and close."""
        ...


async def run(front: Front, what: str) -> int:
    """Serve ``front`` until a stop signal; ``what`` names it in the log."""
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="snapdriver")
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with front.serving() as where:
        metrics.observe_start(time.monotonic() - started)
        log.info("serving %s on %s", what, where)
        notify_systemd("READY=1")
        await stop.wait()
        notify_systemd("STOPPING=1")
    log.info("stopped")
    return 0


def notify_systemd(state: str) -> None:
    """Tell systemd (``Type=notify`` units) how the daemon is doing; a no-op outside systemd.

    READY=1 is sent once the front listens, so units ordered after ours (``containerd.service``)
    start when calls can be answered, not merely when the process exists.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as err:
        log.warning("cannot notify systemd (%s): %s", state, err)


def raise_open_file_limit() -> None:
    """Soft limit of open files up to the hard one, as Go programs (dockerd) do at start.

    Removing a directory tree holds one descriptor per level, and a hostile layer can be a few
    thousand levels deep; systemd's default soft limit is 1,024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as err:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, hard, err)
