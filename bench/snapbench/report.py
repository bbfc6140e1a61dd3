"""RESULTS.md and the PNG plots, written from :class:`Results`."""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from snapbench import results as m
from snapbench.config import BENCH_DIR, DEFAULT_REPORT, Config
from snapbench.env import DRIVERS
from snapbench.results import Metric, Results

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: Results made elsewhere, included (never overwritten) in each RESULTS.md: the goals of the run
#: against issue 13 with the floors measured (kept by hand), bench/native_changes.py's (by hand)
#: and the ZFS lab's reports (``bench/zfs-lab``: the default scenarios 1-2, and 4 and 7 under
#: ``--report zfs-lab-run-load``).
KEPT = {
    BENCH_DIR / "goals.md": "written by hand from the last full run and the profiles it names",
    BENCH_DIR / "native-changes.md": "written by hand from `bench/native_changes.py`",
    BENCH_DIR / "zfs-lab.md": "from `bench/zfs-lab` runs in the ZFS lab",
    BENCH_DIR / "zfs-lab-run-load.md": "from a `bench/zfs-lab --scenarios 4,7` run in the ZFS lab",
}
COLOURS = {
    "snapdriver": "tab:red",
    "btrfs": "tab:blue",
    "overlay2": "tab:green",
    "vfs": "tab:gray",
    "snapdriver-zfs": "tab:red",
    "zfs": "tab:orange",
}


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    return f"{value:,.0f} {unit}"


def reference(results: Results) -> str | None:
    """The driver the others are compared with: the run's first snapdriver plugin."""
    plugins = {spec.label for spec in DRIVERS if spec.plugin}
    return next((d for d in results.drivers if d in plugins), None)


def compared(results: Results) -> list[tuple[str, str]]:
    """The (ours, peer) pairs the medians table gives a ratio for: the reference against every
    other driver, and each further snapdriver variant against every in-tree driver."""
    ref = reference(results)
    if ref is None:
        return []
    plugins = {spec.label for spec in DRIVERS if spec.plugin}
    pairs = [(ref, peer) for peer in results.drivers if peer != ref]
    for ours in results.drivers:
        if ours in plugins and ours != ref:
            pairs += [(ours, peer) for peer in results.drivers if peer not in plugins]
    return pairs


def ratio(results: Results, metric: Metric, ours: str, peer: str) -> str:
    """``ours`` over ``peer``, bold when ours is faster."""
    mine, theirs = results.median(metric, ours), results.median(metric, peer)
    if mine is None or theirs is None or theirs == 0:
        return "—"
    value = mine / theirs
    text = f"{value:.2g}x" if value < 0.1 else f"{value:.2f}x"
    return f"**{text}**" if value < 1 else text


def duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _medians_table(results: Results, metrics: Sequence[Metric]) -> list[str]:
    drivers, pairs = results.drivers, compared(results)
    head = ["scenario", *drivers, *(f"{ours} / {peer}" for ours, peer in pairs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric in metrics:
        label = f"{metric.scenario}. {metric.title}" if metric.scenario else metric.title
        row = [label, *(fmt(results.median(metric, d), metric.unit) for d in drivers)]
        row += [
            ratio(results, metric, ours, peer) if not metric.higher_is_better else "—"
            for ours, peer in pairs
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _headline(results: Results, files: int) -> list[str]:
    diff, commit = m.diff_by_size(files), m.commit(files)
    ref = reference(results)
    if ref is None or (diff not in results.samples and commit not in results.samples):
        return []
    lines = [
        f"## Headline: 10 changed files on the {files:,}-file image",
        "",
        f"| driver | `docker diff` | `docker commit` | {ref}'s diff is | {ref}'s commit is |",
        "|---|---|---|---|---|",
    ]
    for driver in results.drivers:
        cells = [
            driver,
            fmt(results.median(diff, driver), "s"),
            fmt(results.median(commit, driver), "s"),
        ]
        for metric in (diff, commit):
            ours, theirs = results.median(metric, ref), results.median(metric, driver)
            if driver == ref or ours is None or not theirs:
                cells.append("—")
            else:
                factor = theirs / ours
                cells.append(
                    f"{factor:.1f}x faster" if factor >= 1 else f"{1 / factor:.1f}x slower"
                )
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_markdown(path: Path, results: Results, config: Config, plots: Sequence[Path]) -> None:
    machine, command = results.machine, results.command
    readme = os.path.relpath(BENCH_DIR / "README.md", path.parent)
    lines = [
        "# snapdriver benchmark results"
        + (f" on ZFS (pool `{config.zpool}`)" if config.zpool else ""),
        "",
        f"Written by `{command}` on {machine.get('date', '?')}; the run took "
        f"{machine.get('duration', '?')}. How to run it and what each scenario measures: "
        f"[README.md]({readme}). Raw samples: `{config.samples_path.name}` beside this file.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(
            f"| {key} | {value} |"
            for key, value in machine.items()
            if key not in ("date", "duration")
        ),
        "",
        "## Drivers",
        "",
        *(
            f"- **{spec.label}**: {spec.description}, its own dockerd and data root"
            + (
                f" (`docker info`: {results.driver_status[spec.label]})"
                if results.driver_status.get(spec.label)
                else ""
            )
            for spec in DRIVERS
            if spec.label in results.drivers
        ),
        "",
        f"Each time is the wall time of one docker CLI command (so it includes the CLI's own "
        f"start-up: see the floor row), repeated {config.repeat} time(s); the table gives the "
        "median. Ratios are snapdriver's median over the peer's: **below 1 (bold) snapdriver is "
        "faster**. Page cache is warm, except that it is written back and dropped before each "
        "`docker import` and `docker load` (and the tar read back in), so that every driver "
        "writes its image into the same state of the machine's memory.",
        "",
        *_headline(results, config.files),
        "## Medians",
        "",
        *_medians_table(results, results.metrics()),
        "",
        "## Peak memory and run conditions per driver",
        "",
        "Peak RSS is VmHWM from /proc/PID/status, read before each process is stopped. The load "
        "average (1 min) is the machine's, read when the driver's run began and ended: other "
        "work on the machine shows up there.",
        "",
        "| driver | plugin peak RSS | dockerd peak RSS | wall time | load at start, end |",
        "|---|---|---|---|---|",
    ]
    for driver in results.drivers:
        rss = results.peak_rss_kib.get(driver, {})
        cells = [f"{rss[k] / 1024:.1f} MiB" if k in rss else "—" for k in ("plugin", "dockerd")]
        run = results.driver_runs.get(driver, {})
        lines.append(
            f"| {driver} | {cells[0]} | {cells[1]} | {run.get('duration', '—')} | "
            f"{run.get('load', '—')} |"
        )
    lines.append("")
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.relative_to(path.parent)})" for p in plots]
        lines.append("")
    consistency = _diff_consistency(results)
    if consistency:
        lines += ["## Do the drivers agree?", "", *consistency, ""]
    if results.failures or results.notes:
        lines += ["## Failures and notes" if results.failures else "## Notes", ""]
        lines += [f"- FAILED: {failure}" for failure in results.failures]
        lines += [f"- {note}" for note in results.notes]
        lines.append("")
    if config.report == DEFAULT_REPORT:
        for kept, origin in KEPT.items():
            lines += kept_section(path, kept, origin)
    path.write_text("\n".join(lines))


def kept_section(path: Path, kept: Path, origin: str) -> list[str]:
    """The file ``kept`` as a section of the report at ``path``, its headings a level down."""
    if not kept.exists():
        return []
    body = kept.read_text().strip().splitlines()
    title = body.pop(0).lstrip("# ") if body and body[0].startswith("# ") else kept.stem
    link = os.path.relpath(kept, path.parent)
    return [
        f"## {title}",
        "",
        f"Not part of this run: copied from [{kept.name}]({link}), {origin} (see the README).",
        *_demoted(body),
        "",
    ]


def _demoted(lines: Sequence[str]) -> Iterator[str]:
    """Markdown headings one level down; lines of fenced code blocks as they are."""
    fenced = False
    for line in lines:
        fenced ^= line.startswith("```")
        yield f"#{line}" if line.startswith("#") and not fenced else line


def _diff_consistency(results: Results) -> list[str]:
    lines = []
    for title, digests in sorted(results.diff_digests.items()):
        if len(set(digests.values())) == 1:
            lines.append(f"- {title}: identical `docker diff` output from {', '.join(digests)}")
        else:
            shown = ", ".join(f"{d}={h}" for d, h in digests.items())
            lines.append(f"- {title}: **outputs differ** ({shown})")
    return lines


# -- plots -----------------------------------------------------------------------------------


def write_plots(results: Results, config: Config) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    config.plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    size_plot = config.plots_dir / "diff_vs_image_size.png"
    if _line_plot(
        results,
        "diff",
        size_plot,
        "files in the image",
        "`docker diff` of a container with 10 changed files",
    ):
        written.append(size_plot)
    changes_plot = config.plots_dir / "diff_vs_changed_files.png"
    if _line_plot(
        results,
        "diff-changes",
        changes_plot,
        "changed files",
        f"`docker diff` on the {config.files:,}-file image",
    ):
        written.append(changes_plot)
    summary_plot = config.plots_dir / "summary.png"
    if _summary_plot(results, config, summary_plot):
        written.append(summary_plot)
    return written


def _line_plot(results: Results, key: str, path: Path, xlabel: str, title: str) -> bool:
    import matplotlib.pyplot as plt

    metrics = results.metrics(key=key)
    if not metrics:
        return False
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    labels: dict[int, list[tuple[float, str, str]]] = {}
    for driver in results.drivers:
        points = [
            (mt.param, results.samples[mt][driver])
            for mt in metrics
            if driver in results.samples[mt]
        ]
        if not points:
            continue
        xs = [x for x, _ in points]
        medians = [statistics.median(v) for _, v in points]
        low = [med - min(v) for med, (_, v) in zip(medians, points, strict=True)]
        high = [max(v) - med for med, (_, v) in zip(medians, points, strict=True)]
        colour = COLOURS.get(driver, "tab:purple")
        ax.errorbar(
            xs, medians, yerr=[low, high], marker="o", capsize=3, label=driver, color=colour
        )
        for x, y in zip(xs, medians, strict=True):
            labels.setdefault(x, []).append((y, fmt(y, "s"), colour))
    if len(metrics) == 1:
        ax.text(
            0.02,
            0.97,
            "one size in this run: `bench/run --full` draws the curve",
            transform=ax.transAxes,
            fontsize=8,
            color="dimgray",
            va="top",
        )
    ax.margins(x=0.08, y=0.12)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel + " (log)")
    ax.set_ylabel("seconds, median (bars: min-max), log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _place_labels(ax, labels)  # last: it needs the final layout
    fig.savefig(path)
    plt.close(fig)
    return True


def _place_labels(ax: Axes, labels: dict[int, list[tuple[float, str, str]]]) -> None:
    """Value labels right of each point, pushed apart vertically so that none overlap."""
    ax.autoscale_view()
    gap = 11.0  # pixels between label baselines
    for x, entries in labels.items():
        previous = -1e9
        for y, text, colour in sorted(entries):
            at = float(ax.transData.transform((x, y))[1])
            placed = max(at, previous + gap)
            previous = placed
            ax.annotate(
                text,
                (x, y),
                textcoords="offset pixels",
                xytext=(8, placed - at - 4),
                fontsize=7,
                color=colour,
            )


def _summary_plot(results: Results, config: Config, path: Path) -> bool:
    import matplotlib.pyplot as plt

    wanted = [m.diff_by_size(config.files), m.commit(config.files), m.run_true(), m.build()]
    metrics = [mt for mt in wanted if mt in results.samples]
    if not metrics:
        return False
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(3.6 * len(metrics), 4), dpi=110, squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        drivers = [d for d in results.drivers if results.median(metric, d) is not None]
        values = [results.median(metric, d) or 0.0 for d in drivers]
        bars = ax.bar(drivers, values, color=[COLOURS.get(d, "tab:purple") for d in drivers])
        ax.bar_label(bars, labels=[fmt(v, "s") for v in values], fontsize=7)
        ax.set_title(metric.title.replace("`", ""), fontsize=8, wrap=True)
        ax.set_ylabel("seconds (median)")
        ax.tick_params(axis="x", labelsize=8, labelrotation=30)
        plt.setp(ax.get_xticklabels(), horizontalalignment="right")  # long names, no overlap
        ax.margins(y=0.15)
    fig.suptitle("Median wall time per driver (lower is better)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
