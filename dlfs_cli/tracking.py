"""The run folder's text files (config.yaml, metrics.csv, summary.json, train.log) and the progress display."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from omegaconf import DictConfig, OmegaConf
from rich import get_console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.tree import Tree

from dlfs_cli import __version__, runlock
from dlfs_cli.errors import DlfsError, os_error_message
from dlfs_cli.summary import Summary

log = logging.getLogger("dlfs")

# The run-folder contract: later commands and users' scripts rely on these names.
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
MULTIRUN_FILE = "multirun.yaml"  # a sweep's root: its config, as Hydra's basic sweeper saves it (and optuna_study)
LOG_FILE = "train.log"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"  # logger=tensorboard: event files, beside metrics.csv


def write_atomic(path: Path, text: str) -> None:
    """A text file of the run, written by replace_atomically."""
    replace_atomically(path, lambda f: f.write(text.encode("utf-8")))


def replace_atomically(
    path: Path, write: Callable[[BinaryIO], object], action: str = "could not write", note: str = ""
) -> None:
    """Write `path` through a temporary file in its folder, flushed, fsynced and renamed over it, so readers
    never see a half-written file. A failure (a full disk, say) leaves the previous file as it was and is a
    DlfsError naming the file and the reason (`action`, then `note`); the temporary file never stays."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as ex:
        _unlink_quietly(tmp)
        ex.filename, ex.filename2 = str(path), None  # the file meant, not its temporary twin
        raise DlfsError(os_error_message(ex, action) + note) from None
    except BaseException:  # an abort, a torch error: never leave a half-written temporary file behind
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError while writing `path` becomes a DlfsError naming it (and saying when the disk is full)."""
    try:
        yield
    except OSError as ex:
        ex.filename = ex.filename or str(path)
        raise DlfsError(os_error_message(ex, "could not write")) from None


def versions() -> dict[str, str | None]:
    import torch  # only runs that train call this

    return {"python": platform.python_version(), "torch": torch.__version__, "dlfs": __version__, "git": _git_commit()}


def _git_commit() -> str | None:
    """The commit of the dlfs source when it runs from a git checkout; None for an installed wheel."""
    src = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    # Only if the package really lives in that work tree (not a wheel inside someone's repo).
    if len(out) == 2 and src.is_relative_to(Path(out[0]).resolve()) and (src.parent / "pyproject.toml").exists():
        return out[1]
    return None


class RunFolder:
    """Writes the files of one run folder; see README "The run folder"."""

    def __init__(self, path: Path, tensorboard: bool = False, live: bool = True, rank: int = 0) -> None:
        """tensorboard: also write TensorBoard event files; live: a progress bar on a terminal (not for
        jobs that run side by side in one terminal); rank: under torchrun only rank 0 writes the run's
        files, the others keep only their own log (train.rank<N>.log)."""
        self.path = path
        self.rank = rank
        self.checkpoints = path / CHECKPOINT_DIR
        self.summary = Summary()
        self.live = live
        self._tensorboard = tensorboard
        self._writer: Any = None  # torch.utils.tensorboard.SummaryWriter
        self._metrics_columns: list[str] | None = None
        self._log_handler: logging.Handler | None = None
        self._took_lock = False  # this object took the folder's lock (not the CLI before it)

    def start(
        self, cfg: DictConfig, summary: Mapping[str, Any], metric_columns: list[str], resume_step: int | None = None
    ) -> None:
        """Write the run's first files; or, resuming from the checkpoint at `resume_step`, keep them,
        dropping any metrics.csv rows recorded after that checkpoint (they will be recorded again).
        Rank 0 holds the folder's lock from here to close() (the CLI took it earlier: then a no-op)."""
        with writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        if self.rank == 0 and not runlock.holds(self.path) and not runlock.parent_holds(self.path):
            runlock.acquire(self.path)
            self._took_lock = True
        self._metrics_columns = ["epoch", "step", "split", "lr", *metric_columns, "elapsed_s"]
        if self.rank > 0:
            self._log_to(self.path / f"train.rank{self.rank}.log")
            self.summary = Summary().update(status="running", **summary)
            return
        with writing(self.path / CONFIG_FILE):
            self.checkpoints.mkdir(exist_ok=True)
            OmegaConf.save(cfg, self.path / CONFIG_FILE, resolve=True)
        rows: list[list[str]] = []
        if resume_step is not None:
            try:
                with open(self.path / METRICS_FILE, newline="") as f:
                    rows = list(csv.reader(f))[1:]
                self.summary = Summary.load(self.path / SUMMARY_FILE)
            except (OSError, ValueError) as ex:
                raise DlfsError(f"cannot resume {self.path}: {type(ex).__name__}: {ex}") from None
            # the rows up to the checkpoint; a row cut short by a kill is dropped
            width = len(self._metrics_columns)
            rows = [r for r in rows if len(r) == width and r[1].isdigit() and int(r[1]) <= resume_step]
            self.summary.drop("error", "figures_error")
        buffer = io.StringIO()
        csv.writer(buffer).writerows([self._metrics_columns, *rows])
        write_atomic(self.path / METRICS_FILE, buffer.getvalue())
        self._log_to(self.path / LOG_FILE)
        if self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (checked before)

            # purge_step: a resumed run replaces the events written after its checkpoint, as metrics.csv does
            self._writer = SummaryWriter(str(self.path / TENSORBOARD_DIR), purge_step=resume_step)
        self.update_summary(status="running", **summary)

    def _log_to(self, path: Path) -> None:
        with writing(path):
            self._log_handler = logging.FileHandler(path, encoding="utf-8")  # appends
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self._log_handler)
        log.setLevel(logging.INFO)

    def log_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one row (missing metrics stay empty) and flush, so a crash keeps what was measured."""
        assert self._metrics_columns is not None, "start() first"
        if self.rank > 0:
            return
        with writing(self.path / METRICS_FILE), open(self.path / METRICS_FILE, "a", newline="") as f:
            csv.writer(f).writerow([csv_cell(row.get(c)) for c in self._metrics_columns])
        if self._writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step", "split", "elapsed_s") and value is not None:
                    if key == "lr" and row["split"] != "train":
                        continue  # the rate is the training loop's
                    self._writer.add_scalar(f"{row['split']}/{key}", value, row["step"])

    def update_summary(self, **fields: Any) -> None:
        """Set fields of summary.json and write it (rank 0); a name Summary does not declare is a TypeError."""
        self.summary.update(**fields)
        if self.rank > 0:
            return
        self.summary.save(self.path / SUMMARY_FILE)

    def update_summary_quietly(self, **fields: Any) -> None:
        """update_summary on the way out of a failed run: a second failure (the disk is still full) must not
        hide the first, which is the one the user is told."""
        try:
            self.update_summary(**fields)
        except DlfsError as ex:
            log.debug("summary.json not updated: %s", ex)

    def note(self, message: str) -> None:
        """A line for train.log only (the console shows it elsewhere, e.g. as the command's error)."""
        if self._log_handler is not None:
            self._log_handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), None))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()  # flushes the events
            self._writer = None
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self._took_lock:
            runlock.release(self.path)
            self._took_lock = False


def csv_cell(value: Any) -> Any:
    """A value as a cell of the run's and the sweep's CSV files: floats to 6 significant digits, None empty."""
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


# --- what the user sees ----------------------------------------------------------------------

# The console that Hydra's RichHandler logs to (conf/hydra/job_logging/dlfs.yaml): sharing it lets
# log lines print above the live progress bar instead of through it.
console = get_console()


def print_config_tree(cfg: DictConfig) -> None:
    tree = Tree("[bold]config[/bold]")

    def add(node: Tree, value: Any) -> None:
        for key, child in value.items():
            if isinstance(child, dict):
                add(node.add(f"[bold]{key}[/bold]"), child)
            else:
                node.add(f"{key}: {child}")

    add(tree, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    console.print(tree)


class ProgressDisplay:
    """A rich progress bar (epochs and batches, loss, ETA) on a terminal; plain log lines otherwise."""

    REFRESH_S = 0.25  # how often the bar reads the loss from the device (each read is a host sync)

    def __init__(self, epochs: int, batches_per_epoch: int, live: bool = True) -> None:
        self.epochs = epochs
        self.batches = batches_per_epoch
        self.live = live and console.is_terminal
        self._next_refresh = 0.0
        self._start = time.monotonic()
        self._progress: Progress | None = None
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[loss]}"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._epoch_task = self._progress.add_task("epochs ", total=epochs, loss="")
            self._batch_task = self._progress.add_task("batches", total=batches_per_epoch, loss="")

    def __enter__(self) -> ProgressDisplay:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextmanager
    def showing(self, what: str) -> Iterator[None]:
        """A phase between the batches (an evaluation): named on the batch bar while it lasts."""
        if self._progress is None:
            yield
            return
        self._progress.update(self._batch_task, description=what, loss="")
        try:
            yield
        finally:
            self._progress.update(self._batch_task, description="batches")

    def due(self) -> bool:
        """True at most every REFRESH_S seconds: only then is the loss worth a host sync."""
        if not self.live:
            return False
        now = time.monotonic()
        if now < self._next_refresh:
            return False
        self._next_refresh = now + self.REFRESH_S
        return True

    def batch(self, done: int, loss: float | None = None) -> None:
        if self._progress is not None:
            fields: dict[str, Any] = {"loss": f"loss {loss:.4g}"} if loss is not None else {}
            self._progress.update(self._batch_task, completed=done, **fields)

    def epoch(self, epoch: int, train_loss: float, test: Mapping[str, float] | None) -> None:
        """End of an epoch: advance the bar, or log a line when the epoch was evaluated (or is the last)."""
        if self._progress is not None:
            self._progress.update(self._epoch_task, completed=epoch, loss=f"train loss {train_loss:.4g}")
            self._progress.update(self._batch_task, completed=self.batches)  # the last refresh may be behind
            if epoch < self.epochs:
                self._progress.reset(self._batch_task, total=self.batches, loss="")
        if test is not None or epoch == self.epochs:
            elapsed = time.monotonic() - self._start
            eta = elapsed / max(epoch, 1) * (self.epochs - epoch)
            scores = " ".join(f"{k} {v:.4g}" for k, v in (test or {}).items())
            line = f"epoch {epoch}/{self.epochs} train_loss {train_loss:.4g} {scores} ({elapsed:.1f}s, eta {eta:.1f}s)"
            log.info(line)


Losses = dict[str, list[tuple[int, float]]]  # split (train, val, test) -> (step, loss) points


def read_losses(metrics_csv: Path) -> Losses:
    """metrics.csv's loss column by split, in row order; rows without a loss are skipped. Raises what reading
    the file raises (OSError, csv.Error; ValueError, KeyError or TypeError for rows that are not dlfs's)."""
    losses: Losses = {"train": [], "val": [], "test": []}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("split") in losses and row.get("loss"):
                losses[row["split"]].append((int(row["step"]), float(row["loss"])))
    return losses


def spans_decades(losses: Iterable[float]) -> bool:
    """Whether loss curves read better on a log scale: the finite losses all positive and over 50x apart."""
    values = [v for v in losses if math.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 50


@contextmanager
def phase(what: str) -> Iterator[None]:
    """A phase that can take more than a second (figures, a t-SNE map): a spinner with `what` on a terminal
    while it lasts, a log line when the output is a file or a pipe."""
    if not console.is_terminal:
        log.info("%s ...", what)
        yield
        return
    with console.status(f"{what} ..."):
        yield


def console_log_handler() -> logging.Handler:
    """Hydra's console handler (conf/hydra/job_logging/dlfs.yaml): rich on a terminal, plain lines otherwise."""
    if console.is_terminal:
        from rich.logging import RichHandler

        return RichHandler(console=console, show_path=False, markup=False)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    return handler
