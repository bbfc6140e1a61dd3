"""``bench/run``: every scenario on every driver, one driver at a time, then the report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from snapbench import contention
from snapbench.config import (
    ALL_SCENARIOS,
    BENCH_DIR,
    CHANGE_COUNTS,
    DEFAULT_REPORT,
    FULL_SIZES,
    Config,
)
from snapbench.env import DRIVERS, environment, raise_on_sigterm
from snapbench.images import (
    LOAD_FILE_MIN,
    FileLayout,
    file_image_tar,
    load_archive,
    load_file_size,
)
from snapbench.report import duration, write_markdown, write_plots
from snapbench.results import Results
from snapbench.scenarios import Runner
from snapdriver.hostfs import mounts_below
from snapdriver.testing import loopfs
from snapdriver.testing.loopfs import can_make_loop_filesystems, sweep_stale

LOCK = Path("/run/snapdriver-bench.lock")
#: Where this benchmark's loop images live (bench/run sets SNAPDRIVER_TEST_ROOT to it), so that
#: sweeping stale images never touches a test suite's.
STATE_ROOT_NAME = "snapdriver-bench"
_STARTED = time.monotonic()


def log(message: str) -> None:
    elapsed = time.monotonic() - _STARTED
    print(
        f"[{int(elapsed) // 60:3d}:{int(elapsed) % 60:02d}] {message}", file=sys.stderr, flush=True
    )


def _csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())


def parse_args(argv: Sequence[str]) -> Config:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="snapdriver (btrfs backend) against dockerd's btrfs, overlay2 and vfs drivers; "
        "with --zpool, snapdriver's zfs backend against dockerd's zfs driver.",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help="runs per measurement, median reported (default 5; 1 with --smoke)",
    )
    parser.add_argument(
        "--import-repeat",
        type=int,
        help="runs of the file image's `docker import` (default: --repeat; 1 in the ZFS lab, "
        "where one takes a quarter of an hour)",
    )
    parser.add_argument(
        "--files", type=int, help="files in the main image (default 100000; 200 with --smoke)"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="scenario 1 also on 10,000- and 1,000,000-file images (slow)",
    )
    parser.add_argument(
        "--sizes",
        type=_csv_ints,
        help="image sizes for scenarios 1-2, comma-separated (overrides --full)",
    )
    parser.add_argument(
        "--changes",
        type=_csv_ints,
        default=CHANGE_COUNTS,
        help="changed-file counts for scenario 3 (default 10,100,1000,10000)",
    )
    parser.add_argument(
        "--load-mib",
        type=int,
        help="scenario 7: MiB in the image docker loads (default 1000; 4 with --smoke)",
    )
    parser.add_argument(
        "--load-files",
        type=int,
        help="scenario 7: files in that image, all of one size (default 50000; 200 with --smoke)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every scenario once on tiny sizes, report to bench/out/ (for CI)",
    )
    parser.add_argument(
        "--drivers",
        help="comma-separated subset of: "
        f"{', '.join(spec.label for spec in DRIVERS)} (default: those not on zfs; with "
        "--zpool, those on zfs)",
    )
    parser.add_argument(
        "--zpool",
        help="the pool on which the zfs drivers get a root dataset each (for the ZFS lab)",
    )
    parser.add_argument(
        "--images",
        type=Path,
        help="keep the image tars in this directory and reuse them (default: the run's "
        "scratch directory)",
    )
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="only write the image tars into --images, then stop (no root needed)",
    )
    parser.add_argument(
        "--rewrite",
        action="store_true",
        help="measure nothing: write the report and plots again from the samples of the run "
        "that wrote them (--out, --report), e.g. after editing goals.md, which it includes",
    )
    parser.add_argument(
        "--no-plots",
        dest="plots",
        action="store_false",
        help="write no plots (the ZFS lab's guest cannot import the venv's matplotlib)",
    )
    parser.add_argument(
        "--report",
        default=DEFAULT_REPORT,
        help="the report's name: OUT/NAME.md, OUT/NAME.json, OUT/plots/NAME/ "
        "(default %(default)s: OUT/RESULTS.md, OUT/results.json, OUT/plots/)",
    )
    parser.add_argument(
        "--scenarios",
        type=_csv_ints,
        default=tuple(sorted(ALL_SCENARIOS)),
        help="comma-separated subset of 1-9 (default: all)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where the report (RESULTS.md), results.json and plots/ go "
        "(default bench/, or bench/out/ with --smoke)",
    )
    parser.add_argument("--rpc-clients", type=int, default=8)
    parser.add_argument(
        "--rpc-rounds",
        type=int,
        help="Get+Put pairs per client and run (default 500; 20 with --smoke)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the plugin during scenarios 1-5 and 7 (bench/out/profile-*.svg)",
    )
    parser.add_argument(
        "--contend",
        choices=contention.KINDS,
        help="run every driver beside the same load: one busy core (cpu) or an fsyncing "
        "disk writer (io)",
    )
    parser.add_argument(
        "--own-containerd",
        action="store_true",
        help="start containerd for each dockerd and wait for it as long as it takes (dockerd "
        "gives its own 15 s: too little in the ZFS lab on a busy host)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="seconds one docker command may take (default %(default)s)",
    )
    args = parser.parse_args(argv)

    files = args.files or (200 if args.smoke else 100_000)
    if args.sizes:
        sizes = tuple(sorted(set(args.sizes)))
    elif args.full:
        sizes = tuple(sorted({files, *FULL_SIZES}))
    else:
        sizes = (files,)
    drivers = _drivers(parser, args.drivers, args.zpool)
    if args.prepare and args.images is None:
        parser.error("--prepare needs --images DIR")
    scenarios = frozenset(args.scenarios)
    if not scenarios or not scenarios <= ALL_SCENARIOS:
        parser.error("--scenarios: choose from 1-9")
    repeat = args.repeat or (1 if args.smoke else 5)
    import_repeat = args.import_repeat or repeat
    if repeat < 1 or files < 1 or import_repeat < 1:
        parser.error("--repeat, --import-repeat and --files must be positive")
    load_files = args.load_files or (200 if args.smoke else 50_000)
    load_mib = args.load_mib or (4 if args.smoke else 1000)
    if load_files < 1 or load_file_size(load_files, load_mib) < LOAD_FILE_MIN:
        parser.error(f"--load-mib and --load-files: each file needs at least {LOAD_FILE_MIN} bytes")
    out = args.out or (BENCH_DIR / "out" if args.smoke else BENCH_DIR)
    return Config(
        repeat=repeat,
        import_repeat=import_repeat,
        files=files,
        sizes=sizes if files in sizes else tuple(sorted({*sizes, files})),
        changes=tuple(sorted(set(args.changes))),
        drivers=drivers,
        scenarios=scenarios,
        out_dir=out.resolve(),
        workdir=Path("/var/tmp"),  # replaced by a fresh directory once the run can start
        smoke=args.smoke,
        rpc_clients=args.rpc_clients,
        rpc_rounds=args.rpc_rounds or (20 if args.smoke else 500),
        load_files=load_files,
        load_mib=load_mib,
        create_files=1000 if args.smoke else 1_000_000,
        stream_mib=16 if args.smoke else 2048,
        profile=args.profile,
        contend=args.contend,
        timeout=args.timeout,
        command=shlex.join(["bench/run", *argv]),
        zpool=args.zpool,
        images=args.images.resolve() if args.images else None,
        report=args.report,
        prepare=args.prepare,
        plots=args.plots,
        own_containerd=args.own_containerd,
        rewrite=args.rewrite,
    )


def _drivers(
    parser: argparse.ArgumentParser, text: str | None, zpool: str | None
) -> tuple[str, ...]:
    """The ``--drivers`` asked for, in the order of :data:`DRIVERS`."""
    if text is None:
        return tuple(spec.label for spec in DRIVERS if spec.on_zfs == bool(zpool))
    wanted = {d.strip() for d in text.split(",") if d.strip()}
    known = {spec.label for spec in DRIVERS}
    if not wanted or not wanted <= known:
        parser.error(f"--drivers: choose from {', '.join(sorted(known))}")
    if not zpool and any(spec.on_zfs for spec in DRIVERS if spec.label in wanted):
        parser.error("the zfs drivers need --zpool POOL")
    return tuple(spec.label for spec in DRIVERS if spec.label in wanted)


def preflight(config: Config) -> str | None:
    """None if this machine can run the benchmark, else why not."""
    specs = [spec for spec in DRIVERS if spec.label in config.drivers]
    tools = ["dockerd", "docker"]
    if any(not spec.on_zfs for spec in specs):
        reason = can_make_loop_filesystems()
        if reason:
            return reason
        tools.append("mkfs.ext4")
    elif os.geteuid() != 0:
        return "needs root (dockerd, mounts)"
    if any(spec.on_zfs for spec in specs):
        tools.append("zfs")
        if not Path("/dev/zfs").exists():
            return "/dev/zfs is missing (no ZFS kernel module: run it in the lab, vagrant/)"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/bin/busybox").exists():
        return "/bin/busybox is missing (apt-get install busybox-static)"
    return None


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """One benchmark at a time: they share the plugin socket name and the loop-image folder."""
    with open(LOCK, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit("bench/run: another benchmark is running (lock on /run)") from None
        yield


def _output(*cmd: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return done.stdout.strip() or "?"


def machine_info() -> dict[str, str]:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kib = next((int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:")), 0)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
        platform.processor() or "?",
    )
    commit = _output("git", "-C", str(BENCH_DIR.parent), "rev-parse", "--short", "HEAD")
    dirty = _output("git", "-C", str(BENCH_DIR.parent), "status", "--porcelain")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": _output("nproc"),
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "CPU model": model,
        "dockerd": _output("dockerd", "--version"),
        "docker CLI": _output("docker", "--version"),
        "Python": platform.python_version(),
        "snapdriver commit": commit
        + (" (work tree has uncommitted changes)" if dirty not in ("", "?") else ""),
        "load average at start (1, 5, 15 min)": " ".join(
            Path("/proc/loadavg").read_text().split()[:3]
        ),
    }


def _driver_status(text: str) -> str:
    """``docker info``'s DriverStatus pairs as ``key: value; ...`` (Home paths left out)."""
    try:
        pairs = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()
    if not isinstance(pairs, list):
        return ""  # vfs reports no status at all (null)
    return "; ".join(f"{k}: {v}" for k, v in pairs if k not in ("Home", "Build Version"))


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def fs_sizes_mb(config: Config) -> dict[str, int]:
    """Sparse loop images big enough (in space and, for ext4, in inodes) for the largest image."""
    if config.smoke:
        return {"btrfs": 2048, "ext4": 2048}
    largest = config.largest
    # btrfs also holds scenario 8's million-file parent and scenario 9's 2 GiB layer.
    return {"btrfs": max(16384, largest // 1000 * 16), "ext4": max(16384, largest * 64 // 1000)}


def _keep_logs(config: Config, label: str, workdir: Path) -> None:
    target = config.logs_dir / label
    target.mkdir(parents=True, exist_ok=True)
    for log_file in workdir.rglob("*.log"):
        shutil.copy(log_file, target / log_file.name)


def run(config: Config, results: Results) -> None:
    sizes = fs_sizes_mb(config)
    for spec in DRIVERS:
        if spec.label not in config.drivers:
            continue
        log(f"== {spec.label}: {spec.description}")
        started, load = time.monotonic(), _load()
        workdir = config.workdir / spec.label
        try:
            with environment(
                spec, workdir, sizes, config.zpool, log, containerd=config.own_containerd
            ) as env:
                status = env.dockerd.docker("info", "--format", "{{json .DriverStatus}}")
                results.driver_status[spec.label] = _driver_status(status.stdout)
                try:
                    Runner(env, config, results, log).run_all()
                finally:
                    env.sample_rss()
                    results.peak_rss_kib[spec.label] = dict(env.peak_rss_kib)
        except Exception as err:
            results.fail(f"{spec.label}: set-up or tear-down failed: {err}")
            log(f"  FAILED {spec.label}: {err}")
        finally:
            _keep_logs(config, spec.label, workdir)
        took = duration(time.monotonic() - started)
        results.driver_runs[spec.label] = {"duration": took, "load": f"{load}, {_load()}"}
        log(f"== {spec.label} done in {took}")


def leftovers(config: Config) -> list[str]:
    """Mounts, loop devices or datasets of this benchmark still present (there should be none)."""
    roots = (str(loopfs.STATE_ROOT), str(config.workdir))
    found = [m.target for m in mounts_below(*roots)]
    found += [line for line in _output("losetup", "-a").splitlines() if roots[0] in line]
    if config.zpool:
        datasets = _output("zfs", "list", "-H", "-o", "name", "-t", "all", "-r", config.zpool)
        found += [name for name in datasets.split() if name.startswith(f"{config.zpool}/bench")]
    return found


def prepare(config: Config) -> int:
    """``--prepare``: the image tars the chosen scenarios read, written where a later run will
    find them (the ZFS lab's emulated guest would take minutes for each)."""
    if config.scenarios & {1, 2, 3}:
        for files in config.sizes:
            tar = file_image_tar(config.images_dir, FileLayout.for_files(files), log)
            log(f"image tar: {tar}")
    if 7 in config.scenarios:
        archive = load_archive(config.images_dir, config.load_files, config.load_mib, log)
        log(f"load archive: {archive}")
    return 0


def rewrite(config: Config) -> int:
    """``--rewrite``: the report of an earlier run, written again from its samples with the
    options that run was given (its command line is saved with them)."""
    try:
        results = Results.load(config.samples_path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"bench/run: cannot read {config.samples_path}: {err!r}", file=sys.stderr)
        return 2
    if not results.command:
        print(f"bench/run: {config.samples_path} does not name its command", file=sys.stderr)
        return 2
    ran = parse_args(shlex.split(results.command)[1:])
    ran = dataclasses.replace(ran, out_dir=config.out_dir, report=config.report, plots=config.plots)
    plots = write_plots(results, ran) if ran.plots else []
    write_markdown(ran.report_path, results, ran, plots)
    log(f"rewrote {ran.report_path} ({len(plots)} plots) from {config.samples_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(list(sys.argv[1:] if argv is None else argv))
    if config.prepare:
        return prepare(config)
    if config.rewrite:
        return rewrite(config)
    reason = preflight(config)
    if reason:
        print(f"bench/run: cannot run here: {reason}", file=sys.stderr)
        return 2
    os.environ["DOCKER_BUILDKIT"] = "0"  # scenario 5 measures the classic builder
    raise_on_sigterm()
    results = Results(drivers=list(config.drivers), command=config.command)
    results.machine = machine_info()
    interrupted = False
    with exclusive():
        if loopfs.STATE_ROOT.name == STATE_ROOT_NAME:
            sweep_stale()  # only this benchmark's images from an earlier, killed run
        log(
            f"{config.command}: drivers {', '.join(config.drivers)}, image sizes "
            f"{', '.join(f'{s:,}' for s in config.sizes)}, repeat {config.repeat}"
        )
        if config.contend:
            results.machine["contention (--contend)"] = contention.describe(config.contend)
        # Made under the lock, so a run refused by it leaves nothing behind.
        config = dataclasses.replace(
            config, workdir=Path(tempfile.mkdtemp(prefix="snapbench-", dir="/var/tmp"))
        )
        try:
            with contention.contended(config.contend, config.workdir):
                run(config, results)
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: everything is stopped and released")
        finally:
            shutil.rmtree(config.workdir, ignore_errors=True)
    stale = leftovers(config)
    if stale:
        results.fail(f"left mounted or attached: {stale}")
    if interrupted:
        return 130
    results.machine["load average at end (1, 5, 15 min)"] = " ".join(
        Path("/proc/loadavg").read_text().split()[:3]
    )
    results.machine["duration"] = duration(time.monotonic() - _STARTED)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    try:
        plots = write_plots(results, config) if config.plots else []
    except ImportError:
        message = "matplotlib is missing: no plots (.venv/bin/pip install matplotlib)"
        (results.notes if config.smoke else results.failures).append(message)
    results.save(config.samples_path)
    write_markdown(config.report_path, results, config, plots)
    log(f"wrote {config.report_path} ({len(plots)} plots)")
    for failure in results.failures:
        log(f"FAILED: {failure}")
    return 1 if results.failures else 0
