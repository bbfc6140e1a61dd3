"""The core: Docker's GraphDriver operations, written once on top of a backend's primitives.

The protocol layer decodes a request and calls one method here; this module owns what every
backend shares: the persisted layer record, per-layer locks, reference-counted mounts with a stable
path per layer, Diff/DiffSize/ApplyDiff built from change lists and tar code, and recovery after a
crash. Backend hooks are blocking, so they run in worker threads (``asyncio.to_thread``), except
the mounts of a backend that says they are instant.

Get and Put are dockerd's most frequent calls. For such a backend they stay on the event loop:
the layer's lock (free unless a Create, ApplyDiff or Remove of the same layer is running), the
record in memory, and a reference count that reaches the disk shortly after
(:data:`REFS_FLUSH_DELAY`).
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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from snapdriver.dockerdb import DOCKERD_ID, referenced_layers
from snapdriver.errors import (
    ConfigError,
    LayerBusyError,
    LayerExistsError,
    LayerNotFoundError,
    NoSpaceError,
    NotInitialisedError,
    RequestError,
    SnapdriverError,
)
from snapdriver.hookspec import BackendConfig, CreateRequest
from snapdriver.layers.apply import UnpackNoSpaceError, apply_tar
from snapdriver.layers.archive import export_changes, export_tree
from snapdriver.layers.changes import Change, changes_size, walk_changes
from snapdriver.layers.state import InitRecord, LayerRecord, LayerStore, Status
from snapdriver.layers.units import parse_size
from snapdriver.plugins import Backend
from snapdriver.streams import Sink, stream_from_thread

log = logging.getLogger(__name__)
#: Layers younger than this are never judged orphans: dockerd may be between two calls.
DEFAULT_ORPHAN_AGE = 600.0
#: Seconds between a reference count changing and its write: one write for a burst of Get/Put.
REFS_FLUSH_DELAY = 0.5
#: Longest wait for the space of a removed layer to be free again before a reply.
RECLAIM_TIMEOUT = 60.0


def parse_options(options: Sequence[str]) -> dict[str, str]:
    """Turn Init's ``["key=value", ...]`` into a mapping; a pair without ``=`` is an error."""
    parsed: dict[str, str] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"storage option {item!r} is not of the form key=value")
        parsed[key.strip().lower()] = value.strip()
    return parsed


def parse_storage_opt(storage_opt: Mapping[str, str]) -> int | None:
    """The per-layer options Docker sends on Create: only ``size`` is understood."""
    quota = None
    for key, value in storage_opt.items():
        if key.lower() != "size":
            raise RequestError(f"Unknown option {key!r}: the only per-layer option is size")
        quota = parse_size(value)
    return quota


@dataclass
class DiffJob:
    """A Diff whose checks passed: :meth:`stream` writes the tar; nothing can fail before it."""

    layer: str
    layer_dir: Path
    changes: list[Change] | None  # None: the whole layer (no parent)

    def write(self, sink: Sink) -> None:
        if self.changes is None:
            export_tree(self.layer_dir, sink)
        else:
            export_changes(self.layer_dir, self.changes, sink)

    async def stream(self, consume: Callable[[bytes], Awaitable[None]]) -> None:
        await stream_from_thread(self.write, consume)


class Driver:
    """One GraphDriver: a backend, the layer record in its Home, and the mounts in use."""

    def __init__(
        self, backend: Backend, state_dir: Path, args: argparse.Namespace | None = None
    ) -> None:
        self.backend = backend
        self.state_dir = state_dir
        self.args = args or argparse.Namespace()
        self.home: Path | None = None
        self._store: LayerStore | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._paths: dict[str, Path] = {}
        self._internal_refs: Counter[str] = Counter()
        self._instant_mounts = False
        self._refs_flush: asyncio.TimerHandle | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def resume(self) -> bool:
        """Carry on from the last recorded Init, as after a plugin restart. False if none."""
        record = InitRecord.load(self.state_dir)
        if record is None:
            return False
        await self._setup(record)
        log.info("resumed %s at %s without a new Init", self.backend.name, record.home)
        swept = await self.sweep()
        if swept:
            log.warning("reclaimed %d orphan layers at start: %s", len(swept), swept)
        return True

    async def init(
        self,
        home: str,
        options: Sequence[str],
        uid_maps: Sequence[object] = (),
        gid_maps: Sequence[object] = (),
    ) -> None:
        if uid_maps or gid_maps:
            raise ConfigError("user-namespace remapping (userns-remap) is not supported")
        if not home or not os.path.isabs(home):
            raise ConfigError(f"Init Home must be an absolute path, got {home!r}")
        record = InitRecord(Path(home), tuple(options))
        await self._setup(record)
        try:
            record.save(self.state_dir)
        except OSError as err:  # a full disk: serve now, resume needs a new Init after a restart
            log.warning("cannot record this Init in %s: %s", self.state_dir, err)

    async def _setup(self, record: InitRecord) -> None:
        config = BackendConfig(record.home, parse_options(record.options), self.args)
        await asyncio.to_thread(self.backend.setup, config)
        self._instant_mounts = self.backend.instant_mounts()
        if self._store is not None and self.home != record.home:
            self.close()
        if self._store is None:
            self._store = LayerStore(record.home)
        self.home = record.home
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

    async def sweep(self, min_age: float = DEFAULT_ORPHAN_AGE, dry_run: bool = False) -> list[str]:
        """Reclaim layers nobody references: half made, unrecorded, or forgotten by dockerd.

        A complete layer is an orphan when dockerd's layer store exists and names it nowhere,
        its ID is one dockerd makes, nothing holds it, it has no children left, and it is older
        than ``min_age`` seconds (so a create still in flight is never taken).
        """
        removed = [] if dry_run else await self.recover()
        known = referenced_layers(self.home) if self.home else None
        if known is None:
            return removed
        skipped: set[str] = set()
        while orphans := self._orphans(known, min_age, set(removed) | skipped):
            for layer in orphans:
                try:
                    if not dry_run:
                        await self.remove(layer)
                    removed.append(layer)
                except SnapdriverError as err:
                    log.warning("orphan %s not removed: %s", layer, err)
                    skipped.add(layer)
            if dry_run:
                break  # children of what would go cannot be judged without removing it
        return removed

    def _orphans(self, known: set[str], min_age: float, exclude: set[str]) -> list[str]:
        now = time.time()
        return [
            r.id
            for r in self.store.all()
            if r.status == Status.READY
            and r.refs == 0
            and r.id not in known
            and r.id not in exclude
            and DOCKERD_ID.fullmatch(r.id)
            and now - r.created >= min_age
            and not self.store.children(r.id)
        ]

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

    @property
    def store(self) -> LayerStore:
        if self._store is None:
            raise NotInitialisedError(
                "the plugin has no Home yet: dockerd has not sent Init since it was installed"
            )
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
        """dockerd's references: in memory now, on disk within :data:`REFS_FLUSH_DELAY`."""
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
        if self.store.deletions_pending():
            await self._after_full_disk_removal()

    async def _after_full_disk_removal(self) -> None:
        """Reply once the space is free, as after a failed ApplyDiff; then write the deletion."""
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

    # -- the GraphDriver operations ------------------------------------------------------------

    async def create(
        self, layer: str, parent: str | None, storage_opt: Mapping[str, str] | None = None
    ) -> None:
        quota = parse_storage_opt(storage_opt or {})
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
            self.store.set_status(layer, Status.READY)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._destroy(layer)
            raise

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

    async def get(self, layer: str, mount_label: str = "") -> Path:
        async with self._lock(layer):
            record = self._require(layer)
            path = await self._acquire(layer, mount_label)
            self._set_refs(layer, record.refs + 1)
            return path

    async def put(self, layer: str) -> None:
        async with self._lock(layer):
            record = self.store.get(layer)
            if record is None:
                return  # dockerd may Put after a Remove; nothing to release
            if record.refs > 0:
                self._set_refs(layer, record.refs - 1)
            else:
                log.info("Put of %s without a matching Get (plugin restarted?)", layer)
            await self._release_if_unused(layer)

    async def exists(self, layer: str) -> bool:
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
            yield DiffJob(layer, layer_dir, changes)

    async def apply_diff(self, layer: str, parent: str | None, stream: IO[bytes]) -> int:
        async with self._locked(layer):
            record = self._require(layer)
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
            return await asyncio.to_thread(apply_tar, layer_dir, stream)
        finally:
            self._internal_refs[layer] -= 1
            with contextlib.suppress(SnapdriverError, OSError):
                await self._release_if_unused(layer)

    @staticmethod
    def capabilities() -> dict[str, bool]:
        """Diffs are rebuilt from the files, not replayed, so they are not byte-exact."""
        return {"ReproducesExactDiffs": False}


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
