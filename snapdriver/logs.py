"""Log output: the text format people read, or one JSON object per line for machines.

``--log-format text`` (the default) is ``snapdriver[NAME] LEVEL LOGGER: MESSAGE``.
``--log-format json`` writes, per record, an object with ``time`` (UTC, RFC 3339), ``level``,
``logger``, ``plugin`` (NAME) and ``message``; ``exception`` with the traceback when there is one;
and, for records made while a front serves a call (:mod:`snapdriver.observe`), ``front``,
``call``, ``layer`` (when known), and on the call's own closing record ``outcome`` and
``duration`` (seconds).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from snapdriver.observe import CURRENT

FORMATS = ("text", "json")
#: Taken from a record's ``extra=`` when present, else from the call being served.
CALL_FIELDS = ("front", "call", "layer", "outcome", "duration")


def configure(level: str, log_format: str, name: str) -> None:
    """Log to stderr at ``level`` in ``log_format`` (one of :data:`FORMATS`)."""
    if log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter(name))
        logging.basicConfig(level=level.upper(), handlers=[handler])
        logging.captureWarnings(True)  # a warning printed raw would be a line that is not JSON
    else:
        logging.basicConfig(
            level=level.upper(),
            format=f"snapdriver[{name}] %(levelname)s %(name)s: %(message)s",
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def __init__(self, plugin: str) -> None:
        super().__init__()
        self.plugin = plugin

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        data: dict[str, Any] = {
            "time": moment.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "plugin": self.plugin,
            "message": record.getMessage(),
        }
        data |= _call_fields(record)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exception"] = record.exc_text
        return json.dumps(data, ensure_ascii=False, default=str)


def _call_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {k: getattr(record, k) for k in CALL_FIELDS if hasattr(record, k)}
    if "call" not in fields:
        call = CURRENT.get()
        if call is not None:
            fields |= {"front": call.front, "call": call.method, "layer": call.layer}
            if call.outcome is not None:  # the front has judged the call; it is not over yet
                fields["outcome"] = call.outcome
    return {k: v for k, v in fields.items() if v != ""}
