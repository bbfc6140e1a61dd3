"""snapdriver: Docker's GraphDriver plugin protocol in Python, with snapshot backends.

The public API: the hook contract (``hookimpl``, ``BackendConfig``, ``CreateRequest``), change
lists (``Change``, ``ChangeKind``), the core (``Driver``, ``Backend``), the aiohttp application
(``create_app``) and its listener (``serving``, ``Listen``), and the exception tree.
"""

__version__ = "0.1.0"

from snapdriver.driver import Driver
from snapdriver.errors import (
    ArchiveError,
    BackendError,
    BackendLoadError,
    ConfigError,
    LayerBusyError,
    LayerExistsError,
    LayerNotFoundError,
    NotInitialisedError,
    QuotaNotSupportedError,
    RequestError,
    SnapdriverError,
)
from snapdriver.hookspec import BackendConfig, CreateRequest, hookimpl
from snapdriver.layers.changes import Change, ChangeKind
from snapdriver.plugins import Backend
from snapdriver.protocol.app import create_app
from snapdriver.protocol.serve import Listen, TLSFiles, serving

__all__ = [
    "ArchiveError",
    "Backend",
    "BackendConfig",
    "BackendError",
    "BackendLoadError",
    "Change",
    "ChangeKind",
    "ConfigError",
    "CreateRequest",
    "Driver",
    "LayerBusyError",
    "LayerExistsError",
    "LayerNotFoundError",
    "Listen",
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
