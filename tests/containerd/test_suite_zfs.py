"""containerd's own snapshotter suite against the containerd front on ZFS (in the lab).

The guest has no Go: the host builds the suite binary and leaves it in ``.lab-bin/`` of the shared
checkout (``python -m snapdriver.testing.gosuite export``, which scripts/test runs before the lab).
Each subtest's front gets a root dataset of its own, ``ROOT/f<front number>``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from snapdriver_zfs.testing import dataset_mounts, everything_below, scratch_root, skip_without_zfs

from snapdriver.testing import gosuite

pytestmark = [pytest.mark.zfs, pytest.mark.slow]
WRAPPER = Path(__file__).parent / "zfs-front.sh"
BINARY = gosuite.LAB_BIN / gosuite.SUITE_BINARY


def lab_binary() -> Path:
    """The exported suite binary; missing or stale fails where the zfs tier is required."""
    stamp = BINARY.with_name(f"{BINARY.name}.key")
    problem = None
    if not BINARY.exists() or not stamp.exists():
        problem = f"{BINARY} is missing"
    elif stamp.read_text().strip() != gosuite.suite_sources_key():
        problem = f"{BINARY} is stale (tests/containerd/suite changed since it was built)"
    if problem is None:
        return BINARY
    message = (
        f"CONTAINERD SUITE (zfs) NOT RUN: {problem}; on the host run "
        "`.venv/bin/python -m snapdriver.testing.gosuite export` before the lab"
    )
    if "zfs" in os.environ.get("SNAPDRIVER_REQUIRE_TIERS", "").split(","):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture
def suite_root() -> Iterator[str]:
    skip_without_zfs()
    with scratch_root("s") as root:
        yield root


def test_the_front_passes_containerds_suite_on_zfs(
    suite_root: str, tmp_path: Path, figure: Callable[[str], None]
) -> None:
    binary = lab_binary()
    dataset = f"{suite_root}/f{{n}}"
    front = [sys.executable, "-m", "snapdriver.containerd", "--backend", "zfs"]
    command = ["/bin/sh", str(WRAPPER), dataset, *front, "--dataset", dataset]
    run = gosuite.run_suite(binary, command, tmp_path / "front", timeout=1500)
    figure(f"CONTAINERD SUITE (zfs): {run.summary()}")
    assert not run.problems(), run.failure_report()
    assert dataset_mounts(suite_root) == [], "a stopped front left mounts"
    # The suite closes each snapshotter without removing what it made (128LayersMount keeps its
    # 128 layers): the fronts' datasets are the subtests' debris, not leaks. Gone before the
    # scratch root is judged.
    for name in everything_below(suite_root):
        if name.rsplit("/", 1)[0] == suite_root and "@" not in name:
            subprocess.run(["zfs", "destroy", "-R", name], check=True)
    assert everything_below(suite_root) == []
