"""snapdriver: container layers as filesystem snapshots, behind a pluggy backend contract.

The public API: the hook contract (``hookimpl``, ``BackendConfig``, ``CreateRequest``,
``Finding``), change lists (``Change``, ``ChangeKind``), the exception tree, the core (``Core``,
``Backend``), and the graphdriver front (``GraphDriver``, ``create_app``, ``serving``,
``Listen``, ``TLSFiles``).

What a backend author imports (the contract, the errors, change lists) loads nothing heavy; the
core and the fronts (aiohttp, SQLite, the tar code) are imported on first use of their names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from snapdriver.errors import (
    ArchiveError,
    BackendError,
    BackendLoadError,
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
from snapdriver.hookspec import BackendConfig, CreateRequest, Finding, hookimpl
from snapdriver.layers.changes import Change, ChangeKind

__version__ = "0.1.0"

if TYPE_CHECKING:
    from snapdriver.core import Core
    from snapdriver.graphdriver.app import create_app
    from snapdriver.graphdriver.driver import GraphDriver
    from snapdriver.graphdriver.serve import Listen, TLSFiles, serving
    from snapdriver.plugins import Backend

#: Names loaded on first use, and the module each comes from.
_LAZY = {
    "Backend": "snapdriver.plugins",
    "Core": "snapdriver.core",
    "GraphDriver": "snapdriver.graphdriver.driver",
    "Listen": "snapdriver.graphdriver.serve",
    "TLSFiles": "snapdriver.graphdriver.serve",
    "create_app": "snapdriver.graphdriver.app",
    "serving": "snapdriver.graphdriver.serve",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'snapdriver' has no attribute {name!r}")


__all__ = [
    "ArchiveError",
    "Backend",
    "BackendConfig",
    "BackendError",
    "BackendLoadError",
    "Change",
    "ChangeKind",
    "ConfigError",
    "Core",
    "CreateRequest",
    "Finding",
    "GraphDriver",
    "LayerBusyError",
    "LayerExistsError",
    "LayerNotFoundError",
    "Listen",
    "NoSpaceError",
    "NotInitialisedError",
    "QuotaNotSupportedError",
    "RequestError",
    "SnapdriverError",
    "TLSFiles",
    "__version__",
    "create_app",
    "hookimpl",
    "serving",
]
