"""The ``snapdriver`` pytest plugin (entry point ``pytest11``): fixtures for backend authors."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="class")
def snapdriver_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the conformance suite puts Init's Home. Override it to use another filesystem."""
    return tmp_path_factory.mktemp("home")
