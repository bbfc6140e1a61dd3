"""Testing the containerd front: its server in a process, and containerd's side of the wire."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2, field_mask_pb2, message

from snapdriver.containerd.proto import mount_pb2
from snapdriver.containerd.proto import snapshots_pb2 as pb
from snapdriver.testing.process import SOCKETS

SERVICE = "/containerd.services.snapshots.v1.Snapshots/"


class Client:
    """containerd's side of the wire, by method path: what the proxy snapshotter sends."""

    def __init__(self, socket: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request: message.Message, reply: type[Any]) -> Any:
        call: grpc.UnaryUnaryMultiCallable[Any, Any] = self.channel.unary_unary(
            SERVICE + method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply.FromString,
        )
        return call(request, timeout=60)

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[mount_pb2.Mount]:
        request = pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels or {})
        return list(self._call("Prepare", request, pb.PrepareSnapshotResponse).mounts)

    def view(self, key: str, parent: str = "") -> list[mount_pb2.Mount]:
        request = pb.ViewSnapshotRequest(key=key, parent=parent)
        return list(self._call("View", request, pb.ViewSnapshotResponse).mounts)

    def mounts(self, key: str) -> list[mount_pb2.Mount]:
        return list(self._call("Mounts", pb.MountsRequest(key=key), pb.MountsResponse).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        request = pb.CommitSnapshotRequest(name=name, key=key, labels=labels or {})
        self._call("Commit", request, empty_pb2.Empty)

    def remove(self, key: str) -> None:
        self._call("Remove", pb.RemoveSnapshotRequest(key=key), empty_pb2.Empty)

    def stat(self, key: str) -> pb.Info:
        reply = self._call("Stat", pb.StatSnapshotRequest(key=key), pb.StatSnapshotResponse)
        return reply.info  # type: ignore[no-any-return]

    def update(self, info: pb.Info, *paths: str) -> pb.Info:
        mask = field_mask_pb2.FieldMask(paths=list(paths))
        request = pb.UpdateSnapshotRequest(info=info, update_mask=mask)
        return self._call("Update", request, pb.UpdateSnapshotResponse).info  # type: ignore[no-any-return]

    def list(self, *filters: str) -> list[pb.Info]:
        call: grpc.UnaryStreamMultiCallable[Any, Any] = self.channel.unary_stream(
            SERVICE + "List",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.ListSnapshotsResponse.FromString,
        )
        replies = call(pb.ListSnapshotsRequest(filters=list(filters)), timeout=60)
        return [info for reply in replies for info in reply.info]

    def usage(self, key: str) -> pb.UsageResponse:
        return self._call("Usage", pb.UsageRequest(key=key), pb.UsageResponse)  # type: ignore[no-any-return]

    def cleanup(self) -> None:
        self._call("Cleanup", pb.CleanupRequest(), empty_pb2.Empty)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code ``call`` fails with (fails the test if it succeeds)."""
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    pytest.fail("the call succeeded")


class Front:
    """``python -m snapdriver.containerd`` in its own process, restartable and killable."""

    def __init__(self, root: Path, env: Mapping[str, str] | None = None) -> None:
        self.root = root
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
            "btrfs",
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
