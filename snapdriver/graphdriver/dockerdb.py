"""What dockerd's own layer store references, read from its files.

dockerd keeps, per storage driver, ``<data-root>/image/<driver>/layerdb``: ``sha256/*/cache-id``
names the driver layer of every image layer, ``mounts/*/mount-id`` and ``init-id`` those of every
container. Since Init's Home is ``<data-root>/<driver>``, the plugin can find it. A layer named by
none of these is one dockerd has forgotten, such as the ``-init`` layer it leaks when a Get fails
right after the create.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: The IDs dockerd itself makes. Others (BuildKit's snapshots) are never judged orphans here.
DOCKERD_ID = re.compile(r"[0-9a-f]{64}(-init)?")


def layerdb_of(home: Path) -> Path:
    return home.parent / "image" / home.name / "layerdb"


def referenced_layers(home: Path) -> set[str] | None:
    """Layer IDs dockerd references, or None when there is no layer store to ask.

    One directory listing and one read per layer: with 10,000 layers, pathlib's globs (a stat
    per directory and per file) took three times as long (bench/scale.md).
    """
    layerdb = layerdb_of(home)
    if not layerdb.is_dir():
        return None
    found = _read_names(layerdb / "sha256", ("cache-id",))
    return found | _read_names(layerdb / "mounts", ("mount-id", "init-id"))


def _read_names(directory: Path, names: tuple[str, ...]) -> set[str]:
    """The stripped contents of ``names`` in each subdirectory of ``directory`` that has them."""
    found: set[str] = set()
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return found
    with entries:
        for entry in entries:
            for name in names:
                try:
                    with open(os.path.join(entry.path, name), "rb") as handle:
                        found.add(handle.read().decode().strip())
                except (FileNotFoundError, NotADirectoryError):
                    continue  # dockerd is writing it, or a stray file: it names nothing yet
    return found
