"""Kernel-log triage: the guest kernel logs at level 7 to its second serial port, kept as
``.lab-kernel.log`` in the checkout. A passing run counts the lines that show kernel trouble; a
failing one prints the log from the first of them (or its last lines when there is none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# What kernel trouble looks like, by kind (a line counts once, under its first kind).
KINDS = {
    "BUG": r"BUG:",
    "WARNING": r"WARNING:",
    "oops/panic": r"Oops|Kernel panic",
    "call trace": r"Call Trace",
    "RCU stall": r"rcu: INFO",
    "hung task": r"hung_task|blocked for more than",
}
SHOWN_FROM_FIRST = 150
SHOWN_TAIL = 40


@dataclass(frozen=True)
class Triage:
    """What a kernel log holds: its size, its trouble lines by kind, where trouble starts."""

    lines: list[str]
    kinds: dict[str, int]
    first: int | None  # 1-based line number of the first trouble line

    @property
    def trouble(self) -> int:
        """How many lines show kernel trouble."""
        return sum(self.kinds.values())


def triage(text: str) -> Triage:
    """Count the trouble lines of a kernel log (serial CRs dropped)."""
    lines = text.replace("\r", "").splitlines()
    kinds = dict.fromkeys(KINDS, 0)
    first = None
    for number, line in enumerate(lines, 1):
        kind = next((k for k, pattern in KINDS.items() if re.search(pattern, line)), None)
        if kind is not None:
            kinds[kind] += 1
            first = first or number
    return Triage(lines, kinds, first)


def summary(found: Triage) -> str:
    """``N lines, M of them kernel trouble (BUG 1, call trace 2)``."""
    text = f"{len(found.lines)} lines, {found.trouble} of them kernel trouble"
    counted = ", ".join(f"{kind} {n}" for kind, n in found.kinds.items() if n)
    return f"{text} ({counted})" if counted else text


def report(text: str, rc: int, where: str) -> list[str]:
    """What the lab prints about the kernel log of a run that exited with ``rc``."""
    found = triage(text)
    if rc == 0:
        return [f"lab: kernel log: {summary(found)} ({where})"]
    if found.first is not None:
        head = (
            f"lab: kernel log from its first sign of trouble (line {found.first} of"
            f" {len(found.lines)}: {summary(found)}; all of it in {where}):"
        )
        return [head, *found.lines[found.first - 1 : found.first - 1 + SHOWN_FROM_FIRST]]
    head = (
        f"lab: kernel log, last {SHOWN_TAIL} lines (no kernel trouble in it; all of it in {where}):"
    )
    return [head, *found.lines[-SHOWN_TAIL:]]
