"""containerd's snapshotter conformance suite (``snapshots/testsuite``), built and judged here.

The suite is Go. Debian ships containerd's sources (golang-github-containerd-containerd-dev), so a
small Go test package (``tests/containerd/suite``) builds offline in GOPATH mode into one binary,
cached under /var/tmp by a hash of its sources and the Go version. That binary starts one front
process per subtest with the subtest's root and socket and talks to it through containerd's own
proxy client, as a containerd would.

The trap this module guards: without ``-test.root`` every subtest skips and the binary still prints
``PASS`` and exits 0, so a run is judged by the subtests it reports, not by its exit status.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

GOPATH = Path("/usr/share/gocode")
SUITE_PACKAGE = GOPATH / "src/github.com/containerd/containerd/snapshots/testsuite"
CACHE = Path(os.environ.get("SNAPDRIVER_GOSUITE_CACHE", "/var/tmp/snapdriver-gosuite"))
GOCACHE = Path("/var/tmp/snapdriver-gocache")
#: The subtests of containerd 1.6's SnapshotterSuite, in its order. ``Rename`` always skips.
SUBTESTS = (
    "Basic",
    "StatActive",
    "StatComitted",
    "TransitivityTest",
    "PreareViewFailingtest",
    "Update",
    "Remove",
    "Walk",
    "LayerFileupdate",
    "RemoveDirectoryInLowerLayer",
    "Chown",
    "DirectoryPermissionOnCommit",
    "RemoveIntermediateSnapshot",
    "DeletedFilesInChildSnapshot",
    "MoveFileFromLowerLayer",
    "Rename",
    "ViewReadonly",
    "StatInWalk",
    "CloseTwice",
    "RootPermission",
    "128LayersMount",
)
EXPECTED_SKIPS = frozenset({"Rename"})
TOP = "TestSnapdriver"
#: A Go test's own error line (``t.Errorf`` and friends): ``    file_test.go:123: message``.
_GO_ERROR = re.compile(r"^\s+\S+\.go:\d+: ")
_RESULT = re.compile(rf"^\s*--- (PASS|FAIL|SKIP): {TOP}(?:/(\S+))? \(([\d.]+)s\)")


def go_environment() -> dict[str, str]:
    """Go offline in GOPATH mode against Debian's sources; no cgo (gcc is not a dependency)."""
    return {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": str(GOPATH),
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOCACHE": str(GOCACHE),
        "CGO_ENABLED": "0",
    }


def unavailable() -> str | None:
    """None if the suite can be built here, else why not."""
    if shutil.which("go") is None:
        return "go is not installed (apt-get install golang-go)"
    if not SUITE_PACKAGE.is_dir():
        package = "golang-github-containerd-containerd-dev"
        return f"{SUITE_PACKAGE} is missing (apt-get install {package})"
    if not (GOPATH / "src/github.com/gogo/protobuf").is_dir():
        return "gogo/protobuf sources are missing (apt-get install golang-github-gogo-protobuf-dev)"
    return None


def go_version() -> str:
    done = subprocess.run(
        ["go", "version"], capture_output=True, text=True, check=True, env=go_environment()
    )
    return done.stdout.strip()


@dataclass
class Build:
    """A built binary, and whether this call built it or found it in the cache."""

    path: Path
    seconds: float
    cached: bool


def source_key(source: Path) -> str:
    """A hash of a Go package directory's own .go files, of the Go toolchain and of containerd's
    suite sources (a Debian update of either builds anew)."""
    digest = hashlib.sha256(go_version().encode())
    for path in [*sorted(source.glob("*.go")), *sorted(SUITE_PACKAGE.glob("*.go"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def build(source: Path, name: str, *, test: bool) -> Build:
    """``go test -c`` (``test``) or ``go build`` the package in ``source``, once per source hash.

    The binary is written beside its final name and renamed into place, so runs that build at
    the same time never see half a file.
    """
    target = CACHE / source_key(source) / name
    if target.exists():
        return Build(target, 0.0, cached=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{name}.{os.getpid()}")
    verb = ["test", "-c"] if test else ["build"]
    started = time.monotonic()
    done = subprocess.run(
        ["go", *verb, "-o", str(partial), "."],
        cwd=source,
        capture_output=True,
        text=True,
        env=go_environment(),
        check=False,
        timeout=900,
    )
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"building {source} failed:\n{done.stdout}{done.stderr}")
    partial.rename(target)
    return Build(target, time.monotonic() - started, cached=False)


@dataclass
class SuiteRun:
    """What one run of the suite binary reported, subtest by subtest."""

    returncode: int
    seconds: float
    output: str
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    top: str | None = None  # PASS, FAIL or SKIP of the enclosing test, None if never reported

    def problems(self) -> list[str]:
        """Why this run does not show a conforming snapshotter (empty if it does)."""
        found = []
        if self.top != "PASS":
            found.append(f"{TOP} reported {self.top or 'nothing'}")
        if self.returncode != 0:
            found.append(f"the suite exited {self.returncode}")
        ran = len(self.passed) + len(self.failed)
        if ran < len(SUBTESTS) - len(EXPECTED_SKIPS):
            found.append(f"only {ran} subtests ran (without -test.root all of them skip)")
        if self.failed:
            found.append(f"failed: {', '.join(self.failed)}")
        unexpected = sorted(set(self.skipped) - EXPECTED_SKIPS)
        if unexpected:
            found.append(f"skipped: {', '.join(unexpected)}")
        missing = sorted(set(SUBTESTS) - set(self.passed + self.failed + self.skipped))
        if missing:
            found.append(f"never reported: {', '.join(missing)}")
        return found

    def summary(self) -> str:
        skips = f" ({', '.join(self.skipped)})" if self.skipped else ""
        failed = f", {len(self.failed)} failed" if self.failed else ""
        return (
            f"{len(self.passed)} passed{failed}, {len(self.skipped)} skipped{skips}, "
            f"{self.seconds:.1f} s"
        )

    def failure_report(self, lines: int = 120) -> str:
        """The problems and the end of the output, for an assertion message."""
        tail = "\n".join(self.output.splitlines()[-lines:])
        # The fronts' logs come last and can push the suite's own errors out of the tail.
        errors = [line for line in self.output.splitlines() if _GO_ERROR.match(line)][:60]
        return (
            "; ".join(self.problems())
            + "\n--- the suite's errors ---\n"
            + "\n".join(errors)
            + "\n--- suite output (end) ---\n"
            + tail
        )


def parse(output: str, returncode: int, seconds: float) -> SuiteRun:
    """Read ``-test.v`` output: one ``--- PASS|FAIL|SKIP`` line per (sub)test."""
    run = SuiteRun(returncode, seconds, output)
    for line in output.splitlines():
        match = _RESULT.match(line)
        if match is None:
            continue
        outcome, subtest = match.group(1), match.group(2)
        if subtest is None:
            run.top = outcome
            continue
        {"PASS": run.passed, "FAIL": run.failed, "SKIP": run.skipped}[outcome].append(subtest)
    return run


def run_suite(
    binary: Path,
    command: Sequence[str],
    tmpdir: Path,
    *,
    root_flag: bool = True,
    name: str = "snapdriver",
    timeout: float = 1200,
) -> SuiteRun:
    """Run the suite binary against fronts started with ``command``; subtests' roots in ``tmpdir``.

    ``tmpdir`` must be on the filesystem the front needs (btrfs for the btrfs backend). Sockets
    and the fronts' logs go to a short-lived directory under /tmp (unix paths are short).
    """
    if any(" " in part for part in command):
        raise ValueError(f"the suite splits its command on spaces: {list(command)}")
    tmpdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdsuite-", dir="/tmp") as sockets:
        argv = [
            str(binary),
            "-test.v",
            "-test.timeout",
            f"{int(timeout)}s",
            "-snapdriver.command",
            " ".join(command),
            "-snapdriver.name",
            name,
            "-snapdriver.sockets",
            sockets,
        ]
        if root_flag:
            argv.insert(1, "-test.root")
        started = time.monotonic()
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env={**os.environ, "TMPDIR": str(tmpdir)},
            check=False,
            timeout=timeout + 60,
        )
        seconds = time.monotonic() - started
        output = done.stdout + done.stderr
        if done.returncode != 0:
            output += _front_logs(Path(sockets))
    return parse(output, done.returncode, seconds)


def _front_logs(sockets: Path, lines: int = 15) -> str:
    """The ends of the fronts' logs, which the directory's removal would otherwise lose."""
    parts = []
    for log in sorted(sockets.glob("*.log"), key=lambda p: int(p.name.split(".")[0])):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"\n--- front log {log.name} ---\n" + "\n".join(text))
    return "".join(parts)


#: Where the host leaves the suite binary for the ZFS lab guest, which has no Go (the guest shares
#: the checkout at the same path). Git-ignored.
LAB_BIN = Path(__file__).resolve().parents[2] / ".lab-bin"
SUITE_SOURCE = Path(__file__).resolve().parents[2] / "tests/containerd/suite"
SUITE_BINARY = "snapsuite.test"


def suite_sources_key(source: Path = SUITE_SOURCE) -> str:
    """A hash of the suite's own .go files, which the guest can compute without Go."""
    digest = hashlib.sha256()
    for path in sorted(source.glob("*.go")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def export_for_lab(dest: Path = LAB_BIN) -> Path:
    """Build (or take from the cache) the suite binary and copy it to ``dest`` with a stamp of
    its sources, so the lab guest can run it and tell a stale copy."""
    built = build(SUITE_SOURCE, SUITE_BINARY, test=True)
    dest.mkdir(parents=True, exist_ok=True)
    partial = dest / f".{SUITE_BINARY}.{os.getpid()}"
    shutil.copy2(built.path, partial)
    partial.rename(dest / SUITE_BINARY)
    (dest / f"{SUITE_BINARY}.key").write_text(suite_sources_key() + "\n")
    return dest / SUITE_BINARY


def main(argv: Sequence[str]) -> int:
    """``python -m snapdriver.testing.gosuite export``: leave the binary in .lab-bin/."""
    if list(argv) != ["export"]:
        print("usage: python -m snapdriver.testing.gosuite export")
        return 2
    why = unavailable()
    if why is not None:
        print(f"gosuite: CANNOT BUILD the containerd suite for the lab: {why}")
        return 1
    print(f"gosuite: {export_for_lab()}")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
