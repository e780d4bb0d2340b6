"""Shared fixtures: compose configs exactly as `dlfs train` does, run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dlfs_cli import cli, lifecycle, runlock
from dlfs_cli.config import conf_dir, register_configs

register_configs()


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker's torch gets its share of the cores, as a joblib sweep's jobs do
    (sweep.job_threads): torch's default of a thread per core in every worker oversubscribes them, and
    its spinning threads then make a test many times slower, the more so when other work holds the cores.
    OMP_NUM_THREADS carries the share to the `dlfs` processes the tests start."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


# A run small enough for a test: the whole Boston train split is 12 batches of 32.
SMOKE = ["trainer.epochs=2", "trainer.limit_batches=3", "device=cpu"]
# What every run folder holds (README, "The run folder"); a run started by the CLI also has .hydra/.
RUN_FILES = {"config.yaml", "metrics.csv", "summary.json", "checkpoints", "train.log", "figures", ".dlfs.lock"}


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


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def dlfs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """`dlfs ARGS` in this process; returns its exit code and what it printed."""
    monkeypatch.setattr(lifecycle, "install_for_process", lambda: None)  # pytest keeps its own signal handlers
    monkeypatch.setattr(sys, "argv", ["dlfs"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.delenv("DLFS_OUTPUTS", raising=False)

    def run(*args: str) -> Result:
        capsys.readouterr()
        try:
            cli.main(list(args))
            code = 0
        except SystemExit as ex:
            code = ex.code if isinstance(ex.code, int) else 1
        finally:
            runlock.release_all()
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


@pytest.fixture
def run_here(dlfs, monkeypatch: pytest.MonkeyPatch) -> Callable[..., subprocess.CompletedProcess]:
    """run_dlfs's twin in this process (no 2-3 s of interpreter and torch start-up): the same arguments,
    a CompletedProcess back. For tests that do not need a fresh process."""

    def run(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120):
        with monkeypatch.context() as m:
            m.chdir(cwd)
            for key, value in (env or {}).items():
                m.setenv(key, value)
            result = dlfs(*args)
        return subprocess.CompletedProcess(["dlfs", *args], result.code, result.out, result.err)

    return run


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Poll until `condition` holds; fail at once if the process (when one is given) ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"the process ended first (exit {proc.returncode})"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def start_long_run(run: Path, cwd: Path) -> subprocess.Popen:
    """`dlfs train` into `run` for as long as a test needs it (Boston, 100000 epochs), in another process."""
    return subprocess.Popen(
        [sys.executable, "-m", "dlfs_cli", "train", "device=cpu", "trainer.epochs=100000", f"hydra.run.dir={run}"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def write_idx(raw: Path, split: str, pixels, labels) -> None:
    """Write MNIST's two IDX files for one split (`train` or `t10k`) into raw/."""
    import struct

    import numpy as np

    raw.mkdir(parents=True, exist_ok=True)
    n = len(pixels)
    images = struct.pack(">IIII", 2051, n, 28, 28) + np.asarray(pixels, dtype=np.uint8).tobytes()
    (raw / f"{split}-images-idx3-ubyte").write_bytes(images)
    (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + bytes(np.asarray(labels, np.uint8)))


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    """A small MNIST in torchvision's layout (<root>/MNIST/raw/), made of real handwritten digits
    (scikit-learn's, upsampled): 240 training and 60 test images."""
    from dlfs_cli.data.digits import load_digits_28

    pixels, labels = load_digits_28()
    root = tmp_path / "mnist_root"
    write_idx(root / "MNIST" / "raw", "train", pixels[:240].numpy(), labels[:240].numpy())
    write_idx(root / "MNIST" / "raw", "t10k", pixels[240:300].numpy(), labels[240:300].numpy())
    return root


# The acceptance run of exact resume (tests/test_resume.py, tests/test_slow_resume.py).
DIGITS_CNN = ["model=mnist_cnn", "data=digits", "trainer.epochs=8", "seed=11", "figures.enabled=false"]


@pytest.fixture(scope="session")
def straight_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The acceptance run, uninterrupted: dlfs train model=mnist_cnn data=digits trainer.epochs=8 seed=11."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert run_dlfs("train", *DIGITS_CNN, f"hydra.run.dir={run}", cwd=run.parent).returncode == 0
    return run
