"""sweep.png, beside a sweep's summary.csv: the ranking metric against each swept parameter (seeds of one
setting as a mean with a std error bar) and the jobs' loss curves on one figure.

Only the jobs' small files are read (summary.json, metrics.csv): no torch, as in the rest of the sweep's
own process.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

from dlfs_cli.runs import SEED_KEYS, Run, fmt, varying_keys  # noqa: E402
from dlfs_cli.tracking import METRICS_FILE, Losses, read_losses, spans_decades  # noqa: E402

MAX_LABELLED = 10  # curves beyond this many are drawn but left out of the legend


def draw_sweep(jobs: list[Run], metric: str, path: Path, searched: bool = False) -> Path | None:
    """Write the sweep's picture to `path`; None when there is nothing to draw (no job has `metric`).
    searched: the values were proposed by a search (Optuna), not a grid: points, not joined by lines."""
    fig = sweep_figure(jobs, metric, f"{path.parent.name}: ", searched)
    if fig is None:
        return None
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep_figure(jobs: list[Run], metric: str, title: str = "", searched: bool = False) -> Any:
    """The figure draw_sweep saves (matplotlib's Figure), or None when no job has `metric`."""
    done = [r for r in jobs if r.status == "completed" and _finite(r.metrics.get(metric))]
    if not done:
        return None
    params = [k for k in varying_keys(jobs) if k not in SEED_KEYS]
    panels = len(params) + 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    for ax, param in zip(axes[0], params, strict=False):
        _metric_against(ax, done, param, [k for k in params if k != param], metric, searched)
    _curves(axes[0][-1], jobs, params)
    fig.suptitle(f"{title}{len(jobs)} jobs, {len(done)} with {metric}")
    fig.tight_layout()
    return fig


def _metric_against(ax: Any, jobs: list[Run], param: str, others: list[str], metric: str, searched: bool) -> None:
    """One line per setting of the other swept parameters; the seeds of a point as mean +- std."""
    numbers = {r.overrides.get(param, ""): _number(r.overrides.get(param)) for r in jobs}
    numeric = {v: n for v, n in numbers.items() if n is not None}
    if len(numeric) == len(numbers):  # numbers: at their values (a log scale for rates)
        values = sorted(numeric, key=numeric.__getitem__)
        x = dict(numeric)
    else:  # words: one place each, in order
        values = sorted(numbers)
        x = {v: float(i) for i, v in enumerate(values)}
    lines: dict[tuple[str, ...], dict[str, list[float]]] = {}
    for r in jobs:
        line = tuple(r.overrides.get(k, "") for k in others)
        lines.setdefault(line, {}).setdefault(r.overrides.get(param, ""), []).append(r.metrics[metric])
    for line, points in lines.items():
        xs = [v for v in values if v in points]
        at = [x[v] for v in xs]
        means = [statistics.fmean(points[v]) for v in xs]
        stds = [statistics.stdev(points[v]) if len(points[v]) > 1 else 0.0 for v in xs]
        label = ", ".join(f"{k}={_short(v)}" for k, v in zip(others, line, strict=True)) or None
        ax.errorbar(at, means, yerr=stds, marker="o", capsize=3, label=label, linestyle="none" if searched else "-")
    if spans_decades(r.metrics[metric] for r in jobs):  # a loss from 10 to 1e25 (a search that nearly diverged)
        ax.set_yscale("log")
    if len(numeric) == len(numbers):
        low, high = min(numeric.values()), max(numeric.values())
        if low > 0 and high / low >= 10:  # rates, decays: a log scale
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(values)), values, rotation=30 if max(map(len, values)) > 8 else 0)
    ax.set(xlabel=param, ylabel=metric, title=f"{metric} against {param}")
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize="small")


def _curves(ax: Any, jobs: list[Run], params: list[str]) -> None:
    """Every job's training loss (line) and validation or test loss (markers, same colour), by step."""
    every_loss: list[float] = []
    for i, r in enumerate(jobs):
        losses = _losses(r.path / METRICS_FILE)
        label = ", ".join(f"{k}={_short(r.overrides.get(k, ''))}" for k in params) or f"job {r.job}"
        if r.overrides.get("seed"):
            label += f", seed {r.overrides['seed']}"
        colour = f"C{i % 10}"
        train, held = losses["train"], losses["val"] or losses["test"]  # test: no validation split
        if train:
            ax.plot(*zip(*train, strict=True), "-", color=colour, alpha=0.8, label=label if i < MAX_LABELLED else None)
        if held:
            ax.plot(*zip(*held, strict=True), "o--", color=colour, markersize=3, alpha=0.8)
        every_loss += [loss for points in losses.values() for _, loss in points]
    if spans_decades(every_loss):
        ax.set_yscale("log")
    ax.set(xlabel="training step", ylabel="loss", title="loss: training (lines), held-out (dashed)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="x-small")


def _losses(path: Path) -> Losses:
    try:
        return read_losses(path)
    except (OSError, csv.Error):
        return {"train": [], "val": [], "test": []}  # a job refused before it trained has no metrics.csv


def _short(value: str) -> str:
    """A value as a legend shows it: a number an Optuna search proposed (0.548858622576932) to 4 digits."""
    number = _number(value)
    return fmt(number) if number is not None and len(value) > 8 else value  # a table's 4 digits


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
