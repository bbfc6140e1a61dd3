"""Layer IDs: the one place where an ID from the wire is checked.

Docker sends 64-hex cache IDs, ``<hex>-init`` layers and, from graphtest-style callers, short names
such as ``Base``. An ID becomes a file or dataset name, so anything that could walk a path or
confuse a tool (``/``, ``..``, NUL, ``@``, whitespace, non-ASCII) is refused here, before any
backend sees it.
"""

from __future__ import annotations

import re

from snapdriver.errors import RequestError

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


def validate_layer_id(value: object, field: str = "ID") -> str:
    """Return ``value`` if it is an acceptable layer ID, else raise :class:`RequestError`."""
    if not isinstance(value, str):
        raise RequestError(f"{field} must be a string, not {type(value).__name__}")
    if not _ID.fullmatch(value) or ".." in value:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise RequestError(
            f"invalid layer {field} {shown!r}: use 1-200 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return value
