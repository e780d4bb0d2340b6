"""`dlfs diff RUN_A RUN_B`: what differs between two run folders (config, run facts, final metrics), and
with --plot FILE.png both runs' loss curves on one figure.

Only the run folders' text files are read (config.yaml, summary.json, metrics.csv): no torch, so the
diff is instant. matplotlib is imported only for --plot.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from dlfs_cli.errors import DlfsError
from dlfs_cli.runs import Run, fmt, metric_keys, read_run, table_console, unreadable_reason
from dlfs_cli.tracking import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, Losses, read_losses, spans_decades

MISSING = "-"  # a key or value one of the runs does not have


@dataclass
class Side:
    """One of the two runs: its folder's summary and its resolved config, flattened to dotted keys."""

    run: Run
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.run.path.resolve().name or str(self.run.path)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, as every dlfs error (argparse prints usage too)
        raise DlfsError(f"dlfs diff: {message} (see dlfs diff --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dlfs diff", description="Compare two run folders: config, run facts and final metrics.")
    p.add_argument("run_a", metavar="RUN_A", help="a run folder (the baseline: deltas are B - A)")
    p.add_argument("run_b", metavar="RUN_B", help="another run folder")
    p.add_argument("--plot", metavar="FILE.png", type=Path, help="write both runs' loss curves to this PNG")
    return p


def diff(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.plot is not None:
        _check_plot_path(args.plot)  # before anything is printed: a bad path leaves no half-done output
    a, b = _load(Path(args.run_a)), _load(Path(args.run_b))
    curves = [_curve(side.run.path) for side in (a, b)] if args.plot is not None else []
    console = table_console()
    console.print(f"A: {a.run.path}\nB: {b.run.path}", markup=False, highlight=False)
    _print_config(console, a, b)
    _print_run(console, a, b)
    _print_metrics(console, a, b)
    if args.plot is not None:
        plot(args.plot, [_label(a, b, 0), _label(a, b, 1)], curves)
        console.print(f"plot: {args.plot}", markup=False, highlight=False)
    return 0  # differences are what was asked for, not an error


# --- reading the two folders ----------------------------------------------------------------


def _load(path: Path) -> Side:
    if not path.is_dir():
        raise DlfsError(f"{path}: no such folder" if not path.exists() else f"{path}: not a folder")
    for name in (SUMMARY_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise DlfsError(f"{path}: not a run folder (no {name})")
    run = read_run(path)
    if run is None or run.status == "unreadable":  # read_run keeps a bad summary.json or .hydra/ file as a row
        raise DlfsError(f"{path}: {run.summary.error if run else 'not a run folder'}")
    try:
        config = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as ex:
        raise DlfsError(f"{path / CONFIG_FILE}: unreadable: {unreadable_reason(ex)}") from None
    if not isinstance(config, dict):
        kind = "an empty file" if config is None else f"a YAML {type(config).__name__}"
        raise DlfsError(f"{path / CONFIG_FILE}: not a config ({kind}, not a mapping)")
    return Side(run, flatten(config))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optimizer': {'lr': 0.1}} -> {'optimizer.lr': 0.1}; lists and empty mappings stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _curve(path: Path) -> Losses:
    """The loss column of metrics.csv by split, or a one-line error naming the file."""
    try:
        return read_losses(path / METRICS_FILE)
    except FileNotFoundError:
        raise DlfsError(f"{path}: no {METRICS_FILE} to plot") from None
    except (OSError, csv.Error, ValueError, TypeError, KeyError) as ex:  # TypeError: a row with no step
        raise DlfsError(f"{path / METRICS_FILE}: unreadable: {' '.join(str(ex).split())[:200]}") from None


# --- the three tables -----------------------------------------------------------------------


def _show(value: Any) -> str:
    """A config value as YAML spells it; str(), not fmt(): 4 digits could hide the difference."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _table(*columns: str, numeric: int = 0) -> Any:
    from rich.table import Table

    table = Table()
    for i, name in enumerate(columns):
        table.add_column(name, justify="right" if i >= len(columns) - numeric else "left", overflow="fold")
    return table


def _print_config(console: Any, a: Side, b: Side) -> None:
    from rich.markup import escape

    keys = list(dict.fromkeys([*a.config, *b.config]))
    differ = [k for k in keys if k not in a.config or k not in b.config or a.config[k] != b.config[k]]
    if not differ:
        console.print(f"config: identical ({len(keys)} keys)", highlight=False)
        return
    table = _table("config key", "A", "B")
    for key in differ:
        shown = [_show(s.config[key]) if key in s.config else MISSING for s in (a, b)]
        table.add_row(escape(key), *map(escape, shown))
    console.print(f"config: {len(differ)} of {len(keys)} keys differ", highlight=False)
    console.print(table)


def _facts(run: Run) -> dict[str, str]:
    s = run.summary
    facts = {
        "status": run.status,
        "epochs": f"{fmt(s.epochs_completed) or '?'}/{fmt(s.epochs) or '?'}",  # completed / asked for
        "seed": fmt(s.seed),
        "device": fmt(s.device),
        "duration_s": fmt(s.duration_s),
    }
    return facts | {f"versions.{k}": fmt(v) for k, v in (s.versions or {}).items()}


def _print_run(console: Any, a: Side, b: Side) -> None:
    from rich.markup import escape

    fa, fb = _facts(a.run), _facts(b.run)
    keys = list(dict.fromkeys([*fa, *fb]))
    differ = [k for k in keys if fa.get(k) != fb.get(k)]
    if not differ:
        console.print("run: same status, epochs, seed, device, duration and versions", highlight=False)
        return
    table = _table("run", "A", "B")
    for key in differ:
        table.add_row(key, *(escape(f.get(key) or MISSING) for f in (fa, fb)))
    console.print(f"run: {len(differ)} of {len(keys)} facts differ", highlight=False)
    console.print(table)


def _print_metrics(console: Any, a: Side, b: Side) -> None:
    keys = metric_keys([a.run, b.run])
    if not keys:
        console.print("metrics: neither run has final metrics", highlight=False)
        return
    table = _table("metric", "A", "B", "B - A", "change", numeric=4)
    for key in keys:
        va, vb = a.run.metrics.get(key), b.run.metrics.get(key)
        delta = relative = MISSING
        if va is not None and vb is not None:
            delta = f"{vb - va:+.4g}"
            relative = f"{(vb - va) / abs(va) * 100:+.1f}%" if va else MISSING  # no percentage of zero
        table.add_row(key, fmt(va) or MISSING, fmt(vb) or MISSING, delta, relative)
    console.print("metrics (final):", highlight=False)
    console.print(table)


# --- --plot ---------------------------------------------------------------------------------


def _check_plot_path(path: Path) -> None:
    if path.suffix.lower() != ".png":
        raise DlfsError(f"--plot {path}: the file must end in .png")
    if path.is_dir():
        raise DlfsError(f"--plot {path}: is a folder; give a file name ending in .png")
    if not path.parent.is_dir():
        raise DlfsError(f"--plot {path}: no such folder {path.parent}")


def _label(a: Side, b: Side, i: int) -> str:
    """The run folder's name; A/B in front when the two folders have the same name (sweep jobs 0 and 0)."""
    side = (a, b)[i]
    return side.name if a.name != b.name else f"{'AB'[i]}: {side.name}"


def plot(path: Path, labels: list[str], curves: list[Losses]) -> Path:
    """Train loss as a line, val and test as markers, one colour per run; log y over a wide range."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for colour, label, curve in zip(("C0", "C1"), labels, curves, strict=True):
        for split, style in (("train", "-"), ("val", "o"), ("test", "s")):
            if curve[split]:
                steps, losses = zip(*curve[split], strict=True)
                ax.plot(steps, losses, style, color=colour, label=f"{label} {split}")
    every_loss = [loss for curve in curves for points in curve.values() for _, loss in points]
    if spans_decades(every_loss):  # as figures.loss_curves
        ax.set_yscale("log")
    ax.set(xlabel="training step", ylabel="loss", title=f"loss: {labels[0]} vs {labels[1]}")
    ax.grid(alpha=0.3)
    if every_loss:
        ax.legend()
    # figures._save's steps, not the function: dlfs_cli.figures imports torch
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as ex:
        raise DlfsError(f"--plot {path}: cannot write: {ex.strerror or ex}") from None
    finally:
        plt.close(fig)
    return path
