"""dlfs from Python, for scripts and notebooks: train from the same overrides as `dlfs train`, read run
folders back (config, summary, metrics rows, the model with its weights), list runs.

    from dlfs_cli import api

    run = api.train("model=boston", "optimizer.lr=0.01", run_dir="outputs/demo")
    run.metrics["val_loss"], run.history()[-1], run.model()
    [r.summary.status for r in api.runs("outputs")]

Errors are DlfsError with the CLI's one-line messages (an unknown key, a folder that holds a run).
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlfs_cli.config import check_device, conf_dir, load_saved_config, register_configs, validate
from dlfs_cli.errors import DlfsError
from dlfs_cli.runs import find_runs
from dlfs_cli.summary import Summary
from dlfs_cli.system import check_run_environment, check_system, outputs_root
from dlfs_cli.tracking import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE

if TYPE_CHECKING:
    import torch

__all__ = ["Run", "compose_config", "load_run", "runs", "train"]


@dataclass
class Run:
    """A run folder, read back: what `dlfs train` wrote there."""

    path: Path
    config: DictConfig | None  # the resolved config, typed (None: a sweep job refused before it trained)
    summary: Summary

    @property
    def metrics(self) -> dict[str, float]:
        """The final metrics: val_* (validation) and test_* (test split)."""
        return self.summary.metrics or {}

    def history(self) -> list[dict[str, Any]]:
        """metrics.csv's rows (split train | val | test), numbers as numbers and missing cells as None."""
        path = self.path / METRICS_FILE
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                return [_row(row, path, reader.line_num) for row in reader]
        except (OSError, UnicodeDecodeError, csv.Error) as ex:
            raise DlfsError(f"{path}: unreadable: {' '.join(str(ex).split())[:160]}") from None

    def model(self, checkpoint: str = "last", device: str = "cpu") -> torch.nn.Module:
        """The trained model with the weights of checkpoints/<checkpoint>.pt, in eval mode."""
        from dlfs_cli.checkpoint import load_run_model
        from dlfs_cli.distributed import resolve_device

        check_device(device)  # device="tpu": the CLI's one line, not torch's RuntimeError
        model, _, _ = load_run_model(self.path, checkpoint, resolve_device(device))  # "cuda" without CUDA: one line
        return model.eval()


def compose_config(*overrides: str) -> DictConfig:
    """The config `dlfs train OVERRIDES` would train with, composed and checked (its interpolations too)."""
    for override in overrides:
        if not isinstance(override, str):
            raise DlfsError(f"overrides are KEY=VALUE texts, as on the command line: got {override!r}")
    _refuse_command_line_keys(overrides)
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="train"):
            cfg = compose(config_name="train", overrides=list(overrides))
        OmegaConf.to_container(cfg, resolve=True)  # ${nope} fails here, not half-way into a run
        validate(cfg)
    except (HydraException, OmegaConfBaseException) as ex:  # ~model: a value that is missing
        from dlfs_cli.cli import explain  # the CLI's one line, "did you mean" included

        raise DlfsError(explain(ex)) from None
    if cfg.trainer.nproc > 1:
        raise DlfsError(
            f"trainer.nproc={cfg.trainer.nproc}: api.train trains in this process; several processes are "
            "`dlfs train trainer.nproc=N` (it starts torchrun)"
        )
    return cfg


def _refuse_command_line_keys(overrides: tuple[str, ...]) -> None:
    """What only the command line can do is refused, naming the key: `resume=`, `hydra.run.dir=` and the other
    Hydra settings were dropped without a word (api.train("resume=RUN") trained a fresh run from the defaults)."""
    for override in overrides:
        key = override_key(override)
        if key == "resume":
            raise DlfsError("resume=: api.train starts a new run; continue one with `dlfs train resume=PATH`")
        if key == "hydra.run.dir":
            raise DlfsError("hydra.run.dir=: api.train takes the run's folder as run_dir=")
        if is_hydra_setting(override):
            raise DlfsError(f"{key}=: Hydra's own settings are the command line's (dlfs train); api.train has none")


def override_key(override: str) -> str:
    """The key of an override (`+`, `++` and `~` off)."""
    return override.lstrip("+~").partition("=")[0].strip()


def is_hydra_setting(override: str) -> bool:
    """Whether an override sets Hydra itself (hydra.KEY, a hydra/GROUP), not the run."""
    key = override_key(override)
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def train(*overrides: str, run_dir: str | Path | None = None, progress: bool = False) -> Run:
    """Train as `dlfs train OVERRIDES` does, into `run_dir` (default: outputs/<model>/<timestamp>, or under
    $DLFS_OUTPUTS), a new or empty folder; returns the run, read back. progress: a live progress bar."""
    check_system()
    check_run_environment()
    from dlfs_cli import runlock
    from dlfs_cli.train import train as train_run  # torch: only when something trains

    cfg = compose_config(*overrides)
    if run_dir is None:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + f"_{time.time_ns() // 1000 % 1_000_000:06d}"
        run_dir = outputs_root() / cfg.model.name / stamp
    folder = Path(run_dir)
    runlock.check_new_folder(folder, "run_dir")  # never into a run, or a folder of the user's own
    train_run(cfg, folder, live=progress)
    return load_run(folder)


def load_run(path: str | Path) -> Run:
    """A run folder: its summary.json and config.yaml."""
    if not isinstance(path, (str, os.PathLike)):
        raise DlfsError(f"load_run takes a run folder's path: got {path!r}")
    folder = Path(path)
    if not (folder / SUMMARY_FILE).is_file():
        raise DlfsError(f"{folder}: not a run folder (no {SUMMARY_FILE})")
    try:
        summary = Summary.load(folder / SUMMARY_FILE)
    except (OSError, ValueError) as ex:
        raise DlfsError(f"{folder / SUMMARY_FILE}: unreadable ({ex})") from None
    config = load_saved_config(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else None
    return Run(folder, config, summary)


def runs(root: str | Path | None = None) -> list[Run]:
    """Every run folder under `root` (default: outputs/, or $DLFS_OUTPUTS, as `dlfs runs`), oldest first. A run
    whose files cannot be read is there too, with `summary.status` "unreadable" and the reason in its error."""
    found = []
    for r in find_runs(outputs_root() if root is None else Path(root)):
        if (r.path / SUMMARY_FILE).is_file():
            try:
                found.append(load_run(r.path))
            except DlfsError as ex:  # one malformed folder never hides the others (`dlfs runs` lists it too)
                found.append(Run(r.path, None, Summary(status="unreadable", error=str(ex))))
    return sorted(found, key=lambda r: (r.summary.started_at or "", str(r.path)))


def _row(row: dict[Any, Any], path: Path, line: int) -> dict[str, Any]:
    if None in row:  # csv's key for the cells beyond the header's
        raise DlfsError(f"{path}: line {line} has more cells than the header")
    return {key: _number(key, cell, path, line) for key, cell in row.items()}


def _number(key: str, cell: str | None, path: Path, line: int) -> Any:
    if cell is None or cell == "":
        return None
    if key == "split":
        return cell
    try:
        number = float(cell)
        return int(number) if key in ("epoch", "step") else number
    except (ValueError, OverflowError):  # not a number; an epoch of nan or 1e400
        raise DlfsError(f"{path}: line {line}, column {key} is {cell!r}, not a number") from None
