"""The ``snapdriver`` pytest plugin (entry point ``pytest11``): fixtures for backend authors."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="class")
def snapdriver_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the conformance suite puts Init's Home. Override it to use another filesystem."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="class")
def snapdriver_init_options() -> list[str] | None:
    """Init's ``Opts`` for the conformance suite; override to compute them (e.g. a dataset name).
    None means the ``init_options`` class attribute."""
    return None
