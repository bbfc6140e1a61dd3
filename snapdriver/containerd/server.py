"""Serving the containerd front: grpc.aio on a unix socket, mode 0600.

:func:`serving` runs over a core that is already open; :class:`ContainerdFront` is the daemon's
view of it (:class:`snapdriver.daemon.Front`): open the core at the root, serve, close.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from snapdriver.containerd.service import Servicer, SnapshotService
from snapdriver.containerd.store import KeyStore
from snapdriver.core import Core
from snapdriver.errors import ConfigError, NotInitialisedError
from snapdriver.hookspec import BackendConfig
from snapdriver.plugins import Backend
from snapdriver.sockets import prepare_unix_socket

log = logging.getLogger(__name__)
#: Seconds calls in flight get to finish when the server stops.
STOP_GRACE = 2.0
#: Unix socket paths longer than this do not fit in sockaddr_un.
MAX_SOCKET_PATH = 107


def proxy_plugin_toml(name: str, path: Path) -> str:
    """What containerd's config needs to load this front as snapshotter ``name``."""
    return f'version = 2\n[proxy_plugins.{name}]\n  type = "snapshot"\n  address = "{path}"\n'


def parse_listen(text: str) -> Path:
    """``unix:///abs/path.sock`` (or a bare absolute path) to the socket's path."""
    path = text.removeprefix("unix://")
    if not path.startswith("/") or (text.startswith("unix:") and not text.startswith("unix:///")):
        raise ConfigError(f"--listen {text!r}: expected unix:///absolute/path.sock")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(f"--listen {text!r}: a unix socket path has at most 107 bytes")
    return Path(path)


def _bind(server: grpc.aio.Server, path: Path) -> None:
    prepare_unix_socket(path)
    old_umask = os.umask(0o177)  # born 0600: never briefly open to others
    try:
        port = server.add_insecure_port(f"unix://{path}")
    finally:
        os.umask(old_umask)
    if port == 0:
        raise ConfigError(f"cannot listen on {path}")
    os.chmod(path, 0o600)


@contextlib.asynccontextmanager
async def serving(core: Core, path: Path, store: KeyStore | None = None) -> AsyncIterator[str]:
    """Serve the Snapshots API for the open ``core`` on ``path`` until the block exits.

    The key store lives in the core's home (opened and closed here unless ``store`` is given);
    start-up reconciles it with the core's record before the socket appears, so a ready socket
    means a consistent, serving front.
    """
    if core.home is None:
        raise NotInitialisedError("the core must be open before the containerd front serves")
    async with contextlib.AsyncExitStack() as stack:
        if store is None:
            store = KeyStore(core.home)
            stack.callback(store.close)
        service = SnapshotService(core, store)
        await service.reconcile()
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((Servicer(service).handler(),))
        _bind(server, path)
        await server.start()
        try:
            yield f"unix://{path}"
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # gone first: a client dialling now fails at once
            await server.stop(STOP_GRACE)


@dataclass
class ContainerdFront:
    """``snapdriver containerd``: one backend at ``root``, served on ``path``."""

    backend: Backend
    root: Path
    path: Path
    args: argparse.Namespace = field(default_factory=argparse.Namespace)
    core: Core = field(init=False)

    def __post_init__(self) -> None:
        self.core = Core(self.backend, "containerd", self.args)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        """Open the root and serve; on exit stop serving, then close the key store and core.

        A front already serving this socket or this root is refused before storage is touched:
        opening the core would otherwise set the backend up and recover under the live one.
        """
        prepare_unix_socket(self.path)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        store = KeyStore(self.root)  # holds an exclusive lock on the root from here
        core = self.core
        try:
            await core.open(BackendConfig(self.root, {}, self.args))
            async with serving(core, self.path, store) as where:
                yield f"{where} (root {self.root})"
        finally:
            core.close()
            store.close()
