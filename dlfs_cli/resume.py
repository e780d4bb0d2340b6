"""`dlfs train resume=<run folder>`: continue a run in place from its last.pt, with its saved config.

Only overrides that leave the model, the data and the training trajectory alone are accepted on
top of the saved config: more epochs, and how the run is watched (evaluation, logging, saving,
figures, device). Anything else would make the continued run a different experiment.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from omegaconf import DictConfig, OmegaConf

from dlfs_cli.config import load_saved_config
from dlfs_cli.errors import DlfsError
from dlfs_cli.summary import Summary
from dlfs_cli.tracking import CHECKPOINT_DIR, CONFIG_FILE, MULTIRUN_FILE, SUMMARY_FILE

if TYPE_CHECKING:
    from dlfs_cli.checkpoint import Checkpoint

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


def prepare(composed: DictConfig, overrides: list[str], run_dir: Path) -> tuple[DictConfig, Checkpoint | None] | None:
    """What `dlfs train resume=run_dir` continues with: the run's config (with the allowed overrides) and
    the state in its last.pt, for train(cfg, run_dir, state). The state is None for a run stopped before
    its first step (it starts again from the beginning); None in all for a run already complete."""
    cfg = resume_config(composed, overrides, run_dir)
    if cfg is None:
        return None
    return cfg, last_state(run_dir, cfg)


def last_state(run_dir: Path, cfg: DictConfig) -> Checkpoint | None:
    """The run's last.pt, checked to belong to this model and data and to be within trainer.epochs."""
    from dlfs_cli.checkpoint import FORMAT_VERSION, config_hash, describe, load_run_checkpoint  # torch

    path = run_dir / CHECKPOINT_DIR / "last.pt"
    if not path.exists() and not _trained_any(run_dir):
        return None
    state = load_run_checkpoint(run_dir, "last")  # on the CPU: the RNG states must stay there
    if state.format_version < FORMAT_VERSION:
        raise DlfsError(
            f"{path} was written by an older dlfs (checkpoint format {state.format_version}) that did not save "
            "what an exact resume needs; start a new run"
        )
    plain_cfg = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    if state.config_hash != config_hash(plain_cfg):
        raise DlfsError(
            f"{path} holds {describe(state.config)}, but the run's config is "
            f"{describe(plain_cfg)} (or differs in the model or data settings); refusing to mix them"
        )
    if state.epoch > cfg.trainer.epochs:
        epochs = cfg.trainer.epochs
        raise DlfsError(f"resume: trainer.epochs={epochs} is below the {state.epoch} epochs already trained")
    return state


def _trained_any(run_dir: Path) -> bool:
    try:
        return bool(Summary.load(run_dir / SUMMARY_FILE).step)
    except (OSError, ValueError):
        return True  # unreadable: let load_run_checkpoint say what is missing


def resume_config(composed: DictConfig, overrides: list[str], run_dir: Path) -> DictConfig | None:
    """The config to continue `run_dir` with, or None when the run is already complete."""
    if not run_dir.is_dir():
        raise DlfsError(f"resume={run_dir}: no such folder")
    config_file, summary_file = run_dir / CONFIG_FILE, run_dir / SUMMARY_FILE
    if not config_file.is_file() or not summary_file.is_file():
        raise DlfsError(
            f"resume={run_dir}: not a dlfs run folder (no {CONFIG_FILE} or {SUMMARY_FILE}), nor a sweep's folder "
            f"(no {MULTIRUN_FILE}): name the run or the sweep itself"
        )
    try:
        cfg = load_saved_config(config_file)
    except DlfsError as ex:
        raise DlfsError(f"resume={run_dir}: {ex}") from None
    saved_epochs = cfg.trainer.epochs
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
    try:
        summary = Summary.load(summary_file)
    except (OSError, ValueError) as ex:  # ValueError: not JSON, not UTF-8, not a summary
        raise DlfsError(f"resume={run_dir}: cannot read {SUMMARY_FILE}: {ex}") from None
    done = summary.epochs_completed or 0
    if cfg.trainer.epochs < done:
        raise DlfsError(f"resume: trainer.epochs={cfg.trainer.epochs} is below the {done} epochs already trained")
    s = cfg.scheduler
    fitted = (s.name == "exponential" and s.final_lr is not None) or (s.name == "cosine" and s.t_max is None)
    if fitted and cfg.trainer.epochs != saved_epochs:
        raise DlfsError(
            f"resume cannot change trainer.epochs of this run: its scheduler={s.name} was fitted to "
            f"{saved_epochs} epochs; start a new run instead"
        )
    if summary.status == "completed" and cfg.trainer.epochs == done:
        return None
    return cfg
