"""User-namespace ID maps: container IDs to host IDs and back, with Docker's rules.

``dockerd --userns-remap`` sends Init a list of UID ranges and one of GID ranges; layers then
hold host IDs (container root is, say, host 100000) while tars carry container IDs. The rules are
those of moby's ``pkg/idtools``: an ID inside no range is an error (applying and exporting both
fail), and on the way in an ID already equal to the remapped root's is kept as it is. No maps at
all is ``None`` at every call site, so unmapped layers pay one ``is None`` check.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from snapdriver.errors import ArchiveError, ConfigError


class IDMapError(ArchiveError):
    """An owner that the maps cannot translate (moby refuses these the same way)."""


@dataclass(frozen=True)
class IDRange:
    """``size`` consecutive IDs from ``container_id`` in the container, ``host_id`` on the host."""

    container_id: int
    host_id: int
    size: int

    def __post_init__(self) -> None:
        if self.container_id < 0 or self.host_id < 0 or self.size <= 0:
            raise ConfigError(f"ID range {self} is invalid: IDs must be >= 0 and size > 0")

    def encode(self) -> dict[str, int]:
        """The wire's (and the Init record's) snake_case keys."""
        return {"container_id": self.container_id, "host_id": self.host_id, "size": self.size}

    @classmethod
    def decode(cls, value: Mapping[str, Any]) -> IDRange:
        return cls(int(value["container_id"]), int(value["host_id"]), int(value["size"]))


def _to_host(ranges: Sequence[IDRange], container_id: int, what: str) -> int:
    for r in ranges:
        if r.container_id <= container_id < r.container_id + r.size:
            return r.host_id + container_id - r.container_id
    raise IDMapError(f"Container {what} {container_id} cannot be mapped to a host {what}")


def _to_container(ranges: Sequence[IDRange], host_id: int, what: str) -> int:
    for r in ranges:
        if r.host_id <= host_id < r.host_id + r.size:
            return r.container_id + host_id - r.host_id
    raise IDMapError(f"Host {what} {host_id} cannot be mapped to a container {what}")


@dataclass(frozen=True)
class IDMapping:
    """UID and GID ranges; an empty list of either maps that kind of ID to itself."""

    uids: tuple[IDRange, ...] = ()
    gids: tuple[IDRange, ...] = ()

    @classmethod
    def create(cls, uids: Iterable[IDRange], gids: Iterable[IDRange]) -> IDMapping | None:
        """The mapping, or None when there are no ranges at all (no remapping)."""
        mapping = cls(tuple(uids), tuple(gids))
        if not mapping.uids and not mapping.gids:
            return None
        _ = mapping.root  # container root must map: Docker's drivers refuse to start otherwise
        return mapping

    @cached_property
    def root(self) -> tuple[int, int]:
        """The host UID and GID of the container's root (``RootPair``)."""
        try:
            return self._uid_to_host(0), self._gid_to_host(0)
        except IDMapError as err:
            raise ConfigError(f"the ID maps do not map container root: {err}") from err

    def _uid_to_host(self, uid: int) -> int:
        return _to_host(self.uids, uid, "UID") if self.uids else uid

    def _gid_to_host(self, gid: int) -> int:
        return _to_host(self.gids, gid, "GID") if self.gids else gid

    def to_host(self, uid: int, gid: int) -> tuple[int, int]:
        """A tar entry's owner as the layer stores it (moby's ``IdentityMapping.ToHost``).

        As in moby, an ID that already equals the remapped root's is left alone.
        """
        root_uid, root_gid = self.root
        host_uid = uid if uid == root_uid else self._uid_to_host(uid)
        host_gid = gid if gid == root_gid else self._gid_to_host(gid)
        return host_uid, host_gid

    def to_container(self, uid: int, gid: int) -> tuple[int, int]:
        """A stored file's owner as a tar of the layer carries it (``ToContainer``)."""
        container_uid = _to_container(self.uids, uid, "UID") if self.uids else uid
        container_gid = _to_container(self.gids, gid, "GID") if self.gids else gid
        return container_uid, container_gid

    def encode(self) -> dict[str, list[dict[str, int]]]:
        return {
            "uid_maps": [r.encode() for r in self.uids],
            "gid_maps": [r.encode() for r in self.gids],
        }

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> IDMapping | None:
        """From :meth:`encode`'s form; ``ConfigError`` if it is malformed."""
        try:
            uids = [IDRange.decode(r) for r in data.get("uid_maps") or ()]
            gids = [IDRange.decode(r) for r in data.get("gid_maps") or ()]
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"malformed ID maps {data!r}: {err}") from err
        return cls.create(uids, gids)
