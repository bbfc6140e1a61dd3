"""Unix sockets both fronts listen on: a live one is never taken over, a stale one is replaced."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from snapdriver.errors import ConfigError


def prepare_unix_socket(path: Path) -> None:
    """Refuse a live socket, replace a stale one, and never delete anything that is not one."""
    if not os.path.lexists(path):
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        return
    if not path.is_socket():
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody is listening: a leftover of a process that died
        return
    finally:
        probe.close()
    raise ConfigError(f"socket {path} is in use: is another snapdriver running?")


def bind_unix_socket(path: Path, group: int | None) -> socket.socket:
    prepare_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is born 0600: never briefly open to others
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    if group is not None:
        os.chown(path, 0, group)
        os.chmod(path, 0o660)
    return sock
