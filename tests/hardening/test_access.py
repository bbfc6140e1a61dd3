"""Who can reach the plugin: socket ownership and mode, TCP only on loopback or with TLS."""

from __future__ import annotations

import grp
import http.client
import json
import socket
import ssl
import stat
import subprocess
from pathlib import Path

import pytest

from snapdriver.graphdriver.client import PluginClient
from snapdriver.testing.process import PluginProcess


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
    )
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(d / f"{name}.key"),
            "-out",
            str(d / f"{name}.csr"),
        )
        ext = d / f"{name}.ext"
        ext.write_text(extra + "\n" if extra else "basicConstraints=CA:FALSE\n")
        openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{name}.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-out",
            str(d / f"{name}.pem"),
        )
    return d


def test_unix_socket_is_root_only_by_default(tmp_path: Path) -> None:
    plugin = PluginProcess("copydir", tmp_path)
    plugin.start()
    try:
        st = plugin.socket.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    finally:
        plugin.stop()
    assert not plugin.socket.exists(), "the socket is removed at exit"


def test_socket_group_opens_it_to_that_group(tmp_path: Path) -> None:
    group = grp.getgrnam("daemon")
    plugin = PluginProcess("copydir", tmp_path, ["--socket-group", "daemon"])
    plugin.start()
    try:
        st = plugin.socket.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid
    finally:
        plugin.stop()


def test_socket_activation_keeps_a_call_across_a_restart(tmp_path: Path) -> None:
    """Behind a socket unit the socket outlives the daemon: a call made while no process runs
    waits in the backlog and the next process answers it (a bare socket is gone meanwhile)."""
    plugin = PluginProcess("copydir", tmp_path, socket_activated=True)
    plugin.start()
    try:
        assert stat.S_IMODE(plugin.socket.stat().st_mode) == 0o600
        plugin.stop()
        with socket.socket(socket.AF_UNIX) as caller:
            caller.connect(str(plugin.socket))  # no process: the kernel queues it
            caller.sendall(
                b"POST /Plugin.Activate HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\n"
            )
            plugin.start()
            caller.settimeout(60)
            reply = b"".join(iter(lambda: caller.recv(65536), b""))
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert json.loads(reply.partition(b"\r\n\r\n")[2]) == {"Implements": ["GraphDriver"]}
    finally:
        plugin.close()
    assert not plugin.socket.exists(), "released with the socket unit"


def test_plain_tcp_on_loopback_writes_and_removes_the_spec(tmp_path: Path) -> None:
    address, spec_dir = f"tcp://127.0.0.1:{free_port()}", tmp_path / "spec"
    plugin = PluginProcess("copydir", tmp_path, ["--spec-dir", str(spec_dir)], listen=address)
    plugin.start()
    try:
        assert (spec_dir / f"{plugin.name}.spec").read_text() == address
        with PluginClient(address) as client:
            assert client.call("Plugin.Activate") == {"Implements": ["GraphDriver"]}
    finally:
        plugin.stop()
    assert not (spec_dir / f"{plugin.name}.spec").exists(), "the spec file is removed at exit"


def test_plain_tcp_off_loopback_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [*PluginProcess("copydir", tmp_path).command(), "--listen", "tcp://0.0.0.0:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "refusing plain TCP" in done.stderr


def test_tls_with_client_certificates(tmp_path: Path, pki: Path) -> None:
    port = free_port()
    spec_dir = tmp_path / "spec"
    args = [
        "--spec-dir",
        str(spec_dir),
        "--tls-cert",
        str(pki / "server.pem"),
        "--tls-key",
        str(pki / "server.key"),
        "--tls-ca",
        str(pki / "ca.pem"),
        "--tls-client-cert",
        str(pki / "client.pem"),
        "--tls-client-key",
        str(pki / "client.key"),
    ]
    plugin = PluginProcess("copydir", tmp_path, args, listen=f"tcp://127.0.0.1:{port}")
    plugin.start()
    try:
        spec = json.loads((spec_dir / f"{plugin.name}.json").read_text())
        assert spec["Addr"] == f"https://127.0.0.1:{port}"
        assert spec["TLSConfig"] == {
            "InsecureSkipVerify": False,
            "CAFile": str(pki / "ca.pem"),
            "CertFile": str(pki / "client.pem"),
            "KeyFile": str(pki / "client.key"),
        }
        good = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        good.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        assert _post(port, good) == 200
        no_cert = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            _post(port, no_cert)
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            _post_plain(port)
    finally:
        plugin.stop()
    assert not (spec_dir / f"{plugin.name}.json").exists()


def _post_plain(port: int) -> None:
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    plain.request("POST", "/Plugin.Activate", body=b"")
    plain.getresponse().read()


def _post(port: int, context: ssl.SSLContext) -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request("POST", "/Plugin.Activate", body=b"")
        return conn.getresponse().status
    finally:
        conn.close()
