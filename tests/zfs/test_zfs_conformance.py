"""The conformance suite on a real pool, with SetQuota required (as moby's zfs graphtest)."""

from __future__ import annotations

import pytest

from snapdriver.testing import Conformance

pytestmark = pytest.mark.zfs


@pytest.fixture(scope="class")
def snapdriver_init_options(root_dataset: str) -> list[str]:
    """Layers go under this module's root dataset: dockerd's ``--storage-opt zfs.fsname``."""
    return [f"zfs.fsname={root_dataset}"]


class TestZfsConformance(Conformance):
    backend = "zfs"
    quota_required = True
