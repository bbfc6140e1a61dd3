"""The containerd front over gRPC on a real btrfs loop filesystem: every RPC and every code."""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from snapdriver.containerd.proto import snapshots_pb2 as pb
from snapdriver.testing.containerd import Client, Front, code_of

pytestmark = pytest.mark.btrfs

KEY = "default/1/extract-385520567-0fr_ sha256:abc"  # opaque: '/', ':' and a space
Code = grpc.StatusCode


@pytest.fixture
def front(make_front: Callable[..., Front]) -> Front:
    started = make_front()
    started.start()
    return started


@pytest.fixture
def client(front: Front) -> Iterator[Client]:
    made = front.client()
    yield made
    made.close()


def bind_source(mounts: list[object], mode: str) -> Path:
    assert len(mounts) == 1
    (mount,) = mounts
    assert mount.type == "bind"  # type: ignore[attr-defined]
    assert list(mount.options) == ["rbind", mode]  # type: ignore[attr-defined]
    return Path(mount.source)  # type: ignore[attr-defined]


def test_socket_is_private_and_the_toml_is_printed(front: Front) -> None:
    assert stat.S_IMODE(front.socket.stat().st_mode) == 0o600
    text = front.log.read_text()
    assert "[proxy_plugins.snapdriver]" in text
    assert f'address = "{front.socket}"' in text


def test_prepare_commit_child_view_and_mounts(client: Client) -> None:
    base_dir = bind_source(client.prepare(KEY, labels={"a": "1"}), "rw")
    assert stat.S_IMODE(base_dir.stat().st_mode) == 0o755
    (base_dir / "file").write_text("base")
    assert bind_source(client.mounts(KEY), "rw") == base_dir  # repeatable
    assert bind_source(client.mounts(KEY), "rw") == base_dir
    client.commit("base", KEY, labels={"b": "2"})
    assert code_of(lambda: client.stat(KEY)) == Code.NOT_FOUND
    info = client.stat("base")
    assert (info.name, info.parent, info.kind, dict(info.labels)) == (
        "base",
        "",
        pb.COMMITTED,
        {"b": "2"},
    )
    assert info.created_at == info.updated_at

    child = bind_source(client.prepare("child", "base"), "rw")
    assert (child / "file").read_text() == "base"
    (child / "file").write_text("child")
    view = bind_source(client.view("view", "base"), "ro")
    assert (view / "file").read_text() == "base"
    assert client.stat("view").kind == pb.VIEW
    assert client.stat("child").kind == pb.ACTIVE
    assert client.stat("child").parent == "base"
