"""`dlfs` as users run it: a subprocess, its exit code, its output, and what it leaves on disk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import RUN_FILES, run_dlfs

from dlfs_cli.config import conf_dir


def test_help_lists_the_commands(run_here, tmp_path: Path) -> None:
    for args in (["--help"], []):
        out = run_here(*args, cwd=tmp_path)
        assert out.returncode == 0 and "train" in out.stdout and "usage: dlfs" in out.stdout


def test_unknown_command_is_refused(run_here, tmp_path: Path) -> None:
    out = run_here("trian", cwd=tmp_path)
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr and "train" in out.stderr


def test_train_help_shows_the_config_groups_and_their_options(run_here, tmp_path: Path) -> None:
    out = run_here("train", "--help", cwd=tmp_path)
    assert out.returncode == 0
    conf = conf_dir()
    for group in ("model", "data", "optimizer", "scheduler", "loss", "trainer", "experiment"):
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        assert len(options) >= 1 and f"{group}: {', '.join(options)}" in out.stdout
    assert "model: autoencoder, boston, lstm_charmodel, mnist_cnn" in out.stdout
    assert "schema" not in out.stdout  # the typed schemas are not options


def test_cfg_job_prints_the_composed_config(run_here, tmp_path: Path) -> None:
    out = run_here("train", "optimizer.lr=0.5", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0 and "lr: 0.5" in out.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "args", [["--help"], ["train", "--cfg", "job"], ["train", "--help"], ["runs", "."], ["completion", "query"]]
)
def test_commands_that_do_not_train_do_not_import_torch(tmp_path: Path, args: list[str]) -> None:
    script = f"""
import sys
from dlfs_cli.cli import main
try:
    main({args!r})
except SystemExit as ex:
    assert not ex.code, ex.code
heavy = sorted(m for m in ("torch", "torchvision", "sklearn") if m in sys.modules)
print("HEAVY", heavy)
"""
    env = {**os.environ, "COMP_LINE": "dlfs train model=mnist_cnn trainer."}  # completion: a config composed
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_the_command_ends_without_pythons_finalization_and_a_call_from_python_does_not(monkeypatch) -> None:
    """`dlfs` itself (main() reading sys.argv) ends through lifecycle.exit_process, with its exit code (atexit
    handlers, then os._exit: no last collection over torch's objects, and a signal until the very end keeps
    its code: test_signals.py); main(args) from a script or a test returns or raises to its caller."""
    from dlfs_cli import cli, lifecycle

    ended: list[int] = []
    monkeypatch.setattr(lifecycle, "exit_process", ended.append)
    monkeypatch.setattr(sys, "argv", ["dlfs", "--version"])
    cli.main()
    monkeypatch.setattr(sys, "argv", ["dlfs", "nope"])
    cli.main()
    assert ended == [0, 2]
    cli.main(["--version"])
    with pytest.raises(SystemExit):
        cli.main(["nope"])
    assert ended == [0, 2]


def test_device_cuda_without_cuda_is_refused(run_here, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = run_here("train", "device=cuda", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        out.stderr.strip()
        == "dlfs: error: device=cuda: CUDA is not available on this machine; use device=cpu or device=auto"
    )


def test_a_cli_run_writes_the_whole_run_folder(run_here, tmp_path: Path) -> None:
    # in this process, as Hydra runs it (test_python_m_and_info starts `python -m dlfs_cli` for real)
    out = run_here("train", "trainer.epochs=2", "trainer.limit_batches=3", "hydra.run.dir=myrun", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "myrun"
    assert {p.name for p in run.iterdir()} == RUN_FILES | {".hydra"}
    assert {p.name for p in (run / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.pt", "best.pt"}
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert "epoch 2/2" in out.stdout  # plain log lines when the output is not a terminal

    again = run_here("train", "hydra.run.dir=myrun", cwd=tmp_path)  # never overwrite a finished run
    assert again.returncode == 2 and "already holds a run" in again.stderr


@pytest.mark.slow
def test_two_runs_started_together_get_two_folders(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "dlfs_cli", "train", "trainer.epochs=0"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    runs = sorted((tmp_path / "outputs" / "boston").iterdir())
    assert len(runs) == 2
    # the folder is named to the microsecond: runs started in the same second still differ
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}", r.name) for r in runs), runs
    assert all(json.loads((r / "summary.json").read_text())["status"] == "completed" for r in runs)


def test_python_m_and_info(tmp_path: Path) -> None:
    out = run_dlfs("train", "--info", cwd=tmp_path)
    assert out.returncode == 0 and "Config search path" in out.stdout


def test_from_starts_a_new_run_from_an_earlier_runs_config(run_here, tmp_path: Path) -> None:
    """dlfs train from=RUN KEY=VALUE: that run's command-line choices, then these; a folder of its own; the
    source recorded in summary.json and left as it was."""
    source = ["model=boston", "trainer.epochs=2", "trainer.limit_batches=3", "optimizer.lr=0.02", "seed=3"]
    out = run_here("train", *source, "figures.enabled=false", "device=cpu", "hydra.run.dir=src", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    before = (tmp_path / "src" / "summary.json").read_text()
    out = run_here("train", "from=src", "optimizer.lr=0.005", "hydra.run.dir=new", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load((tmp_path / "new" / "config.yaml").read_text())
    assert config["optimizer"]["lr"] == 0.005 and config["seed"] == 3 and config["trainer"]["limit_batches"] == 3
    assert config["figures"]["enabled"] is False  # every recorded choice, not only the model's
    summary = json.loads((tmp_path / "new" / "summary.json").read_text())
    assert summary["from_run"] == str((tmp_path / "src").resolve()) and summary["status"] == "completed"
    assert (tmp_path / "src" / "summary.json").read_text() == before
    assert "optimizer.lr=0.02" not in (tmp_path / "new" / ".hydra" / "overrides.yaml").read_text()
    shown = run_here("train", "from=src", "--cfg", "job", cwd=tmp_path)  # an option after from=
    assert shown.returncode == 0 and "lr: 0.02" in shown.stdout, shown.stderr
    out = run_here("train", "from=src", "-m", "optimizer.lr=0.01,0.005", "hydra.sweep.dir=sw", cwd=tmp_path)
    assert out.returncode == 0, out.stderr  # a sweep from it: each job with the recorded choices
    for job, lr in (("0", 0.01), ("1", 0.005)):
        config = yaml.safe_load((tmp_path / "sw" / job / "config.yaml").read_text())
        assert config["optimizer"]["lr"] == lr and config["seed"] == 3
    again = run_here("train", "trainer.epochs=0", "device=cpu", "hydra.run.dir=plain", cwd=tmp_path)
    assert again.returncode == 0 and "from_run" not in json.loads((tmp_path / "plain" / "summary.json").read_text())
    (tmp_path / "notarun").mkdir()
    for args, message in (
        (["from=nowhere"], "from=nowhere: no such folder"),
        (["from=notarun"], "from=notarun: not a dlfs run folder"),
        (["from=src", "resume=src"], "give one of them"),
    ):
        out = run_here("train", *args, cwd=tmp_path)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # joblib's worker processes each import torch (~8 s)
def test_jobs_in_other_processes_record_the_run_they_started_from(run_here, tmp_path: Path) -> None:
    source = ["trainer.epochs=1", "trainer.limit_batches=2", "device=cpu", "figures.enabled=false"]
    assert run_here("train", *source, "hydra.run.dir=src", cwd=tmp_path).returncode == 0
    out = run_here(
        "train", "-m", "from=src", "seed=1,2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "hydra.sweep.dir=sw", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for job in ("0", "1"):
        summary = json.loads((tmp_path / "sw" / job / "summary.json").read_text())
        assert summary["from_run"] == str((tmp_path / "src").resolve())


def test_options_may_come_after_the_overrides(run_here, tmp_path: Path) -> None:
    """Hydra's parser takes no option after an override (`a=1 -m b=2` was argparse's usage text): dlfs puts them
    first."""
    out = run_here("train", "trainer.epochs=0", "device=cpu", "-m", "seed=1,2", "hydra.sweep.dir=sw", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "sw").iterdir() if p.name.isdigit()) == ["0", "1"]


def test_the_config_tree_is_shown_on_request_only(run_here, tmp_path: Path) -> None:
    quiet = run_here("train", "trainer.epochs=0", "device=cpu", "hydra.run.dir=a", cwd=tmp_path)
    loud = run_here("train", "trainer.epochs=0", "device=cpu", "verbose=true", "hydra.run.dir=b", cwd=tmp_path)
    assert quiet.returncode == loud.returncode == 0
    assert "── optimizer" not in quiet.stdout + quiet.stderr
    assert "── optimizer" in loud.stdout + loud.stderr
    # a sweep shows it once, for its first job: the others differ by the overrides Hydra logs for each
    sweep = run_here("train", "-m", "trainer.epochs=0", "device=cpu", "verbose=true", "seed=1,2", cwd=tmp_path)
    assert sweep.returncode == 0 and (sweep.stdout + sweep.stderr).count("── optimizer") == 1
