"""How the lab fails and reports."""

from __future__ import annotations

import sys


class LabError(Exception):
    """The lab refuses or a build step failed: exit code 2."""


class Terminated(Exception):
    """SIGTERM arrived: exit code 143 after cleanup."""


def log(message: str) -> None:
    """One line for the user on stderr, prefixed like every lab message."""
    print(f"lab: {message}", file=sys.stderr, flush=True)
