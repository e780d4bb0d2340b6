"""`dlfs train resume=<run folder>`: continue a run in place from its last.pt, with its saved config.

Only overrides that leave the model, the data and the training trajectory alone are accepted on
top of the saved config: more epochs, and how the run is watched (evaluation, logging, saving,
figures, device). Anything else would make the continued run a different experiment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dlfs_cli.config import DlfsError, typed_config
from dlfs_cli.tracking import CONFIG_FILE, SUMMARY_FILE

ALLOWED = (
    "trainer.epochs",
    "trainer.eval_every",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.nproc",
    "device",
    "logger",
    "figures.",
)


def resume_config(composed: DictConfig, overrides: list[str], run_dir: Path) -> DictConfig | None:
    """The config to continue `run_dir` with, or None when the run is already complete."""
    if not run_dir.is_dir():
        raise DlfsError(f"resume={run_dir}: no such folder")
    config_file, summary_file = run_dir / CONFIG_FILE, run_dir / SUMMARY_FILE
    if not config_file.is_file() or not summary_file.is_file():
        raise DlfsError(f"resume={run_dir}: not a dlfs run folder (no {CONFIG_FILE} or {SUMMARY_FILE})")
    cfg = typed_config(OmegaConf.load(config_file))
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "resume" or key.startswith("hydra."):
            continue
        if not any(key == a or (a.endswith(".") and key.startswith(a)) for a in ALLOWED):
            allowed = ", ".join(a + "*" if a.endswith(".") else a for a in ALLOWED)
            raise DlfsError(
                f"resume cannot change {key}: it would make a different run (allowed: {allowed}); "
                "start a new run instead"
            )
        OmegaConf.update(cfg, key, OmegaConf.select(composed, key), merge=False)
    summary: dict[str, Any] = json.loads(summary_file.read_text())
    done = summary.get("epochs_completed", 0)
    if cfg.trainer.epochs < done:
        raise DlfsError(f"resume: trainer.epochs={cfg.trainer.epochs} is below the {done} epochs already trained")
    saved_epochs = OmegaConf.load(config_file).trainer.epochs
    s = cfg.scheduler
    fitted = (s.name == "exponential" and s.final_lr is not None) or (s.name == "cosine" and s.t_max is None)
    if fitted and cfg.trainer.epochs != saved_epochs:
        raise DlfsError(
            f"resume cannot change trainer.epochs of this run: its scheduler={s.name} was fitted to "
            f"{saved_epochs} epochs; start a new run instead"
        )
    if summary.get("status") == "completed" and cfg.trainer.epochs == done:
        return None
    return cfg
