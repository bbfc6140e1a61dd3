"""Controlled load beside the drivers (``--contend``), the same for each of them.

A shared machine slows a run in ways no ratio can separate from the driver, unless every
driver gets the same neighbour. ``cpu`` keeps one core busy in Python, as a second process
competing with the plugin would; ``io`` writes 4 MiB blocks over a 2 GiB file next to the loop
images and fsyncs every 16 MiB, as a virtual machine's disk does. The neighbour runs from
before the first driver starts until the last one is torn down.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

KINDS = ("cpu", "io")

_CPU = "while True: pass"
_IO = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
block, offset, written = os.urandom(4 << 20), 0, 0
while True:
    os.pwrite(fd, block, offset)
    offset, written = (offset + len(block)) % (2 << 30), written + 1
    if written % 4 == 0:
        os.fsync(fd)
"""


def describe(kind: str) -> str:
    return {
        "cpu": "one core kept busy by a Python loop",
        "io": "4 MiB writes over a 2 GiB file beside the loop images, fsync every 16 MiB",
    }[kind]


@contextlib.contextmanager
def contended(kind: str | None, workdir: Path) -> Iterator[None]:
    """Run the ``kind`` of neighbour for the duration (nothing for None)."""
    if kind is None:
        yield
        return
    target = workdir / "contention.img"
    code = _CPU if kind == "cpu" else _IO
    neighbour = subprocess.Popen([sys.executable, "-c", code, str(target)])
    try:
        yield
    finally:
        neighbour.kill()
        neighbour.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
