"""Checkpoints: plain dicts of tensors and primitives, loadable with torch.load(weights_only=True)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dlfs_cli.config import DlfsError

CHECKPOINT_DIR = "checkpoints"  # inside a run folder

FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, fsynced, then renamed over `path`,
    so the previous checkpoint survives a crash in the middle of the write."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


def load_run_checkpoint(run_dir: Path, checkpoint: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """checkpoints/<checkpoint>.pt of a run folder; a missing folder, file or unreadable file is a DlfsError."""
    if not run_dir.is_dir():
        raise DlfsError(f"run={run_dir}: no such folder")
    path = run_dir / CHECKPOINT_DIR / f"{checkpoint}.pt"
    if not path.is_file():
        found = sorted(p.name for p in (run_dir / CHECKPOINT_DIR).glob("*.pt"))
        raise DlfsError(
            f"run={run_dir}: no {CHECKPOINT_DIR}/{checkpoint}.pt"
            + (f" (it has {', '.join(found)})" if found else " (is it a dlfs run folder that finished an epoch?)")
        )
    try:
        return load_checkpoint(path, map_location)
    except Exception as ex:  # noqa: BLE001 - a damaged file, whatever torch says about it
        raise DlfsError(f"{path}: cannot be read as a checkpoint ({type(ex).__name__}: {ex})") from None
