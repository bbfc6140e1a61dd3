"""The backend contract: every hook a storage backend can implement, in one module.

A backend is a pluggy plugin (usually an object) registered under a name in the entry-point group
``snapdriver.backends``; ``snapdriver --backend NAME`` loads exactly that one. Other plugins, from
the group ``snapdriver.plugins``, are all loaded and may wrap any hook (``@hookimpl(wrapper=True)``)
for logging, metrics or policy, the way pytest plugins wrap pytest's hooks.

The contract is storage primitives, not any front's calls: make a layer from a parent, remove it,
give its directory and release it, and, optionally, freeze it and say what changed natively. The
core (:mod:`snapdriver.core`) builds Diff, DiffSize, ApplyDiff, Usage, reference counting, locking
and the persisted layer record on top, once for every backend; the fronts (Docker's graphdriver
protocol, containerd's snapshotter API) speak their wires over the core. The core calls each hook
from a worker
thread (except mount and unmount of a backend that declares them instant, see
``snapdriver_instant_mounts``), one call per layer at a time (calls for different layers run
concurrently), and only for IDs that passed :func:`snapdriver.layers.ids.validate_layer_id`.

A backend must implement the hooks marked ``@required`` below (:data:`REQUIRED_HOOKS`); the
rest have defaults. Hooks that return a value are ``firstresult`` (one answer); hooks that return
nothing are called on every plugin that implements them.

Errors: raise a subclass of :class:`snapdriver.errors.SnapdriverError` with a message a person
can act on (``ConfigError`` in setup, ``QuotaNotSupportedError`` for an unenforceable size,
``BackendError`` for storage failures, ``NoSpaceError`` when the filesystem is full); the front
shows the message to its user.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import pluggy

from snapdriver.layers.changes import Change

PROJECT = "snapdriver"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The hooks a backend must implement, in the order they are declared below.
REQUIRED_HOOKS: list[str] = []


_Hook = TypeVar("_Hook", bound=Callable[..., object])


def required(func: _Hook) -> _Hook:
    """Mark a hook as one every backend must implement (checked when the backend loads)."""
    REQUIRED_HOOKS.append(func.__name__)
    return func


@dataclass(frozen=True)
class BackendConfig:
    """What a backend is set up with.

    ``home`` is the directory the backend keeps its layers under or beside: Docker's Init ``Home``
    (``<data-root>/<plugin name>``) for the graphdriver front, ``--root`` for the containerd front.
    ``options`` are storage options, verbatim (dockerd's ``--storage-opt`` pairs from Init, keys
    such as ``zfs.fsname``); a backend raises ``ConfigError`` for a key it owns but cannot use.
    ``args`` holds the parsed command line, including the flags the backend added in
    ``snapdriver_addoption``.
    """

    home: Path
    options: Mapping[str, str] = field(default_factory=dict)
    args: argparse.Namespace = field(default_factory=argparse.Namespace)


Level = Literal["OK", "WARN", "FAIL", "SKIP"]
#: The levels that make ``snapdriver doctor`` exit 1.
PROBLEMS: frozenset[str] = frozenset({"WARN", "FAIL"})


@dataclass(frozen=True)
class Finding:
    """One check of ``snapdriver doctor``: what was found and, for a problem, what to do.

    ``level``: ``OK``; ``WARN`` or ``FAIL`` (a problem: ``fix`` says what to do); ``SKIP`` when
    it cannot be checked because of something another check reports.
    """

    check: str
    level: Level
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -> fix: {self.fix}" if self.fix and self.level in PROBLEMS else ""
        return f"{self.level:<4} {self.check}: {self.detail}{fix}"


@dataclass(frozen=True)
class CreateRequest:
    """A layer to make: ``parent`` None means an empty layer; ``quota`` is a byte limit or None."""

    layer: str
    parent: str | None
    quota: int | None = None


@hookspec
def snapdriver_addoption(parser: argparse.ArgumentParser) -> None:
    """Add command-line flags for this backend (called before the command line is parsed).

    Each flag is also a setting: ``--dataset`` is read from ``SNAPDRIVER_DATASET`` and from
    ``dataset`` in the config file's ``[backends.NAME]`` table (its argparse ``dest``, checked
    against the flag's ``type`` and ``choices``), flags first. See :mod:`snapdriver.config`.
    """


@required
@hookspec
def snapdriver_setup(config: BackendConfig) -> None:
    """Check and prepare storage for ``config.home``; raise ``ConfigError`` with a one-line reason.

    Called on every Init and again when the plugin restarts with an Init on record (dockerd does
    not resend Init to a restarted plugin). Must be idempotent.
    """


@required
@hookspec
def snapdriver_create(request: CreateRequest) -> None:
    """Make the layer: empty, or a writable copy-on-write child of ``request.parent``.

    The layer must be writable even when Docker says Create rather than CreateReadWrite (dockerd
    applies diffs into it, BuildKit writes into it). If leftovers of the same ID exist from a crash,
    replace them. Raise ``QuotaNotSupportedError`` if a quota was asked for and cannot be enforced.
    """


@required
@hookspec
def snapdriver_remove(layer: str) -> None:
    """Delete the layer and everything inside it (nested subvolumes, snapshots it owns).

    Unknown IDs succeed. The layer is unmounted already, as far as the core knows.
    """


@required
@hookspec(firstresult=True)
def snapdriver_mount(layer: str, mount_label: str) -> Path:
    """Make the layer's files visible and return its directory.

    Called on the first reference only; the same layer must always get the same path. The path
    must be visible in dockerd's mount namespace. Mounting an already mounted layer succeeds.
    """
    raise NotImplementedError


@required
@hookspec
def snapdriver_unmount(layer: str) -> None:
    """Release what ``snapdriver_mount`` made (called when the last reference goes)."""


@hookspec(firstresult=True)
def snapdriver_instant_mounts() -> bool:
    """True if ``snapdriver_mount`` and ``snapdriver_unmount`` never block.

    Say so only when they do no more than look at the layer's directory (a stat), as for btrfs
    subvolumes or plain directories. The core then calls them on its event loop, not in a worker
    thread: a Get or Put is then answered without a thread hand-off, which on a busy machine costs
    more than the call itself. A plugin that wraps these hooks must not block either. Default:
    False (mounting may wait on the kernel or a tool, as for ZFS).
    """
    raise NotImplementedError


@required
@hookspec(firstresult=True)
def snapdriver_layers() -> Sequence[str]:
    """Every layer ID present in storage, complete or not (used to find leftovers and orphans)."""
    raise NotImplementedError


@hookspec(firstresult=True)
def snapdriver_changes(
    layer: str, layer_dir: Path, parent: str, parent_dir: Path
) -> Sequence[Change] | None:
    """What changed from ``parent`` to ``layer``, exactly as Docker's tree walk would say.

    Both layers are mounted at the given directories for the duration of the call. ``parent`` may
    be any ancestor, not only the direct parent. Return None to let the next implementation answer;
    the core's two-tree walk answers last. A native differ should judge its candidate paths with
    :func:`snapdriver.layers.changes.changes_from_candidates` so its output equals the walk's.
    """


@hookspec
def snapdriver_commit(layer: str) -> None:
    """Freeze the layer: it will never be written again, and children will be made from it.

    A front calls this when a writable layer becomes an immutable one (containerd's Commit).
    Optional: without it, the core alone keeps the layer unchanged (it hands out no writable
    directory of a frozen layer). A backend that can enforce it natively should (btrfs: a
    read-only subvolume, which ``btrfs send`` can then read without a scratch snapshot; ZFS: the
    ``readonly`` property). Must be idempotent: after a crash the core freezes again.
    """


@hookspec
def snapdriver_status() -> list[tuple[str, str]]:
    """Key/value pairs for ``docker info``; every plugin's pairs are shown, in order."""
    raise NotImplementedError


@hookspec
def snapdriver_metadata(layer: str) -> dict[str, str]:
    """Key/value pairs for ``docker inspect``'s ``GraphDriver.Data``; merged over plugins."""
    raise NotImplementedError


@hookspec
def snapdriver_cleanup() -> None:
    """dockerd is shutting down (Cleanup). Release caches; never undo user settings."""


@hookspec
def snapdriver_doctor(config: BackendConfig) -> list[Finding]:
    """Check this host for the backend, for ``snapdriver doctor``; change nothing.

    Called on a loaded backend that was never set up (``snapdriver_setup`` has not run), with
    the configuration the daemon would start with. Return what a generic check cannot know
    (where the layers would go, a property another owner set); every implementation's findings
    are printed, in order. Optional.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def snapdriver_free_space() -> tuple[int, int] | None:
    """``(free, total)`` bytes where new layer data goes, or None when it cannot be told.

    The core asks after every removal: when space is short it waits for the removed layer's
    space (``snapdriver_reclaim``) before it replies, so a user who removes images to make room
    finds the room there. Optional: without it the core measures the filesystem of its layer
    record (the Home), which is right for a backend that keeps its layers there (btrfs) and
    wrong for one that does not (ZFS: a pool, while the Home is a host directory).
    """
    raise NotImplementedError


@hookspec
def snapdriver_reclaim(timeout: float) -> None:
    """Return once the space of the layers removed so far is free again, or after ``timeout`` s.

    Called after a layer that filled the filesystem was removed, before the caller is answered,
    so the next write finds the space. Optional: for a filesystem that frees space in the
    background (btrfs's cleaner drops deleted subvolumes after the call returned) it waits.
    """
