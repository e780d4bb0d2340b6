"""`dlfs reproduce`: the book's chapter-7 table, re-run and compared number by number.

Each experiment of `conf/reproduce.yaml`'s targets is an ordinary `experiment/` preset, run once per
seed with `train()` into a run folder of its own inside the reproduction's folder; then REPORT.md
and report.json say, for every number the book printed, what this machine got and whether its mean
lies in the band that the book's own code spans (each target's `reference`: that code re-run at
several seeds). Our improved presets run the same way for a second table, placed against that band.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from hydra import compose
from omegaconf import DictConfig

from dlfs_cli.config import Direction, reported_metrics
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
NOT_COMPARED = "not compared"  # quick=true: tiny data, whose numbers say nothing about the book
BEYOND, WITHIN, WORSE = "beyond the book", "within the book's band", "worse than the book"


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
    """One experiment over its seeds, against the band of the book's own code for one of its numbers."""

    name: str
    target: Any  # the Target (conf/reproduce.yaml) of this preset, or of the book preset it improves on
    band: tuple[float, float]
    runs: list[SeedRun]
    ours: float | None = None  # the mean over the seeds, once all of them completed
    std: float | None = None
    status: str = "completed"  # or "not run: <reason>", "failed: <reason>"
    verdict: str = ""  # yes | no (a book preset in its band); beyond the book | ... (improved); not compared; status

    @property
    def duration_s(self) -> float:
        return sum(r.duration_s for r in self.runs)

    @property
    def in_band(self) -> bool | None:
        """Whether our mean lies in the band; None when not compared (quick, or runs that did not complete)."""
        return {"yes": True, "no": False}.get(self.verdict)


def band(values: Sequence[float], n: int, sigmas: float) -> tuple[float, float]:
    """Where the mean of n runs of the book's code falls: the reference's mean +- sigmas standard errors of
    the difference between a mean of n runs and the reference's own mean of len(values) runs."""
    m, s = statistics.fmean(values), statistics.stdev(values)
    half = sigmas * s * math.sqrt(1 / n + 1 / len(values))
    return m - half, m + half


def side(x: float, low_high: tuple[float, float]) -> int:
    """-1 below the band, 0 inside it (ends included), 1 above it."""
    return -1 if x < low_high[0] else 1 if x > low_high[1] else 0


def check_targets(cfg: DictConfig) -> None:
    """The reference of every target is consistent with itself: the yaml's mean and std are what its values
    give (to the digits written there), one value per seed, and a direction to be better in."""
    if not cfg.band_sigmas > 0:
        raise DlfsError(f"band_sigmas: {cfg.band_sigmas} must be > 0")
    for t in cfg.targets:
        ref, values, where = t.reference, _values(t), f"targets: {t.experiment}'s reference"
        if len(values) < 2 or len(ref.seeds) != len(values):
            count = f"{len(ref.seeds)} seeds, {len(values)} values"
            raise DlfsError(f"{where} needs one value per seed, and at least two ({count})")
        if t.better not in (Direction.minimize, Direction.maximize):
            raise DlfsError(f"targets: {t.experiment}'s better must be minimize or maximize, not {t.better.value}")
        for key, actual in (("mean", statistics.fmean(values)), ("std", statistics.stdev(values))):
            if not _agrees(ref[key], actual):
                raise DlfsError(f"{where}.{key} {ref[key]:g} disagrees with its values, whose {key} is {actual:.4g}")


def _values(target: Any) -> list[float]:
    return list(target.reference["values"])  # by key: a DictConfig's .values is the mapping's method


def _agrees(recorded: float, actual: float) -> bool:
    """`recorded` is `actual` rounded to the digits it shows: 16.89 stands for 16.885 .. 16.895 (a whole
    number for +- 0.5; 1e-12 of slack for the binary floats)."""
    exponent = Decimal(repr(recorded)).normalize().as_tuple().exponent
    last = min(exponent, 0) if isinstance(exponent, int) else 0
    return abs(recorded - actual) <= 0.5 * 10.0**last + 1e-12 * abs(actual)


def reproduce(cfg: DictConfig, out: Path) -> int:
    """Run the targets (and the improved presets) into `out`; write the report; the exit code."""
    start = time.monotonic()
    check_targets(cfg)
    targets = list(cfg.targets)
    known = {t.experiment for t in targets}
    if cfg.only is not None:  # None (the default) is every target; an empty list would run nothing, or all
        if not cfg.only:
            raise DlfsError(f"only: give at least one experiment, or leave it out for all: {', '.join(sorted(known))}")
        unknown = [name for name in cfg.only if name not in known]
        if unknown:
            raise DlfsError(f"only: unknown experiment {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        twice = sorted({name for name in cfg.only if list(cfg.only).count(name) > 1})
        if twice:  # each experiment runs once: a repeat would say more than it does
            raise DlfsError(f"only: {', '.join(twice)} given more than once; each experiment runs once")
        targets = [t for t in targets if t.experiment in cfg.only]
    if not cfg.seeds:
        raise DlfsError("seeds: give at least one seed, e.g. seeds=[0]")
    # each seed is one run folder (<experiment>/seed<N>/): a repeat would train into it again, and count twice
    repeated = sorted({seed for seed in cfg.seeds if list(cfg.seeds).count(seed) > 1})
    if repeated:
        raise DlfsError(f"seeds: {', '.join(map(str, repeated))} given more than once; each seed runs once")
    _check_metrics(cfg, targets)
    out.mkdir(parents=True, exist_ok=True)

    book = [_experiment(cfg, out, t.experiment, t) for t in targets]
    improved = []
    if cfg.improved:
        improved = [_experiment(cfg, out, t.improved, t) for t in targets if t.improved]
    report = _report_json(cfg, book, improved, time.monotonic() - start, out)
    write_atomic(out / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    write_atomic(out / REPORT_MD, _report_md(cfg, report, book, improved, out))
    _print(cfg, book, improved, out, report["duration_s"])
    if cfg.quick:  # tiny data: the numbers mean nothing, only that everything ran
        return 0 if all(r.status == "completed" for r in book + improved) else 1
    return 0 if all(r.in_band for r in book) else 1


def _check_metrics(cfg: DictConfig, targets: list[Any]) -> None:
    """Each target's metric is one its experiments report: targets.N.metric=test_nope trained them all, then
    failed."""
    for t in targets:
        for name in [t.experiment, *([t.improved] if cfg.improved and t.improved else [])]:
            overrides = [f"experiment={name}", *(cfg.quick_overrides.get(name, []) if cfg.quick else [])]
            known = reported_metrics(compose(config_name="train", overrides=overrides))
            if t.metric not in known:
                reports = ", ".join(known)
                raise DlfsError(f"targets: {t.experiment}'s metric {t.metric} is not one {name} reports: {reports}")


def _experiment(cfg: DictConfig, out: Path, name: str, target: Any) -> Result:
    runs = [_run(cfg, out, name, seed) for seed in cfg.seeds]
    result = Result(name, target, band(_values(target), len(runs), cfg.band_sigmas), runs)
    done = [r.metrics[target.metric] for r in runs if r.status == "completed" and target.metric in r.metrics]
    bad = next((r for r in runs if r.status != "completed"), None)
    if bad is not None:
        result.status = f"{bad.status}: {bad.error}" if bad.error else bad.status
    elif len(done) < len(runs):
        result.status = f"failed: no {target.metric} in the runs' metrics (they have {', '.join(runs[0].metrics)})"
    if done:
        result.ours = statistics.fmean(done)
        result.std = statistics.stdev(done) if len(done) > 1 else None
    if result.status != "completed" or result.ours is None:
        result.verdict = result.status
    elif cfg.quick:
        result.verdict = NOT_COMPARED
    elif name == target.experiment:
        result.verdict = "no" if side(result.ours, result.band) else "yes"
    else:  # an improved preset: on which side of the book's band
        better = -1 if target.better == Direction.minimize else 1
        result.verdict = {0: WITHIN, better: BEYOND, -better: WORSE}[side(result.ours, result.band)]
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
        # quick's tiny batches gain nothing from a second thread, and stall on it while other work holds a core
        metrics = train(child, run_dir, threads=1 if cfg.quick else None)
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
        t, ref, values = r.target, r.target.reference, _values(r.target)
        return {
            "name": r.name,
            "metric": t.metric,
            "better": t.better.value,
            "book": t.book,
            "book_in_band": side(t.book, r.band) == 0,
            "band": {"low": r.band[0], "high": r.band[1]},
            "band_sigmas": cfg.band_sigmas,
            "reference": {
                "script": ref.script,
                "seeds": list(ref.seeds),
                "values": values,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values),
                "measured": ref.measured,
            },
            "ours": r.ours,
            "std": r.std,
            "in_band": r.in_band,
            "verdict": r.verdict,
            "status": r.status,
            "run_dir": str(r.runs[0].run_dir.relative_to(out)),
            "duration_s": round(r.duration_s, 1),
            "seeds": [
                {**asdict(run), "run_dir": str(run.run_dir.relative_to(out)), "duration_s": round(run.duration_s, 1)}
                for run in r.runs
            ],
        }

    by_name = {r.name: r for r in book}
    return {
        "experiments": [entry(r) for r in book],
        # each improved preset with its book preset's mean here (the table's "change")
        "improved": [
            {"book_preset": r.target.experiment, "book_preset_ours": by_name[r.target.experiment].ours, **entry(r)}
            for r in improved
        ],
        "all_in_band": None if cfg.quick else bool(book) and all(r.in_band for r in book),
        "quick": bool(cfg.quick),
        "band_sigmas": cfg.band_sigmas,
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


def _band(r: Result) -> str:
    return f"{r.band[0]:.4g}-{r.band[1]:.4g}"


def _book_in_band(r: Result) -> str:
    return "yes" if side(r.target.book, r.band) == 0 else "no"


def _change(base: Result, imp: Result) -> str:
    """The improved preset's mean against the book preset's, here."""
    if base.ours is None or imp.ours is None or base.ours == 0:
        return "-"
    return f"{imp.ours - base.ours:+.4g} ({(imp.ours / base.ours - 1) * 100:+.1f}%)"


def _report_md(cfg: DictConfig, report: dict, book: list[Result], improved: list[Result], out: Path) -> str:
    env = report["environment"]
    n = len(report["seeds"])
    if cfg.quick:
        done = sum(r.status == "completed" for r in book + improved)
        headline = f"**quick=true**: {done} of {len(book + improved)} presets ran to the end"
    else:
        in_band = sum(r.in_band is True for r in book)
        headline = f"**{in_band} of {len(book)}** experiments in the band of the book's own code"
    lines = [
        "# Deep Learning from Scratch, chapter 7: reproduced",
        "",
        f"`{env['command']}`, {env['date']}: {headline}, in {report['duration_s']:.0f} s.",
        "",
    ]
    if cfg.quick:
        lines += [
            "quick=true runs tiny offline data (digits, a few batches): these numbers say nothing about the "
            "book and are not compared with it. Run `dlfs reproduce` without it for the comparison.",
            "",
        ]
    lines += [
        f"Each band is where the mean of {n} seed(s) of the book's own code falls: the mean m and standard "
        f"deviation s of that code re-run at the reference's seeds (`conf/reproduce.yaml`), "
        f"m +- {cfg.band_sigmas:g} s sqrt(1/{n} + 1/n_reference). An experiment is in band when our mean over the "
        "seeds lies inside it; *book in band?* says whether the number the book printed does.",
        "",
        "| experiment | metric | book | band | book in band? | ours | in band | seeds | duration |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in book:
        lines.append(
            f"| {r.name} | {r.target.metric} | {_fmt(r.target.book)} | {_band(r)} | {_book_in_band(r)} | "
            f"{_fmt(r.ours, r.std)} | {r.verdict} | {len(r.runs)} | {r.duration_s:.0f} s |"
        )
    if improved:
        by_name = {r.name: r for r in book}
        lines += [
            "",
            "## Beyond the book",
            "",
            "The same models with settings of ours (each an `experiment/` preset you can run alone: "
            "`dlfs train experiment=<preset>`), to show what the book's choices cost. An improved preset is "
            f'"{BEYOND}" when its mean lies outside the book\'s band on the better side, "{WITHIN}" when inside, '
            f'"{WORSE}" when outside on the other side.',
            "",
            "| experiment | metric | band | book's settings, here | improved preset | improved | change | verdict "
            "| duration |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for imp in improved:
            base = by_name[imp.target.experiment]
            lines.append(
                f"| {base.name} | {imp.target.metric} ({imp.target.better.value}) | {_band(imp)} | "
                f"{_fmt(base.ours, base.std)} | {imp.name} | {_fmt(imp.ours, imp.std)} | {_change(base, imp)} | "
                f"{imp.verdict} | {imp.duration_s:.0f} s |"
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
        "`report.json` holds the same numbers, with each band's reference values.",
        "",
    ]
    return "\n".join(lines)


STYLES = {"yes": "green", BEYOND: "green", "no": "red", WORSE: "red", WITHIN: "yellow", NOT_COMPARED: "dim"}


def _print(cfg: DictConfig, book: list[Result], improved: list[Result], out: Path, seconds: float) -> None:
    from rich.table import Table

    from dlfs_cli.runs import table_console

    def styled(verdict: str) -> str:
        style = STYLES.get(verdict, "yellow")  # yellow: a run that did not complete
        return f"[{style}]{verdict}[/{style}]"

    console = table_console()
    title = "quick=true: tiny data, not compared with the book" if cfg.quick else None
    table = Table(title=title)
    for name in ["experiment", "metric", "book", "band", "book in band?", "ours", "in band", "seeds", "duration_s"]:
        table.add_column(name, justify="right" if name in ("book", "band", "ours", "duration_s") else "left")
    for r in book:
        table.add_row(
            r.name, r.target.metric, _fmt(r.target.book), _band(r), _book_in_band(r), _fmt(r.ours, r.std),
            styled(r.verdict), str(len(r.runs)), f"{r.duration_s:.0f}",
        )  # fmt: skip
    console.print(table)
    if improved:
        by_name = {r.name: r for r in book}
        table = Table(title="beyond the book")
        for name in ["improved preset", "metric", "book's band", "book's settings", "improved", "change", "verdict"]:
            table.add_column(name, justify="left" if name in ("improved preset", "metric", "verdict") else "right")
        table.add_column("duration_s", justify="right")
        for imp in improved:
            base = by_name[imp.target.experiment]
            table.add_row(
                imp.name, imp.target.metric, _band(imp), _fmt(base.ours, base.std), _fmt(imp.ours, imp.std),
                _change(base, imp), styled(imp.verdict), f"{imp.duration_s:.0f}",
            )  # fmt: skip
        console.print(table)
    console.print(f"report: {out / REPORT_MD} ({seconds:.0f} s)", highlight=False)
