"""The run's parameters, from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
CHANGE_COUNTS = (10, 100, 1000, 10000)
FULL_SIZES = (10_000, 1_000_000)
ALL_SCENARIOS = frozenset(range(1, 10))
DEFAULT_REPORT = "RESULTS"


@dataclass(frozen=True)
class Config:
    repeat: int
    import_repeat: int  # runs of the file image's docker import
    files: int  # the main image: scenarios 1-3
    sizes: tuple[int, ...]  # image sizes for scenario 1 (and 2), ascending
    changes: tuple[int, ...]  # changed-file counts for scenario 3
    drivers: tuple[str, ...]
    scenarios: frozenset[int]
    out_dir: Path
    workdir: Path
    smoke: bool
    rpc_clients: int
    rpc_rounds: int
    load_files: int  # scenario 7: the image docker loads
    load_mib: int
    create_files: int  # scenario 8: files in the big parent
    stream_mib: int  # scenario 9: size of the ApplyDiff and the Diff
    profile: bool
    contend: str | None  # the neighbour every driver runs beside: "cpu", "io" or none
    timeout: float  # for one docker command
    command: str  # as typed, for the report
    zpool: str | None  # the pool the zfs drivers make their datasets on
    images: Path | None  # where image tars are kept and reused; None: the run's workdir
    report: str  # the report's file name, without .md (results: .json)
    prepare: bool  # write the image tars into ``images`` and stop
    plots: bool
    own_containerd: bool  # start containerd for dockerd instead of letting it start its own
    rewrite: bool = False  # write the report again from its saved samples; measure nothing

    @property
    def images_dir(self) -> Path:
        return self.images or self.workdir

    @property
    def report_path(self) -> Path:
        return self.out_dir / f"{self.report}.md"

    @property
    def samples_path(self) -> Path:
        name = "results" if self.report == DEFAULT_REPORT else self.report
        return self.out_dir / f"{name}.json"

    @property
    def plots_dir(self) -> Path:
        plots = self.out_dir / "plots"
        return plots if self.report == DEFAULT_REPORT else plots / self.report

    @property
    def scratch_dir(self) -> Path:
        """Logs and profiles go here even when the report goes to bench/."""
        return BENCH_DIR / "out"

    @property
    def logs_dir(self) -> Path:
        return self.scratch_dir / "logs"

    @property
    def largest(self) -> int:
        return max(self.sizes)
