"""Fixtures for the containerd front's tests: fronts on fresh roots of the session's btrfs."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from snapdriver.testing.containerd import Front, remove_everything


@pytest.fixture
def make_front(btrfs_mount: Path) -> Iterator[Callable[..., Front]]:
    """Fronts on fresh roots of the session's btrfs; each is emptied and stopped at the end."""
    made: list[Front] = []

    def make(env: Mapping[str, str] | None = None) -> Front:
        root = btrfs_mount / f"ctr-{uuid.uuid4().hex[:8]}"
        front = Front(root, env)
        made.append(front)
        return front

    yield make
    for front in made:
        if front.env or not front.running():  # a crash hook, or stopped: start it plainly
            front.stop()
            front.env = {}
            front.start()
        client = front.client()
        try:
            remove_everything(client)
        finally:
            client.close()
            front.stop()
