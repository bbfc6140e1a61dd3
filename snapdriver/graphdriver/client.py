"""A small blocking client for the GraphDriver protocol, speaking to a plugin as dockerd does.

Used by the conformance suite and handy for poking a running plugin::

    client = PluginClient("unix:///run/docker/plugins/snapdriver.sock")
    client.call("GraphDriver.Status")
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import SplitResult, urlsplit

from snapdriver.errors import SnapdriverError

ACCEPT = "application/vnd.docker.plugins.v1.2+json"


class PluginCallError(SnapdriverError):
    """The plugin answered with a non-200 status."""

    def __init__(self, method: str, status: int, message: str) -> None:
        super().__init__(f"{method}: {message}")
        self.method = method
        self.status = status
        self.message = message


def _url(address: str) -> SplitResult:
    return urlsplit(address if "://" in address else f"unix://{address}")


def unix_path(address: str) -> str:
    """The socket path of a ``unix:///path`` address (or of a bare path)."""
    url = _url(address)
    if url.scheme != "unix":
        raise ValueError(f"{address} is not a unix socket address")
    return url.path


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the standard library speaks only TCP)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class PluginClient:
    """Calls to a plugin at ``unix:///path`` or ``tcp://host:port`` (reconnecting per call: the
    plugin closes every connection after its reply)."""

    def __init__(self, address: str, timeout: float = 300.0) -> None:
        url = _url(address)
        self._conn: http.client.HTTPConnection
        if url.scheme == "unix":
            self._conn = UnixHTTPConnection(url.path, timeout)
        else:
            self._conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PluginClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, path: str, body: bytes | Iterable[bytes], chunked: bool = False) -> Any:
        headers = {"Host": "", "Accept": ACCEPT}
        self._conn.request("POST", path, body=body, headers=headers, encode_chunked=chunked)
        return self._conn.getresponse()

    def raw(self, method: str, body: bytes = b"") -> tuple[int, bytes]:
        """Status and body of ``POST /method`` with exactly ``body``."""
        response = self._send("/" + method, body)
        return response.status, response.read()

    def call(self, method: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """JSON call: ``payload`` is sent as dockerd sends it (compact, newline-terminated)."""
        body = b"" if payload is None else json.dumps(payload).encode() + b"\n"
        status, data = self.raw(method, body)
        reply = json.loads(data) if data.strip() else {}
        if status != 200:
            raise PluginCallError(method, status, reply.get("Err", data.decode(errors="replace")))
        return reply if isinstance(reply, dict) else {}

    def apply_diff(self, layer: str, parent: str, tar: bytes | Iterable[bytes]) -> int:
        """ApplyDiff as dockerd sends it: ids in the query, the tar as a chunked body."""
        chunks = [tar] if isinstance(tar, bytes) else tar
        path = f"/GraphDriver.ApplyDiff?id={layer}&parent={parent}"
        response = self._send(path, chunks, chunked=True)
        data = response.read()
        reply = json.loads(data) if data.strip() else {}
        if response.status != 200:
            raise PluginCallError("GraphDriver.ApplyDiff", response.status, reply.get("Err", ""))
        return int(reply["Size"])

    def diff_stream(self, layer: str, parent: str = "") -> Iterator[bytes]:
        """The Diff tar in chunks; raises :class:`PluginCallError` before the first byte."""
        payload: dict[str, str] = {"ID": layer}
        if parent:
            payload["Parent"] = parent
        response = self._send("/GraphDriver.Diff", json.dumps(payload).encode() + b"\n")
        if response.status != 200:
            data = response.read()
            message = json.loads(data).get("Err", "") if data.strip() else ""
            raise PluginCallError("GraphDriver.Diff", response.status, message)
        while chunk := response.read(1 << 16):
            yield chunk

    def diff(self, layer: str, parent: str = "") -> bytes:
        return b"".join(self.diff_stream(layer, parent))
