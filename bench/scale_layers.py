"""Benchmark: snapdriver with 10,000 layers, as dockerd leaves them, against the same with 10.

Issue 12 (5): plugin start, Status, the orphan sweep and Get/Put must stay fast with 10,000
layers, and 32 concurrent ApplyDiff streams must keep the plugin under 150 MiB. On one btrfs
loop image, two real plugin processes (``python -m snapdriver --backend btrfs``) over their
sockets, each with a dockerd-like data root: "big" holds ``--layers`` layers, "small" ``--small``.

The layers are made as dockerd makes them: image chains of depth 1-125 (a log-normal spread, the
first two chains 125 and 1 deep; half of the later chains start on a layer of an earlier one, as
an image built FROM another), each layer a Create on its parent and a tiny ApplyDiff; and
containers, a ``<id>-init`` layer (CreateReadWrite, a Get and a Put) with the container's own
layer on it. IDs are dockerd's: 64 random hex digits. A fake dockerd layer store,
``<data-root>/image/<driver>/layerdb`` with a ``cache-id`` per image layer and ``mount-id`` and
``init-id`` per container, names every one of them, so the start-up sweep reads 10,000 files.

Measured, ``--runs`` times each, the two plugins alternating (medians; ratios big over small):

- start: exec to the socket answering ``Plugin.Activate``, and to the first ``Status`` answer
  (the plugin resumes its recorded Init, recovers and sweeps before it listens);
- ``GraphDriver.Status`` latency (p50 and p99 of ``--calls`` calls);
- ``Snapdriver.Sweep`` with MinAge 0 over fresh orphans (chains nobody names and leaked
  ``-init`` layers), dry run then real; the removed set is checked against the orphans made;
- Get/Put: p50 and p99 of a request, ``--clients`` clients at once (``snapbench.rpc``);
- the big plugin's peak RSS (VmHWM, reset first) while ``--streams`` ApplyDiffs of
  ``--stream-mib`` MiB each run at once.

Needs root. From the repository root, with the project venv::

    .venv/bin/python bench/scale_layers.py            # 10,000 layers, 5 runs: writes bench/scale.*
    .venv/bin/python bench/scale_layers.py --smoke    # 200 layers, 1 run, into bench/out/
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapbench.env import vm_hwm_kib
from snapbench.plugin_calls import generated_tar
from snapbench.rpc import call_raw, get_put_load, http_request

from snapdriver.graphdriver.client import PluginClient, unix_path
from snapdriver.testing.loopfs import can_make_loop_filesystems, loop_filesystem
from snapdriver.testing.process import PluginProcess

BENCH_DIR = Path(__file__).resolve().parent
DRIVER = "sdscale"
MAX_DEPTH = 125
#: Layers made at once while the store is filled (the plugin has two cores to share).
FILL_WORKERS = 4
#: The section of scale.md this script owns: from this heading to the end of the file.
SECTION = "## 10,000 layers (bench/scale_layers.py)"
Log = Callable[[str], None]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def new_id(rng: random.Random) -> str:
    """A layer ID of dockerd's form (``stringid.GenerateRandomID``): 64 hex digits."""
    return f"{rng.getrandbits(256):064x}"


@dataclass(frozen=True)
class Layer:
    id: str
    parent: str
    kind: str  # "image", "init" (a container's -init layer) or "container"


@dataclass
class Plan:
    """Layers in the order they can be made: each wave's chains only need earlier waves."""

    waves: list[list[list[Layer]]] = field(default_factory=list)
    images: list[Layer] = field(default_factory=list)
    containers: list[tuple[Layer, Layer]] = field(default_factory=list)
    #: How deep each image's top layer is (its chain's own layers and those it starts on).
    depths: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(chain) for wave in self.waves for chain in wave)


def chain_depth(rng: random.Random, index: int) -> int:
    """Most images are 5-20 layers deep, a few near Docker's limit of 125."""
    if index == 0:
        return MAX_DEPTH
    if index == 1:
        return 1
    return max(1, min(MAX_DEPTH, round(rng.lognormvariate(2.3, 0.9))))


def image_chain(rng: random.Random, parent: str, depth: int) -> list[Layer]:
    chain = []
    for _ in range(depth):
        layer = Layer(new_id(rng), parent, "image")
        chain.append(layer)
        parent = layer.id
    return chain


def plan_layers(total: int, rng: random.Random) -> Plan:
    """``total`` layers: ~90% in image chains, the rest containers (two layers each)."""
    pairs = max(1, total // 20)
    plan = Plan(waves=[[], [], []])
    depth_of: dict[str, int] = {}
    budget, index = total - 2 * pairs, 0
    while budget > 0:
        base_wave = index < 16  # the first chains are the bases later ones may build on
        parent, start = "", 0
        if not base_wave and plan.images and rng.random() < 0.5:
            on = rng.choice(plan.waves[0])  # base chains start at depth 0: on[i] is at i + 1
            parent_layer = rng.choice(on[: MAX_DEPTH - 1])
            parent, start = parent_layer.id, depth_of[parent_layer.id]
        depth = min(budget, chain_depth(rng, index), MAX_DEPTH - start)
        chain = image_chain(rng, parent, depth)
        for offset, layer in enumerate(chain, 1):
            depth_of[layer.id] = start + offset
        plan.waves[0 if base_wave else 1].append(chain)
        plan.images += chain
        plan.depths.append(start + depth)
        budget -= depth
        index += 1
    tips = [chain[-1] for wave in plan.waves[:2] for chain in wave]
    for _ in range(pairs):
        init = Layer(new_id(rng) + "-init", rng.choice(tips).id, "init")
        container = Layer(init.id.removesuffix("-init"), init.id, "container")
        plan.containers.append((init, container))
        plan.waves[2].append([init, container])
    return plan


def tiny_tar(layer: str) -> bytes:
    """What each image layer's ApplyDiff brings: one small file of its own."""
    data = layer.encode() + b"\n"
    info = tarfile.TarInfo(f"etc/layer-{layer[:12]}")
    info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_layer(client: PluginClient, layer: Layer) -> None:
    if layer.kind == "image":
        client.call("GraphDriver.Create", {"ID": layer.id, "Parent": layer.parent})
        client.apply_diff(layer.id, layer.parent, tiny_tar(layer.id))
        return
    call = {"ID": layer.id, "Parent": layer.parent, "MountLabel": "", "StorageOpt": {}}
    client.call("GraphDriver.CreateReadWrite", call)
    if layer.kind == "init":  # dockerd writes /etc/hosts and friends into it
        client.call("GraphDriver.Get", {"ID": layer.id, "MountLabel": ""})
        client.call("GraphDriver.Put", {"ID": layer.id})


def make_chains(address: str, chains: list[list[Layer]]) -> list[float]:
    """Make ``chains`` (each in order, several at once); seconds per layer, in making order."""
    times: list[float] = []
    lock = threading.Lock()

    def one(chain: list[Layer]) -> None:
        with PluginClient(address) as client:
            for layer in chain:
                started = time.perf_counter()
                make_layer(client, layer)
                with lock:
                    times.append(time.perf_counter() - started)

    with ThreadPoolExecutor(FILL_WORKERS) as pool:
        futures = [pool.submit(one, chain) for chain in chains]
        try:
            for future in futures:
                future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # Ctrl-C or a failure: not the whole wave first
            raise
    return times


def fill(address: str, plan: Plan, say: Log) -> list[float]:
    """Make every layer of ``plan``; seconds per image layer (Create and ApplyDiff), in order."""
    times: list[float] = []
    for number, wave in enumerate(plan.waves):
        made = make_chains(address, wave)
        times += made if number < 2 else []  # the last wave is containers: other calls
        say(f"    wave {number + 1}: {len(made):,} layers")
    return times


def write_layerdb(data_root: Path, plan: Plan) -> None:
    """dockerd's layer store as :mod:`snapdriver.graphdriver.dockerdb` reads it."""
    layerdb = data_root / "image" / DRIVER / "layerdb"
    for layer in plan.images:
        chain_id = hashlib.sha256(layer.id.encode()).hexdigest()
        directory = layerdb / "sha256" / chain_id
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cache-id").write_text(layer.id)
    for init, container in plan.containers:
        directory = layerdb / "mounts" / container.id
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "mount-id").write_text(container.id)
        (directory / "init-id").write_text(init.id)


# -- the plugins -----------------------------------------------------------------------------


class TimedPlugin(PluginProcess):
    """A plugin whose start is timed finely: exec to the socket answering, and to Status."""

    def start_timed(self, timeout: float = 300.0) -> tuple[float, float]:
        path = unix_path(self.address)
        activate = http_request("Plugin.Activate", {})
        status = http_request("GraphDriver.Status", {})
        started = time.perf_counter()
        self._proc = self._spawn()
        while time.perf_counter() - started < timeout:
            if self._proc.poll() is not None:
                raise RuntimeError(f"snapdriver exited early:\n{self.log_tail()}")
            try:
                call_raw(path, activate)
            except (OSError, RuntimeError):
                time.sleep(0.002)
                continue
            answering = time.perf_counter() - started
            call_raw(path, status)
            return answering, time.perf_counter() - started
        raise RuntimeError(f"snapdriver did not start in {timeout}s:\n{self.log_tail()}")


@dataclass
class World:
    """One plugin and its dockerd-like data root; ``home`` is what Init names."""

    label: str
    plugin: TimedPlugin
    data_root: Path
    plan: Plan
    rng: random.Random
    fill_times: list[float] = field(default_factory=list)
    fill_wall_s: float = 0.0

    @property
    def home(self) -> Path:
        return self.data_root / DRIVER

    @property
    def pid(self) -> int:
        pid = self.plugin.pid
        if pid is None:
            raise RuntimeError(f"the {self.label} plugin is not running")
        return pid


@contextlib.contextmanager
def world(label: str, root: Path, layers: int, seed: int, say: Log) -> Iterator[World]:
    """A running plugin with ``layers`` layers made through its socket, and their layer store."""
    workdir = root / label
    workdir.mkdir()
    plugin = TimedPlugin("btrfs", workdir, ["--log-level", "warning"], name=f"sdscale-{label}")
    rng = random.Random(seed)
    made = World(label, plugin, workdir / "docker", plan_layers(layers, rng), rng)
    plugin.start()
    try:
        with plugin.client() as client:
            client.call("GraphDriver.Init", {"Home": str(made.home), "Opts": []})
        started = time.perf_counter()
        made.fill_times = fill(plugin.address, made.plan, say)
        made.fill_wall_s = time.perf_counter() - started
        say(f"  {label}: {made.plan.count:,} layers in {made.fill_wall_s:.0f} s")
        write_layerdb(made.data_root, made.plan)
        yield made
    finally:
        plugin.close()


# -- the measurements ------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def time_start(w: World) -> dict[str, float]:
    w.plugin.stop()
    answering, status = w.plugin.start_timed()
    return {"socket_s": answering, "status_s": status}


def time_status(w: World, calls: int) -> dict[str, float]:
    path, request = unix_path(w.plugin.address), http_request("GraphDriver.Status", {})
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call_raw(path, request)
        times.append(time.perf_counter() - started)
    return {"p50_ms": statistics.median(times) * 1000, "p99_ms": percentile(times, 0.99) * 1000}


def make_orphans(w: World, chains: int, leaked_inits: int) -> tuple[set[str], set[str]]:
    """Layers dockerd names nowhere: every orphan, and those a first pass can take (leaves)."""
    rng, tips = w.rng, [c[-1] for wave in w.plan.waves[:2] for c in wave]
    orphan_chains = [
        image_chain(rng, rng.choice(w.plan.images).id, rng.randint(1, 25)) for _ in range(chains)
    ]
    inits = [
        [Layer(new_id(rng) + "-init", rng.choice(tips).id, "init")] for _ in range(leaked_inits)
    ]
    make_chains(w.plugin.address, orphan_chains + inits)
    every = {layer.id for chain in orphan_chains + inits for layer in chain}
    leaves = {chain[-1].id for chain in orphan_chains + inits}
    return every, leaves


def time_sweep(w: World, chains: int, leaked_inits: int) -> dict[str, float]:
    """Dry run, then the real sweep, each checked against the orphans made for it."""
    every, leaves = make_orphans(w, chains, leaked_inits)
    with PluginClient(w.plugin.address) as client:
        started = time.perf_counter()
        dry = client.call("Snapdriver.Sweep", {"MinAge": 0, "DryRun": True})["Removed"]
        dry_s = time.perf_counter() - started
        started = time.perf_counter()
        real = client.call("Snapdriver.Sweep", {"MinAge": 0, "DryRun": False})["Removed"]
        real_s = time.perf_counter() - started
    if set(dry) != leaves:
        raise RuntimeError(f"dry-run sweep named {len(dry)} layers, not the {len(leaves)} leaves")
    if set(real) != every:
        raise RuntimeError(f"the sweep removed {len(real)} layers, not the {len(every)} orphans")
    return {"dry_run_s": dry_s, "real_s": real_s, "orphans": len(every)}


def time_get_put(w: World, clients: int, rounds: int) -> dict[str, float]:
    result = get_put_load(w.plugin.address, clients, rounds, prefix=f"sdscale-rt-{w.label}")
    return {
        "p50_ms": result.request_p50_ms,
        "p99_ms": result.request_p99_ms,
        "requests_per_s": result.requests_per_s,
    }


def stream_peak(w: World, streams: int, mib: int) -> dict[str, float]:
    """VmHWM of the plugin (reset first) while ``streams`` ApplyDiffs of ``mib`` MiB run."""
    layers = [f"sdscale-stream-{i}" for i in range(streams)]
    address = w.plugin.address
    with PluginClient(address) as client:
        for layer in layers:
            client.call("GraphDriver.Create", {"ID": layer, "Parent": ""})
    rss_before = rss_kib(w.pid)
    Path(f"/proc/{w.pid}/clear_refs").write_text("5\n")

    def one(layer: str) -> int:
        with PluginClient(address) as client:
            return client.apply_diff(layer, "", generated_tar(mib))

    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            sizes = list(pool.map(one, layers))
        seconds = time.perf_counter() - started
        peak = vm_hwm_kib(w.pid)
    finally:
        with PluginClient(address) as client:
            for layer in layers:
                client.call("GraphDriver.Remove", {"ID": layer})
    if peak is None or min(sizes) < mib * 1024 * 1024:
        raise RuntimeError(f"ApplyDiff sizes {sizes[:3]}... or peak {peak} are wrong")
    return {"peak_mib": peak / 1024, "rss_before_mib": rss_before / 1024, "seconds": seconds}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Settings:
    layers: int
    small: int
    runs: int
    calls: int
    clients: int
    rounds: int
    streams: int
    stream_mib: int
    orphan_chains: int
    leaked_inits: int
    image_mb: int
    out: Path
    smoke: bool


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, help="layers in the big store (default 10000)")
    parser.add_argument("--small", type=int, default=10, help="layers in the small store")
    parser.add_argument("--runs", type=int, help="runs of each measurement (default 5)")
    parser.add_argument("--streams", type=int, default=32, help="concurrent ApplyDiffs")
    parser.add_argument("--stream-mib", type=int, help="MiB per ApplyDiff stream (default 50)")
    parser.add_argument("--out", type=Path, help="where scale.md/json go (default bench/)")
    parser.add_argument("--smoke", action="store_true", help="200 layers, one run, bench/out/")
    args = parser.parse_args(argv)
    smoke = args.smoke
    return Settings(
        layers=args.layers or (200 if smoke else 10_000),
        small=args.small,
        runs=args.runs or (1 if smoke else 5),
        calls=50 if smoke else 500,
        clients=4,
        rounds=20 if smoke else 500,
        streams=4 if smoke else args.streams,
        stream_mib=args.stream_mib or (4 if smoke else 50),
        orphan_chains=2 if smoke else 4,
        leaked_inits=3 if smoke else 10,
        image_mb=1024 if smoke else 8192,
        out=args.out or (BENCH_DIR / "out" if smoke else BENCH_DIR),
        smoke=smoke,
    )


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")), "?")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kib = next(int(x.split()[1]) for x in meminfo if x.startswith("MemTotal:"))
    commit = subprocess.run(
        ["git", "-C", str(BENCH_DIR.parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": os.uname().release,
        "CPU model": model,
        "Python": sys.version.split()[0],
        "snapdriver commit": commit or "?",
    }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


Samples = dict[str, dict[str, list[dict[str, float]]]]


def measure(big: World, small: World, cfg: Settings, say: Log) -> Samples:
    """Every measurement ``cfg.runs`` times, the two stores alternating within each run."""
    samples: Samples = {w.label: {} for w in (big, small)}
    steps: list[tuple[str, Callable[[World], dict[str, float]]]] = [
        ("start", time_start),
        ("status", lambda w: time_status(w, cfg.calls)),
        ("sweep", lambda w: time_sweep(w, cfg.orphan_chains, cfg.leaked_inits)),
        ("get_put", lambda w: time_get_put(w, cfg.clients, cfg.rounds)),
    ]
    for run in range(cfg.runs):
        say(f"run {run + 1} of {cfg.runs} (load {loadavg()})")
        for name, step in steps:
            for w in (small, big) if run % 2 == 0 else (big, small):
                samples[w.label].setdefault(name, []).append(step(w))
        samples["big"].setdefault("load", []).append({"load1": float(loadavg().split()[0])})
    for _ in range(max(1, min(cfg.runs, 3))):
        samples["big"].setdefault("streams", []).append(
            stream_peak(big, cfg.streams, cfg.stream_mib)
        )
        say(f"  {cfg.streams} streams: peak {samples['big']['streams'][-1]['peak_mib']:.1f} MiB")
    return samples


def medians(samples: Samples) -> dict[str, dict[str, dict[str, float]]]:
    return {
        label: {
            step: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            for step, runs in steps.items()
        }
        for label, steps in samples.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    # SIGTERM unwinds like Ctrl-C, so the plugins stop and the loop image is released.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    reason = can_make_loop_filesystems()
    if reason is not None:
        raise SystemExit(f"cannot make a btrfs loop image: {reason}")
    info = machine() | {"load average at start (1, 5, 15 min)": loadavg()}
    started = time.monotonic()
    with (
        loop_filesystem("btrfs", size_mb=cfg.image_mb) as mnt,
        world("small", mnt, cfg.small, 1, log) as small,
        world("big", mnt, cfg.layers, 2, log) as big,
    ):
        fill = fill_summary(big)
        samples = measure(big, small, cfg, log)
    info["load average at end (1, 5, 15 min)"] = loadavg()
    info["duration"] = f"{time.monotonic() - started:.0f} s"
    result = {
        "machine": info,
        "settings": {k: str(v) for k, v in vars(cfg).items()},
        "fill": fill,
        "medians": medians(samples),
        "samples": samples,
    }
    write_report(cfg.out, result)
    log(f"written to {cfg.out / 'scale.md'} and scale.json")
    return 0


def fill_summary(w: World) -> dict[str, Any]:
    """Making the image layers as the store filled: the first tenth against the last."""
    times = w.fill_times
    tenth = max(1, len(times) // 10)
    first, last = times[:tenth], times[-tenth:]
    return {
        "layers": w.plan.count,
        "image_layers": len(times),
        "containers": len(w.plan.containers),
        "images": len(w.plan.depths),
        "depth_min": min(w.plan.depths),
        "depth_median": statistics.median(w.plan.depths),
        "depth_max": max(w.plan.depths),
        "wall_s": w.fill_wall_s,
        "first_tenth_p50_ms": statistics.median(first) * 1000,
        "last_tenth_p50_ms": statistics.median(last) * 1000,
    }


# -- the report ------------------------------------------------------------------------------

ROWS = (
    ("start", "socket_s", "start: exec to the socket answering", "s"),
    ("start", "status_s", "start: exec to the first Status answer", "s"),
    ("status", "p50_ms", "`GraphDriver.Status`, p50", "ms"),
    ("status", "p99_ms", "`GraphDriver.Status`, p99", "ms"),
    ("sweep", "dry_run_s", "`Snapdriver.Sweep`, dry run", "s"),
    ("sweep", "real_s", "`Snapdriver.Sweep`, removing the orphans", "s"),
    ("get_put", "p50_ms", "Get/Put request, p50", "ms"),
    ("get_put", "p99_ms", "Get/Put request, p99", "ms"),
    ("get_put", "requests_per_s", "Get/Put requests per second", "/s"),
)
STREAM_LIMIT_MIB = 150


def write_report(out: Path, result: dict[str, Any]) -> None:
    """``layers`` in scale.json and the section :data:`SECTION` of scale.md, the rest kept."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "scale.json", out / "scale.md"
    data = json.loads(json_path.read_text()) if json_path.exists() else {}
    data["layers"] = result
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    kept = md_path.read_text().split(SECTION)[0].rstrip() + "\n\n" if md_path.exists() else ""
    md_path.write_text(kept + render(result))


def render(result: dict[str, Any]) -> str:
    cfg, med, fill = result["settings"], result["medians"], result["fill"]
    big, small = med["big"], med["small"]
    lines = [
        SECTION,
        "",
        f"Written by `bench/scale_layers.py{' --smoke' if cfg['smoke'] == 'True' else ''}` on "
        f"{result['machine']['date']}; the run took {result['machine']['duration']}. What is "
        "measured and how: the script's docstring. Samples: `layers` in `scale.json`.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in result["machine"].items()),
        "",
        f"The big store: {fill['layers']:,} layers: {fill['image_layers']:,} image layers, "
        f"{fill['images']:,} images of depth {fill['depth_min']}-{fill['depth_max']} (median "
        f"{fill['depth_median']:.0f}), and {fill['containers']:,} containers of an `-init` layer "
        f"and their own, made through the socket in {fill['wall_s']:.0f} s by "
        f"{FILL_WORKERS} clients. An image layer (Create + ApplyDiff) took "
        f"{fill['first_tenth_p50_ms']:.1f} ms (p50) in the first tenth made and "
        f"{fill['last_tenth_p50_ms']:.1f} ms in the last "
        f"({fill['last_tenth_p50_ms'] / fill['first_tenth_p50_ms']:.2f}x).",
        "",
        f"Medians of {cfg['runs']} runs, the two plugins alternating; the ratio is the "
        f"{int(cfg['layers']):,}-layer store over the {cfg['small']}-layer one "
        "(1.00x: no cost of scale).",
        "",
        f"| measurement | {cfg['small']} layers | {int(cfg['layers']):,} layers | ratio |",
        "|---|---|---|---|",
    ]
    for step, key, title, unit in ROWS:
        a, b = small[step][key], big[step][key]
        lines.append(f"| {title} | {_fmt(a, unit)} | {_fmt(b, unit)} | {b / a:.2f}x |")
    orphans = int(big["sweep"]["orphans"])
    streams = result["samples"]["big"]["streams"]
    peaks = [s["peak_mib"] for s in streams]
    verdict = "under" if max(peaks) < STREAM_LIMIT_MIB else "**over**"
    lines += [
        "",
        f"Each sweep run first made {orphans} orphans (chains of depth 1-25 on image layers "
        "that no `cache-id` names, and leaked `-init` layers) and checked that the dry run "
        "named exactly their leaves and the sweep removed exactly them.",
        "",
        f"**{cfg['streams']} concurrent ApplyDiff streams of {cfg['stream_mib']} MiB** "
        f"(random data, on the {int(cfg['layers']):,}-layer plugin): peak RSS (VmHWM, reset "
        f"first) {', '.join(f'{p:.1f}' for p in peaks)} MiB in {len(peaks)} runs, "
        f"{verdict} the {STREAM_LIMIT_MIB} MiB target; RSS before "
        f"{big['streams']['rss_before_mib']:.1f} MiB, "
        f"{big['streams']['seconds']:.1f} s for all streams (median).",
        "",
        "Load average (1 min) after each run: "
        + ", ".join(f"{s['load1']:.2f}" for s in result["samples"]["big"]["load"])
        + ".",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: float, unit: str) -> str:
    if unit == "/s":
        return f"{value:,.0f}/s"
    return f"{value:.3f} {unit}" if value < 10 else f"{value:.1f} {unit}"


if __name__ == "__main__":
    sys.exit(main())
