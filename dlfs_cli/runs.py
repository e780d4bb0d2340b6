"""Reading run folders back, and `dlfs runs [PATH]`: a table of the runs found under PATH.

The default table fits in 100 characters for any mix of models and sweeps (run, model, status, epochs, the
validation loss, the model's test metric, duration, started; the varying overrides when they fit);
--columns and --all show more, --format csv|json every column for scripts.

Only the run folders' small text files are read (summary.json, .hydra/overrides.yaml): no torch,
so listing hundreds of runs takes a fraction of a second.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from dlfs_cli import runlock
from dlfs_cli.errors import DlfsError
from dlfs_cli.summary import FIELDS, Summary
from dlfs_cli.system import outputs_root
from dlfs_cli.tracking import SUMMARY_FILE

OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
HYDRA_FILE = Path(".hydra") / "hydra.yaml"
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
    starting, or killed before its first file. A folder whose files cannot be read or are malformed
    (summary.json, .hydra/overrides.yaml, .hydra/hydra.yaml) is `unreadable`, the reason in its error;
    what summary.json holds is kept when that file could be read."""
    overrides: dict[str, str] = {}
    job, command, problems = None, None, []
    if _is_file(path / OVERRIDES_FILE):
        try:
            overrides = _overrides(_load_yaml(path, OVERRIDES_FILE))
        except _Unreadable as ex:
            problems.append(str(ex))
        try:
            job, command = _job(path)
        except _Unreadable as ex:
            problems.append(str(ex))
    try:
        summary = Summary.load(path / SUMMARY_FILE)
    except FileNotFoundError:
        if command != "train" and not problems:
            return None
        summary = Summary(status="unknown", error="no summary.json: starting, or ended before it began (killed?)")
    except (OSError, ValueError) as ex:  # one malformed folder never hides the others
        summary = Summary(status="unreadable", error=f"unreadable summary.json: {unreadable_reason(ex)}")
    if summary.status == "running" and runlock.holder(path) is None:
        summary.update(status="killed", error="no process is writing it: killed or crashed (resume it)")
    if problems:  # a run whose overrides cannot be read is not shown as though it had none
        problems += [summary.error] if summary.status == "unreadable" and summary.error else []
        summary.update(status="unreadable", error="; ".join(problems))
    return Run(path, summary, overrides, job if isinstance(job, int) else None)


class _Unreadable(Exception):
    """A run folder's file that cannot be read, or is not what Hydra writes there: the message names it."""


def unreadable_reason(ex: BaseException) -> str:
    """Why a file could not be read, in a few words on one line (its name is the caller's to give)."""
    if isinstance(ex, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(ex, OSError) and ex.strerror:
        return ex.strerror[:1].lower() + ex.strerror[1:]  # "permission denied": the path is named already
    if isinstance(ex, yaml.MarkedYAMLError) and ex.problem and ex.problem_mark:  # its own text spans lines
        return f"not YAML: {ex.problem} (line {ex.problem_mark.line + 1}, column {ex.problem_mark.column + 1})"
    return " ".join(str(ex).split())[:200]


def _is_file(path: Path) -> bool:
    """Path.is_file, but a file that is there and cannot be looked at (its folder lacks the x permission)
    counts: reading it then says why, where is_file would raise."""
    try:
        return path.is_file()
    except OSError:
        return True


# libyaml's parser where PyYAML has it (its wheels do): the pure-Python one took 9 ms a hydra.yaml
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read(run: Path, name: Path) -> str:
    try:
        return (run / name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as ex:
        raise _Unreadable(f"unreadable {name}: {unreadable_reason(ex)}") from None


def _load_yaml(run: Path, name: Path, text: str | None = None) -> Any:
    try:
        return yaml.load(_read(run, name) if text is None else text, Loader=YAML_LOADER)
    except yaml.YAMLError as ex:
        raise _Unreadable(f"unreadable {name}: {unreadable_reason(ex)}") from None


def _overrides(items: Any) -> dict[str, str]:
    """Hydra's overrides.yaml, a list of KEY=VALUE texts, as {KEY: VALUE}."""
    if items is None:  # an empty file: a run with no overrides
        return {}
    if not isinstance(items, list):
        raise _Unreadable(f"unreadable {OVERRIDES_FILE}: a YAML {type(items).__name__}, not a list of overrides")
    overrides = {}
    for i, item in enumerate(items, 1):
        if not isinstance(item, str):  # Hydra writes each override as text: anything else was not written by it
            raise _Unreadable(f"unreadable {OVERRIDES_FILE}: item {i} is a YAML {type(item).__name__}, not an override")
        key, _, value = item.partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def _job(run: Path) -> tuple[Any, Any]:
    """The job's number in its sweep and the command that made the folder, from Hydra's hydra.yaml (None
    for either when it is not there: a folder with overrides.yaml alone is still read)."""
    if not _is_file(run / HYDRA_FILE):
        return None, None
    text = _read(run, HYDRA_FILE)
    found = _job_as_hydra_writes_it(text)
    if found is not None:
        return found
    tree = _load_yaml(run, HYDRA_FILE, text)
    if tree is not None and not isinstance(tree, dict):
        raise _Unreadable(f"unreadable {HYDRA_FILE}: a YAML {type(tree).__name__}, not a mapping")
    hydra = (tree or {}).get("hydra")
    job = hydra.get("job") if isinstance(hydra, dict) else None
    return (job.get("num"), job.get("name")) if isinstance(job, dict) else (None, None)


_JOB_LINE = re.compile(r"    (name|num): ([A-Za-z0-9_]+|\?\?\?)")


def _job_as_hydra_writes_it(text: str) -> tuple[Any, Any] | None:
    """hydra.job.num and hydra.job.name read from the lines Hydra writes (OmegaConf.to_yaml: `hydra:`, then
    `  job:` with its keys indented 4), without parsing the whole file (`dlfs runs` over 2,000 runs parsed
    2,000 of them); None when the file is laid out otherwise, for the YAML parser to read or refuse."""
    if not text.startswith("hydra:\n") or "\n  job:\n" not in text:
        return None
    found: dict[str, str] = {}
    for line in text.split("\n  job:\n", 1)[1].splitlines():
        if not line.startswith("    "):  # the end of the job block
            break
        match = _JOB_LINE.fullmatch(line)
        if match:
            found[match[1]] = match[2]
    if set(found) != {"name", "num"}:
        return None
    return (int(found["num"]) if found["num"].isdigit() else None), found["name"]


def find_runs(root: Path, unlisted: bool = False) -> list[Run]:
    """Every run folder under `root` (itself included), without descending into a run's own files.
    unlisted: a folder below `root` that cannot be listed is a row too, `unreadable` with the reason
    (else skipped, as it always is by os.walk); `root` itself that cannot be listed is a DlfsError."""
    runs = []

    def cannot_list(ex: OSError) -> None:
        if ex.filename is None or Path(ex.filename) == root:
            raise DlfsError(f"{root}: cannot be read: {unreadable_reason(ex)}")
        if unlisted:  # it may hold runs: never left out without a word
            error = f"cannot list its files: {unreadable_reason(ex)}"
            runs.append(Run(Path(ex.filename), Summary(status="unreadable", error=error)))

    for folder, subdirs, files in os.walk(root, onerror=cannot_list):
        here = Path(folder)
        run = read_run(here) if SUMMARY_FILE in files or _is_file(here / OVERRIDES_FILE) else None
        if run is not None:
            runs.append(run)
            # a folder whose .hydra files cannot be read may be a reproduction's, with runs inside: looked in
            if run.status != "unreadable" or SUMMARY_FILE in files:
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

# The default table is at most this wide, whatever mix of models and sweeps it lists (a terminal narrower
# than this: its width). --all and --columns show what they are asked for, as wide as that takes.
TABLE_WIDTH = 100
# The run column gets at least this much room (or its longest path, when shorter) before the optional
# columns take what is left; paths longer than the room left are shortened in the middle.
RUN_WIDTH = 24
# The default columns, in the order shown. run, model, status, val and test are always there; the others
# (and the --sort column, and the varying overrides) when they fit, in this order of priority.
DEFAULT_COLUMNS = ("run", "model", "status", "epochs", "val", "test", "duration", "started")
_ALWAYS = ("run", "model", "status", "val", "test")
_OPTIONAL = ("epochs", "started", "duration")
# summary.json's names for what a default column shows: sorting by either does not add a column.
_SAME = {"duration_s": "duration", "started_at": "started", "epochs_completed": "epochs"}
# csv and json: every column, unabridged; the summary's own names for the values.
_MACHINE_HEAD = ("run", "model", "data", "status", "seed")
_MACHINE_TAIL = ("epochs_completed", "epochs", "duration_s", "started_at", "error")
_FORMATS = ("table", "csv", "json")


@dataclass
class Column:
    """A column of `dlfs runs`: its value for csv/json and sorting (`raw`, `sort`), its text in a table."""

    name: str
    raw: Callable[[Run], Any]
    text: Callable[[Run], str] | None = None  # default: fmt(raw)
    sort: Callable[[Run], Any] | None = None  # default: raw
    header: str | None = None  # default: name
    numeric: bool = False  # right-justified

    def cell(self, run: Run) -> str:
        return self.text(run) if self.text is not None else _text(self.raw(run))

    def sort_value(self, run: Run) -> Any:
        return (self.sort or self.raw)(run)


def _text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return "true" if value else "false"
    return fmt(value)


def primary_val(run: Run) -> str | None:
    """The metric a row's validation is judged by: val_loss; test_loss for a run without a validation split."""
    return next((k for k in ("val_loss", "test_loss") if k in run.metrics), None)


def primary_test(run: Run) -> str | None:
    """The test metric the book reports for the model: accuracy for a classifier (mnist_cnn), the mse for a
    regression (boston, autoencoder), the loss for a character model (lstm_charmodel, whose accuracy is
    a side metric); any test_* metric otherwise."""
    m = run.metrics
    order = ("test_mse", "test_loss") if "test_bpc" in m else ("test_accuracy", "test_mse", "test_loss")
    return next((k for k in order if k in m), next((k for k in m if k.startswith("test_")), None))


def _short_metric(name: str) -> str:
    short = name.removeprefix("test_").removeprefix("val_")
    return {"accuracy": "acc"}.get(short, short)


class _Columns:
    """Every column `dlfs runs` can show for these runs, by name; run paths relative to `base` (default: root)."""

    def __init__(self, runs: list[Run], root: Path, base: Path | None = None) -> None:
        self.runs, self.root, self.base = runs, root, base or root
        found = metric_keys(runs)  # validation metrics, then test metrics, then any other
        self.metrics = sorted(found, key=lambda k: 0 if k.startswith("val_") else 1 if k.startswith("test_") else 2)
        self.overrides = list(dict.fromkeys(k for r in runs for k in r.overrides))
        self.unknown = list(dict.fromkeys(k for r in runs for k in r.summary.unknown))
        self.started_mode, self.started_date = _started_mode(runs)
        vals = {primary_val(r) for r in runs} - {None}
        tests = {primary_test(r) for r in runs} - {None}
        # one metric for every row: its name heads the column; several: each cell names its own
        self.val_name = vals.pop() if len(vals) == 1 else "val_loss"
        self.test_name = tests.pop() if len(tests) == 1 else None

    def names(self) -> list[str]:
        """The names a column can be asked for by: the built-in ones, summary.json's, the metrics', the overrides'."""
        builtin = ["run", "model", "data", "seed", "status", "epochs", "val", "test", "duration", "started"]
        return list(dict.fromkeys([*builtin, *FIELDS, *self.metrics, *self.overrides, *self.unknown]))

    def get(self, name: str, lenient: bool = False) -> Column | None:
        """The column `name`; None when these runs have no such thing (lenient: an empty column, for a name
        that other runs under the folder have)."""
        name = name.strip()
        builtin = self._builtin(name)
        if builtin is not None:
            return builtin
        if name in FIELDS:
            return Column(name, lambda r: getattr(r.summary, name), numeric=name in ("duration_s", "parameters"))
        if name in self.metrics:
            return Column(name, lambda r: r.metrics.get(name), numeric=True)
        if name in self.overrides:
            return Column(name, lambda r: r.overrides.get(name))
        if name in self.unknown or lenient:
            return Column(
                name, lambda r: _first(r.metrics.get(name), r.overrides.get(name), r.summary.unknown.get(name))
            )
        return None

    def _builtin(self, name: str) -> Column | None:
        s = lambda r: r.summary  # noqa: E731
        if name == "run":
            return Column("run", self.relative, sort=lambda r: str(r.path))
        if name in ("model", "data", "seed"):  # the summary's, else the override's: one column, never two
            return Column(name, lambda r: _first(getattr(r.summary, name), r.overrides.get(name)))
        if name == "status":
            return Column("status", lambda r: r.status)
        if name == "epochs":  # completed/asked in a table; sorted by the epochs completed
            return Column("epochs", lambda r: s(r).epochs, self._epochs, lambda r: s(r).epochs_completed, numeric=True)
        if name == "duration":
            return Column("duration", lambda r: s(r).duration_s, lambda r: _duration(s(r).duration_s), numeric=True)
        if name == "started":
            return Column("started", lambda r: s(r).started_at, lambda r: self._started(s(r).started_at))
        if name == "val":  # its value (csv, json, --sort) is the val_loss alone; the table's falls back, starred
            return Column(
                "val", lambda r: r.metrics.get("val_loss"), self._val_text, header=self.val_name, numeric=True
            )
        if name == "test":
            return Column("test", self._test, self._test_text, header=self.test_name or "test", numeric=True)
        return None

    def relative(self, run: Run) -> str:
        return str(run.path.relative_to(self.base)) if run.path != self.base else str(self.base)

    def _epochs(self, run: Run) -> str:
        s = run.summary
        return f"{fmt(s.epochs_completed)}/{s.epochs}" if s.epochs is not None else fmt(s.epochs_completed)

    def _val_text(self, run: Run) -> str:
        key = primary_val(run)
        if key is None:
            return ""
        return fmt(run.metrics[key]) + ("*" if key != self.val_name else "")

    def _test(self, run: Run) -> float | None:
        key = primary_test(run)
        return None if key is None else run.metrics[key]

    def _test_text(self, run: Run) -> str:
        key = primary_test(run)
        if key is None:
            return ""
        return fmt(run.metrics[key]) if self.test_name else f"{_short_metric(key)} {fmt(run.metrics[key])}"

    def _started(self, started: str | None) -> str:
        if not started or len(started) < 16:
            return started or ""
        return {"time": started[11:19], "day": started[5:16], "full": started[:16]}[self.started_mode].replace("T", " ")

    def marked(self, run: Run) -> bool:
        """Whether the row's val cell is starred (its test_loss, for want of a validation split)."""
        return primary_val(run) not in (None, self.val_name)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None and v != ""), None)


def _started_mode(runs: list[Run]) -> tuple[str, str | None]:
    """How much of the start times a table needs: the time alone when every run started the same day
    (that day is named above the table), the month and day within one year, else the year too."""
    stamps = [r.summary.started_at for r in runs if r.summary.started_at and len(r.summary.started_at) >= 19]
    if stamps and len({s[:10] for s in stamps}) == 1:
        return "time", stamps[0][:10]
    return ("day" if len({s[:4] for s in stamps}) <= 1 else "full"), None


def _duration(seconds: float | None) -> str:
    """1.2s, 42s, 3m05s, 2h07m, 1d04h."""
    if seconds is None:
        return ""
    if seconds < 59.5:
        return f"{seconds:.2g}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours < 24 else f"{hours // 24}d{hours % 24:02d}h"


def shorten(path: str, width: int) -> str:
    """`path` in at most `width` characters: whole folder names dropped from its middle (the first and the
    last kept) when that still fills most of the width (multirun/…/12-00-00/3), else characters cut from its
    middle (repro/improv…armodel/seed0: a long folder name that tells the runs apart is kept in part)."""
    if cell_len(path) <= width:
        return path
    parts = path.split("/")
    by_folder = [
        *("/".join([parts[0], "…", *parts[-k:]]) for k in range(len(parts) - 2, 0, -1)),
        *("/".join(["…", *parts[-k:]]) for k in range(len(parts) - 1, 0, -1)),
    ]
    fits = [c for c in by_folder if cell_len(c) <= width]
    head = max(0, (width - 1) // 2)
    cut = path[:head] + "…" + path[len(path) - max(0, width - 1 - head) :] if width > 1 else "…"
    best = max(fits, key=cell_len, default="")
    return best if best and cell_len(best) >= width * 3 // 4 else cut


def cell_len(text: str) -> int:
    from rich.cells import cell_len as rich_cell_len

    return rich_cell_len(text)


# --- the command ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, as every dlfs error (argparse prints usage too)
        raise DlfsError(f"dlfs runs: {message} (see dlfs runs --help)")


def _limit(text: str) -> int:
    """--limit N: N >= 1. 0 is refused rather than read as "no limit" (leave --limit out for that) or as an
    empty table; a negative N is refused rather than counted from the end."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (--limit N lists the first N runs)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1 (leave --limit out to list every run)")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dlfs runs",
        description="List the runs under PATH (single runs and sweep jobs) from their run-folder files. "
        f"The table shows {', '.join(DEFAULT_COLUMNS)} in at most {TABLE_WIDTH} characters: val is the "
        "validation loss (a run without validation metrics: its test_loss, marked *), test the model's "
        "test metric (accuracy, mse or loss); the overrides that differ between the runs follow when they fit.",
    )
    p.add_argument("path", nargs="?", help="default: outputs/")
    p.add_argument("--model", help="only runs of this model (boston, mnist_cnn, lstm_charmodel, autoencoder)")
    p.add_argument("--status", choices=STATUSES, help="only runs with this status")
    p.add_argument(
        "--sort",
        default="started",
        help="any column: started (default), duration, epochs, status, model, run, val, test, a metric "
        "(test_accuracy), an override (optimizer.lr), a summary.json field; runs without it go last",
    )
    p.add_argument("--reverse", action="store_true", help="sort descending")
    p.add_argument("--limit", type=_limit, default=None, help="show at most N runs (after sorting), N >= 1")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument(
        "--columns",
        metavar="A,B,...",
        help="these columns, in this order: the default ones, a metric, an override key or a summary.json field",
    )
    shown.add_argument("--all", action="store_true", help="every column: the varying overrides and all metrics")
    p.add_argument(
        "--format",
        choices=_FORMATS,
        default="table",
        help="csv or json (a list of objects): every column (or --columns), unabridged, nothing else printed",
    )
    return p


def list_runs(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.path == "":  # Path("") is the working folder: an empty argument is a mistake, not a choice of "."
        parser.error("PATH is empty: name a folder, or leave it out to list outputs/")
    root = Path(args.path) if args.path is not None else outputs_root()
    try:
        is_dir = root.is_dir()
    except OSError as ex:  # a folder above it cannot be looked into
        raise DlfsError(f"{root}: cannot be read: {unreadable_reason(ex)}") from None
    if not is_dir:
        raise DlfsError(f"{root}: no such folder (dlfs runs lists the run folders under a folder, default outputs/)")
    everything = find_runs(root, unlisted=True)
    known = _Columns(everything, root)  # a name any run under PATH has is a column, whatever --model keeps
    runs = everything
    if args.model is not None:
        models = {m for m in map(_model, everything) if m is not None}
        valid = sorted(models | set(_known_models()))  # an old run's model that is gone from conf/ too
        if args.model not in valid:  # else a typo lists no run, as though there were none
            raise DlfsError(f"--model {args.model or repr('')}: no such model; valid: {', '.join(valid)}")
        runs = [r for r in runs if _model(r) == args.model]
    if args.status:
        runs = [r for r in runs if r.status == args.status]
    if everything and known.get(args.sort) is None:
        raise DlfsError(f"--sort {args.sort}: no such column; valid: {', '.join(sorted(known.names()))}")
    asked = _asked_columns(args.columns, known, everything) if args.columns is not None else None
    sort = _Columns(runs, root).get(args.sort, lenient=True)
    if sort is not None:
        runs.sort(key=lambda r: _sort_key(sort.sort_value(r)), reverse=args.reverse)
        if args.reverse:  # runs without the value stay last
            runs.sort(key=lambda r: _sort_key(sort.sort_value(r))[0])
    found = len(runs)
    if args.limit is not None:
        runs = runs[: args.limit]
    columns = _Columns(runs, root)  # the rows shown decide the headers and the start times' format
    if args.format != "table":
        _write_machine(args.format, _get(columns, asked or _machine_columns(columns)), runs)
    elif asked is not None or args.all:
        _print_table(columns, _get(columns, asked or _all_columns(columns)), found)
    else:
        _print_default(runs, root, args.sort, found)
    return 0


def _model(run: Run) -> str | None:
    return _first(run.summary.model, run.overrides.get("model"))


def _known_models() -> list[str]:
    """The models dlfs trains: conf/model/*.yaml (read, not imported: dlfs_cli.models imports torch)."""
    from dlfs_cli.config import conf_dir

    return sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))


def print_runs(runs: list[Run], root: Path) -> None:
    """The default table of these runs."""
    _print_default(runs, root, "started", len(runs))


def _get(columns: _Columns, names: list[str]) -> list[Column]:
    return [c for c in (columns.get(n, lenient=True) for n in names) if c is not None]


def _asked_columns(text: str, known: _Columns, runs: list[Run]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise DlfsError("--columns: name at least one column, e.g. --columns run,model,val_loss,test_accuracy")
    unknown = [n for n in names if known.get(n) is None]
    if unknown and runs:
        raise DlfsError(f"--columns {','.join(unknown)}: no such column; valid: {', '.join(sorted(known.names()))}")
    return list(dict.fromkeys(names))


def _sort_key(value: Any) -> tuple:
    """Runs without the value (or with NaN) go last; numbers sort as numbers."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return (1, 0, "")
    if isinstance(value, (dict, list)):
        return (0, 0, json.dumps(value, sort_keys=True))
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (0, 0, str(value))


def _varying(columns: _Columns) -> list[str]:
    """The overrides that differ between the runs, but model (the model column is the summary's or the override's)."""
    return [k for k in varying_keys(columns.runs) if k != "model"]


def _all_columns(columns: _Columns) -> list[str]:
    return ["run", "model", "status", *_varying(columns), *columns.metrics, "epochs", "duration", "started"]


def _machine_columns(columns: _Columns) -> list[str]:
    varying = [k for k in _varying(columns) if k not in _MACHINE_HEAD]
    return list(dict.fromkeys([*_MACHINE_HEAD, *varying, *columns.metrics, *_MACHINE_TAIL]))


@dataclass
class _Layout:
    columns: _Columns
    shown: list[Column]
    hidden: list[str]  # the columns left out for want of room
    room: int  # for the run paths


def _print_default(runs: list[Run], root: Path, sort_key: str, found: int) -> None:
    """The default table, in at most TABLE_WIDTH characters (a narrower terminal's width). When columns are
    left out and the runs all lie in one folder below PATH (a sweep's), the paths are shown from that folder,
    if that makes room for more columns."""
    width = min(table_console().width, TABLE_WIDTH)
    layout = _default_layout(_Columns(runs, root), sort_key, width)
    base = _common_folder(runs, root)
    if base != root and layout.hidden:
        shorter = _default_layout(_Columns(runs, root, base), sort_key, width)
        layout = shorter if len(shorter.hidden) < len(layout.hidden) else layout
    _print_table(layout.columns, layout.shown, found, hidden=layout.hidden, fit=width, room=layout.room)


def _common_folder(runs: list[Run], root: Path) -> Path:
    """The deepest folder below `root` that holds every run (root when they are fewer than two, or spread)."""
    paths = [r.path for r in runs]
    if len(paths) < 2 or root in paths:
        return root
    common = Path(os.path.commonpath(paths))
    return common if root in common.parents and common not in paths else root


def _default_layout(columns: _Columns, sort_key: str, width: int) -> _Layout:
    """The default columns that fit in `width`: run, model, status, val and test always, then by priority the
    --sort column, epochs, started, duration and the varying overrides."""
    sort_key = _SAME.get(sort_key, sort_key)
    defaults = [c for c in (columns.get(n) for n in DEFAULT_COLUMNS) if c is not None]
    covered = {c.name for c in defaults} | {c.header for c in defaults if c.header}
    extra = [sort_key] if sort_key not in covered and columns.get(sort_key) is not None else []
    varying = [k for k in _varying(columns) if k not in covered and k not in extra]
    cols = {n: c for n, c in ((n, columns.get(n)) for n in [*DEFAULT_COLUMNS, *extra, *varying]) if c is not None}
    widths = {
        n: max([cell_len(c.header or c.name), *(cell_len(c.cell(r)) for r in columns.runs)]) for n, c in cols.items()
    }
    run_width = min(widths["run"], RUN_WIDTH)
    chosen = [n for n in (*_ALWAYS, *extra) if n in cols]
    others = sum(widths[n] for n in chosen if n != "run") + 3 * (len(chosen) - 1)  # " │ " between, no outer edge
    hidden = []
    for name in (*_OPTIONAL, *varying):
        if name in cols and run_width + others + 3 + widths[name] <= width:
            chosen.append(name)
            others += 3 + widths[name]
        elif name in cols:
            hidden.append(name)
    order = [*DEFAULT_COLUMNS, *extra, *varying]
    return _Layout(columns, [cols[n] for n in order if n in chosen], hidden, max(8, width - others))


def _print_table(
    columns: _Columns,
    shown: list[Column],
    found: int,
    hidden: list[str] | None = None,
    fit: int | None = None,
    room: int | None = None,
) -> None:
    """The table; with `fit`, in at most that many characters, a row a line, the run paths shortened to `room`.
    Without, every cell whole: folded in a terminal, as wide as it takes in a file or a pipe."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.measure import Measurement
    from rich.table import Table

    runs = columns.runs
    cells = [
        [shorten(text, room) if room and c.name == "run" else text for c, text in ((c, c.cell(r)) for c in shown)]
        for r in runs
    ]
    lines = _lines_that_fit(shown, cells, runs, fit) if fit is not None and runs else None
    table = Table(box=box.HEAVY_HEAD, show_edge=False, pad_edge=False)
    for c in shown:
        table.add_column(
            c.header or c.name,
            justify="right" if c.numeric else "left",
            no_wrap=fit is not None,
            overflow="ellipsis" if fit else "fold",
        )
    if lines is None:  # rich draws the rows
        for run, row in zip(runs, cells, strict=True):
            table.add_row(
                *(_styled(run.status) if c.name == "status" else escape(t) for c, t in zip(shown, row, strict=True))
            )
    console = table_console()
    if fit is None and not console.is_terminal:  # a file or a pipe: nothing folded
        natural = Measurement.get(console, console.options.update_width(1_000_000), table).maximum
        console = Console(width=max(console.width, natural))
    title = f"{len(runs)} run(s) under {columns.base}"
    if found > len(runs):
        title += f" (the first {len(runs)} of {found})"
    if columns.started_date and any(c.name == "started" for c in shown):
        title += f", started on {columns.started_date}"
    console.print(title, markup=False, highlight=False, width=fit)
    if lines is not None:  # the rows joined by hand
        console.print("\n".join(lines), highlight=False, soft_wrap=True)
    elif runs:
        console.print(table, width=fit)
    notes = []
    if any(c.name == "val" for c in shown) and any(columns.marked(r) for r in runs):
        notes.append(f"*: test_loss: the run recorded no validation metrics ({columns.val_name} for the others)")
    if hidden:
        notes.append(f"not shown for width: {', '.join(hidden)} (see --columns, --all)")
    for run in runs:
        if run.status in ("unreadable", "killed"):
            notes.append(f"  {columns.relative(run)}: {run.status}: {run.summary.error or ''}")
    for note in notes:
        console.print(note, markup=False, highlight=False, width=fit)


def _lines_that_fit(shown: list[Column], cells: list[list[str]], runs: list[Run], fit: int) -> list[str] | None:
    """The table rich would draw (box.HEAVY_HEAD, no outer edge) when every column fits whole in `fit`, as
    markup lines joined by hand: rich's own layout of 2,000 rows took a second of `dlfs runs`. None when a
    column has to be cut short (a terminal narrower than the table): rich does that."""
    from rich.emoji import Emoji

    if any(not text.isprintable() or Emoji.replace(text) != text for row in cells for text in row):
        return None  # a line break, a tab, an :emoji: code: rich draws what it makes of them
    widths = [max([cell_len(c.header or c.name), *(cell_len(row[i]) for row in cells)]) for i, c in enumerate(shown)]
    if sum(widths) + 3 * (len(widths) - 1) > fit:
        return None

    def line(texts: list[str], styled: list[str], sep: str) -> str:
        padded = []
        for c, text, shown_as, width in zip(shown, texts, styled, widths, strict=True):
            pad = " " * (width - cell_len(text))
            padded.append(pad + shown_as if c.numeric else shown_as + pad)
        return sep.join(padded)

    from rich.markup import escape

    heads = [c.header or c.name for c in shown]
    out = [line(heads, [f"[bold]{escape(h)}[/bold]" for h in heads], " ┃ ")]
    last = len(widths) - 1
    out.append("╇".join("━" * (w + (i > 0) + (i < last)) for i, w in enumerate(widths)))
    for run, row in zip(runs, cells, strict=True):
        styled = [_styled(run.status) if c.name == "status" else escape(t) for c, t in zip(shown, row, strict=True)]
        out.append(line(row, styled, " │ "))
    return out


def _write_machine(form: str, shown: list[Column], runs: list[Run]) -> None:
    rows = [{c.name: c.raw(r) for c in shown} for r in runs]
    if form == "json":
        print(json.dumps(_json_safe(rows), indent=2))
        return
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow([c.name for c in shown])
    for row in rows:
        writer.writerow(["" if v is None else v if isinstance(v, str) else json.dumps(v) for v in row.values()])


def _json_safe(value: Any) -> Any:
    """NaN and infinity, which JSON cannot hold, as null (a diverged run's status says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _styled(status: str) -> str:
    colour = {"completed": "green", "running": "cyan", "interrupted": "yellow", "killed": "yellow"}.get(status, "red")
    return f"[{colour}]{status}[/{colour}]"
