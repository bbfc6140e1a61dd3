"""Testing the containerd front: its server in a process, containerd's side of the wire, a private
containerd 1.6, and offline OCI images.

:class:`Client` speaks the snapshots.v1 API as containerd's proxy does; :class:`Front` runs
``python -m snapdriver.containerd`` on a fresh root. :class:`Containerd` gets its own root, state,
gRPC and ttrpc sockets and opt directory, no CRI, and proxy snapshotters by name, so a system
containerd on the same machine is left alone (as :mod:`snapdriver.testing.dockerd` does for
dockerd); :class:`ContainerdFront` is a front for it on a short socket path, or a control program
with the same command line. :func:`oci_image_tar` writes an OCI image-layout tar that
``ctr images import`` accepts, from layers made here (no registry needed).
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
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2, field_mask_pb2, message

from snapdriver.containerd.proto import mount_pb2
from snapdriver.containerd.proto import snapshots_pb2 as pb
from snapdriver.testing.dockerd import busybox_rootfs_tar
from snapdriver.testing.loopfs import unmount_below
from snapdriver.testing.process import SOCKETS

SERVICE = "/containerd.services.snapshots.v1.Snapshots/"


class Client:
    """containerd's side of the wire, by method path: what the proxy snapshotter sends."""

    def __init__(
        self, socket: Path, *, timeout: float = 60.0, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.timeout = timeout
        self.metadata = metadata  # e.g. containerd's own socket wants a namespace

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, request: message.Message, reply: type[Any]) -> Any:
        call: grpc.UnaryUnaryMultiCallable[Any, Any] = self.channel.unary_unary(
            SERVICE + method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply.FromString,
        )
        return call(request, timeout=self.timeout, metadata=self.metadata)

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[mount_pb2.Mount]:
        request = pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels or {})
        return list(self.call("Prepare", request, pb.PrepareSnapshotResponse).mounts)

    def view(self, key: str, parent: str = "") -> list[mount_pb2.Mount]:
        request = pb.ViewSnapshotRequest(key=key, parent=parent)
        return list(self.call("View", request, pb.ViewSnapshotResponse).mounts)

    def mounts(self, key: str) -> list[mount_pb2.Mount]:
        return list(self.call("Mounts", pb.MountsRequest(key=key), pb.MountsResponse).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        request = pb.CommitSnapshotRequest(name=name, key=key, labels=labels or {})
        self.call("Commit", request, empty_pb2.Empty)

    def remove(self, key: str) -> None:
        self.call("Remove", pb.RemoveSnapshotRequest(key=key), empty_pb2.Empty)

    def stat(self, key: str) -> pb.Info:
        reply = self.call("Stat", pb.StatSnapshotRequest(key=key), pb.StatSnapshotResponse)
        return reply.info  # type: ignore[no-any-return]

    def update(self, info: pb.Info, *paths: str) -> pb.Info:
        mask = field_mask_pb2.FieldMask(paths=list(paths))
        request = pb.UpdateSnapshotRequest(info=info, update_mask=mask)
        return self.call("Update", request, pb.UpdateSnapshotResponse).info  # type: ignore[no-any-return]

    def list(self, *filters: str) -> list[pb.Info]:
        call: grpc.UnaryStreamMultiCallable[Any, Any] = self.channel.unary_stream(
            SERVICE + "List",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.ListSnapshotsResponse.FromString,
        )
        replies = call(pb.ListSnapshotsRequest(filters=list(filters)), timeout=60)
        return [info for reply in replies for info in reply.info]

    def usage(self, key: str) -> pb.UsageResponse:
        return self.call("Usage", pb.UsageRequest(key=key), pb.UsageResponse)  # type: ignore[no-any-return]

    def cleanup(self) -> None:
        self.call("Cleanup", pb.CleanupRequest(), empty_pb2.Empty)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code ``call`` fails with (fails the test if it succeeds)."""
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    pytest.fail("the call succeeded")


class Front:
    """``python -m snapdriver.containerd`` in its own process, restartable and killable."""

    def __init__(
        self,
        root: Path,
        env: Mapping[str, str] | None = None,
        *,
        backend: str = "btrfs",
        backend_args: Sequence[str] = (),
    ) -> None:
        self.root = root
        self.backend, self.backend_args = backend, list(backend_args)
        self.socket = root.parent / f"{root.name}.sock"
        self.log = root.parent / f"{root.name}.log"
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        SOCKETS.append(self.socket)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "snapdriver.containerd",
            "--backend",
            self.backend,
            *self.backend_args,
            "--root",
            str(self.root),
            "--listen",
            f"unix://{self.socket}",
            "--log-level",
            "debug",
        ]

    def start(self, timeout: float = 60) -> None:
        with open(self.log, "ab") as log:
            env = {**os.environ, **self.env}
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the front exited early:\n{self.log_tail()}")
            if self.listening():
                return
            time.sleep(0.05)
        raise RuntimeError(f"the front did not start in {timeout}s:\n{self.log_tail()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def listening(self) -> bool:
        """A connection is accepted: a stale socket left by a killed front refuses it."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            return probe.connect_ex(str(self.socket)) == 0

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(30)
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def client(self) -> Client:
        return Client(self.socket)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def mount(mounts: Sequence[mount_pb2.Mount], target: Path) -> None:
    """Mount a snapshot's one bind mount at ``target``, as containerd would (read-only if its
    options say so)."""
    (spec,) = mounts
    assert spec.type == "bind"
    subprocess.run(["mount", "-o", ",".join(spec.options), spec.source, str(target)], check=True)


def umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True)


def remove_everything(client: Client) -> None:
    """Remove every snapshot, leaves first, so nothing is left behind."""
    for _ in range(100):
        infos = client.list()
        if not infos:
            return
        parents = {info.parent for info in infos}
        for info in infos:
            if info.name not in parents:
                client.remove(info.name)
    pytest.fail("snapshots left after 100 rounds of removal")


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


class ContainerdFront(Front):
    """A :class:`Front` on a given (short) socket path, for a :class:`Containerd` to dial.

    ``backend`` may be empty (no ``--backend``); ``program`` replaces everything before it: a
    control with the front's command line, such as containerd's own snapshotter served by Go.
    """

    def __init__(
        self,
        root: Path,
        socket_path: Path,
        backend: str = "btrfs",
        program: Sequence[str] | None = None,
    ) -> None:
        if len(str(socket_path)) > MAX_SOCKET_PATH:
            raise ValueError(f"socket path longer than {MAX_SOCKET_PATH} bytes: {socket_path}")
        super().__init__(root)
        SOCKETS.remove(self.socket)
        self.socket = socket_path
        self.log = socket_path.with_suffix(".log")
        self.backend = backend
        self.program = list(program or [sys.executable, "-m", "snapdriver.containerd"])
        SOCKETS.append(socket_path)

    def command(self) -> list[str]:
        backend = ["--backend", self.backend] if self.backend else []
        listen = ["--root", str(self.root), "--listen", f"unix://{self.socket}"]
        return [*self.program, *backend, *listen]

    def start(self, timeout: float = 120) -> None:
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        super().start(timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """``sig``, and SIGKILL should the front not exit within 30 s."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return super().stop(sig)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop, and remove the socket and the log."""
        self.stop()
        self.socket.unlink(missing_ok=True)
        self.log.unlink(missing_ok=True)


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
        namespace: str | None = None,
        gc_deletion_threshold: int = 0,
    ) -> None:
        self.root = root
        self.proxies = dict(proxies)
        # runc keeps state by namespace for every containerd on the host: never a shared name
        # such as "default", whose containers close() would otherwise delete.
        self.namespace = namespace or f"sd{os.getpid()}"
        self.gc_deletion_threshold = gc_deletion_threshold
        self.run_dir = RUN_ROOT / f"{os.getpid()}-{hashlib.sha256(bytes(root)).hexdigest()[:8]}"
        self.state = self.run_dir / "state"
        self.address = self.run_dir / "c.sock"
        self.ttrpc_address = self.run_dir / "t.sock"
        self.opt = self.run_dir / "opt"
        self.config_path = self.run_dir / "config.toml"
        self.log_path = self.run_dir / "containerd.log"
        self.namespaces = {self.namespace}
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
            # containerd spaces collections so GC takes at most this share of the time (default
            # 2%): on a loaded host one slow pass would hold the next back for over a minute.
            "  pause_threshold = 0.5",
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
        unmount_below(self.state)
        unmount_below(self.root)

    def close(self) -> None:
        """Stop, and remove the private run directory (state and sockets) and runc's (empty)
        directories of the namespaces used."""
        self.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        for namespace in self.namespaces - {"default", "moby", "k8s.io"}:  # never shared ones
            state = RUNC_ROOT / namespace
            # Containers whose shim was killed above (a test that failed before removing them).
            for container in state.iterdir() if state.is_dir() else ():
                subprocess.run(
                    ["runc", "--root", str(state), "delete", "--force", container.name],
                    capture_output=True,
                    check=False,
                )
            with contextlib.suppress(OSError):
                state.rmdir()

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

    def collect(self, namespace: str | None = None) -> None:
        """One full garbage collection, begun after this call and waited for.

        containerd drops a deletion's request for a collection when it lands while a collection
        is removing from the snapshotters (its time is before that collection's end), so a
        snapshot removed then stays in the snapshotter until something else asks for one. A
        synchronous lease delete asks, and waits until the snapshotters have been swept.
        """
        lease = self.ctr("leases", "create", namespace=namespace).stdout.split()[0]
        self.ctr("leases", "delete", "--sync", lease, namespace=namespace)

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
