"""containerd's own snapshotter conformance suite against the containerd front on btrfs.

The suite is containerd's (Go, ``snapshots/testsuite``), built offline from Debian's sources and run
through containerd's proxy client, one front process per subtest. Two controls keep the harness
honest: containerd's own native snapshotter behind a Go gRPC server passes it, and a front that
never serves, or a run without ``-test.root``, does not.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapdriver.hostfs import mounts_below
from snapdriver.testing import gosuite
from snapdriver.testing.loopfs import loop_filesystem

pytestmark = [pytest.mark.containerd, pytest.mark.slow]
SUITE_SOURCE = Path(__file__).parent / "suite"
FRONT = [sys.executable, "-m", "snapdriver.containerd", "--backend", "btrfs"]


#: How the suite binary was had this session, for the figures.
BUILT: list[gosuite.Build] = []


@pytest.fixture(scope="module")
def suite_binary(containerd_available: None) -> Path:
    BUILT.append(gosuite.build(SUITE_SOURCE, "snapsuite.test", test=True))
    return BUILT[-1].path


@pytest.fixture(scope="module")
def refserver(containerd_available: None) -> Path:
    return gosuite.build(SUITE_SOURCE / "refserver", "refserver", test=False).path


@pytest.fixture(scope="module")
def suite_fs(containerd_available: None) -> Iterator[Path]:
    """A throw-away btrfs: a failing subtest can leave read-only subvolumes the suite cannot
    remove, and the image takes them with it."""
    with loop_filesystem("btrfs", size_mb=3072) as mnt:
        yield mnt


def mounts_under(path: Path) -> list[str]:
    """Mounts inside the suite's filesystem (``path`` itself is one)."""
    return [m.target for m in mounts_below(path) if m.target != str(path)]


def test_the_front_passes_containerds_suite_on_btrfs(
    suite_binary: Path, suite_fs: Path, figure: Callable[[str], None]
) -> None:
    run = gosuite.run_suite(suite_binary, FRONT, suite_fs / "front")
    figure(f"CONTAINERD SUITE (btrfs): {run.summary()}")
    how = "from the cache" if BUILT[0].cached else f"built in {BUILT[0].seconds:.1f} s"
    figure(f"CONTAINERD SUITE binary: {how} ({gosuite.go_version()})")
    assert not run.problems(), run.failure_report()
    assert mounts_under(suite_fs) == []


def test_control_containerds_native_snapshotter_passes(
    suite_binary: Path, refserver: Path, suite_fs: Path, figure: Callable[[str], None]
) -> None:
    """The harness itself is sound: containerd's own snapshotter, served by Go, passes."""
    run = gosuite.run_suite(suite_binary, [str(refserver)], suite_fs / "control")
    figure(f"CONTAINERD SUITE (control: containerd native via Go server): {run.summary()}")
    assert not run.problems(), run.failure_report()
    assert mounts_under(suite_fs) == []


def test_control_a_front_that_never_serves_fails(suite_binary: Path, suite_fs: Path) -> None:
    run = gosuite.run_suite(suite_binary, ["/bin/false"], suite_fs / "false", timeout=300)
    assert run.returncode != 0
    assert run.top == "FAIL"
    assert sorted(run.failed) == sorted(gosuite.SUBTESTS)  # the factory fails before any skip
    assert run.problems()


def test_control_without_test_root_nothing_counts(
    suite_binary: Path, refserver: Path, suite_fs: Path
) -> None:
    """The binary's PASS without ``-test.root`` (everything skipped) is judged a failure."""
    run = gosuite.run_suite(
        suite_binary, [str(refserver)], suite_fs / "noroot", root_flag=False, timeout=300
    )
    assert run.returncode == 0, "the trap: the Go binary reports success"
    assert run.passed == []
    assert any("subtests ran" in problem for problem in run.problems())
