"""Shared fixtures: compose configs exactly as `dlfs train` does, run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dlfs_cli.config import conf_dir, register_configs

register_configs()

# A run small enough for a test: the whole Boston train split is 12 batches of 32.
SMOKE = ["trainer.epochs=2", "trainer.limit_batches=3", "device=cpu"]


@pytest.fixture
def make_cfg() -> Callable[..., DictConfig]:
    def make(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))

    return make


def run_dlfs(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`python -m dlfs_cli ARGS` in `cwd`, as a user would run `dlfs` there."""
    return subprocess.run(
        [sys.executable, "-m", "dlfs_cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
