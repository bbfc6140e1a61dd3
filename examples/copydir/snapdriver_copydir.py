"""An example snapdriver backend: every layer is a plain directory, a child a full copy.

It is the smallest complete backend: the six required hooks, and one optional hook to show how a
backend adds its own check to ``snapdriver doctor``. Changes come from the core's tree walk, and
the core builds Diff, ApplyDiff, reference counts and state on top. Copies use
``cp -a --reflink=auto``, so on btrfs or XFS they share blocks with the parent.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from snapdriver import (
    BackendConfig,
    BackendError,
    CreateRequest,
    Finding,
    QuotaNotSupportedError,
    hookimpl,
)
from snapdriver.hostfs import mount_of

#: Filesystems where ``cp --reflink`` shares blocks (XFS only when made with reflink=1).
REFLINK_FILESYSTEMS = frozenset({"btrfs", "xfs", "bcachefs"})


class CopyDirBackend:
    def __init__(self) -> None:
        self.layers_dir: Path | None = None

    def path(self, layer: str) -> Path:
        if self.layers_dir is None:
            raise BackendError("copydir is not set up (no Init yet)")
        return self.layers_dir / layer

    @hookimpl
    def snapdriver_setup(self, config: BackendConfig) -> None:
        self.layers_dir = config.home / "dirs"
        self.layers_dir.mkdir(parents=True, exist_ok=True)

    @hookimpl
    def snapdriver_doctor(self, config: BackendConfig) -> list[Finding]:
        fstype = mount_of(config.home).fstype
        if fstype in REFLINK_FILESYSTEMS:
            return [
                Finding("copydir copies", "OK", f"{fstype}: a child shares its parent's blocks")
            ]
        return [
            Finding(
                "copydir copies",
                "WARN",
                f"{config.home} is on {fstype}: every layer is a full copy of its parent",
                "keep the Home on btrfs or XFS (reflink=1)",
            )
        ]

    @hookimpl
    def snapdriver_create(self, request: CreateRequest) -> None:
        if request.quota is not None:
            raise QuotaNotSupportedError("copydir cannot enforce a quota (size)")
        target = self.path(request.layer)
        shutil.rmtree(target, ignore_errors=True)
        if request.parent is None:
            target.mkdir(mode=0o755)
            target.chmod(0o755)
            return
        done = subprocess.run(
            ["cp", "-a", "--reflink=auto", str(self.path(request.parent)), str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            raise BackendError(f"copying {request.parent} failed: {done.stderr.strip()}")

    @hookimpl
    def snapdriver_remove(self, layer: str) -> None:
        shutil.rmtree(self.path(layer), ignore_errors=True)

    @hookimpl
    def snapdriver_mount(self, layer: str, mount_label: str) -> Path:
        return self.path(layer)

    @hookimpl
    def snapdriver_unmount(self, layer: str) -> None:
        """Plain directories need no unmounting."""

    @hookimpl
    def snapdriver_layers(self) -> Sequence[str]:
        return sorted(p.name for p in self.path("x").parent.iterdir())


backend = CopyDirBackend()
