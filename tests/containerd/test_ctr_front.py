"""The containerd front over gRPC on a real btrfs loop filesystem: every RPC and every code."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import grpc
import pytest

from snapdriver import doctor
from snapdriver.containerd.proto import mount_pb2
from snapdriver.containerd.proto import snapshots_pb2 as pb
from snapdriver.doctor import Host
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


def bind_source(mounts: list[mount_pb2.Mount], mode: str) -> Path:
    assert len(mounts) == 1
    (mount,) = mounts
    assert mount.type == "bind"
    assert list(mount.options) == ["rbind", mode]
    return Path(mount.source)


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
    assert code_of(lambda: client.mounts("base")) == Code.FAILED_PRECONDITION
    assert code_of(lambda: client.mounts("missing")) == Code.NOT_FOUND


def test_prepare_and_view_codes(client: Client) -> None:
    client.prepare("active")
    assert code_of(lambda: client.prepare("active")) == Code.ALREADY_EXISTS
    assert code_of(lambda: client.view("active")) == Code.ALREADY_EXISTS
    assert code_of(lambda: client.prepare("new", "missing")) == Code.NOT_FOUND
    assert code_of(lambda: client.view("new", "missing")) == Code.NOT_FOUND
    # As containerd's own storage answers a parent that is not committed:
    assert code_of(lambda: client.prepare("new", "active")) == Code.INVALID_ARGUMENT
    assert code_of(lambda: client.prepare("")) == Code.INVALID_ARGUMENT
    assert [i.name for i in client.list()] == ["active"]  # no failed call left anything


def test_commit_freezes_and_codes(client: Client) -> None:
    work = bind_source(client.prepare("work"), "rw")
    client.commit("done", "work")
    with pytest.raises(OSError, match="Read-only"):
        (work / "late").write_text("x")  # the layer is frozen (a read-only subvolume)
    client.view("view", "done")
    client.prepare("other")
    assert code_of(lambda: client.commit("x", "view")) == Code.FAILED_PRECONDITION
    assert code_of(lambda: client.commit("x", "done")) == Code.FAILED_PRECONDITION
    assert code_of(lambda: client.commit("done", "other")) == Code.ALREADY_EXISTS
    assert code_of(lambda: client.commit("x", "missing")) == Code.NOT_FOUND
    assert code_of(lambda: client.commit("", "other")) == Code.INVALID_ARGUMENT
    assert client.stat("other").kind == pb.ACTIVE


def test_remove_codes_and_order(client: Client, front: Front) -> None:
    client.prepare("a")
    client.commit("c1", "a")
    client.prepare("a")
    client.commit("c2", "a", labels={"x": "y"})
    assert client.stat("c2").parent == ""
    client.prepare("b", "c1")
    client.commit("c3", "b")
    client.view("v", "c3")
    child = bind_source(client.prepare("act", "c3"), "rw")
    assert code_of(lambda: client.remove("c3")) == Code.FAILED_PRECONDITION
    assert code_of(lambda: client.remove("c1")) == Code.FAILED_PRECONDITION
    assert code_of(lambda: client.remove("missing")) == Code.NOT_FOUND
    layers = len(os.listdir(front.root / "subvolumes"))
    client.remove("act")
    assert not child.exists()
    client.remove("v")
    client.remove("c3")
    client.remove("c1")
    assert code_of(lambda: client.remove("c1")) == Code.NOT_FOUND
    assert len(os.listdir(front.root / "subvolumes")) == layers - 4
    assert [i.name for i in client.list()] == ["c2"]


def test_stat_and_update(client: Client) -> None:
    client.prepare("s", labels={"l1": "v1", "empty": ""})
    info = client.stat("s")
    assert dict(info.labels) == {"l1": "v1"}
    created = info.created_at
    info.parent = "ignored"
    info.kind = pb.COMMITTED
    info.labels.clear()
    info.labels.update({"l1": "new", "l2": "v2", "l3": "v3"})
    updated = client.update(info)
    assert dict(updated.labels) == {"l1": "new", "l2": "v2", "l3": "v3"}
    assert (updated.parent, updated.kind, updated.created_at) == ("", pb.ACTIVE, created)
    assert updated.updated_at.ToNanoseconds() > created.ToNanoseconds()
    info.labels.clear()
    info.labels.update({"l1": "again", "l4": "v4"})
    updated = client.update(info, "labels.l1", "labels.l2")
    assert dict(updated.labels) == {"l1": "again", "l3": "v3"}
    updated = client.update(info, "labels")
    assert dict(updated.labels) == {"l1": "again", "l4": "v4"}
    assert client.stat("s") == updated
    assert code_of(lambda: client.update(info, "parent")) == Code.INVALID_ARGUMENT
    assert code_of(lambda: client.update(info, "labels.x", "name")) == Code.INVALID_ARGUMENT
    assert client.stat("s") == updated
    assert code_of(lambda: client.stat("missing")) == Code.NOT_FOUND
    info.name = "missing"
    assert code_of(lambda: client.update(info)) == Code.NOT_FOUND


def test_list_and_filters(client: Client) -> None:
    client.prepare("p")
    client.commit("base", "p", labels={"containerd.io/snapshot.ref": "sha256:1"})
    client.prepare(KEY, "base", labels={"team": "a"})
    client.view("view", "base")
    assert sorted(i.name for i in client.list()) == sorted(["base", KEY, "view"])

    def names(*filters: str) -> list[str]:
        return sorted(i.name for i in client.list(*filters))

    assert names("kind==committed") == ["base"]
    assert names("kind==active", "kind==view") == sorted([KEY, "view"])
    assert names("parent==base,kind!=view") == [KEY]
    assert names('labels."containerd.io/snapshot.ref"') == ["base"]
    assert names("labels.team==a") == [KEY]
    assert names("name~=extract") == [KEY]
    assert names(f"name=={KEY.split(maxsplit=1)[0]}") == []
    assert names('name=="' + KEY + '"') == [KEY]
    assert code_of(lambda: client.list("name==")) == Code.INVALID_ARGUMENT
    assert code_of(lambda: client.list("kind==active", "name~=(")) == Code.INVALID_ARGUMENT


def test_list_streams_in_batches(client: Client) -> None:
    client.prepare("p")
    client.commit("base", "p")
    for n in range(105):
        client.view(f"v{n:03}", "base")
    found = client.list("kind==view")
    assert sorted(i.name for i in found) == [f"v{n:03}" for n in range(105)]


def test_usage_and_cleanup(client: Client) -> None:
    work = bind_source(client.prepare("work"), "rw")
    (work / "data").write_bytes(os.urandom(100_000))
    (work / "dir").mkdir()
    active = client.usage("work")
    assert active.size >= 100_000
    client.commit("done", "work")
    committed = client.usage("done")
    assert committed.size >= 100_000
    assert committed.inodes >= 2
    child = bind_source(client.prepare("child", "done"), "rw")
    (child / "small").write_bytes(b"x" * 10)
    assert client.usage("child").size < 100_000  # its own content only, not the parent's
    assert code_of(lambda: client.usage("missing")) == Code.NOT_FOUND
    client.cleanup()


def test_concurrent_prepares_of_one_key(client: Client) -> None:
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: attempt(lambda: client.prepare("same")), range(8)))
    assert outcomes.count(None) == 1
    assert [o for o in outcomes if o is not None] == [Code.ALREADY_EXISTS] * 7
    assert [i.name for i in client.list()] == ["same"]


def attempt(call: Callable[[], object]) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return None


def test_unknown_method_is_unimplemented(client: Client) -> None:
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = client.channel.unary_unary(
        "/containerd.services.snapshots.v1.Snapshots/Nope"
    )
    assert code_of(lambda: call(b"", timeout=10)) == Code.UNIMPLEMENTED


# -- restarts and crashes -----------------------------------------------------------------------


def build_chain(client: Client) -> dict[str, pb.Info]:
    work = bind_source(client.prepare("w"), "rw")
    (work / "f").write_text("one")
    client.commit("c1", "w", labels={"k": "v"})
    top = bind_source(client.prepare(KEY, "c1"), "rw")
    (top / "g").write_text("two")
    client.view("view", "c1")
    return {i.name: i for i in client.list()}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_restart_loses_nothing(make_front: Callable[..., Front], sig: int) -> None:
    front = make_front()
    front.start()
    with closing(front.client()) as client:
        before = build_chain(client)
        mounts = client.mounts(KEY)
    front.stop(sig)
    front.start()
    with closing(front.client()) as client:
        assert {i.name: i for i in client.list()} == before
        assert client.mounts(KEY) == mounts
        top = bind_source(mounts, "rw")
        assert (top / "f").read_text() == "one"
        assert (top / "g").read_text() == "two"
        client.commit("c2", KEY)
        assert client.stat("c2").parent == "c1"


def subvolumes(front: Front) -> set[str]:
    return set(os.listdir(front.root / "subvolumes"))


def crashing(make_front: Callable[..., Front], point: str) -> Front:
    front = make_front({"SNAPDRIVER_CONTAINERD_CRASH_AT": point})
    front.start()
    return front


def restart_clean(front: Front) -> None:
    assert front.wait() == -signal.SIGKILL
    front.stop()
    front.env = {}
    front.start()


def test_kill_between_create_and_key_insert(make_front: Callable[..., Front]) -> None:
    front = crashing(make_front, "prepare-created")
    with closing(front.client()) as client:
        assert code_of(lambda: client.prepare(KEY)) == Code.UNAVAILABLE
    assert len(subvolumes(front)) == 1  # the layer was made, no key names it
    restart_clean(front)
    assert subvolumes(front) == set()  # start-up removed the orphan
    with closing(front.client()) as client:
        assert client.list() == []
        bind_source(client.prepare(KEY), "rw")  # containerd's retry succeeds
        assert [i.name for i in client.list()] == [KEY]


def test_kill_between_commit_of_key_and_freeze(make_front: Callable[..., Front]) -> None:
    front = crashing(make_front, "commit-stored")
    with closing(front.client()) as client:
        work = bind_source(client.prepare("work"), "rw")
        (work / "f").write_text("data")
        assert code_of(lambda: client.commit("done", "work")) == Code.UNAVAILABLE
    (work / "still-writable").write_text("x")  # not frozen yet
    (work / "still-writable").unlink()
    restart_clean(front)
    with closing(front.client()) as client:
        info = client.stat("done")
        assert info.kind == pb.COMMITTED
        assert code_of(lambda: client.stat("work")) == Code.NOT_FOUND
        with pytest.raises(OSError, match="Read-only"):
            (work / "late").write_text("x")  # start-up finished the commit
        child = bind_source(client.prepare("child", "done"), "rw")
        assert (child / "f").read_text() == "data"


def test_kill_between_layer_removal_and_key_delete(make_front: Callable[..., Front]) -> None:
    front = crashing(make_front, "remove-removed")
    with closing(front.client()) as client:
        client.prepare("keep")
        client.prepare("gone")
        assert len(subvolumes(front)) == 2
        assert code_of(lambda: client.remove("gone")) == Code.UNAVAILABLE
    assert len(subvolumes(front)) == 1
    restart_clean(front)
    with closing(front.client()) as client:
        assert [i.name for i in client.list()] == ["keep"]  # the dangling key was dropped
        client.prepare("gone")
    assert "lost its layer" in front.log.read_text()


# -- start-up problems --------------------------------------------------------------------------


def run_main(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "snapdriver.containerd", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_bad_configuration_is_one_line_and_status_2(tmp_path: Path, front: Front) -> None:
    sock = f"unix://{tmp_path}/s.sock"
    cases = [
        ("--root", str(tmp_path / "r"), "--listen", sock),  # no --backend
        ("--backend", "nope", "--root", str(tmp_path / "r"), "--listen", sock),
        ("--backend", "btrfs", "--root", str(tmp_path / "r"), "--listen", "tcp://1.2.3.4:5"),
        ("--backend", "btrfs", "--root", str(tmp_path / "r"), "--listen", sock),  # not btrfs
        # A live front's socket, or its root, is refused before its storage is touched:
        ("--backend", "btrfs", "--root", str(front.root), "--listen", f"unix://{front.socket}"),
        ("--backend", "btrfs", "--root", str(front.root), "--listen", sock),
    ]
    with closing(front.client()) as client:
        client.prepare("kept")
        with ThreadPoolExecutor(len(cases)) as pool:
            results = list(pool.map(lambda args: run_main(*args), cases))
        for args, done in zip(cases, results, strict=True):
            assert done.returncode == 2, (args, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
            assert "error" in done.stderr
        assert "in use" in results[-2].stderr
        assert "another snapdriver" in results[-1].stderr
        assert front.listening()
        bind_source(client.mounts("kept"), "rw")


def test_calls_the_client_abandons_still_finish_whole(client: Client, front: Front) -> None:
    """A deadline passing mid-call (containerd cancelling) never leaves half a snapshot."""
    client.prepare("p")
    client.commit("base", "p")
    for n in range(6):
        request = pb.PrepareSnapshotRequest(key=f"k{n}", parent="base")
        call: grpc.UnaryUnaryMultiCallable[pb.PrepareSnapshotRequest, bytes] = (
            client.channel.unary_unary(
                "/containerd.services.snapshots.v1.Snapshots/Prepare",
                request_serializer=lambda m: m.SerializeToString(),
            )
        )
        with contextlib.suppress(grpc.RpcError):
            call(request, timeout=0.002 * n)
    deadline = time.monotonic() + 30
    while True:  # the abandoned calls finish on their own
        keys = {i.name for i in client.list()}
        if len(subvolumes(front)) == len(keys) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(subvolumes(front)) == len(keys)
    for key in keys - {"base"}:
        bind_source(client.mounts(key), "rw")


def test_doctor_probes_the_running_front(front: Front, tmp_path: Path) -> None:
    """``snapdriver doctor --front containerd`` asks the front a real snapshots call."""
    host = Host(
        backend="btrfs",
        front="containerd",
        data_root=front.root,
        listen=f"unix://{front.socket}",
        timeout=10.0,
    )
    found = doctor.check_socket(host)
    assert found.level == "OK" and "answers the snapshots API" in found.detail, found
    assert doctor.check_filesystem(host).level == "OK"
    front.stop()
    gone = doctor.check_socket(host)
    assert gone.level == "FAIL" and "nothing answers" in gone.detail, gone
