"""`dlfs reproduce`: the book's chapter-7 table, re-run and compared number by number.

Each experiment of `conf/reproduce.yaml`'s targets is an ordinary `experiment/` preset, run once per
seed with `train()` into a run folder of its own inside the reproduction's folder; then REPORT.md
and report.json say, for every number the book printed, what this machine got and whether it is
within the tolerance. Our improved presets run the same way for a second table.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose
from omegaconf import DictConfig

from dlfs_cli.errors import DlfsError, exit_code_of
from dlfs_cli.runs import fmt
from dlfs_cli.summary import Summary
from dlfs_cli.tracking import SUMMARY_FILE, log, write_atomic

REPORT_MD = "REPORT.md"
REPORT_JSON = "report.json"
FIGURES = {  # what REPORT.md shows of each model's run, in this order
    "loss_curves.png": "loss curves",
    "confusion_matrix.png": "confusion matrix",
    "reconstructions.png": "test digits and their reconstructions (the book's figure 7-3)",
    "tsne.png": "t-SNE of the test encodings (figure 7-4)",
    "random_codes.png": "random codes through the decoder (figure 7-5)",
}


@dataclass
class SeedRun:
    """One preset trained at one seed (runs.Run is what any run folder says about itself)."""

    seed: int
    run_dir: Path
    status: str  # completed | failed | diverged | interrupted | not run
    metrics: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0
    error: str | None = None


@dataclass
class Result:
    """One experiment over its seeds, against one number of the book."""

    name: str
    metric: str
    book: float | None
    tolerance: str | None  # "<= 20", ">= 0.965"
    runs: list[SeedRun]
    ours: float | None = None  # the mean over the seeds that completed
    std: float | None = None
    passed: bool | None = None  # None: not run, or no tolerance
    status: str = "completed"  # or "not run: <reason>", "failed: <reason>"

    @property
    def duration_s(self) -> float:
        return sum(r.duration_s for r in self.runs)


def reproduce(cfg: DictConfig, out: Path) -> int:
    """Run the targets (and the improved presets) into `out`; write the report; the exit code."""
    start = time.monotonic()
    targets = list(cfg.targets)
    known = {t.experiment for t in targets}
    if cfg.only:
        unknown = [name for name in cfg.only if name not in known]
        if unknown:
            raise DlfsError(f"only: unknown experiment {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        targets = [t for t in targets if t.experiment in cfg.only]
    if not cfg.seeds:
        raise DlfsError("seeds: give at least one seed, e.g. seeds=[0]")
    out.mkdir(parents=True, exist_ok=True)

    book = [_experiment(cfg, out, t.experiment, t) for t in targets]
    improved = []
    if cfg.improved:
        improved = [_experiment(cfg, out, t.improved, t) for t in targets if t.improved]
    report = _report_json(cfg, book, improved, time.monotonic() - start, out)
    write_atomic(out / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    write_atomic(out / REPORT_MD, _report_md(cfg, report, book, improved, out))
    _print(book, improved, out, report["duration_s"])
    if cfg.quick:  # tiny data: the numbers mean nothing, only that everything ran
        return 0 if all(r.status == "completed" for r in book + improved) else 1
    return 0 if all(r.passed for r in book) else 1


def _experiment(cfg: DictConfig, out: Path, name: str, target: Any) -> Result:
    runs = [_run(cfg, out, name, seed) for seed in cfg.seeds]
    tolerance = f"<= {target.at_most:g}" if target.at_most is not None else None
    if target.at_least is not None:
        tolerance = f">= {target.at_least:g}"
    result = Result(name, target.metric, target.book, tolerance, runs)
    done = [r.metrics[target.metric] for r in runs if r.status == "completed" and target.metric in r.metrics]
    bad = next((r for r in runs if r.status != "completed"), None)
    if bad is not None:
        result.status = f"{bad.status}: {bad.error}" if bad.error else bad.status
    elif len(done) < len(runs):
        result.status = f"failed: no {target.metric} in the runs' metrics (they have {', '.join(runs[0].metrics)})"
    if done:
        result.ours = statistics.fmean(done)
        result.std = statistics.stdev(done) if len(done) > 1 else None
        if len(done) == len(runs) and tolerance is not None:
            ok_max = target.at_most is None or result.ours <= target.at_most
            ok_min = target.at_least is None or result.ours >= target.at_least
            result.passed = ok_max and ok_min
    if result.passed is None and not result.status.startswith("not run"):
        result.passed = False if result.status != "completed" else None
    return result


def _run(cfg: DictConfig, out: Path, name: str, seed: int) -> SeedRun:
    """One preset, one seed, as a full run folder: <out>/<name>/seed<seed>/."""
    from dlfs_cli.train import train  # torch: only once there is something to train

    run_dir = out / name / f"seed{seed}"
    overrides = [f"experiment={name}", f"seed={seed}", f"device={cfg.device}"]
    if cfg.quick:
        overrides += list(cfg.quick_overrides.get(name, []))
    t0 = time.monotonic()
    try:
        child = compose(config_name="train", overrides=overrides)
        if "root" in child.data:
            child.data.root = cfg.data.root
        log.info("reproduce: %s seed %d -> %s", name, seed, run_dir)
        metrics = train(child, run_dir)
        return SeedRun(seed, run_dir, "completed", metrics, time.monotonic() - t0)
    except DlfsError as ex:
        if exit_code_of(ex) != 2:  # a signal: stop the whole reproduction (the report is not written)
            raise
        summary = _summary(run_dir)
        status = summary.status if summary is not None and summary.status else "not run"  # refused before it trained
        log.error("reproduce: %s seed %d %s: %s", name, seed, status, ex)
        return SeedRun(seed, run_dir, status, {}, time.monotonic() - t0, str(ex))


def _summary(run_dir: Path) -> Summary | None:
    try:
        return Summary.load(run_dir / SUMMARY_FILE)
    except (OSError, ValueError):
        return None


# --- the report ------------------------------------------------------------------------------


def _report_json(cfg: DictConfig, book: list[Result], improved: list[Result], seconds: float, out: Path) -> dict:
    def entry(r: Result) -> dict[str, Any]:
        first = r.runs[0].run_dir
        return {
            "name": r.name,
            "metric": r.metric,
            "book": r.book,
            "ours": r.ours,
            "std": r.std,
            "tolerance": r.tolerance,
            "pass": r.passed,
            "status": r.status,
            "run_dir": str(first.relative_to(out)),
            "duration_s": round(r.duration_s, 1),
            "seeds": [
                {**asdict(run), "run_dir": str(run.run_dir.relative_to(out)), "duration_s": round(run.duration_s, 1)}
                for run in r.runs
            ],
        }

    by_name = {r.name: r for r in book}
    pairs = []
    for t in cfg.targets:
        if t.improved and t.experiment in by_name:
            imp = next((r for r in improved if r.name == t.improved), None)
            if imp is not None:
                pairs.append({"book_preset": t.experiment, **entry(imp)})
    return {
        "experiments": [entry(r) for r in book],
        "improved": pairs,
        "all_pass": all(r.passed for r in book) if book else False,
        "quick": bool(cfg.quick),
        "seeds": list(cfg.seeds),
        "duration_s": round(seconds, 1),
        "environment": _environment(book + improved),
    }


def _environment(results: list[Result]) -> dict[str, Any]:
    summary = next((s for r in results for run in r.runs if (s := _summary(run.run_dir)) is not None), Summary())
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "dlfs reproduce " + " ".join(sys.argv[1:]),
        "device": summary.device,
        "versions": summary.versions,
        "machine": f"{platform.node()}, {platform.platform()}, {os.cpu_count()} CPUs",
    }
    if (summary.device or "").startswith("cuda"):
        import torch

        env["gpu"] = torch.cuda.get_device_name()
    return env


def _fmt(x: float | None, std: float | None = None) -> str:
    """runs.fmt's numbers; "-" for none (or NaN) in the report's tables."""
    if x is None or math.isnan(x):
        return "-"
    return fmt(float(x), std, std_digits=2)


def _verdict(r: Result) -> str:
    if r.status != "completed":
        return r.status
    return {True: "pass", False: "FAIL", None: "-"}[r.passed]


def _report_md(cfg: DictConfig, report: dict, book: list[Result], improved: list[Result], out: Path) -> str:
    env = report["environment"]
    passed = sum(1 for r in book if r.passed)
    lines = [
        "# Deep Learning from Scratch, chapter 7: reproduced",
        "",
        f"`{env['command']}`, {env['date']}: **{passed} of {len(book)}** experiments within the book's "
        f"tolerance, in {report['duration_s']:.0f} s.",
    ]
    if cfg.quick:
        lines += ["", "**quick=true**: tiny offline data, a few batches: these numbers say nothing about the book."]
    lines += [
        "",
        "| experiment | metric | book | ours | tolerance | result | seeds | duration |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in book:
        lines.append(
            f"| {r.name} | {r.metric} | {_fmt(r.book)} | {_fmt(r.ours, r.std)} | {r.tolerance or '-'} | "
            f"{_verdict(r)} | {len(r.runs)} | {r.duration_s:.0f} s |"
        )
    if report["improved"]:
        by_name = {r.name: r for r in book}
        lines += [
            "",
            "## Beyond the book",
            "",
            "The same models with settings of ours (each an `experiment/` preset you can run alone: "
            "`dlfs train experiment=<preset>`), to show what the book's choices cost.",
            "",
            "| experiment | metric | book | book's settings, here | improved preset | improved | change | duration |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for pair in report["improved"]:
            base = by_name[pair["book_preset"]]
            imp = next(r for r in improved if r.name == pair["name"])
            change = "-"
            if base.ours is not None and imp.ours is not None and base.ours != 0:
                change = f"{imp.ours - base.ours:+.4g} ({(imp.ours / base.ours - 1) * 100:+.1f}%)"
            lines.append(
                f"| {base.name} | {imp.metric} | {_fmt(base.book)} | {_fmt(base.ours, base.std)} | {imp.name} | "
                f"{_fmt(imp.ours, imp.std) if imp.status == 'completed' else imp.status} | {change} | "
                f"{imp.duration_s:.0f} s |"
            )
        lines += ["", "What each improved preset changes is written at the top of its file in `conf/experiment/`."]
    lines += ["", "## Figures", ""]
    for r in book:
        run_dir = r.runs[0].run_dir
        for file, caption in FIGURES.items():
            if (run_dir / "figures" / file).exists():
                rel = (run_dir / "figures" / file).relative_to(out)
                lines += [f"**{r.name}** (seed {r.runs[0].seed}): {caption}", "", f"![{r.name} {caption}]({rel})", ""]
    for r in book + improved:
        sample = r.runs[0].run_dir / "samples.txt"
        if sample.exists():
            lines += [
                f"## Generated text ({r.name}, seed {r.runs[0].seed})",
                "",
                "```",
                sample.read_text(encoding="utf-8").rstrip("\n"),
                "```",
                "",
            ]
    versions = env.get("versions") or {}
    lines += [
        "## Environment",
        "",
        f"- device: {env.get('device')}" + (f" ({env['gpu']})" if env.get("gpu") else ""),
        f"- machine: {env['machine']}",
        f"- python {versions.get('python')}, torch {versions.get('torch')}, dlfs {versions.get('dlfs')}, "
        f"git {versions.get('git')}",
        f"- seeds: {', '.join(map(str, report['seeds']))}",
        f"- date: {env['date']}",
        "",
        "Each experiment's runs are full run folders under this folder (`<experiment>/seed<N>/`); "
        "`report.json` holds the same numbers.",
        "",
    ]
    return "\n".join(lines)


def _print(book: list[Result], improved: list[Result], out: Path, seconds: float) -> None:
    from rich.table import Table

    from dlfs_cli.runs import table_console

    console = table_console()
    table = Table()
    for name in ["experiment", "metric", "book", "ours", "tolerance", "result", "duration_s"]:
        table.add_column(name, justify="right" if name in ("book", "ours", "duration_s") else "left")
    for r in book + improved:
        verdict = _verdict(r)
        style = {"pass": "green", "FAIL": "red"}.get(verdict, "yellow")
        table.add_row(
            r.name,
            r.metric,
            _fmt(r.book) if r in book else "",
            _fmt(r.ours, r.std),
            r.tolerance or "" if r in book else "",
            f"[{style}]{verdict}[/{style}]" if r in book else ("" if r.status == "completed" else r.status),
            f"{r.duration_s:.0f}",
        )
    console.print(table)
    console.print(f"report: {out / REPORT_MD} ({seconds:.0f} s)", highlight=False)
