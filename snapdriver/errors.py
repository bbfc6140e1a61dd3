"""The exception tree.

Every error snapdriver raises on purpose derives from :class:`SnapdriverError`. The protocol
layer turns each into Docker's ``{"Err": "..."}`` reply with the class's ``status``; anything
else is a bug and is answered with status 500 and a one-line message, never a traceback.
"""

from __future__ import annotations


class SnapdriverError(Exception):
    """Base of all snapdriver errors. ``str(err)`` is the message a person reads."""

    status: int = 500


class ConfigError(SnapdriverError):
    """Bad configuration: a CLI flag, an Init option, a Home on the wrong filesystem."""

    status = 400


class BackendLoadError(ConfigError):
    """A backend could not be found, imported or validated at start-up."""


class NotInitialisedError(SnapdriverError):
    """A call arrived before any Init, and no earlier Init was recorded."""

    status = 503


class RequestError(SnapdriverError):
    """The request itself is malformed: bad JSON, a wrong type, an invalid layer ID."""

    status = 400


class LayerNotFoundError(SnapdriverError):
    """The named layer does not exist (or was never completed)."""

    status = 404


class LayerExistsError(SnapdriverError):
    """Create was asked for an ID that already names a complete layer."""

    status = 409


class LayerBusyError(SnapdriverError):
    """The layer is in a state that forbids the call (children exist, still in use)."""

    status = 409


class QuotaNotSupportedError(SnapdriverError):
    """A size limit was asked for, but the backend or filesystem cannot enforce one."""

    status = 400


class ArchiveError(SnapdriverError):
    """A layer tar stream is malformed or tries to write outside its layer."""

    status = 400


class NoSpaceError(SnapdriverError):
    """The filesystem or a quota is full (ENOSPC, EDQUOT); what was half made is gone again."""

    status = 507


class BackendError(SnapdriverError):
    """The storage backend failed (a filesystem or tool error)."""

    status = 500
