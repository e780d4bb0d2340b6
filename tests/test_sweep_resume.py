"""dlfs train resume=<sweep folder>: the jobs that did not complete run again (from their last.pt when they
have one), the completed ones are left alone, and the sweep's summary is made again."""

from __future__ import annotations

import csv
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

import dlfs_cli.train
from dlfs_cli.data.boston import BUNDLED_CSV
from dlfs_cli.train import train
from dlfs_cli.trainer import Trainer

QUICK = ["trainer.epochs=2", "device=cpu", "figures.enabled=false"]


def status(job: Path) -> str:
    return json.loads((job / "summary.json").read_text())["status"]


def test_a_sweep_finishes_what_failed_or_was_interrupted(run_here, make_cfg, tmp_path: Path, monkeypatch) -> None:
    """Job 0 is stopped at step 5 (last.pt kept), job 1 then never starts, job 2's data file is missing.
    Once the file is there, resume=<sweep> continues job 0 exactly where it stopped, runs jobs 1 and 2 from
    their recorded overrides, and summary.csv has all three completed."""
    shutil.copy(BUNDLED_CSV, tmp_path / "good.csv")
    original = Trainer._after_step

    def stop_at_step_5(self, *args):
        if self.step == 5 and not (tmp_path / "stopped").exists():
            (tmp_path / "stopped").touch()
            self.stop_signal = signal.SIGINT
        original(self, *args)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_after_step", stop_at_step_5)
        sweep_args = ["-m", "data.path=good.csv,good.csv,late.csv", "optimizer.lr=0.01", *QUICK, "hydra.sweep.dir=sw"]
        out = run_here("train", *sweep_args, cwd=tmp_path)
    assert out.returncode == 130  # the stop at step 5: a SIGINT
    sweep = tmp_path / "sw"
    assert [status(sweep / j) for j in "012"] == ["interrupted", "skipped", "skipped"]
    assert torch.load(sweep / "0" / "checkpoints" / "last.pt", weights_only=True)["step"] == 5

    shutil.copy(BUNDLED_CSV, tmp_path / "late.csv")
    out = run_here("train", "resume=sw", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [status(sweep / j) for j in "012"] == ["completed"] * 3
    # the jobs say what they do, as in a sweep (this part of the command runs outside Hydra's logging)
    assert "resume: sweep sw: 3 jobs, 3 to run again" in out.stdout
    assert out.stdout.count("completed: val_loss") == 3
    with open(sweep / "summary.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["completed"] * 3
    assert (sweep / "sweep.png").exists()

    straight = tmp_path / "straight"  # job 0, never stopped
    train(make_cfg(f"data.path={tmp_path / 'good.csv'}", "optimizer.lr=0.01", *QUICK), straight)
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(sweep / "0" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    before = (sweep / "0" / "summary.json").read_text()
    out = run_here("train", "resume=sw", cwd=tmp_path)  # nothing left to do: completed jobs are left alone
    assert out.returncode == 0 and (sweep / "0" / "summary.json").read_text() == before


def test_completed_and_diverged_jobs_are_left_alone(run_here, tmp_path: Path) -> None:
    """A job that diverged would diverge again at the same step from its last.pt: resume=<sweep> leaves it as it
    is, with the completed ones, and runs the failed one again."""
    sweep = tmp_path / "sw"
    for job, state in (("0", "completed"), ("1", "diverged"), ("2", "failed")):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text("- trainer.epochs=1\n- trainer.limit_batches=2\n")
        (sweep / job / "summary.json").write_text(json.dumps({"status": state, "error": "as it was"}) + "\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")  # a sweep made it
    before = {job: (sweep / job / "summary.json").read_text() for job in "01"}
    out = run_here("train", "resume=sw", cwd=tmp_path)
    assert out.returncode == 2 and "1 of the sweep's jobs did not complete (job" in out.stderr, out.stderr
    assert {job: (sweep / job / "summary.json").read_text() for job in "01"} == before
    assert not (sweep / "1" / "metrics.csv").exists()  # never trained again
    assert status(sweep / "2") == "completed"


def test_resuming_a_sweep_takes_no_other_arguments(run_here, tmp_path: Path) -> None:
    (tmp_path / "sw" / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "sw" / "0" / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=0.1\n")
    (tmp_path / "sw" / "multirun.yaml").write_text("hydra: {}\n")  # a sweep made it
    out = run_here("train", "resume=sw", "trainer.epochs=5", cwd=tmp_path)
    assert out.returncode == 2 and "give no other arguments" in out.stderr


def test_a_malformed_job_and_a_stale_stop_file_do_not_stop_the_others(run_here, tmp_path: Path) -> None:
    """Job 0's config.yaml is malformed: one line says so and job 1 still runs. The .stop file that a sweep
    killed while it stopped left behind does not skip the jobs of the resume."""
    sweep = tmp_path / "sw"
    for job in ("0", "1"):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=0.01\n- trainer.epochs=1\n")
        (sweep / job / "summary.json").write_text('{"status": "interrupted"}\n')
    (sweep / "0" / "config.yaml").write_text("model: [unclosed\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")  # a sweep made it
    (sweep / ".stop").write_text("15")
    out = run_here("train", "resume=sw", cwd=tmp_path)
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    assert out.returncode == 2 and "1 of the sweep's jobs did not complete" in out.stderr, out.stderr
    assert "cannot read" in out.stdout + out.stderr and "sw/0/config.yaml" in out.stdout + out.stderr
    assert status(sweep / "1") == "completed" and not (sweep / ".stop").exists()


def test_a_job_that_crashes_again_is_recorded_and_the_others_run(
    run_here, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job whose re-run crashed with anything but a DlfsError (a torch error, a bug) ended the whole resume
    with a traceback: the jobs after it never ran and summary.csv was not made again. As in a sweep, it is
    recorded, the others run, and the command exits 2."""
    sweep = tmp_path / "sw"
    for job in ("0", "1"):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text("- trainer.epochs=1\n- trainer.limit_batches=2\n")
        (sweep / job / "summary.json").write_text('{"status": "failed"}\n')
    (sweep / "multirun.yaml").write_text("hydra: {}\n")  # a sweep made it
    real = dlfs_cli.train.train

    def crashing(cfg, run_dir, *args, **kwargs):
        if Path(run_dir).name == "0":
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")
        return real(cfg, run_dir, *args, **kwargs)

    monkeypatch.setattr(dlfs_cli.train, "train", crashing)
    out = run_here("train", "resume=sw", cwd=tmp_path)
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    assert out.returncode == 2 and "1 of the sweep's jobs did not complete" in out.stderr, out.stderr
    assert ": RuntimeError: CUDA error: an illegal memory access was encountered\n" in out.stdout  # its first line
    assert status(sweep / "0") == "failed" and status(sweep / "1") == "completed"
    assert (sweep / "summary.csv").is_file()
