"""Sizes as Docker spells them (``--storage-opt size=50M``)."""

from __future__ import annotations

import re

from snapdriver.errors import RequestError

_SIZE = re.compile(r"(\d+(?:\.\d+)?) ?([kKmMgGtTpP])?[iI]?[bB]?")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """Parse a size the way Docker's ``units.RAMInBytes`` does: binary units, ``50M`` = 50 MiB."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise RequestError(
            f"invalid size {text!r}: expected a number with an optional unit, e.g. 50M"
        )
    number, unit = match.groups()
    size = int(float(number) * _UNITS[(unit or "").lower()])
    if size <= 0:
        raise RequestError(f"invalid size {text!r}: must be greater than zero")
    return size
