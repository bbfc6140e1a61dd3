"""A private containerd 1.6, snapdriver's containerd front as a process, and offline OCI images.

:class:`Containerd` gets its own root, state, gRPC and ttrpc sockets and opt directory, no CRI, and
proxy snapshotters by name, so a system containerd on the same machine is left alone (as
:mod:`snapdriver.testing.dockerd` does for dockerd). :class:`ContainerdFront` runs
``python -m snapdriver.containerd`` on a unix socket. :func:`oci_image_tar` writes an OCI
image-layout tar that ``ctr images import`` accepts, from layers made here (no registry needed).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapdriver.testing.dockerd import busybox_rootfs_tar
from snapdriver.testing.loopfs import _unmount_tree
from snapdriver.testing.process import SOCKETS

#: Unix socket paths hold at most this many bytes (sun_path less its NUL).
MAX_SOCKET_PATH = 107
#: Where private containerds keep their state and sockets: short, so socket paths fit.
RUN_ROOT = Path("/run/sdctr")
#: Where runc keeps container state, one directory per containerd namespace, shared by all
#: containerds on the host (so test namespaces carry the test process's ID).
RUNC_ROOT = Path("/run/containerd/runc")


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL to the process group after ``timeout`` seconds; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def _wait_for(
    check: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float, what: str
) -> None:
    """Poll ``check()`` until it is true; fail early when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before it was ready")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} was not ready in {timeout}s")


class ContainerdFront:
    """``python -m snapdriver.containerd --backend NAME --root DIR --listen unix://SOCKET``.

    The front serves once its socket exists. Its output goes to ``log_path``. ``program`` replaces
    everything before ``--root`` (a control, such as containerd's own snapshotter served by Go).
    """

    def __init__(
        self,
        root: Path,
        socket_path: Path,
        backend: str = "btrfs",
        extra_args: Sequence[str] = (),
        program: Sequence[str] | None = None,
    ) -> None:
        if len(str(socket_path)) > MAX_SOCKET_PATH:
            raise ValueError(f"socket path longer than {MAX_SOCKET_PATH} bytes: {socket_path}")
        self.root = root
        self.socket = socket_path
        self.backend = backend
        self.log_path = socket_path.with_suffix(".log")
        self.extra_args = list(extra_args)
        self.program = list(program or [sys.executable, "-m", "snapdriver.containerd"])
        self._proc: subprocess.Popen[bytes] | None = None
        SOCKETS.append(socket_path)

    def command(self) -> list[str]:
        backend = ["--backend", self.backend] if self.backend else []
        return [
            *self.program,
            *backend,
            "--root",
            str(self.root),
            "--listen",
            f"unix://{self.socket}",
            *self.extra_args,
        ]

    def start(self, timeout: float = 120.0) -> None:
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self._proc = subprocess.Popen(
            self.command(), stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        try:
            _wait_for(self.socket.exists, self._proc, timeout, "the containerd front")
        except RuntimeError as err:
            self.stop()
            raise RuntimeError(f"{err}:\n{self.log_tail()}") from None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (SIGKILL after ``timeout``); the exit code, None if it was not running."""
        if self._proc is None:
            return None
        code = _stop_process(self._proc, timeout)
        self._proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a crash."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop, and remove the socket and the log."""
        self.stop()
        self.socket.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class Containerd:
    """``containerd --config FILE`` with everything private; :meth:`ctr` runs ``ctr`` against it.

    ``root`` must be on btrfs for containerd's own btrfs snapshotter to load there.
    ``proxies`` maps a snapshotter name to the unix socket of a proxy snapshotter.
    """

    def __init__(
        self,
        root: Path,
        proxies: Mapping[str, Path],
        *,
        namespace: str = "default",
        gc_deletion_threshold: int = 0,
    ) -> None:
        self.root = root
        self.proxies = dict(proxies)
        self.namespace = namespace
        self.gc_deletion_threshold = gc_deletion_threshold
        self.run_dir = RUN_ROOT / f"{os.getpid()}-{hashlib.sha256(bytes(root)).hexdigest()[:8]}"
        self.state = self.run_dir / "state"
        self.address = self.run_dir / "c.sock"
        self.ttrpc_address = self.run_dir / "t.sock"
        self.opt = self.run_dir / "opt"
        self.config_path = self.run_dir / "config.toml"
        self.log_path = self.run_dir / "containerd.log"
        self.namespaces = {namespace}
        self._proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        """The TOML configuration: version 2, private paths, CRI off, the proxy snapshotters."""
        lines = [
            "version = 2",
            f"root = {json.dumps(str(self.root))}",
            f"state = {json.dumps(str(self.state))}",
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "[grpc]",
            f"  address = {json.dumps(str(self.address))}",
            "[ttrpc]",
            f"  address = {json.dumps(str(self.ttrpc_address))}",
            "[debug]",
            '  level = "debug"',
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {json.dumps(str(self.opt))}",
            '[plugins."io.containerd.gc.v1.scheduler"]',
            f"  deletion_threshold = {self.gc_deletion_threshold}",
        ]
        for name, socket_path in self.proxies.items():
            lines += [
                f"[proxy_plugins.{name}]",
                '  type = "snapshot"',
                f"  address = {json.dumps(str(socket_path))}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 60.0) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self._proc = subprocess.Popen(
            ["containerd", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        try:
            _wait_for(self._answers, self._proc, timeout, "containerd")
        except RuntimeError as err:
            self.stop()
            raise RuntimeError(f"{err}:\n{self.log_tail()}") from None

    def _answers(self) -> bool:
        return self.address.exists() and self.ctr("version", check=False).returncode == 0

    def stop(self, timeout: float = 60.0) -> None:
        """Stop containerd and the shims it started, and unmount what is left of its state."""
        if self._proc is not None:
            _stop_process(self._proc, timeout)
            self._proc = None
        for pid in self.shim_pids():
            os.kill(pid, signal.SIGKILL)
        _unmount_tree(self.state)
        _unmount_tree(self.root)

    def close(self) -> None:
        """Stop, and remove the private run directory (state and sockets) and runc's (empty)
        directories of the namespaces used."""
        self.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        for namespace in self.namespaces:
            with contextlib.suppress(OSError):
                (RUNC_ROOT / namespace).rmdir()

    def restart(self) -> None:
        """containerd only: running shims and their containers live on, as in production."""
        if self._proc is not None:
            _stop_process(self._proc, 60.0)
            self._proc = None
        self.start()

    def shim_pids(self) -> list[int]:
        """The shims started by this containerd (they name its address on their command line)."""
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"containerd-shim" in argv[0] and str(self.address).encode() in argv:
                found.append(int(proc.name))
        return found

    def ctr(
        self, *args: str, namespace: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        namespace = namespace or self.namespace
        self.namespaces.add(namespace)
        base = ["ctr", "--address", str(self.address), "--namespace", namespace]
        done = subprocess.run(
            [*base, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"ctr {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


# --- offline OCI images --------------------------------------------------------------------------

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
WHITEOUT = ".wh."


@dataclass(frozen=True)
class Layer:
    """One image layer: an uncompressed tar, stored gzipped or plain."""

    tar: bytes
    gzipped: bool = True
    comment: str = ""


def layer_tar(files: Mapping[str, bytes], deleted: Sequence[str] = ()) -> bytes:
    """A layer tar adding ``files`` (with their parent directories) and deleting ``deleted``
    paths of lower layers by AUFS whiteouts (``dir/.wh.name``)."""
    entries = dict(files)
    for path in deleted:
        parent, _, name = path.rpartition("/")
        entries[f"{parent}/{WHITEOUT}{name}".lstrip("/")] = b""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        made: set[str] = set()
        for path, data in sorted(entries.items()):
            parts = path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                directory = "/".join(parts[:depth])
                if directory not in made:
                    made.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest


def go_architecture() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def oci_image_tar(name: str, layers: Sequence[Layer], cmd: Sequence[str] = ("sh",)) -> bytes:
    """An OCI image-layout tar of one image: index.json (named by the
    ``io.containerd.image.name`` annotation), its manifest, config and layer blobs."""
    blobs: dict[str, bytes] = {}
    descriptors = []
    for layer in layers:
        stored = gzip.compress(layer.tar, mtime=0) if layer.gzipped else layer.tar
        descriptors.append(
            {
                "mediaType": MEDIA_LAYER_GZIP if layer.gzipped else MEDIA_LAYER,
                "digest": _blob(blobs, stored),
                "size": len(stored),
            }
        )
    config = {
        "architecture": go_architecture(),
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": list(cmd)},
        "rootfs": {
            "type": "layers",
            "diff_ids": ["sha256:" + hashlib.sha256(layer.tar).hexdigest() for layer in layers],
        },
        "history": [{"created_by": layer.comment or "snapdriver test layer"} for layer in layers],
    }
    config_data = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {
            "mediaType": MEDIA_CONFIG,
            "digest": _blob(blobs, config_data),
            "size": len(config_data),
        },
        "layers": descriptors,
    }
    manifest_data = json.dumps(manifest).encode()
    tag = name.rpartition(":")[2] if ":" in name.rpartition("/")[2] else "latest"
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": _blob(blobs, manifest_data),
                "size": len(manifest_data),
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }
        ],
    }
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index).encode(),
    }
    files |= {f"blobs/sha256/{d.split(':', 1)[1]}": data for d, data in blobs.items()}
    return _plain_tar(files)


def _plain_tar(files: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


#: What :func:`busybox_image_layers` puts where, for tests to check.
DOOMED = "etc/doomed"  # in the base layer, deleted by a whiteout in the second
KEPT = "etc/kept"  # in the base layer, untouched
ADDED = "data/added"  # added by the third layer


def busybox_image_layers(marker: bytes = b"snapdriver") -> list[Layer]:
    """Three layers from Debian's busybox-static: the base (gzip), a whiteout deleting
    :data:`DOOMED` (plain tar), and :data:`ADDED` holding ``marker`` (gzip)."""
    base = busybox_rootfs_tar({DOOMED: b"to be deleted\n", KEPT: b"kept\n"})
    return [
        Layer(base, gzipped=True, comment="busybox-static rootfs"),
        Layer(layer_tar({}, deleted=[DOOMED]), gzipped=False, comment=f"rm /{DOOMED}"),
        Layer(layer_tar({ADDED: marker + b"\n"}), gzipped=True, comment=f"add /{ADDED}"),
    ]


# --- a plain gRPC client of the snapshots.v1 API, for calls containerd would never make --------

SERVICE = "containerd.services.snapshots.v1.Snapshots"


class SnapshotsClient:
    """Calls a snapshots.v1 server on a unix socket by method name, with its wire types."""

    def __init__(self, socket_path: Path, snapshotter: str = "snapdriver") -> None:
        import grpc
        from google.protobuf import message_factory

        from snapdriver.containerd.proto import snapshots_pb2

        self.snapshotter = snapshotter
        self.pb = snapshots_pb2
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")
        self._methods = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"].methods_by_name
        self._reply = message_factory.GetMessageClass
        self._grpc = grpc

    def call(self, method: str, timeout: float = 30.0, **fields: Any) -> Any:
        """One unary call; ``List`` returns every ``Info`` of its stream."""
        descriptor = self._methods[method]
        request = self._reply(descriptor.input_type)(snapshotter=self.snapshotter, **fields)
        reply = self._reply(descriptor.output_type)
        path = f"/{SERVICE}/{method}"
        if descriptor.server_streaming:
            stream: Any = self._channel.unary_stream(
                path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=reply.FromString,
            )
            return [info for part in stream(request, timeout=timeout) for info in part.info]
        unary: Any = self._channel.unary_unary(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply.FromString,
        )
        return unary(request, timeout=timeout)

    def error(self, method: str, **fields: Any) -> tuple[str, str]:
        """(status code name, details) of a call that must fail; AssertionError if it succeeds."""
        try:
            reply = self.call(method, **fields)
        except self._grpc.RpcError as err:
            return err.code().name, err.details() or ""
        raise AssertionError(f"{method}({fields}) succeeded: {reply}")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SnapshotsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
