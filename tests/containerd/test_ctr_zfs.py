"""The containerd front on ZFS (in the lab): the snapshots' mounts, Commit's freeze, Usage from
``zfs diff``, Remove's refusals and a restart, driven over gRPC like containerd would.

One front and one restart for the whole module: under the lab's emulation a start takes ~20 s.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from snapdriver_zfs.testing import dataset_mounts, everything_below, scratch_root, skip_without_zfs

from snapdriver.containerd.proto import mount_pb2
from snapdriver.hostfs import mount_of
from snapdriver.testing.containerd import Front, code_of, mount, umount

pytestmark = [pytest.mark.zfs, pytest.mark.slow]
Code = grpc.StatusCode


class ZfsFront(Front):
    """The front with ``--backend zfs --dataset DATASET``."""

    def __init__(self, root: Path, dataset: str) -> None:
        super().__init__(root, backend="zfs", backend_args=("--dataset", dataset))
        self.dataset = dataset


@pytest.fixture
def front(tmp_path: Path) -> Iterator[ZfsFront]:
    skip_without_zfs()
    with scratch_root("c") as dataset:
        front = ZfsFront(tmp_path / f"ctr-{uuid.uuid4().hex[:6]}", dataset)
        front.start(timeout=180)
        try:
            yield front
        finally:
            front.stop()


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    """Where the test mounts what the front returns (as containerd would), unmounted after."""
    target = tmp_path / "mnt"
    target.mkdir()
    yield target
    subprocess.run(["umount", str(target)], check=False, capture_output=True)


def dataset_of(mounts: list[mount_pb2.Mount]) -> str:
    return mount_of(Path(mounts[0].source)).source


def readonly(dataset: str) -> str:
    done = subprocess.run(
        ["zfs", "get", "-H", "-o", "value", "readonly", dataset],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_the_front_on_zfs(front: ZfsFront, mnt: Path) -> None:
    client = front.client()
    try:
        base = client.prepare("base-key")
        layer = dataset_of(base)
        assert layer.startswith(front.dataset + "/")
        assert readonly(layer) == "off"
        mount(base, mnt)
        (mnt / "data").write_bytes(b"b" * 100_000)
        umount(mnt)
        client.commit("base", "base-key")
        assert readonly(layer) == "on"  # frozen natively, no copy
        client.view("v", "base")

        mount(client.view("v2", "base"), mnt)
        assert (mnt / "data").read_bytes() == b"b" * 100_000
        with pytest.raises(OSError, match="Read-only"):
            (mnt / "late").write_text("x")
        umount(mnt)

        mount(client.prepare("child-key", "base"), mnt)
        (mnt / "small").write_bytes(b"s" * 10)
        (mnt / "data").unlink()
        umount(mnt)
        client.commit("child", "child-key")
        usage = client.usage("child")
        assert usage.size < 100_000  # its own content (zfs diff), not the parent's
        assert client.usage("base").size >= 100_000
        assert code_of(lambda: client.remove("base")) == Code.FAILED_PRECONDITION

        client.close()
        front.stop()
        front.start(timeout=180)
        client = front.client()
        assert sorted(i.name for i in client.list()) == ["base", "child", "v", "v2"]
        mount(client.view("v3", "child"), mnt)
        assert sorted(p.name for p in mnt.iterdir()) == ["small"]
        umount(mnt)
        for key in ("v3", "v2", "v", "child", "base"):
            client.remove(key)
        client.cleanup()
        assert everything_below(front.dataset) == []
        assert dataset_mounts(front.dataset) == []
    finally:
        client.close()
