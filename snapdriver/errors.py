"""The exception tree.

Every error snapdriver raises on purpose derives from :class:`SnapdriverError`, and its class says
what went wrong, never how a wire spells it: each front maps the tree to its own wire at its
boundary (the graphdriver front to an HTTP status and Docker's ``{"Err": "..."}``, the containerd
front to a gRPC status code). Anything else is a bug, answered as an internal error with a
one-line message, never a traceback.
"""

from __future__ import annotations

import errno
import os

#: A full filesystem or quota: the layer is not at fault, and the caller's clean-up differs.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class SnapdriverError(Exception):
    """Base of all snapdriver errors. ``str(err)`` is the message a person reads."""


class ConfigError(SnapdriverError):
    """Bad configuration: a CLI flag, an Init option, a Home on the wrong filesystem."""


class BackendLoadError(ConfigError):
    """A backend could not be found, imported or validated at start-up."""


class NotInitialisedError(SnapdriverError):
    """A call needs storage that is not set up yet (no Init, or a recorded one that failed)."""


class RequestError(SnapdriverError):
    """The request itself is malformed: bad JSON, a wrong type, an invalid layer ID."""


class LayerNotFoundError(SnapdriverError):
    """The named layer does not exist (or was never completed)."""


class LayerExistsError(SnapdriverError):
    """Create was asked for an ID that already names a complete layer."""


class LayerBusyError(SnapdriverError):
    """The layer is in a state that forbids the call (children exist, still in use)."""


class QuotaNotSupportedError(SnapdriverError):
    """A size limit was asked for, but the backend or filesystem cannot enforce one."""


class ArchiveError(SnapdriverError):
    """A layer tar stream is malformed or tries to write outside its layer."""


class NoSpaceError(SnapdriverError):
    """The filesystem or a quota is full (ENOSPC, EDQUOT); what was half made is gone again."""


class BackendError(SnapdriverError):
    """The storage backend failed (a filesystem or tool error)."""


def storage_error(code: int, what: str, detail: str) -> SnapdriverError:
    """A backend's failure: :class:`NoSpaceError` for ENOSPC and EDQUOT, else BackendError.

    The full-disk message leads with ``strerror`` ("no space left on device", "disk quota
    exceeded"), which the core repeats when it names the layer.
    """
    if code in NO_SPACE_ERRNOS:
        return NoSpaceError(f"{os.strerror(code).lower()}: {what}")
    return BackendError(f"{what}: {detail}")
