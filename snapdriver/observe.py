"""One call a front serves, observed: its log fields while it runs, then its metrics and record.

A front wraps each call it serves in a :class:`Call`::

    with Call("containerd", "Prepare") as call:
        call.layer = request.key
        ...

While the block runs, every log record made below it (the core, a backend hook in a worker
thread: ``asyncio.to_thread`` copies the context) carries the call's front, method and layer in
the JSON log format (:mod:`snapdriver.logs`). When it ends, its outcome (``ok``, or from the
exception that left the block, or as set with :meth:`Call.fail`) and duration go to
:func:`snapdriver.metrics.observe_call` and into one DEBUG record on the ``snapdriver.calls``
logger. Works the same in coroutines and threads.

A front that answers an error itself instead of letting it leave the block (an HTTP error reply,
a gRPC ``context.abort``) calls :meth:`Call.fail` with it first, so the outcome names the error
and not whatever the front raises to answer it.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar, Token
from types import TracebackType

from snapdriver import metrics

log = logging.getLogger("snapdriver.calls")


class Call:
    """One call: ``front`` (``graphdriver``, ``containerd``), ``method`` in the front's terms."""

    __slots__ = ("_started", "_token", "front", "layer", "method", "outcome")

    def __init__(self, front: str, method: str) -> None:
        self.front = front
        self.method = method
        self.layer = ""
        self.outcome: str | None = None
        self._started = 0.0
        self._token: Token[Call | None] | None = None

    def fail(self, err: BaseException) -> None:
        """The call failed although no exception leaves the block (the front answered it)."""
        self.outcome = metrics.outcome_of(err)

    def __enter__(self) -> Call:
        self._token = CURRENT.set(self)
        self._started = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        seconds = time.perf_counter() - self._started
        if self._token is not None:
            CURRENT.reset(self._token)
        outcome = self.outcome or metrics.outcome_of(exc)
        metrics.observe_call(self.front, self.method, outcome, seconds)
        if log.isEnabledFor(logging.DEBUG):
            self._log(outcome, seconds)

    def _log(self, outcome: str, seconds: float) -> None:
        fields = {
            "front": self.front,
            "call": self.method,
            "layer": self.layer,
            "outcome": outcome,
            "duration": round(seconds, 6),
        }
        layer = f" {self.layer}" if self.layer else ""
        log.debug("%s%s: %s in %.3f ms", self.method, layer, outcome, seconds * 1000, extra=fields)


#: The call being served in this task or thread, if any.
CURRENT: ContextVar[Call | None] = ContextVar("snapdriver_call", default=None)


def set_layer(layer: str) -> None:
    """Name the layer the current call is about (once the front has decoded its request)."""
    call = CURRENT.get()
    if call is not None:
        call.layer = layer
