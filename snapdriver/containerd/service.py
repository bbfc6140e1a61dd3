"""containerd's ``Snapshots`` service over the core: keys, kinds, labels and gRPC status codes.

Each snapshot is one core layer with a fresh hex ID; the key store (:mod:`.store`) maps keys to
layers. Active and View snapshots hold one core reference (``Core.get``) for as long as they
exist, so their directory stays mounted and ``Mounts`` is a lookup. A Commit freezes the layer
(``Core.commit``) and drops that reference.

Order of writes, so that a crash at any point leaves something start-up (:meth:`reconcile`) can
finish or undo:

- Prepare/View: ``core.create`` and ``core.get``, then the key row. A layer no key names is an
  orphan of a crash and is removed at start-up.
- Commit: the key row first (the key becomes the committed name), then ``core.commit``. A
  committed key whose layer is not frozen is frozen at start-up.
- Remove: ``core.put`` and ``core.remove``, then the row. A key whose layer is gone is dropped at
  start-up with a warning.

Codes follow containerd's own snapshot storage: missing → NOT_FOUND, taken → ALREADY_EXISTS,
wrong kind (Mounts of a committed snapshot, Commit of a view, Remove of a parent) →
FAILED_PRECONDITION, bad input → INVALID_ARGUMENT. A parent that is not committed is
INVALID_ARGUMENT, as containerd's ``storage.CreateSnapshot`` answers. Usage reports the layer's own
content for every kind (containerd's btrfs reports 0 for an active snapshot; its overlayfs, like
this front, measures it).

Concurrency: calls that change a key hold a per-key lock (Prepare and View also the parent's), so
two Prepares of one key cannot both succeed and a parent cannot go while a child is being made.
The work of a call is shielded from the client's cancellation: once started, it finishes.

Test hook: ``SNAPDRIVER_CONTAINERD_CRASH_AT=<point>`` makes the process SIGKILL itself at that
point (``prepare-created``, ``commit-stored``, ``remove-removed``), between the core's change and
the key store's, so tests can prove start-up repairs it. Never set it elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, message
from google.protobuf.timestamp_pb2 import Timestamp

from snapdriver.containerd.filters import Filters, snapshot_lookup
from snapdriver.containerd.proto import mount_pb2
from snapdriver.containerd.proto import snapshots_pb2 as pb
from snapdriver.containerd.store import KeyStore, Kind, Snapshot
from snapdriver.core import Core, Usage
from snapdriver.errors import (
    NO_SPACE_ERRNOS,
    ArchiveError,
    BackendError,
    ConfigError,
    LayerBusyError,
    LayerExistsError,
    LayerNotFoundError,
    NoSpaceError,
    NotInitialisedError,
    QuotaNotSupportedError,
    RequestError,
    SnapdriverError,
)
from snapdriver.observe import Call

log = logging.getLogger(__name__)
SERVICE = "containerd.services.snapshots.v1.Snapshots"
CRASH_ENV = "SNAPDRIVER_CONTAINERD_CRASH_AT"
#: Infos per List reply message, as containerd's own server batches them.
LIST_BATCH = 100
_KIND_TO_WIRE = {Kind.VIEW: pb.VIEW, Kind.ACTIVE: pb.ACTIVE, Kind.COMMITTED: pb.COMMITTED}

_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (LayerNotFoundError, grpc.StatusCode.NOT_FOUND),
    (LayerExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (LayerBusyError, grpc.StatusCode.FAILED_PRECONDITION),
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (QuotaNotSupportedError, grpc.StatusCode.INVALID_ARGUMENT),
    (ArchiveError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotInitialisedError, grpc.StatusCode.UNAVAILABLE),
    (NoSpaceError, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def grpc_status(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one mapping from snapdriver's exception tree to a gRPC code and a one-line message."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for cls, code in _STATUS:
        if isinstance(err, cls):
            return code, text
    if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, text
    return grpc.StatusCode.INTERNAL, f"internal error ({type(err).__name__}): {text}"


def crash_point(name: str) -> None:
    """Test-only: die here, as a SIGKILL would, when the environment asks for it."""
    if os.environ.get(CRASH_ENV) == name:
        log.warning("%s=%s: killing myself", CRASH_ENV, name)
        os.kill(os.getpid(), signal.SIGKILL)


def bind_mounts(kind: Kind, path: Path) -> list[mount_pb2.Mount]:
    """The portable answer for a layer kept at a directory, as containerd's native snapshotter."""
    mode = "ro" if kind is Kind.VIEW else "rw"
    return [mount_pb2.Mount(type="bind", source=str(path), options=["rbind", mode])]


def _timestamp(nanoseconds: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(nanoseconds)
    return stamp


def info(snapshot: Snapshot) -> pb.Info:
    return pb.Info(
        name=snapshot.key,
        parent=snapshot.parent,
        kind=_KIND_TO_WIRE[snapshot.kind],
        created_at=_timestamp(snapshot.created),
        updated_at=_timestamp(snapshot.updated),
        labels=dict(snapshot.labels),
    )


class SnapshotService:
    """The snapshotter's operations in containerd's terms, over one core and one key store."""

    def __init__(self, core: Core, store: KeyStore) -> None:
        self.core = core
        self.store = store
        self._paths: dict[str, Path] = {}  # layer -> its mounted directory (active, view)
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiting: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def _locked(self, *keys: str) -> AsyncIterator[None]:
        """Per-key locks in a fixed order; a lock lives while anyone holds or awaits it."""
        wanted = sorted({k for k in keys if k})
        self._waiting.update(wanted)
        try:
            async with contextlib.AsyncExitStack() as stack:
                for key in wanted:
                    await stack.enter_async_context(self._locks.setdefault(key, asyncio.Lock()))
                yield
        finally:
            for key in wanted:
                self._waiting[key] -= 1
                if not self._waiting[key]:
                    del self._waiting[key]
                    self._locks.pop(key, None)

    # -- start-up and stop ---------------------------------------------------------------------

    async def release(self) -> None:
        """At stop: let go of the mounts held for active snapshots and views.

        A ZFS layer is mounted under the root while its snapshot is open; left mounted, a stopped
        front would leave mounts nobody owns (a container keeps its own bind mount of it). The
        next start mounts them again (:meth:`reconcile`), so Mounts answers as before.
        """
        for layer in list(self._paths):
            try:
                await self.core.put(layer)
            except Exception as err:  # one layer that cannot be released keeps no other held
                log.warning("layer %s not released at stop: %s", layer, err)
            del self._paths[layer]

    async def reconcile(self) -> None:
        """Bring the key store and the core's record together after a stop or a crash."""
        for snapshot in self.store.all():
            if not self.core.exists(snapshot.layer):
                log.warning(
                    "snapshot %r lost its layer %s (a crash during Remove?): dropped",
                    snapshot.key,
                    snapshot.layer,
                )
                self.store.delete(snapshot.key)
        for snapshot in self.store.all():
            try:
                await self._restore(snapshot)
            except Exception as err:
                log.error("snapshot %r (layer %s): %s", snapshot.key, snapshot.layer, err)
        await self._remove_orphans({s.layer for s in self.store.all()})

    async def _restore(self, snapshot: Snapshot) -> None:
        """Committed: frozen, no reference. Active or view: our one reference, mounted."""
        record = self.core.record(snapshot.layer)
        assert record is not None
        if snapshot.kind is Kind.COMMITTED:
            if not record.frozen:
                log.warning("finishing the commit of %r (layer %s)", snapshot.key, snapshot.layer)
                await self.core.commit(snapshot.layer)
            for _ in range(record.refs):
                await self.core.put(snapshot.layer)
            return
        self._paths[snapshot.layer] = await self.core.get(snapshot.layer)
        if record.refs > 0:
            await self.core.put(snapshot.layer)  # it already held ours: only its path was needed

    async def _remove_orphans(self, referenced: set[str]) -> None:
        """Layers no key names (a crash between create and the key insert), leaves first."""
        kept = set(referenced)  # what stays: named, or failed to go (said in the log)
        while True:
            orphans = [
                r.id
                for r in self.core.records()
                if r.id not in kept and not self.core.children(r.id)
            ]
            if not orphans:
                return
            for layer in orphans:
                log.warning("removing layer %s: no snapshot names it (a crash?)", layer)
                try:
                    await self.core.remove(layer)
                except SnapdriverError as err:
                    log.error("layer %s stays: %s", layer, err)
                    kept.add(layer)

    # -- the operations ------------------------------------------------------------------------

    async def prepare(
        self, key: str, parent: str, labels: Mapping[str, str], kind: Kind
    ) -> list[mount_pb2.Mount]:
        """A new active or view snapshot ``key`` on the committed ``parent`` ("" for none)."""
        if not key:
            raise RequestError("a snapshot key must not be empty")
        async with self._locked(key, parent):
            if self.store.get(key) is not None:
                raise LayerExistsError(f"snapshot {key!r} already exists")
            parent_layer = self._parent_layer(parent)
            layer = uuid.uuid4().hex
            await self.core.create(layer, parent_layer)
            crash_point("prepare-created")
            try:
                path = await self.core.get(layer)
                if parent_layer is None:
                    await asyncio.to_thread(os.chmod, path, 0o755)
                now = time.time_ns()
                self.store.insert(Snapshot(key, layer, kind, parent, labels, now, now))
            except Exception:
                with contextlib.suppress(Exception):
                    await self.core.remove(layer)
                raise
            self._paths[layer] = path
            return bind_mounts(kind, path)

    def _parent_layer(self, parent: str) -> str | None:
        if not parent:
            return None
        found = self.store.get(parent)
        if found is None:
            raise LayerNotFoundError(f"parent snapshot {parent!r} does not exist")
        if found.kind is not Kind.COMMITTED:
            raise RequestError(f"parent {parent!r} is a {found.kind} snapshot, not committed")
        return found.layer

    def mounts(self, key: str) -> list[mount_pb2.Mount]:
        snapshot = self.store.require(key)
        if snapshot.kind is Kind.COMMITTED:
            raise LayerBusyError(f"snapshot {key!r} is committed: only active or view mount")
        path = self._paths.get(snapshot.layer)
        if path is None:  # its layer could not be mounted at start-up (the log says why)
            raise BackendError(f"snapshot {key!r} has no mounted directory")
        return bind_mounts(snapshot.kind, path)

    async def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        """Active ``key`` becomes committed ``name``; its layer is frozen."""
        if not name:
            raise RequestError("a committed snapshot's name must not be empty")
        async with self._locked(key, name):
            before = self.store.get(key)
            committed = self.store.commit(key, name, labels)
            assert before is not None  # store.commit raised otherwise
            crash_point("commit-stored")
            try:
                await self.core.commit(committed.layer)
            except Exception:
                self.store.restore(name, before)
                raise
            self._paths.pop(committed.layer, None)
            await self.core.put(committed.layer)

    async def remove(self, key: str) -> None:
        async with self._locked(key):
            snapshot = self.store.require(key)
            children = self.store.children(key)
            if children:
                raise LayerBusyError(
                    f"cannot remove snapshot {key!r}: {len(children)} snapshot(s) use it as "
                    f"parent, e.g. {children[0]!r}"
                )
            path = self._paths.pop(snapshot.layer, None)
            if path is not None:
                await self.core.put(snapshot.layer)
            try:
                await self.core.remove(snapshot.layer)
            except Exception:
                if path is not None:  # still there: keep it usable
                    self._paths[snapshot.layer] = await self.core.get(snapshot.layer)
                raise
            crash_point("remove-removed")
            self.store.delete(key)

    def stat(self, key: str) -> Snapshot:
        return self.store.require(key)

    async def update(self, key: str, labels: Mapping[str, str], paths: Sequence[str]) -> Snapshot:
        async with self._locked(key):
            return self.store.update(key, labels, paths)

    def list(self, filters: Sequence[str]) -> list[Snapshot]:
        parsed = Filters.parse(filters)
        return [
            s
            for s in self.store.all()
            if parsed.matches(snapshot_lookup(s.key, s.parent, s.kind.value, s.labels))
        ]

    async def usage(self, key: str) -> Usage:
        return await self.core.usage(self.store.require(key).layer)

    async def cleanup(self) -> None:
        await self.core.cleanup()


# -- the gRPC boundary --------------------------------------------------------------------------

Req = TypeVar("Req", bound=message.Message)
Resp = TypeVar("Resp", bound=message.Message)
T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


async def _answer(work: Callable[[], Awaitable[T]], context: Context, what: str) -> T:
    """Run ``work`` to its end even if the client goes; turn its error into a status.

    The call is observed (:class:`snapdriver.observe.Call`) from before its work starts, so the
    log records of the work carry it, and its outcome is the error answered, not the abort.
    """
    with Call("containerd", what) as call:
        try:
            return await asyncio.shield(_future(work()))
        except Exception as err:
            call.fail(err)
            code, text = grpc_status(err)
            if code is grpc.StatusCode.INTERNAL:
                log.error("%s failed: %s", what, text, exc_info=err)
            else:
                log.debug("%s: %s %s", what, code.name, text)
            await context.abort(code, text)
            raise  # abort raised already; this satisfies the type checker


def _unary(
    method: Callable[[Req], Awaitable[Resp]], request: type[Req], name: str
) -> grpc.RpcMethodHandler[Any, Any]:
    async def handle(req: Req, context: Context) -> Resp:
        return await _answer(lambda: method(req), context, name)

    return grpc.unary_unary_rpc_method_handler(
        handle,  # grpc.aio takes coroutine functions
        request_deserializer=request.FromString,
        response_serializer=lambda reply: reply.SerializeToString(),
    )


class Servicer:
    """The wire side: decode each request, call :class:`SnapshotService`, encode the reply."""

    def __init__(self, service: SnapshotService) -> None:
        self.service = service

    async def _prepare(self, req: pb.PrepareSnapshotRequest) -> pb.PrepareSnapshotResponse:
        mounts = await self.service.prepare(req.key, req.parent, req.labels, Kind.ACTIVE)
        return pb.PrepareSnapshotResponse(mounts=mounts)

    async def _view(self, req: pb.ViewSnapshotRequest) -> pb.ViewSnapshotResponse:
        mounts = await self.service.prepare(req.key, req.parent, req.labels, Kind.VIEW)
        return pb.ViewSnapshotResponse(mounts=mounts)

    async def _mounts(self, req: pb.MountsRequest) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=self.service.mounts(req.key))

    async def _commit(self, req: pb.CommitSnapshotRequest) -> empty_pb2.Empty:
        await self.service.commit(req.name, req.key, req.labels)
        return empty_pb2.Empty()

    async def _remove(self, req: pb.RemoveSnapshotRequest) -> empty_pb2.Empty:
        await self.service.remove(req.key)
        return empty_pb2.Empty()

    async def _stat(self, req: pb.StatSnapshotRequest) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=info(self.service.stat(req.key)))

    async def _update(self, req: pb.UpdateSnapshotRequest) -> pb.UpdateSnapshotResponse:
        paths = list(req.update_mask.paths)
        updated = await self.service.update(req.info.name, req.info.labels, paths)
        return pb.UpdateSnapshotResponse(info=info(updated))

    async def _usage(self, req: pb.UsageRequest) -> pb.UsageResponse:
        usage = await self.service.usage(req.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    async def _cleanup(self, req: pb.CleanupRequest) -> empty_pb2.Empty:
        await self.service.cleanup()
        return empty_pb2.Empty()

    async def _list(
        self, req: pb.ListSnapshotsRequest, context: Context
    ) -> AsyncIterator[pb.ListSnapshotsResponse]:
        async def matching() -> list[Snapshot]:
            return self.service.list(req.filters)

        found = await _answer(matching, context, "List")
        for batch in _batches(found, LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info(s) for s in batch])

    def handler(self) -> grpc.GenericRpcHandler:
        unary = {
            "Prepare": _unary(self._prepare, pb.PrepareSnapshotRequest, "Prepare"),
            "View": _unary(self._view, pb.ViewSnapshotRequest, "View"),
            "Mounts": _unary(self._mounts, pb.MountsRequest, "Mounts"),
            "Commit": _unary(self._commit, pb.CommitSnapshotRequest, "Commit"),
            "Remove": _unary(self._remove, pb.RemoveSnapshotRequest, "Remove"),
            "Stat": _unary(self._stat, pb.StatSnapshotRequest, "Stat"),
            "Update": _unary(self._update, pb.UpdateSnapshotRequest, "Update"),
            "Usage": _unary(self._usage, pb.UsageRequest, "Usage"),
            "Cleanup": _unary(self._cleanup, pb.CleanupRequest, "Cleanup"),
        }
        stream: grpc.RpcMethodHandler[Any, Any] = grpc.unary_stream_rpc_method_handler(
            self._list,  # grpc.aio takes async generators
            request_deserializer=pb.ListSnapshotsRequest.FromString,
            response_serializer=lambda reply: reply.SerializeToString(),
        )
        return grpc.method_handlers_generic_handler(SERVICE, {**unary, "List": stream})


def _future(work: Awaitable[T]) -> asyncio.Future[T]:
    future = asyncio.ensure_future(work)
    # A call whose client went away still ends; its error was answered to no one, not lost.
    future.add_done_callback(_consume_error)
    return future


def _consume_error(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("a call finished after its client left: %s", future.exception())


def _batches(items: list[Snapshot], size: int) -> Iterator[list[Snapshot]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
