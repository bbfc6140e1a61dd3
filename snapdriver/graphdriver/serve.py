"""Listening where dockerd looks for plugins: a unix socket, TCP with a spec file, or systemd.

dockerd finds plugin NAME as ``/run/docker/plugins/NAME.sock``, or through
``/etc/docker/plugins/NAME.spec`` (``tcp://host:port``) or ``NAME.json`` (an ``https://`` address
with the TLS files dockerd should use). A stale socket left by a dead process is replaced; a live
one is an error. Sockets are made mode 0600 (0660 with a group). TCP is refused on anything but
loopback unless TLS with client certificates is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from snapdriver.errors import ConfigError

PLUGIN_DIR = Path("/run/docker/plugins")
SPEC_DIR = Path("/etc/docker/plugins")
_SD_LISTEN_FDS_START = 3
#: Seconds between the last accept and closing connections that carry no request yet.
ACCEPTED_GRACE = 0.25


@dataclass(frozen=True)
class TLSFiles:
    """Server certificate and key, the CA that signs client certificates, and the client
    certificate and key written into the ``.json`` spec for dockerd to present."""

    cert: Path
    key: Path
    ca: Path
    client_cert: Path | None = None
    client_key: Path | None = None

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        context.verify_mode = ssl.CERT_REQUIRED
        return context


@dataclass(frozen=True)
class Listen:
    """Where to serve: ``unix:///path``, ``tcp://host:port`` or ``systemd:`` (fd 3)."""

    scheme: str
    path: Path | None = None
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> Listen:
        url = urlsplit(text)
        if url.scheme == "unix" and url.path:
            return cls("unix", path=Path(url.path))
        if url.scheme == "tcp" and url.hostname and url.port:
            return cls("tcp", host=url.hostname, port=url.port)
        if url.scheme == "systemd":
            return cls("systemd")
        raise ConfigError(
            f"--listen {text!r}: expected unix:///path/NAME.sock, tcp://host:port or systemd:"
        )

    @classmethod
    def default(cls, name: str) -> Listen:
        return cls("unix", path=PLUGIN_DIR / f"{name}.sock")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def systemd_socket() -> socket.socket:
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        raise ConfigError("--listen systemd: needs exactly one socket passed by systemd")
    return socket.socket(fileno=_SD_LISTEN_FDS_START)


def write_spec(name: str, listen: Listen, tls: TLSFiles | None, spec_dir: Path) -> Path:
    """The discovery file dockerd reads for a TCP plugin."""
    spec_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    address = f"{listen.host}:{listen.port}"
    if tls is None:
        target, data = spec_dir / f"{name}.spec", f"tcp://{address}"
    else:
        config = {"InsecureSkipVerify": False, "CAFile": str(tls.ca)}
        if tls.client_cert and tls.client_key:
            config |= {"CertFile": str(tls.client_cert), "KeyFile": str(tls.client_key)}
        target = spec_dir / f"{name}.json"
        data = json.dumps({"Name": name, "Addr": f"https://{address}", "TLSConfig": config})
    tmp = target.with_suffix(".tmp")
    tmp.write_text(data)
    tmp.chmod(0o644)
    tmp.replace(target)
    return target


@contextlib.asynccontextmanager
async def serving(
    app: web.Application,
    name: str,
    listen: Listen,
    *,
    group: int | None = None,
    tls: TLSFiles | None = None,
    spec_dir: Path = SPEC_DIR,
) -> AsyncIterator[str]:
    """Serve ``app`` until the block exits; yields a description of the address."""
    # No keep-alive probes: each connection carries one call (every reply closes it).
    runner = web.AppRunner(app, handle_signals=False, access_log=None, tcp_keepalive=False)
    await runner.setup()
    cleanup: list[Path] = []
    site: web.BaseSite | None = None
    try:
        site, where = _site(runner, name, listen, group, tls, spec_dir, cleanup)
        await site.start()
        yield where
    finally:
        # Gone first, so a client that dials while we drain fails at once and retries; dockerd
        # resends JSON calls whole, but not a streamed ApplyDiff (README, Troubleshooting).
        for path in cleanup:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if site is not None:
            await site.stop()
            # A connection accepted just before this has its request on the way. The runner's
            # clean-up closes connections that have no request yet, and dockerd would resend the
            # call with an empty body: let the request arrive, so it is served instead.
            await asyncio.sleep(ACCEPTED_GRACE)
        await runner.cleanup()
        for path in cleanup:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _site(  # noqa: PLR0917 - private helper of serving()
    runner: web.AppRunner,
    name: str,
    listen: Listen,
    group: int | None,
    tls: TLSFiles | None,
    spec_dir: Path,
    cleanup: list[Path],
) -> tuple[web.BaseSite, str]:
    if listen.scheme == "unix":
        assert listen.path is not None
        sock = bind_unix_socket(listen.path, group)
        cleanup.append(listen.path)
        return web.SockSite(runner, sock), f"unix://{listen.path}"
    if listen.scheme == "systemd":
        return web.SockSite(runner, systemd_socket()), "systemd socket (fd 3)"
    if tls is None and not _is_loopback(listen.host):
        raise ConfigError(
            f"refusing plain TCP on {listen.host}: anyone who can reach it controls your layers; "
            "use a loopback address or --tls-cert/--tls-key/--tls-ca"
        )
    context = tls.server_context() if tls else None
    site = web.TCPSite(runner, listen.host, listen.port, ssl_context=context)
    cleanup.append(write_spec(name, listen, tls, spec_dir))
    scheme = "https" if tls else "tcp"
    return site, f"{scheme}://{listen.host}:{listen.port}"
