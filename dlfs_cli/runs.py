"""Reading run folders back, and `dlfs runs [PATH]`: a table of the runs found under PATH.

Only the run folders' small text files are read (summary.json, .hydra/overrides.yaml): no torch,
so listing hundreds of runs takes a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from dlfs_cli import runlock
from dlfs_cli.errors import DlfsError
from dlfs_cli.summary import Summary
from dlfs_cli.tracking import SUMMARY_FILE

OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
STATUSES = ("completed", "running", "killed", "diverged", "interrupted", "failed", "skipped", "unknown", "unreadable")
# Keys that only pick the random draws: runs that differ in nothing else are seeds of one setting.
SEED_KEYS = frozenset({"seed"})
# Overrides that say where a run goes or how it is shown, not what it is: left out of the tables.
HIDDEN_KEYS = ("hydra.", "figures.", "sweep.")


@dataclass
class Run:
    """What a run folder says about itself."""

    path: Path
    summary: Summary
    overrides: dict[str, str] = field(default_factory=dict)
    job: int | None = None  # its number in a sweep

    @property
    def status(self) -> str:
        status = "failed" if self.summary.status is None else self.summary.status
        return status if status in STATUSES else "unreadable"

    @property
    def metrics(self) -> dict[str, float]:
        return self.summary.metrics or {}


def read_run(path: Path) -> Run | None:
    """The run in `path`, or None when it is not a run folder (another command's folder, like a
    reproduction's, holds runs instead). A training folder without summary.json yet is `unknown`:
    starting, or killed before its first file."""
    overrides: dict[str, str] = {}
    job, command = None, None
    if (path / OVERRIDES_FILE).is_file():
        try:
            for item in yaml.safe_load((path / OVERRIDES_FILE).read_text()) or []:
                key, _, value = str(item).partition("=")
                overrides[key.lstrip("+~")] = value
            hydra = (yaml.safe_load((path / ".hydra" / "hydra.yaml").read_text()) or {}).get("hydra") or {}
            job, command = hydra.get("job", {}).get("num"), hydra.get("job", {}).get("name")
        except (OSError, yaml.YAMLError, AttributeError):
            pass
    try:
        summary = Summary.load(path / SUMMARY_FILE)
    except FileNotFoundError:
        if command != "train":
            return None
        summary = Summary(status="unknown", error="no summary.json: starting, or ended before it began (killed?)")
    except (OSError, ValueError) as ex:  # one malformed folder never hides the others
        summary = Summary(status="unreadable", error=f"unreadable summary.json: {str(ex)[:200]}")
    if summary.status == "running" and runlock.holder(path) is None:
        summary.update(status="killed", error="no process is writing it: killed or crashed (resume it)")
    return Run(path, summary, overrides, job if isinstance(job, int) else None)


def find_runs(root: Path) -> list[Run]:
    """Every run folder under `root` (itself included), without descending into a run's own files."""
    runs = []
    for folder, subdirs, files in os.walk(root):
        here = Path(folder)
        if SUMMARY_FILE in files or (here / OVERRIDES_FILE).is_file():
            run = read_run(here)
            if run is not None:
                runs.append(run)
                subdirs.clear()
                continue
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    return runs


def varying_keys(runs: Iterable[Run]) -> list[str]:
    """Override keys whose value differs between the runs (or is missing from some), in first-seen order."""
    runs = list(runs)
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(k for k in run.overrides if not k.startswith(HIDDEN_KEYS)))
    return [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]


def metric_keys(runs: Iterable[Run]) -> list[str]:
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run.metrics))
    return list(keys)


def table_console() -> Any:
    """A rich console; written to a file or a pipe it is wide enough that no column is cut short."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=240)


def fmt(value: Any, std: float | None = None, std_digits: int = 3) -> str:
    """A number for a table: a float to 4 significant digits (with `+- std` when given), None empty."""
    if value is None:
        return ""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if std is None else f"{text} +- {std:.{std_digits}g}"


# --- dlfs runs -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, as every dlfs error (argparse prints usage too)
        raise DlfsError(f"dlfs runs: {message} (see dlfs runs --help)")


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dlfs runs",
        description="List the runs under PATH (single runs and sweep jobs) from their run-folder files.",
    )
    p.add_argument("path", nargs="?", default=os.environ.get("DLFS_OUTPUTS", "outputs"), help="default: outputs/")
    p.add_argument("--model", help="only runs of this model (boston, mnist_cnn, lstm_charmodel, autoencoder)")
    p.add_argument("--status", choices=STATUSES, help="only runs with this status")
    p.add_argument(
        "--sort", default="started", help="a column: started (default), duration, epochs, status, model, run, a metric"
    )
    p.add_argument("--reverse", action="store_true", help="sort descending")
    p.add_argument("--limit", type=_non_negative, default=None, help="show at most N runs (after sorting), N >= 0")
    return p


def _sort_key(run: Run, key: str) -> tuple:
    """Runs without the value go last; numbers sort as numbers."""
    value: Any = {
        "started": run.summary.started_at,
        "duration": run.summary.duration_s,
        "epochs": run.summary.epochs_completed,
        "status": run.status,
        "model": run.summary.model,
        "run": str(run.path),
    }.get(key, run.metrics.get(key, run.overrides.get(key)))
    if value is None:
        return (1, 0, "")
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (0, 0, str(value))


def list_runs(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    root = Path(args.path)
    if not root.is_dir():
        raise DlfsError(f"{root}: no such folder (dlfs runs lists the run folders under a folder, default outputs/)")
    runs = find_runs(root)
    if args.model:
        runs = [r for r in runs if r.summary.model == args.model]
    if args.status:
        runs = [r for r in runs if r.status == args.status]
    overrides = {k for r in runs for k in r.overrides}
    columns = {"started", "duration", "epochs", "status", "model", "run", *metric_keys(runs), *overrides}
    if args.sort not in columns and runs:
        raise DlfsError(f"--sort {args.sort}: no such column; valid: {', '.join(sorted(columns))}")
    runs.sort(key=lambda r: _sort_key(r, args.sort), reverse=args.reverse)
    if args.reverse:  # runs without the value stay last
        runs.sort(key=lambda r: _sort_key(r, args.sort)[0])
    if args.limit is not None:
        runs = runs[: args.limit]
    print_runs(runs, root)
    return 0


def print_runs(runs: list[Run], root: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table()
    overrides, metrics = varying_keys(runs), metric_keys(runs)
    for name in ["run", "model", "status", *overrides, *metrics, "epochs", "duration_s", "started"]:
        numeric = name in metrics or name in ("epochs", "duration_s")
        table.add_column(name, justify="right" if numeric else "left", overflow="fold")
    for run in runs:
        s = run.summary
        epochs = f"{fmt(s.epochs_completed)}/{s.epochs}" if s.epochs is not None else ""
        table.add_row(
            escape(str(run.path.relative_to(root)) if run.path != root else str(root)),
            escape(s.model or ""),
            _styled(run.status),
            *(escape(run.overrides.get(k, "")) for k in overrides),
            *(fmt(run.metrics.get(k)) for k in metrics),
            epochs,
            fmt(s.duration_s),
            escape((s.started_at or "")[:19].replace("T", " ")),
        )
    console = table_console()
    console.print(f"{len(runs)} run(s) under {root}", highlight=False)
    console.print(table)
    for run in runs:
        if run.status in ("unreadable", "killed"):
            where = run.path.relative_to(root) if run.path != root else root
            console.print(f"  {where}: {run.status}: {run.summary.error or ''}", markup=False, highlight=False)


def _styled(status: str) -> str:
    colour = {"completed": "green", "running": "cyan", "interrupted": "yellow", "killed": "yellow"}.get(status, "red")
    return f"[{colour}]{status}[/{colour}]"
