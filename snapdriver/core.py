"""The core: layers by ID over a backend's primitives, shared by every front.

A front (Docker's graphdriver protocol, containerd's snapshotter API) decodes its wire and calls
one method here; this module owns what every backend and every front shares: the persisted layer
record in the backend's Home, per-layer locks, reference-counted mounts with a stable path per
layer, Diff/DiffSize/ApplyDiff/Usage built from change lists and tar code, freezing, and recovery
after a crash. It knows no Docker or containerd words. Backend hooks are blocking, so they run in
worker threads (``asyncio.to_thread``), except the mounts of a backend that says they are instant.

Get and Put are the most frequent calls (dockerd makes several per container). For a backend with
instant mounts they stay on the event loop: the layer's lock (free unless a Create, ApplyDiff or
Remove of the same layer is running), the record in memory, and a reference count that reaches
the disk shortly after (:data:`REFS_FLUSH_DELAY`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from snapdriver.errors import (
    ConfigError,
    LayerBusyError,
    LayerExistsError,
    LayerNotFoundError,
    NoSpaceError,
    NotInitialisedError,
    SnapdriverError,
)
from snapdriver.hookspec import BackendConfig, CreateRequest
from snapdriver.layers.apply import UnpackNoSpaceError, apply_tar
from snapdriver.layers.archive import export_changes, export_tree
from snapdriver.layers.changes import Change, ChangeKind, changes_size, walk_changes
from snapdriver.layers.idmap import IDMapping
from snapdriver.layers.state import DB_NAME, LayerRecord, LayerStore, Status
from snapdriver.plugins import Backend
from snapdriver.streams import Sink, stream_from_thread

log = logging.getLogger(__name__)
#: Seconds between a reference count changing and its write: one write for a burst of Get/Put.
REFS_FLUSH_DELAY = 0.5
#: ApplyDiffs unpacking at once; more wait, their bodies unread (aiohttp stops reading the
#: socket). Each holds ~5-6 MiB of buffers while it unpacks, and two cores gain little from more:
#: 32 streams of 50 MiB at once took the plugin to a 208-237 MiB peak RSS unbounded, 120-125 MiB
#: with 8 unpacking, 107-116 MiB with 4, in about the same time (bench/scale.md).
APPLY_CONCURRENCY = 4
#: Longest wait for the space of a removed layer to be free again before a reply.
RECLAIM_TIMEOUT = 60.0
#: Below this much free space (the larger of the two), a Remove waits for the space it frees:
#: a user short of space removes images to pull another at once (btrfs frees it up to ~30 s late).
LOW_SPACE_BYTES, LOW_SPACE_FRACTION = 1 << 30, 0.05


@dataclass
class DiffJob:
    """A Diff whose checks passed: :meth:`stream` writes the tar; nothing can fail before it."""

    layer: str
    layer_dir: Path
    changes: list[Change] | None  # None: the whole layer (no parent)
    idmap: IDMapping | None = None  # userns-remap: owners are written as container IDs

    def write(self, sink: Sink) -> None:
        if self.changes is None:
            export_tree(self.layer_dir, sink, self.idmap)
        else:
            export_changes(self.layer_dir, self.changes, sink, self.idmap)

    async def stream(self, consume: Callable[[bytes], Awaitable[None]]) -> None:
        await stream_from_thread(self.write, consume)


@dataclass(frozen=True)
class Census:
    """Counts for monitoring: layers by status, layers mounted, references held."""

    layers: dict[Status, int]
    mounted: int
    refs: int  # held by the front: Get without a Put yet
    internal_refs: int  # held by the core's own running operations (Diff, Changes, ApplyDiff)


@dataclass(frozen=True)
class Usage:
    """What a layer's own content occupies: bytes of its files, and its entries."""

    size: int
    inodes: int


#: Which front a Home belongs to (a file in the Home).
FRONT_MARK = "snapdriver.front"


def claim_home(home: Path, front: str) -> None:
    """One Home, one front: refuse a Home that another front's layers live in.

    A front removes every layer it does not know at start (containerd's front those no key
    names), so a containerd root pointed at dockerd's Home would destroy dockerd's layers. A
    Home with a record but no mark predates the mark, when only the graphdriver front existed.
    """
    mark = home / FRONT_MARK
    try:
        owner = mark.read_text().strip()
    except FileNotFoundError:
        owner = "graphdriver" if (home / DB_NAME).exists() else ""
    except OSError as err:
        raise ConfigError(f"cannot read {mark}: {err.strerror}") from err
    if owner and owner != front:
        raise ConfigError(
            f"{home} holds the {owner} front's layers: give the {front} front a directory "
            "of its own"
        )


def grant_traversal(home: Path, path: Path, gid: int) -> None:
    """Let the remapped root (group ``gid``) through ``home`` and every directory below it
    down to ``path``, as Docker's drivers do for their Home (``0710``, group the remapped root's):
    a container in a user namespace opens its root filesystem as that root."""
    try:
        below = path.relative_to(home).parts
    except ValueError:
        below = ()  # a backend that keeps layers elsewhere (a mount) owns those directories
    directories = [home]
    for part in below:
        directories.append(directories[-1] / part)
    for current in directories:
        st = os.stat(current)
        if st.st_gid != gid:
            os.chown(current, -1, gid)
        if not st.st_mode & 0o010:
            os.chmod(current, (st.st_mode & 0o7777) | 0o010)


def _mark_home(home: Path, front: str) -> None:
    mark = home / FRONT_MARK
    if mark.exists():
        return
    try:
        mark.write_text(front + "\n")
    except OSError as err:  # a full disk: the record's own front check is the fallback
        log.warning("cannot write %s: %s", mark, err)


class Core:
    """Layers by ID: a backend, the layer record in its Home, and the mounts in use.

    ``front`` names the front that owns the Home (see :func:`claim_home`). ``idmap`` is the
    front's userns-remap (see :meth:`open`); None, the usual case, costs nothing.
    """

    def __init__(
        self, backend: Backend, front: str, args: argparse.Namespace | None = None
    ) -> None:
        self.backend = backend
        self.front = front
        self.args = args or argparse.Namespace()
        self.home: Path | None = None
        self.idmap: IDMapping | None = None
        self._store: LayerStore | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._paths: dict[str, Path] = {}
        self._internal_refs: Counter[str] = Counter()
        self._instant_mounts = False
        self._refs_flush: asyncio.TimerHandle | None = None
        self._unpacking = asyncio.Semaphore(APPLY_CONCURRENCY)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self, config: BackendConfig, idmap: IDMapping | None = None) -> None:
        """Set the backend up for ``config.home``, open its record there, and recover.

        Opening the Home already open only sets the backend up again (as a repeated Init does).
        With ``idmap`` (user-namespace remapping) new layer roots are owned by the remapped root,
        the Home is traversable by it, ApplyDiff stores host IDs and Diff writes container IDs.
        """
        if self._store is None or self.home != config.home:
            claim_home(config.home, self.front)
        await asyncio.to_thread(self.backend.setup, config)
        self._instant_mounts = self.backend.instant_mounts()
        if self._store is not None and self.home != config.home:
            self.close()
        if self._store is None:
            _mark_home(config.home, self.front)
            self._store = LayerStore(config.home)
        self.home = config.home
        self.idmap = idmap
        if idmap is not None:
            await asyncio.to_thread(grant_traversal, config.home, config.home, idmap.root[1])
        await self.recover()

    async def recover(self) -> list[str]:
        """Remove what a crash left half made; return the IDs removed."""
        store = self.store
        removed = []
        known = {r.id: r for r in store.all()}
        stored = set(await asyncio.to_thread(self.backend.layers))
        for record in known.values():
            if record.status in (Status.CREATING, Status.APPLYING, Status.REMOVING):
                await self._destroy(record.id)
                removed.append(record.id)
            elif record.status == Status.READY and record.id not in stored:
                # Removed while its record could not be written (a full disk), then a crash.
                log.warning("layer %s is recorded, its storage gone: forgetting it", record.id)
                store.delete(record.id)
                removed.append(record.id)
        for layer in sorted(stored - known.keys()):
            await asyncio.to_thread(self.backend.remove, layer)
            removed.append(layer)
        if removed:
            log.warning("removed %d half-made or unrecorded layers: %s", len(removed), removed)
        return removed

    def records(self) -> list[LayerRecord]:
        """Every recorded layer, oldest first."""
        return self.store.all()

    def record(self, layer: str) -> LayerRecord | None:
        return self.store.get(layer)

    def children(self, layer: str) -> list[str]:
        return self.store.children(layer)

    async def cleanup(self) -> None:
        if self._store is not None:
            await asyncio.to_thread(self.backend.cleanup)

    def close(self) -> None:
        """Write pending reference counts and close the record."""
        if self._refs_flush is not None:
            self._refs_flush.cancel()
            self._refs_flush = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def census(self) -> Census:
        if self._store is None:
            return Census({}, 0, 0, 0)
        records = self._store.all()
        layers = dict(Counter(r.status for r in records))
        refs = sum(r.refs for r in records)
        return Census(layers, len(self._paths), refs, sum(self._internal_refs.values()))

    @property
    def opened(self) -> bool:
        return self._store is not None

    @property
    def store(self) -> LayerStore:
        if self._store is None:
            raise NotInitialisedError("no storage is set up yet")
        return self._store

    # -- helpers -----------------------------------------------------------------------------

    def _lock(self, layer: str) -> asyncio.Lock:
        lock = self._locks.get(layer)
        if lock is None:
            lock = self._locks[layer] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def _locked(self, *layers: str) -> AsyncIterator[None]:
        """Per-layer locks, taken in a fixed order so two calls can never deadlock."""
        async with contextlib.AsyncExitStack() as stack:
            for layer in sorted(set(layers)):
                await stack.enter_async_context(self._lock(layer))
            yield

    def _require(self, layer: str) -> LayerRecord:
        record = self.store.get(layer)
        if record is None or record.status in (Status.CREATING, Status.REMOVING):
            raise LayerNotFoundError(f"layer {layer} does not exist")
        if record.status == Status.FAILED:
            raise LayerNotFoundError(f"layer {layer} is incomplete (its ApplyDiff failed)")
        return record

    async def _acquire(self, layer: str, mount_label: str = "") -> Path:
        """Mount on the first reference; the same layer always gets the same path."""
        path = self._paths.get(layer)
        if path is None:
            if self._instant_mounts:
                path = self.backend.mount(layer, mount_label)  # a stat: no thread hop
            else:
                path = await asyncio.to_thread(self.backend.mount, layer, mount_label)
            self._paths[layer] = path
        return path

    async def _unmount(self, layer: str) -> None:
        del self._paths[layer]
        if self._instant_mounts:
            self.backend.unmount(layer)
        else:
            await asyncio.to_thread(self.backend.unmount, layer)

    async def _release_if_unused(self, layer: str) -> None:
        record = self.store.get(layer)
        refs = (record.refs if record else 0) + self._internal_refs[layer]
        if refs == 0 and layer in self._paths:
            await self._unmount(layer)

    def _set_refs(self, layer: str, refs: int) -> None:
        """External references: in memory now, on disk within :data:`REFS_FLUSH_DELAY`."""
        self.store.set_refs(layer, refs)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._refs_flush is None:
            loop = asyncio.get_running_loop()
            self._refs_flush = loop.call_later(REFS_FLUSH_DELAY, self._flush_refs)

    def _flush_refs(self) -> None:
        self._refs_flush = None
        if self._store is None:
            return
        try:
            self._store.flush_refs()
        except (sqlite3.Error, NoSpaceError) as err:
            log.warning("cannot write reference counts or deletions (will retry): %s", err)
            self._schedule_flush()

    @contextlib.asynccontextmanager
    async def _mounted(self, *layers: str) -> AsyncIterator[list[Path]]:
        """Hold internal references on ``layers`` for the duration of an operation."""
        paths: list[Path] = []
        try:
            for layer in layers:
                async with self._locked(layer):
                    self._require(layer)
                    self._internal_refs[layer] += 1
                    paths.append(await self._acquire(layer))
            yield paths
        finally:
            for layer in layers[: len(paths)]:
                async with self._locked(layer):
                    self._internal_refs[layer] -= 1
                    await self._release_if_unused(layer)

    async def _destroy(self, layer: str) -> None:
        """Unmount and remove from storage, then forget; the record goes last.

        On a full disk neither record write may stop the removal, which is what frees space:
        without the ``removing`` mark a crash leaves a record without storage, which the next
        start forgets; a deletion that cannot be written yet is written later.
        """
        try:
            self.store.set_status(layer, Status.REMOVING)
        except NoSpaceError as err:
            log.warning("removing layer %s without marking it first: %s", layer, err)
        if layer in self._paths:
            await self._unmount(layer)
        await asyncio.to_thread(self.backend.remove, layer)
        self.store.delete(layer)
        if self.store.deletions_pending() or await asyncio.to_thread(self._space_low):
            await self._after_full_disk_removal()

    def _space_low(self) -> bool:
        """Where layer data goes is short of space (the backend says where; else the record's
        filesystem, which is the layers' for btrfs)."""
        try:
            space = self.backend.free_space()
        except SnapdriverError as err:
            log.warning("cannot tell the free space of the layers: %s", err)
            space = None
        if space is None:
            try:
                st = os.statvfs(self.store.path)
            except OSError:
                return False
            space = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        free, total = space
        return free < max(LOW_SPACE_BYTES, total * LOW_SPACE_FRACTION)

    async def _after_full_disk_removal(self) -> None:
        """Reply once the space is free, as after a failed ApplyDiff; then write the deletion.

        A user who removes layers to make room, and pulls again at once, finds the room there.
        """
        await asyncio.to_thread(self.backend.reclaim, RECLAIM_TIMEOUT)
        try:
            self.store.flush_refs()
        except NoSpaceError as err:
            log.warning("deletions not written yet (will retry): %s", err)
            self._schedule_flush()

    async def _give_back(self, layer: str) -> None:
        """After a full disk: remove the layer's storage and wait until its space is free.

        The record stays, marked failed, for dockerd's Remove (which it sends next).
        """
        started = time.monotonic()
        if layer in self._paths:
            await self._unmount(layer)
        await asyncio.to_thread(self.backend.remove, layer)
        await asyncio.to_thread(self.backend.reclaim, RECLAIM_TIMEOUT)
        log.info("space of layer %s given back in %.2f s", layer, time.monotonic() - started)
        try:
            self.store.set_status(layer, Status.FAILED)
        except NoSpaceError as err:  # marked applying: the next start removes it
            log.warning("layer %s not marked failed: %s", layer, err)

    # -- operations on layers ----------------------------------------------------------------

    async def create(self, layer: str, parent: str | None, quota: int | None = None) -> None:
        """A new layer, empty or a writable child of the complete layer ``parent``."""
        async with self._locked(layer, *([parent] if parent else [])):
            existing = self.store.get(layer)
            if existing is not None and existing.status == Status.READY:
                raise LayerExistsError(f"layer {layer} already exists")
            if existing is not None:
                await self._destroy(layer)  # a leftover of a crash or a failed ApplyDiff
            if parent:
                self._require(parent)
            try:
                await self._create(layer, parent, quota)
            except NoSpaceError as err:
                raise NoSpaceError(f"{_reason(err)} while creating layer {layer}") from err

    async def _create(self, layer: str, parent: str | None, quota: int | None) -> None:
        self.store.add(layer, parent, quota)
        try:
            request = CreateRequest(layer, parent, quota)
            await asyncio.to_thread(self.backend.create, request)
            if self.idmap is not None:
                await self._own_root(layer, self.idmap)
            self.store.set_status(layer, Status.READY)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._destroy(layer)
            raise

    async def _own_root(self, layer: str, idmap: IDMapping) -> None:
        """The new layer's root belongs to the remapped root, its directories let it through
        (Docker's btrfs driver chowns every new subvolume, snapshots too)."""
        self._internal_refs[layer] += 1
        try:
            path = await self._acquire(layer)
            uid, gid = idmap.root
            await asyncio.to_thread(os.chown, path, uid, gid)
            if self.home is not None:
                await asyncio.to_thread(grant_traversal, self.home, path.parent, gid)
        finally:
            self._internal_refs[layer] -= 1
            await self._release_if_unused(layer)

    async def remove(self, layer: str) -> None:
        async with self._locked(layer):
            if self.store.get(layer) is None:
                # Unknown IDs succeed, but storage the record lost is still reclaimed.
                if layer in await asyncio.to_thread(self.backend.layers):
                    await asyncio.to_thread(self.backend.remove, layer)
                return
            children = self.store.children(layer)
            if children:
                raise LayerBusyError(
                    f"layer {layer} still has {len(children)} child layer(s), e.g. {children[0]}"
                )
            if self._internal_refs[layer]:
                raise LayerBusyError(f"layer {layer} is in use by a running Diff or Changes")
            await self._destroy(layer)
        lock = self._locks.get(layer)
        if lock is not None and not lock.locked():
            del self._locks[layer]  # one lock per live layer, not per layer ever seen

    async def commit(self, layer: str) -> None:
        """Freeze the layer: no writes from now on (idempotent; see ``snapdriver_commit``)."""
        async with self._locked(layer):
            record = self._require(layer)
            await asyncio.to_thread(self.backend.commit, layer)
            if not record.frozen:
                self.store.set_frozen(layer)

    async def get(self, layer: str, mount_label: str = "") -> Path:
        """Mount (on the first reference) and count a reference; a frozen layer is refused."""
        async with self._lock(layer):
            record = self._require(layer)
            if record.frozen:
                raise LayerBusyError(f"layer {layer} is committed: it cannot be written to")
            path = await self._acquire(layer, mount_label)
            self._set_refs(layer, record.refs + 1)
            return path

    async def put(self, layer: str) -> None:
        async with self._lock(layer):
            record = self.store.get(layer)
            if record is None:
                return  # a Put may follow a Remove; nothing to release
            if record.refs > 0:
                self._set_refs(layer, record.refs - 1)
            else:
                log.info("Put of %s without a matching Get (plugin restarted?)", layer)
            await self._release_if_unused(layer)

    def exists(self, layer: str) -> bool:
        record = self.store.get(layer)
        return record is not None and record.status == Status.READY

    async def status(self) -> list[tuple[str, str]]:
        pairs = [("Backend", self.backend.name)]
        if self._store is not None:
            counts = self._store.count()
            pairs += [("Home", str(self.home)), ("Layers", str(counts.get(Status.READY, 0)))]
        return pairs + await asyncio.to_thread(self.backend.status)

    async def metadata(self, layer: str) -> dict[str, str]:
        self._require(layer)
        return await asyncio.to_thread(self.backend.metadata, layer)

    async def changes(self, layer: str, parent: str | None) -> list[Change]:
        if not parent:
            async with self._mounted(layer) as (layer_dir,):
                return await asyncio.to_thread(walk_changes, layer_dir, None)
        async with self._mounted(layer, parent) as (layer_dir, parent_dir):
            return await asyncio.to_thread(
                self.backend.changes, layer, layer_dir, parent, parent_dir
            )

    async def diff_size(self, layer: str, parent: str | None) -> int:
        async with self._mounted(layer) as (layer_dir,):
            changes = await self.changes(layer, parent)
            return await asyncio.to_thread(changes_size, layer_dir, changes)

    @contextlib.asynccontextmanager
    async def diff(self, layer: str, parent: str | None) -> AsyncIterator[DiffJob]:
        """Everything that can fail happens before the job is yielded (and the reply begins)."""
        async with self._mounted(layer) as (layer_dir,):
            changes = await self.changes(layer, parent) if parent else None
            yield DiffJob(layer, layer_dir, changes, self.idmap)

    async def usage(self, layer: str) -> Usage:
        """The layer's own content: its changes against its parent (native where the backend
        has them, so it costs what changed), or its whole tree if it has none."""
        record = self._require(layer)
        async with self._mounted(layer) as (layer_dir,):
            changes = await self.changes(layer, record.parent)
            size = await asyncio.to_thread(changes_size, layer_dir, changes)
        return Usage(size, sum(c.kind != ChangeKind.DELETE for c in changes))

    async def apply_diff(self, layer: str, parent: str | None, stream: IO[bytes]) -> int:
        async with self._locked(layer):
            record = self._require(layer)
            if record.frozen:
                raise LayerBusyError(f"layer {layer} is committed: it cannot be written to")
            if parent and record.parent != parent:
                log.warning(
                    "ApplyDiff %s: parent %s differs from recorded %s", layer, parent, record.parent
                )
            try:
                self.store.set_status(layer, Status.APPLYING)
                size = await self._apply(layer, stream)
                self.store.set_status(layer, Status.READY)
            except NoSpaceError as err:
                await self._give_back(layer)
                raise NoSpaceError(_apply_failure(err, layer)) from err
            except BaseException:
                self.store.set_status(layer, Status.FAILED)
                raise
            return size

    async def _apply(self, layer: str, stream: IO[bytes]) -> int:
        self._internal_refs[layer] += 1
        try:
            layer_dir = await self._acquire(layer)
            async with self._unpacking:
                return await asyncio.to_thread(apply_tar, layer_dir, stream, self.idmap)
        finally:
            self._internal_refs[layer] -= 1
            with contextlib.suppress(SnapdriverError, OSError):
                await self._release_if_unused(layer)


def _reason(err: NoSpaceError) -> str:
    """Which limit was hit, in the words of ``strerror``."""
    reason = getattr(err, "reason", "")
    if reason:
        return str(reason)
    return "disk quota exceeded" if "quota" in str(err).lower() else "no space left on device"


def _apply_failure(err: NoSpaceError, layer: str) -> str:
    """One line: ``no space left on device while applying layer X after N bytes``."""
    if isinstance(err, UnpackNoSpaceError):
        return f"{err.reason} while applying layer {layer} after {err.unpacked} bytes"
    return f"{_reason(err)} while applying layer {layer} (the layer record: {err})"
