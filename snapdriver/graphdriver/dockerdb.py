"""What dockerd's own layer store references, read from its files.

dockerd keeps, per storage driver, ``<data-root>/image/<driver>/layerdb``: ``sha256/*/cache-id``
names the driver layer of every image layer, ``mounts/*/mount-id`` and ``init-id`` those of every
container. Since Init's Home is ``<data-root>/<driver>``, the plugin can find it. A layer named by
none of these is one dockerd has forgotten, such as the ``-init`` layer it leaks when a Get fails
right after the create.
"""

from __future__ import annotations

import re
from pathlib import Path

#: The IDs dockerd itself makes. Others (BuildKit's snapshots) are never judged orphans here.
DOCKERD_ID = re.compile(r"[0-9a-f]{64}(-init)?")


def layerdb_of(home: Path) -> Path:
    return home.parent / "image" / home.name / "layerdb"


def referenced_layers(home: Path) -> set[str] | None:
    """Layer IDs dockerd references, or None when there is no layer store to ask."""
    layerdb = layerdb_of(home)
    if not layerdb.is_dir():
        return None
    files = [
        *layerdb.glob("sha256/*/cache-id"),
        *layerdb.glob("mounts/*/mount-id"),
        *layerdb.glob("mounts/*/init-id"),
    ]
    return {f.read_text().strip() for f in files}
