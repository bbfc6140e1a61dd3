"""snapdriver's containerd front against containerd's in-tree ``btrfs`` and ``overlayfs``
snapshotters, side by side in one run (issue 11).

One btrfs loop filesystem holds a private containerd 1.6 (root on btrfs, so its ``btrfs``
snapshotter loads; ``overlayfs`` keeps its upper directories on the same btrfs) and the front,
served to that containerd as the proxy snapshotter ``snapdriver``. Measured, each ``--repeat``
times with the snapshotters alternated, medians reported:

* ``ctr images import`` of an N-file image (busybox plus ``/data/d<i>/f<j>``, bench/snapbench's
  file image) and ``ctr run --rm`` of it, per snapshotter; the image is removed with
  ``ctr images rm --sync`` (containerd's GC removes its snapshots) between repeats;
* Prepare, Commit and Remove latency (p50 of ``--rounds`` rounds), gRPC straight to the front;
* Usage of a committed child of the N-file snapshot with 10 changed files: the front's Usage
  RPC, against a plain walk of the same snapshot's directory (``du -s``, and both trees
  compared by walk_changes + changes_size), and against containerd's own snapshotters' Usage.

Run as root: ``.venv/bin/python bench/containerd_bench.py`` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2

from snapdriver.containerd.proto import snapshots_pb2 as pb
from snapdriver.layers.changes import changes_size, walk_changes
from snapdriver.testing.containerd import (
    RUN_ROOT,
    Client,
    Containerd,
    ContainerdFront,
    Layer,
    oci_image_tar,
)
from snapdriver.testing.loopfs import loop_filesystem, sweep_stale

sys.path.insert(0, str(Path(__file__).parent))
from snapbench.cli import machine_info
from snapbench.env import raise_on_sigterm
from snapbench.images import FileLayout, write_file_image

BENCH_DIR = Path(__file__).parent
FRONT = "snapdriver"
SNAPSHOTTERS = ("btrfs", "overlayfs", FRONT)
IMAGE = "docker.io/snapdriver/files:bench"
GC_ROOT = {"containerd.io/gc.root": "bench"}
CHANGED = 10
#: A file of the image and what it holds (snapbench.images.write_file_image writes it).
FIRST_FILE, FIRST_CONTENT = "/data/d0/f0", "file 00/000000 v1\n"


@dataclass
class Config:
    files: int = 100_000
    repeat: int = 3
    rounds: int = 50
    #: Fewer through containerd: its btrfs snapshotter takes seconds per Commit on a big image.
    api_rounds: int = 5
    size_mb: int = 8192
    out: Path = BENCH_DIR
    smoke: bool = False
    report: Path | None = None


@dataclass
class Results:
    """Every sample, by metric then snapshotter (or measure), in seconds."""

    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    machine: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    #: What each Usage measure answered (sizes are counted differently).
    answers: dict[str, str] = field(default_factory=dict)

    def add(self, metric: str, who: str, value: float) -> None:
        self.samples.setdefault(metric, {}).setdefault(who, []).append(value)

    def median(self, metric: str, who: str) -> float | None:
        values = self.samples.get(metric, {}).get(who)
        return statistics.median(values) if values else None


def log(text: str) -> None:
    print(text, flush=True)


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


# --- containerd's own snapshots API ---------------------------------------------------------------


class ContainerdSnapshots:
    """containerd's snapshots service (its gRPC socket), for one snapshotter and namespace."""

    def __init__(self, address: Path, namespace: str, snapshotter: str) -> None:
        self.client = Client(address, timeout=300, metadata=(("containerd-namespace", namespace),))
        self.snapshotter = snapshotter

    def close(self) -> None:
        self.client.close()

    def prepare(self, key: str, parent: str) -> list[Any]:
        request = pb.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=GC_ROOT
        )
        return list(self.client.call("Prepare", request, pb.PrepareSnapshotResponse).mounts)

    def commit(self, name: str, key: str) -> None:
        request = pb.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=GC_ROOT
        )
        self.client.call("Commit", request, empty_pb2.Empty)

    def remove(self, key: str) -> None:
        request = pb.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key)
        self.client.call("Remove", request, empty_pb2.Empty)

    def usage(self, key: str) -> pb.UsageResponse:
        request = pb.UsageRequest(snapshotter=self.snapshotter, key=key)
        return self.client.call("Usage", request, pb.UsageResponse)  # type: ignore[no-any-return]


@contextlib.contextmanager
def mounted(mounts: list[Any]) -> Iterator[Path]:
    """The mounts containerd gave for a snapshot, mounted on a temporary directory."""
    target = Path(tempfile.mkdtemp(prefix="sdbench-"))
    try:
        for mount in mounts:
            options = ",".join(mount.options)
            cmd = ["mount", "-t", mount.type, "-o", options, mount.source, str(target)]
            subprocess.run(cmd, check=True, capture_output=True)
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False, capture_output=True)
        target.rmdir()


# --- the world ------------------------------------------------------------------------------------


@dataclass
class World:
    mnt: Path
    containerd: Containerd
    front: ContainerdFront
    image_tar: Path
    layer_tar: Path

    def ctr(self, *args: str) -> str:
        return self.containerd.ctr(*args, timeout=1800).stdout

    def snapshots(self, snapshotter: str) -> list[list[str]]:
        lines = self.ctr("snapshots", "--snapshotter", snapshotter, "ls").splitlines()[1:]
        return [line.split() for line in lines if line.strip()]

    def wait_empty(self, snapshotter: str, timeout: float = 300) -> None:
        """containerd's GC has removed every snapshot of ``snapshotter`` in our namespace."""
        deadline = time.monotonic() + timeout
        while self.snapshots(snapshotter):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{snapshotter}: snapshots left after {timeout}s")
            time.sleep(0.2)


def write_image(directory: Path, files: int) -> tuple[Path, Path]:
    """The N-file layer tar and an OCI image-layout tar of it (one uncompressed layer)."""
    layout = FileLayout.for_files(files)
    layer = directory / f"files-{layout.files}.layer.tar"
    log(f"writing the {layout.files}-file image")
    write_file_image(layer, layout)
    image = directory / f"files-{layout.files}.oci.tar"
    data = oci_image_tar(IMAGE, [Layer(layer.read_bytes(), gzipped=False)], cmd=("sh",))
    image.write_bytes(data)
    return image, layer


@contextlib.contextmanager
def world(config: Config) -> Iterator[World]:
    sweep_stale()
    with loop_filesystem("btrfs", config.size_mb) as mnt:
        front = ContainerdFront(mnt / "front", RUN_ROOT / f"bench-{os.getpid()}.sock")
        containerd = Containerd(mnt / "containerd", {FRONT: front.socket})
        try:
            (mnt / "work").mkdir()
            image, layer = write_image(mnt / "work", config.files)
            front.start()
            containerd.start()
            yield World(mnt, containerd, front, image, layer)
        finally:
            containerd.close()
            front.close()


# --- the measurements -----------------------------------------------------------------------------


def import_and_run(w: World, results: Results, repeat: int) -> None:
    """Per repeat, per snapshotter in turn: import, run --rm, remove the image and its snapshots."""
    for i in range(repeat):
        order = SNAPSHOTTERS[i % 3 :] + SNAPSHOTTERS[: i % 3]
        for name in order:
            results.add("ctr version", name, timed(lambda: w.ctr("version")))
            image = str(w.image_tar)
            t = timed(lambda: w.ctr("images", "import", "--snapshotter", name, image))  # noqa: B023
            results.add("ctr images import", name, t)
            results.add("ctr run --rm", name, timed(lambda: run_checked(w, name, f"c{i}")))  # noqa: B023
            w.ctr("images", "rm", "--sync", IMAGE)
            w.wait_empty(name)
            log(f"  repeat {i + 1} {name}: import {t:.2f}s")


def run_checked(w: World, snapshotter: str, container: str) -> None:
    """``ctr run --rm`` of the image, reading one of its files (so a wrong rootfs fails)."""
    cmd = ("run", "--rm", "--snapshotter", snapshotter, IMAGE, container, "cat", FIRST_FILE)
    out = w.ctr(*cmd)
    if out != FIRST_CONTENT:
        raise RuntimeError(f"{snapshotter}: {FIRST_FILE} read {out!r}, not {FIRST_CONTENT!r}")


def pcr_latency(
    front: ContainerdFront, layer_tar: Path, results: Results, repeat: int, rounds: int
) -> None:
    """Prepare (on the N-file snapshot), Commit and Remove, gRPC straight to the front."""
    client = front.client()
    try:
        base = build_base(client, layer_tar)
        for i in range(repeat):
            times: dict[str, list[float]] = {"Prepare": [], "Commit": [], "Remove": []}
            for r in range(rounds):
                key, name = f"pcr-{i}-{r}-a", f"pcr-{i}-{r}"
                times["Prepare"].append(timed(lambda: client.prepare(key, base)))  # noqa: B023
                times["Commit"].append(timed(lambda: client.commit(name, key)))  # noqa: B023
                times["Remove"].append(timed(lambda: client.remove(name)))  # noqa: B023
            for call, values in times.items():
                results.add(f"{call} p50", FRONT, statistics.median(values))
            log(
                f"  repeat {i + 1}: "
                + ", ".join(f"{c} {statistics.median(v) * 1e3:.1f} ms" for c, v in times.items())
            )
        usage_front(client, base, results, repeat)
    finally:
        client.close()


def build_base(client: Client, layer_tar: Path) -> str:
    """A committed snapshot of the N-file layer, made straight on the front."""
    mounts = client.prepare("base-a")
    subprocess.run(["tar", "-C", mounts[0].source, "-xf", str(layer_tar)], check=True)
    client.commit("base", "base-a")
    return "base"


def change_files(root: Path, count: int) -> None:
    for i in range(count):
        with open(root / f"data/d{i % 100}/f{i // 100}", "a") as handle:
            handle.write("changed\n")


def usage_front(client: Client, base: str, results: Results, repeat: int) -> None:
    """The front's Usage of a child with ``CHANGED`` changed files, against walks of it."""
    mounts = client.prepare("child-a", base)
    change_files(Path(mounts[0].source), CHANGED)
    client.commit("child", "child-a")
    child = Path(client.view("child-v", "child")[0].source)
    parent = Path(client.view("base-v", base)[0].source)
    usage = client.usage("child")
    results.answers["front (gRPC)"] = f"{usage.size} B, {usage.inodes} inodes"
    results.answers["walk_changes"] = f"{changes_size(child, walk_changes(child, parent))} B"
    du = ["du", "-s", "--apparent-size", "--block-size=1", str(child)]
    out = subprocess.run(du, check=True, capture_output=True, text=True).stdout
    results.answers["du -s"] = f"{out.split()[0]} B"
    log(f"  Usage answers: {results.answers}")
    for _ in range(repeat):
        results.add("Usage", "front (gRPC)", timed(lambda: client.usage("child")))
        results.add(
            "Usage", "du -s", timed(lambda: subprocess.run(du, check=True, capture_output=True))
        )
        results.add(
            "Usage", "walk_changes", timed(lambda: changes_size(child, walk_changes(child, parent)))
        )


def through_containerd(w: World, results: Results, repeat: int, rounds: int) -> None:
    """The same calls through containerd's snapshots API, per snapshotter, alternated:
    Prepare/Commit/Remove rounds, then Commit and Usage of a child with ``CHANGED`` changes."""
    tops = {}
    for name in SNAPSHOTTERS:
        w.ctr("images", "import", "--snapshotter", name, str(w.image_tar))
        tops[name] = next(row[0] for row in w.snapshots(name) if row[-1] == "Committed")
    for i in range(repeat):
        for name in SNAPSHOTTERS[i % 3 :] + SNAPSHOTTERS[: i % 3]:
            api = ContainerdSnapshots(w.containerd.address, w.containerd.namespace, name)
            try:
                api_rounds(api, tops[name], f"r{i}", results, rounds)
                api_usage(api, tops[name], f"u{i}", results)
            finally:
                api.close()
    w.ctr("images", "rm", "--sync", IMAGE)
    for name in SNAPSHOTTERS:
        w.wait_empty(name)


def api_rounds(api: ContainerdSnapshots, top: str, tag: str, results: Results, rounds: int) -> None:
    times: dict[str, list[float]] = {"Prepare": [], "Commit": [], "Remove": []}
    for r in range(rounds):
        key, name = f"{tag}-{r}-a", f"{tag}-{r}"
        times["Prepare"].append(timed(lambda: api.prepare(key, top)))  # noqa: B023
        times["Commit"].append(timed(lambda: api.commit(name, key)))  # noqa: B023
        times["Remove"].append(timed(lambda: api.remove(name)))  # noqa: B023
    for call, values in times.items():
        results.add(f"{call} p50 via containerd", api.snapshotter, statistics.median(values))


def api_usage(api: ContainerdSnapshots, top: str, tag: str, results: Results) -> None:
    """Commit of a child with ``CHANGED`` changed files, then its Usage."""
    with mounted(api.prepare(f"{tag}-a", top)) as root:
        change_files(root, CHANGED)
    commit = timed(lambda: api.commit(tag, f"{tag}-a"))
    results.add("Commit (10 changed) via containerd", api.snapshotter, commit)
    results.add("Usage via containerd", api.snapshotter, timed(lambda: api.usage(tag)))
    reply = api.usage(tag)
    results.answers[f"{api.snapshotter} via containerd"] = f"{reply.size} B, {reply.inodes} inodes"
    log(
        f"  {api.snapshotter}: Commit {commit * 1e3:.1f} ms; "
        f"Usage {reply.size} B, {reply.inodes} inodes"
    )
    api.remove(tag)


def direct_phase(w: World, results: Results, config: Config) -> None:
    """A second front, not known to containerd (whose GC removes what it did not make)."""
    direct = ContainerdFront(w.mnt / "direct", RUN_ROOT / f"bench-{os.getpid()}-d.sock")
    try:
        direct.start()
        pcr_latency(direct, w.layer_tar, results, config.repeat, config.rounds)
    finally:
        direct.close()


# --- the report -----------------------------------------------------------------------------------

GOALS = {"ctr images import": 1.1, "ctr run --rm": 1.1}


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "-"
    return f"{a / b:.2f}x" if a / b >= 0.1 else f"{a / b:.4f}x"


def markdown(results: Results, config: Config) -> str:
    lines = [
        "# containerd: snapdriver's front against containerd's btrfs and overlayfs snapshotters",
        "",
        "Written by `bench/containerd_bench.py` (see bench/README.md). Medians of "
        f"{config.repeat} repeats, snapshotters alternated, all from one run on a shared, noisy "
        "2-vCPU VM: compare ratios, not absolute times.",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in results.machine.items()),
        "",
        f"## ctr, {config.files:,}-file image",
        "",
        "| measure | btrfs | overlayfs | snapdriver | snapdriver / btrfs | goal |",
        "|---|---|---|---|---|---|",
    ]
    for metric in ("ctr version", "ctr images import", "ctr run --rm"):
        med = {s: results.median(metric, s) for s in SNAPSHOTTERS}
        goal = GOALS.get(metric)
        met = "" if goal is None else _verdict(med[FRONT], med["btrfs"], goal)
        lines.append(
            f"| `{metric}` | {fmt(med['btrfs'])} | {fmt(med['overlayfs'])} | {fmt(med[FRONT])} "
            f"| {ratio(med[FRONT], med['btrfs'])} | {met} |"
        )
    lines += [
        "",
        "## Prepare, Commit, Remove: p50 latency",
        "",
        f"p50 of {config.rounds} rounds straight to the front (a second front process, not "
        f"known to containerd), and of {config.api_rounds} rounds through containerd's "
        "snapshots API (gRPC, its metadata store in front of each snapshotter); median of the "
        "repeats. Prepare has the committed N-file snapshot as parent, Commit follows with no "
        "change, Remove removes the committed snapshot (through containerd only from its "
        "metadata: the snapshotter's Remove runs later, in its garbage collector). The last row "
        f"is Commit of a child with {CHANGED} changed files (one per repeat).",
        "",
        "| call | front, direct | btrfs | overlayfs | snapdriver | snapdriver / btrfs |",
        "|---|---|---|---|---|---|",
        *_latency_rows(results),
        "",
        f"## Usage of a committed {config.files:,}-file snapshot with {CHANGED} changed files",
        "",
        "| measure | median | front Usage / it | answer |",
        "|---|---|---|---|",
    ]
    front = results.median("Usage", "front (gRPC)")
    for who in ("front (gRPC)", "du -s", "walk_changes"):
        value, answer = results.median("Usage", who), results.answers.get(who, "-")
        lines.append(f"| {who} | {fmt(value)} | {ratio(front, value)} | {answer} |")
    for name in SNAPSHOTTERS:
        value = results.median("Usage via containerd", name)
        answer = results.answers.get(f"{name} via containerd", "-")
        lines.append(
            f"| {name} via containerd's API | {fmt(value)} | {ratio(front, value)} | {answer} |"
        )
    verdict = _verdict(front, results.median("Usage", "du -s"), 0.1)
    lines += [
        "",
        f"Goal: front Usage ≤ 0.1x a walk (`du -s` of the snapshot): {verdict}",
        "",
        "`du -s` walks the child's directory (all files); `walk_changes` compares the child's "
        "and its parent's trees and sizes what changed (what Usage would cost without native "
        "changes). containerd's own snapshotters answer a committed snapshot's Usage from their "
        "metadata, worked out when it was committed: their walk is paid in Commit (the row "
        "Commit (10 changed) above), the front's in Usage, from btrfs's native changes. The "
        "answers differ in kind: the front and walk_changes give the apparent size of what "
        "changed (its directories too), containerd's snapshotters disk blocks.",
        "",
    ]
    return "\n".join(lines)


def _latency_rows(results: Results) -> Iterator[str]:
    for call in ("Prepare", "Commit", "Remove", "Commit (10 changed)"):
        direct = results.median(f"{call} p50", FRONT)
        metric = f"{call} p50 via containerd" if "changed" not in call else f"{call} via containerd"
        med = {s: results.median(metric, s) for s in SNAPSHOTTERS}
        yield (
            f"| {call} | {fmt(direct)} | {fmt(med['btrfs'])} | {fmt(med['overlayfs'])} "
            f"| {fmt(med[FRONT])} | {ratio(med[FRONT], med['btrfs'])} |"
        )


def _verdict(value: float | None, peer: float | None, goal: float) -> str:
    if value is None or not peer:
        return f"≤ {goal}x: not measured"
    return f"≤ {goal}x: {'met' if value / peer <= goal else 'MISSED'}"


def write_results(results: Results, config: Config) -> None:
    config.out.mkdir(parents=True, exist_ok=True)
    stem = "containerd-smoke" if config.smoke else "containerd"
    data = {
        "machine": results.machine,
        "config": results.config,
        "answers": results.answers,
        "samples": results.samples,
    }
    (config.out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (config.out / f"{stem}.md").write_text(markdown(results, config))
    log(f"wrote {config.out / stem}.md and .json")


# --- main -----------------------------------------------------------------------------------------


def parse(argv: list[str]) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=50, help="Prepare/Commit/Remove rounds")
    parser.add_argument("--api-rounds", type=int, default=5, help="the same through containerd")
    parser.add_argument("--size-mb", type=int, default=8192, help="the btrfs loop image")
    parser.add_argument("--out", type=Path, help="default bench/, or bench/out/ with --smoke")
    parser.add_argument("--smoke", action="store_true", help="1,000 files, one repeat")
    parser.add_argument("--report", type=Path, help="rewrite the .md of this .json, no run")
    args = parser.parse_args(argv)
    if args.report:
        return saved_config(args.report)
    if args.smoke:  # like bench/run --smoke: a smoke run's report is not a result to keep
        return Config(1000, 1, 5, 3, 2048, args.out or BENCH_DIR / "out", smoke=True)
    out = args.out or BENCH_DIR
    return Config(args.files, args.repeat, args.rounds, args.api_rounds, args.size_mb, out)


def saved_config(path: Path) -> Config:
    """The configuration a run saved in its .json (``--report``)."""
    saved = json.loads(path.read_text())["config"]
    default = Config()
    files, repeat, rounds, api_rounds, size_mb = (
        int(saved.get(k, getattr(default, k)))
        for k in ("files", "repeat", "rounds", "api_rounds", "size_mb")
    )
    smoke = saved.get("smoke") == "True"
    return Config(files, repeat, rounds, api_rounds, size_mb, path.parent, smoke, report=path)


def rewrite_report(path: Path, config: Config) -> int:
    data = json.loads(path.read_text())
    results = Results(data["samples"], data["machine"], data["config"], data.get("answers", {}))
    write_results(results, config)
    return 0


def main(argv: list[str]) -> int:
    config = parse(argv)
    if config.report:
        return rewrite_report(config.report, config)
    if os.geteuid() != 0:
        log("containerd_bench: needs root (loop devices, mounts, containerd)")
        return 2
    raise_on_sigterm()  # so SIGTERM, too, stops containerd and the fronts and frees the loop fs
    results = Results()
    results.machine = {k: v for k, v in machine_info().items() if "docker" not in k}
    results.machine["containerd"] = subprocess.run(
        ["containerd", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    results.config = {k: str(v) for k, v in vars(config).items()}
    started = time.monotonic()
    with world(config) as w:
        log("ctr images import / ctr run --rm")
        import_and_run(w, results, config.repeat)
        log("Prepare / Commit / Remove / Usage, straight to a front")
        direct_phase(w, results, config)
        log("Prepare / Commit / Remove / Usage through containerd's API")
        through_containerd(w, results, config.repeat, config.api_rounds)
    results.machine["load average at end (1, 5, 15 min)"] = " ".join(
        Path("/proc/loadavg").read_text().split()[:3]
    )
    results.machine["wall time"] = f"{time.monotonic() - started:.0f} s"
    write_results(results, config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
