"""`dlfs eval run=<folder>`: rebuild a run's model and data from its checkpoint and recompute the metrics of
its validation split (if it has one) and its test split."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from dlfs_cli.checkpoint import load_run_checkpoint, model_of
from dlfs_cli.config import typed_config
from dlfs_cli.data import build_data
from dlfs_cli.distributed import check_bf16, resolve_device, set_kernels
from dlfs_cli.models import RECONSTRUCTS
from dlfs_cli.tracking import CHECKPOINT_DIR, phase
from dlfs_cli.trainer import evaluate


def evaluate_run(run_dir: Path, checkpoint: str = "last", device: str | None = None) -> dict[str, Any]:
    """{"recomputed": metrics now, "recorded": metrics saved with that checkpoint, "epoch", "batch_in_epoch"}."""
    state = load_run_checkpoint(run_dir, checkpoint)
    cfg = typed_config(state.config)
    target = resolve_device(device or cfg.device)  # the run's device setting unless one is named
    if cfg.trainer.precision == "bf16":  # evaluated as it was measured: bfloat16 autocast, on this device too
        check_bf16(target, fix="evaluate it on another device (device=cpu)")
    set_kernels(cfg.trainer, target)  # the run's float32 policy and kernel choice on a GPU, as it was measured
    # the run's own data, rebuilt: it sizes the model (a text changed since has another vocabulary, which
    # the weights refuse) and is what gets evaluated
    data = build_data(cfg.data, cfg.trainer.batch_size, cfg.seed, target, cfg.model.name in RECONSTRUCTS)
    model = model_of(cfg, state, run_dir / CHECKPOINT_DIR / f"{checkpoint}.pt", target, data.info)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # the book's LSTM evaluation starts from the state carried out of training, saved with the weights
    carried = state.carried
    training_state = None if carried is None else (carried["h"].to(target), carried["c"].to(target))
    metrics: dict[str, float] = {}
    for split, loader in (("val", data.val), ("test", data.test)):
        if loader is not None:
            metrics |= evaluate(
                model,
                loader,
                cfg.loss.name,
                target,
                cfg.trainer.limit_batches,
                bf16=cfg.trainer.precision == "bf16",  # as the run measured them
                channels_last=cfg.trainer.channels_last,
                split=split,
                training_state=training_state,
            )
    return {
        "recomputed": metrics,
        "recorded": state.metrics,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
    }


def print_comparison(run_dir: Path, checkpoint: str, result: dict[str, Any]) -> bool:
    """A table of recorded against recomputed metrics; True when every recorded one matches (a best.pt saved
    before the last epoch has no test metrics recorded). "Matches" allows a relative 1e-9: a run trained over
    several processes added its sums per rank, in another order."""
    from rich.table import Table

    from dlfs_cli.tracking import console

    table = Table(title=f"{run_dir} ({checkpoint}.pt, epoch {result['epoch']})")
    for column in ("metric", "recorded", "recomputed", "same"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    all_same = True
    for name, value in result["recomputed"].items():
        recorded = result["recorded"].get(name)
        if recorded is None:
            table.add_row(name, "-", f"{value:.6g}", "not recorded")
            continue
        same = math.isclose(recorded, value, rel_tol=1e-9, abs_tol=1e-12)
        all_same &= same
        table.add_row(name, f"{recorded:.6g}", f"{value:.6g}", "yes" if same else "NO")
    console.print(table)
    return all_same


def run_eval(run: str, checkpoint: str, device: str | None) -> dict[str, float]:
    run_dir = Path(run).expanduser()
    # evaluation draws no random numbers, but never disturbs any
    with torch.random.fork_rng(devices=[]), phase(f"evaluating {run_dir / CHECKPOINT_DIR / checkpoint}.pt"):
        result = evaluate_run(run_dir, checkpoint, device)
    if not print_comparison(run_dir, checkpoint, result):
        if result["batch_in_epoch"]:
            print(
                f"note: {checkpoint}.pt was saved in the middle of epoch {result['epoch'] + 1} (after batch "
                f"{result['batch_in_epoch']}), later than the recorded evaluation; try checkpoint=best"
            )
        else:
            print("note: the recomputed metrics differ from the recorded ones (another device or library version?)")
    return result["recomputed"]
