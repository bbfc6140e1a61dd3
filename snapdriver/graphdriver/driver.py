"""Docker's fifteen GraphDriver calls over the core: Init and its record, Docker's options, sweep.

dockerd sends Init once, when it starts, and never again to a plugin that restarted under it, so
the last Init is recorded (``init.json`` in the state directory) and resumed at start. A record
that cannot be resumed (its Home gone, or on another filesystem now) does not stop the plugin: it
serves, answers calls that need a Home with :class:`NotInitialisedError` saying why, and takes the
next Init dockerd sends. The orphan sweep reads dockerd's own layer store (:mod:`.dockerdb`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from snapdriver import metrics
from snapdriver.core import Core, DiffJob
from snapdriver.errors import (
    ConfigError,
    NotInitialisedError,
    RequestError,
    SnapdriverError,
)
from snapdriver.graphdriver.dockerdb import DOCKERD_ID, referenced_layers
from snapdriver.hookspec import BackendConfig
from snapdriver.layers.changes import Change
from snapdriver.layers.idmap import IDMapping, IDRange
from snapdriver.layers.state import LayerRecord, Status
from snapdriver.layers.units import parse_size
from snapdriver.plugins import Backend

log = logging.getLogger(__name__)
INIT_NAME = "init.json"
#: Layers younger than this are never judged orphans: dockerd may be between two calls.
DEFAULT_ORPHAN_AGE = 600.0


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


@dataclass(frozen=True)
class InitRecord:
    """The last Init dockerd sent: enough to resume after a plugin restart.

    ``idmap`` is dockerd's userns-remap (``--userns-remap``), None without it; a record written
    before remapping was supported has none.
    """

    home: Path
    options: tuple[str, ...] = ()
    idmap: IDMapping | None = None

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        data: dict[str, object] = {"home": str(self.home), "options": list(self.options)}
        if self.idmap is not None:
            data |= self.idmap.encode()
        _atomic_write(state_dir / INIT_NAME, json.dumps(data, indent=1).encode())

    @classmethod
    def load(cls, state_dir: Path) -> InitRecord | None:
        path = state_dir / INIT_NAME
        try:
            data = json.loads(path.read_bytes())
            idmap = IDMapping.decode(data)
            return cls(Path(data["home"]), tuple(data.get("options") or ()), idmap)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as err:
            raise ConfigError(f"{path} is unreadable ({err})") from err


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class GraphDriver:
    """One GraphDriver plugin: Docker's calls, in Docker's terms, over one :class:`Core`."""

    def __init__(
        self, backend: Backend, state_dir: Path, args: argparse.Namespace | None = None
    ) -> None:
        self.core = Core(backend, "graphdriver", args)
        self.state_dir = state_dir
        self._not_resumed = ""  # why a recorded Init could not be resumed, if it could not

    @property
    def backend(self) -> Backend:
        return self.core.backend

    @property
    def home(self) -> Path | None:
        return self.core.home

    # -- Init and its record -------------------------------------------------------------------

    async def resume(self) -> bool:
        """Carry on from the last recorded Init, as after a plugin restart.

        False if there is none, or if it cannot be resumed: then the reason is logged, with how
        to clear it, and calls that need a Home say so until dockerd sends Init.
        """
        try:
            record = InitRecord.load(self.state_dir)
            if record is None:
                return False
            await self._open(record)
        except (SnapdriverError, OSError) as err:
            clear = self.state_dir / INIT_NAME
            self._not_resumed = f"the recorded Init could not be resumed ({err})"
            log.warning(
                "%s; serving without a Home until dockerd sends Init (restart dockerd, or "
                "remove %s to forget the old Home)",
                self._not_resumed,
                clear,
            )
            return False
        log.info("resumed %s at %s without a new Init", self.backend.name, record.home)
        swept = await self.sweep()
        if swept:
            log.warning("reclaimed %d orphan layers at start: %s", len(swept), swept)
        return True

    async def init(
        self,
        home: str,
        options: Sequence[str],
        uid_maps: Sequence[IDRange] = (),
        gid_maps: Sequence[IDRange] = (),
    ) -> None:
        """Set up ``home``; ``uid_maps``/``gid_maps`` are dockerd's userns-remap, if any."""
        if not home or not os.path.isabs(home):
            raise ConfigError(f"Init Home must be an absolute path, got {home!r}")
        idmap = IDMapping.create(uid_maps, gid_maps)
        record = InitRecord(Path(home), tuple(options), idmap)
        await self._open(record)
        try:
            record.save(self.state_dir)
        except OSError as err:  # a full disk: serve now; after a restart, the next Init
            log.warning("cannot record this Init in %s: %s", self.state_dir, err)
        self._not_resumed = ""

    async def _open(self, record: InitRecord) -> None:
        config = BackendConfig(record.home, parse_options(record.options), self.core.args)
        await self.core.open(config, record.idmap)

    @property
    def _core(self) -> Core:
        """The core, once a Home is set up; else Docker's words for why not."""
        if not self.core.opened:
            reason = self._not_resumed or "dockerd has not sent Init since it was installed"
            raise NotInitialisedError(f"the plugin has no Home yet: {reason}")
        return self.core

    # -- orphans -------------------------------------------------------------------------------

    async def sweep(self, min_age: float = DEFAULT_ORPHAN_AGE, dry_run: bool = False) -> list[str]:
        """Reclaim layers nobody references: half made, unrecorded, or forgotten by dockerd.

        A complete layer is an orphan when dockerd's layer store exists and names it nowhere,
        its ID is one dockerd makes, nothing holds it, it has no children left, and it is older
        than ``min_age`` seconds (so a create still in flight is never taken).
        """
        removed = await self._sweep(min_age, dry_run)
        if not dry_run:
            metrics.observe_sweep(len(removed))
        return removed

    async def _sweep(self, min_age: float, dry_run: bool) -> list[str]:
        core = self._core
        removed = [] if dry_run else await core.recover()
        # Thousands of small files: off the event loop, so Get and Put go on meanwhile.
        known = await asyncio.to_thread(referenced_layers, core.home) if core.home else None
        if known is None:
            return removed
        skipped: set[str] = set()
        candidates: Iterable[LayerRecord | None] = core.records()
        while orphans := self._orphans(candidates, known, min_age, set(removed) | skipped):
            parents: dict[str, None] = {}
            for record in orphans:
                try:
                    if not dry_run:
                        await core.remove(record.id)
                    removed.append(record.id)
                except SnapdriverError as err:
                    log.warning("orphan %s not removed: %s", record.id, err)
                    skipped.add(record.id)
                    continue
                if record.parent:
                    parents[record.parent] = None
            candidates = [core.record(parent) for parent in parents]
            if dry_run:
                break  # children of what would go cannot be judged without removing it
        return removed

    def _orphans(
        self,
        candidates: Iterable[LayerRecord | None],
        known: set[str],
        min_age: float,
        exclude: set[str],
    ) -> list[LayerRecord]:
        """Which of ``candidates`` are orphans now. Only a removal makes a new orphan (its
        parent), so after the first pass only the parents of what went are looked at again.
        Runs on the event loop: the test that drops most records comes first."""
        now = time.time()
        return [
            r
            for r in candidates
            if r is not None
            and r.id not in known
            and r.status == Status.READY
            and r.refs == 0
            and r.id not in exclude
            and DOCKERD_ID.fullmatch(r.id)
            and now - r.created >= min_age
            and not self.core.children(r.id)
        ]

    # -- Docker's calls ------------------------------------------------------------------------

    async def create(
        self, layer: str, parent: str | None, storage_opt: Mapping[str, str] | None = None
    ) -> None:
        quota = parse_storage_opt(storage_opt or {})
        await self._core.create(layer, parent, quota)

    async def remove(self, layer: str) -> None:
        await self._core.remove(layer)

    async def get(self, layer: str, mount_label: str = "") -> Path:
        return await self._core.get(layer, mount_label)

    async def put(self, layer: str) -> None:
        await self._core.put(layer)

    async def exists(self, layer: str) -> bool:
        return self._core.exists(layer)

    async def status(self) -> list[tuple[str, str]]:
        return await self.core.status()

    async def metadata(self, layer: str) -> dict[str, str]:
        return await self._core.metadata(layer)

    async def changes(self, layer: str, parent: str | None) -> list[Change]:
        return await self._core.changes(layer, parent)

    async def diff_size(self, layer: str, parent: str | None) -> int:
        return await self._core.diff_size(layer, parent)

    @contextlib.asynccontextmanager
    async def diff(self, layer: str, parent: str | None) -> AsyncIterator[DiffJob]:
        async with self._core.diff(layer, parent) as job:
            yield job

    async def apply_diff(self, layer: str, parent: str | None, stream: IO[bytes]) -> int:
        return await self._core.apply_diff(layer, parent, stream)

    async def cleanup(self) -> None:
        await self.core.cleanup()

    def close(self) -> None:
        self.core.close()

    @staticmethod
    def capabilities() -> dict[str, bool]:
        """Diffs are rebuilt from the files, not replayed, so they are not byte-exact."""
        return {"ReproducesExactDiffs": False}
