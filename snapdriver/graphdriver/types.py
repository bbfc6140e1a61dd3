"""Docker's GraphDriver wire types, decoded and checked in one place.

dockerd's encoder omits empty ``ID``, ``Parent``, ``MountLabel`` and ``StorageOpt``, and sends
``null`` for Init's ``Opts``, ``UIDMaps`` and ``GIDMaps`` without userns-remap; all of those are
accepted. A field of the wrong type is a :class:`RequestError` naming the field. Layer IDs are
checked by :func:`snapdriver.layers.ids.validate_layer_id`, here and nowhere else on the way in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from snapdriver.errors import ConfigError, RequestError
from snapdriver.layers.changes import Change
from snapdriver.layers.idmap import IDRange
from snapdriver.layers.ids import validate_layer_id

CONTENT_TYPE = "application/vnd.docker.plugins.v1.1+json"
MANIFEST = {"Implements": ["GraphDriver"]}


def decode_object(body: bytes) -> dict[str, Any]:
    """A JSON object from a request body; an empty body is ``{}`` (Activate sends none)."""
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(f"request body is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise RequestError(f"request body must be a JSON object, not {type(data).__name__}")
    return data


def _optional_str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RequestError(f"{key} must be a string, not {type(value).__name__}")
    return value


def _optional_list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(f"{key} must be a list or null, not {type(value).__name__}")
    return value


def _id_range(value: Any, key: str) -> IDRange:
    """One userns range; the wire keys are snake_case (``container_id``), unlike the docs."""
    if not isinstance(value, dict):
        raise RequestError(f"{key} entries must be objects")
    try:
        return IDRange.decode(value)
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise RequestError(f"{key} entry {value!r} is malformed: {err}") from err


@dataclass(frozen=True)
class InitRequest:
    home: str
    options: tuple[str, ...] = ()
    uid_maps: tuple[IDRange, ...] = ()
    gid_maps: tuple[IDRange, ...] = ()

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> InitRequest:
        options = _optional_list(data, "Opts")
        if not all(isinstance(o, str) for o in options):
            raise RequestError("Opts must be a list of strings")
        return cls(
            home=_optional_str(data, "Home"),
            options=tuple(options),
            uid_maps=tuple(_id_range(m, "UIDMaps") for m in _optional_list(data, "UIDMaps")),
            gid_maps=tuple(_id_range(m, "GIDMaps") for m in _optional_list(data, "GIDMaps")),
        )


@dataclass(frozen=True)
class LayerRequest:
    """The request of every call but Init and ApplyDiff (Docker's ``graphDriverRequest``)."""

    id: str
    parent: str | None = None
    mount_label: str = ""
    storage_opt: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> LayerRequest:
        if "ID" not in data or data["ID"] in ("", None):
            raise RequestError("ID is required")
        parent = _optional_str(data, "Parent")
        storage_opt = data.get("StorageOpt") or {}
        if not isinstance(storage_opt, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in storage_opt.items()
        ):
            raise RequestError("StorageOpt must be an object of strings")
        return cls(
            id=validate_layer_id(data["ID"]),
            parent=validate_layer_id(parent, "Parent") if parent else None,
            mount_label=_optional_str(data, "MountLabel"),
            storage_opt=storage_opt,
        )

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> LayerRequest:
        """ApplyDiff's ``?id=...&parent=...`` (``parent=`` empty for a base layer)."""
        layer, parent = query.get("id", ""), query.get("parent", "")
        if not layer:
            raise RequestError("the id query parameter is required")
        return cls(
            id=validate_layer_id(layer, "id"),
            parent=validate_layer_id(parent, "parent") if parent else None,
        )


def encode_changes(changes: list[Change]) -> dict[str, Any]:
    return {"Changes": [{"Path": c.path, "Kind": int(c.kind)} for c in changes]}


def encode_error(message: str) -> dict[str, str]:
    return {"Err": message}
