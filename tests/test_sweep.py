"""Sweeps (`dlfs train -m`): summary.csv, ranking, seeds, failure isolation, launchers; `dlfs runs`;
logger=tensorboard."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMOKE, run_dlfs, wait_for

from dlfs_cli import cli, lifecycle
from dlfs_cli.runs import list_runs
from dlfs_cli.train import train

BOSTON = ["trainer.epochs=2", "device=cpu", "figures.enabled=false"]

# make test (-n auto --dist loadgroup): the tests that read the sweep fixture run on one worker, which makes
# it once; the others go wherever a worker is free
on_the_sweeps_worker = pytest.mark.xdist_group("seed_sweep")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def seed_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """Two learning rates x two seeds, Hydra's basic launcher."""
    cwd = tmp_path_factory.mktemp("seed_sweep")
    with pytest.MonkeyPatch.context() as m:  # in this process: the dlfs fixture's set-up, for a session fixture
        m.setattr(lifecycle, "install_for_process", lambda: None)
        m.setattr(sys, "argv", ["dlfs"])
        m.setenv("HYDRA_FULL_ERROR", "1")
        m.chdir(cwd)
        code, out, err = 0, io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main(["train", "-m", "optimizer.lr=0.1,0.01", "seed=1,2", *BOSTON, "hydra.sweep.dir=sweep"])
            except SystemExit as ex:
                code = ex.code if isinstance(ex.code, int) else 1
    return cwd / "sweep", subprocess.CompletedProcess([], code, out.getvalue(), err.getvalue())


@on_the_sweeps_worker
def test_a_sweep_ends_with_summary_csv_ranked_by_the_metric(seed_sweep) -> None:
    sweep, out = seed_sweep
    assert out.returncode == 0, out.stderr
    rows = read_csv(sweep / "summary.csv")
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]  # a folder per job
    assert "optimizer.lr=0.01" in (sweep / "3" / ".hydra" / "overrides.yaml").read_text()
    assert [(r["optimizer.lr"], r["seed"]) for r in rows] == [("0.1", "1"), ("0.1", "2"), ("0.01", "1"), ("0.01", "2")]
    for r in rows:
        assert r["status"] == "completed" and r["epochs"] == "2" and float(r["duration_s"]) > 0
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert float(r["test_mse"]) == pytest.approx(summary["metrics"]["test_mse"], rel=1e-5)
        assert float(r["val_loss"]) == pytest.approx(summary["metrics"]["val_loss"], rel=1e-5)
    # the printed table: best (lowest validation loss) first, the test metrics beside it
    ranked = sorted(rows, key=lambda r: float(r["val_loss"]))
    table = [line for line in out.stdout.splitlines() if line.startswith("│") and "completed" in line]
    assert [line.split("│")[2].strip() for line in table[:4]] == [r["job"] for r in ranked]
    assert "best first by val_loss (lowest)" in out.stdout and "test_loss" in out.stdout
    assert "Launching 4 jobs locally" in out.stdout and "[HYDRA]" not in out.stdout + out.stderr  # one format
    # and its picture: the metric against optimizer.lr (the seeds as error bars) and the jobs' curves
    assert (sweep / "sweep.png").read_bytes().startswith(b"\x89PNG") and "picture: sweep/sweep.png" in out.stdout


@pytest.mark.parametrize(
    ("metric", "direction", "order"),
    [
        ("val_loss", "auto", ["0.3", "0.1", "0.2"]),  # lowest first
        ("val_accuracy", "auto", ["0.2", "0.1", "0.3"]),  # a metric named accuracy: highest first
        ("val_loss", "maximize", ["0.2", "0.1", "0.3"]),
        ("val_accuracy", "minimize", ["0.3", "0.1", "0.2"]),
    ],
)
def test_the_sweep_ranks_by_its_metric_in_its_direction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], metric: str, direction: str, order: list[str]
) -> None:
    """The printed table is best first by sweep.metric in sweep.direction (only val_loss lowest-first was
    checked: a reversed ranking, or one that ignored the direction, passed)."""
    from dlfs_cli import sweep as sweep_module

    for job, (lr, loss, accuracy) in enumerate([("0.1", 0.5, 0.8), ("0.2", 0.9, 0.9), ("0.3", 0.2, 0.1)]):
        folder = tmp_path / "sw" / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={lr}\n")
        metrics = {"val_loss": loss, "val_accuracy": accuracy}
        (folder / "summary.json").write_text(json.dumps({"status": "completed", "metrics": metrics}))
    swept = sweep_module.SweepFolder()
    swept.path, swept.metric, swept.direction = tmp_path / "sw", metric, direction
    sweep_module.summarize(swept)
    out = capsys.readouterr().out
    rows = [line.split("│") for line in out.splitlines() if line.startswith("│") and "completed" in line]
    assert [cells[3].strip() for cells in rows] == order, out  # #, job, optimizer.lr, ...
    expected = "highest" if (direction == "maximize" or (direction == "auto" and "accuracy" in metric)) else "lowest"
    assert f"best first by {metric} ({expected})" in out


@on_the_sweeps_worker
def test_seeds_of_one_setting_are_aggregated(seed_sweep) -> None:
    sweep, out = seed_sweep
    rows = read_csv(sweep / "summary.csv")
    groups = {g["optimizer.lr"]: g for g in read_csv(sweep / "summary_seeds.csv")}
    assert set(groups) == {"0.1", "0.01"} and all(g["seeds"] == "2" for g in groups.values())
    mses = [float(r["test_mse"]) for r in rows if r["optimizer.lr"] == "0.01"]
    assert float(groups["0.01"]["test_mse_mean"]) == pytest.approx(sum(mses) / 2, rel=1e-4)
    assert float(groups["0.01"]["test_mse_std"]) == pytest.approx(abs(mses[0] - mses[1]) / 2**0.5, rel=1e-3)
    assert "mean +- std" in out.stdout and " +- " in out.stdout


@on_the_sweeps_worker
def test_dlfs_runs_lists_the_jobs_with_their_overrides_and_metrics(seed_sweep, capsys) -> None:
    sweep, _ = seed_sweep
    list_runs([str(sweep), "--sort", "test_mse"])
    text = capsys.readouterr().out
    assert "4 run(s)" in text
    header = next(line for line in text.splitlines() if "optimizer.lr" in line)
    assert all(k in header for k in ("seed", "test_mse", "status", "model", "started"))
    lines = [line for line in text.splitlines() if "boston" in line]
    mses = [float(line.split("│")[header.split("┃").index(" test_mse ")].strip()) for line in lines]
    assert len(lines) == 4 and mses == sorted(mses)

    list_runs([str(sweep.parent), "--status", "diverged"])
    assert "0 run(s)" in capsys.readouterr().out
    list_runs([str(sweep.parent), "--model", "boston", "--limit", "1"])
    assert "1 run(s)" in capsys.readouterr().out


def test_dlfs_runs_refuses_what_it_cannot_do(run_here, tmp_path: Path) -> None:
    out = run_here("runs", "nowhere", cwd=tmp_path)
    assert out.returncode == 2 and "nowhere: no such folder" in out.stderr and "Traceback" not in out.stderr


@on_the_sweeps_worker
def test_a_finished_sweep_folder_is_not_overwritten(run_here, seed_sweep) -> None:
    sweep, _ = seed_sweep
    out = run_here("train", "-m", "optimizer.lr=0.5", f"hydra.sweep.dir={sweep}", cwd=sweep.parent)
    assert out.returncode == 2 and "already holds a sweep" in out.stderr
    assert len(read_csv(sweep / "summary.csv")) == 4


def test_jobs_that_fail_or_diverge_do_not_stop_the_others(run_here, tmp_path: Path) -> None:
    """Hydra's basic launcher, in this process; joblib's parallel processes in the slow test below."""
    out = run_here("train", "-m", "optimizer.lr=0.01,1e6,-1", *BOSTON, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout
    assert "2 of the sweep's jobs did not complete (job 1 diverged, job 2 failed)" in out.stderr
    rows = read_csv(tmp_path / "sweep" / "summary.csv")
    assert [r["status"] for r in rows] == ["completed", "diverged", "failed"]


def test_a_sweep_over_the_model_checks_each_jobs_metric_before_it_trains(run_here, tmp_path: Path) -> None:
    """sweep.metric=val_accuracy is a metric of the CNN, not of the Boston MLP: with the model swept the sweep
    cannot refuse at its start, so the Boston job fails at once (no epoch), recorded, and the sweep exits 2."""
    out = run_here(
        "train", "-m", "model=mnist_cnn,boston", "data=digits", "trainer.epochs=1", "trainer.limit_batches=2",
        "device=cpu", "figures.enabled=false", "sweep.metric=val_accuracy", "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout
    assert "1 of the sweep's jobs did not complete (job 1 failed)" in out.stderr
    rows = read_csv(tmp_path / "sweep" / "summary.csv")
    assert [r["status"] for r in rows] == ["completed", "failed"]
    assert "sweep.metric=val_accuracy is not a metric of model=boston with loss=mse" in rows[1]["error"]
    assert not (tmp_path / "sweep" / "1" / "metrics.csv").exists()  # refused before training


@pytest.mark.slow  # joblib's worker processes each import torch (~8 s)
def test_jobs_that_fail_or_diverge_in_parallel_do_not_stop_the_others(run_here, tmp_path: Path) -> None:
    out = run_here(
        "train", "-m", "optimizer.lr=0.01,1e6,-1", *BOSTON, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout
    assert "2 of the sweep's jobs did not complete (job 1 diverged, job 2 failed)" in out.stderr
    rows = read_csv(tmp_path / "sweep" / "summary.csv")
    assert [r["status"] for r in rows] == ["completed", "diverged", "failed"]
    assert "training diverged" in rows[1]["error"] and "optimizer.lr: -1.0 (must be > 0)" in rows[2]["error"]
    assert rows[0]["test_mse"] and not rows[1]["test_mse"]
    # two jobs at a time share the cores
    cores = len(os.sched_getaffinity(0))
    threads = json.loads((tmp_path / "sweep" / "0" / "summary.json").read_text())["threads"]
    assert threads == max(1, cores // 2)


def test_ctrl_c_stops_the_sweep_and_keeps_what_ran(tmp_path: Path) -> None:
    """SIGINT to the terminal's process group: the running job saves last.pt, later jobs are skipped."""
    cmd = [sys.executable, "-m", "dlfs_cli", "train", "-m", "trainer.epochs=100000", "seed=1,2", "device=cpu"]
    cmd += ["hydra.sweep.dir=sweep", "figures.enabled=false"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    metrics = tmp_path / "sweep" / "0" / "metrics.csv"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 3, proc)  # job 0 trains
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "sweep interrupted" in err.decode() and "Traceback" not in err.decode()
    rows = read_csv(tmp_path / "sweep" / "summary.csv")
    assert [r["status"] for r in rows] == ["interrupted", "skipped"]
    assert (tmp_path / "sweep" / "0" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "sweep" / ".stop").exists()


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_jobs_as_processes(tmp_path: Path) -> None:
    out = run_dlfs(
        "train", "-m", "seed=1,2", *BOSTON, "hydra/launcher=submitit_local", "hydra.sweep.dir=sweep", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert [r["status"] for r in read_csv(tmp_path / "sweep" / "summary.csv")] == ["completed", "completed"]
    assert (tmp_path / "sweep" / ".submitit").is_dir()  # really submitted through submitit


def test_tensorboard_logger_writes_events_that_tensorboard_reads(make_cfg, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(make_cfg(*SMOKE, "logger=tensorboard"), tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for split in ("val", "test"):  # both splits, each under its own name
        rows = [r for r in read_csv(tmp_path / "run" / "metrics.csv") if r["split"] == split]
        logged = events.Scalars(f"{split}/mse")
        assert rows and [e.step for e in logged] == [int(r["step"]) for r in rows]
        assert [e.value for e in logged] == pytest.approx([float(r["mse"]) for r in rows], rel=1e-5)
    assert {"train/loss", "train/lr"} <= set(events.Tags()["scalars"])


def test_the_csv_logger_writes_no_event_files(make_cfg, tmp_path: Path) -> None:
    train(make_cfg(*SMOKE), tmp_path / "run")
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_sweep_png_draws_words_and_numbers_and_nothing_without_the_metric(tmp_path: Path) -> None:
    """A categorical parameter gets a place per value, a numeric one its value; jobs that lack the ranking
    metric (all failed, or another metric named) give no picture rather than an empty one."""
    from dlfs_cli.runs import Run
    from dlfs_cli.summary import Summary
    from dlfs_cli.sweep_figure import draw_sweep

    jobs = []
    for i, (act, lr) in enumerate([("tanh", "0.1"), ("relu", "0.1"), ("tanh", "0.01"), ("relu", "0.01")]):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "metrics.csv").write_text(
            "epoch,step,split,lr,loss,elapsed_s\n1,5,train,0.1,3.0,1\n1,5,val,0.1,2.5,1\n2,10,train,0.1,2.0,2\n"
        )
        summary = Summary().update(status="completed", metrics={"val_loss": 1.0 + i})
        jobs.append(Run(folder, summary, {"model.activation": act, "optimizer.lr": lr}, i))
    path = draw_sweep(jobs, "val_loss", tmp_path / "sweep.png")
    assert path is not None and path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 10_000
    assert draw_sweep(jobs, "val_accuracy", tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_sweep_png_of_a_search_shows_points_on_the_metrics_scale_with_short_labels(tmp_path: Path) -> None:
    """An Optuna search: values like 0.548858622576932 (legends show 4 digits), a loss from 5e3 to 2e25 (a log
    axis, else all but one point sit on zero), points not joined (the order of a search's values means nothing)."""
    from dlfs_cli.runs import Run
    from dlfs_cli.summary import Summary
    from dlfs_cli.sweep_figure import sweep_figure

    jobs = []
    for i, (lr, loss) in enumerate(
        [("0.548858622576932", 3e8), ("0.4237124338589708", 5e3), ("0.5449286946785", 2e25)]
    ):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "metrics.csv").write_text(f"epoch,step,split,lr,loss,elapsed_s\n1,5,train,{lr},{loss},1\n")
        jobs.append(
            Run(folder, Summary().update(status="completed", metrics={"val_loss": loss}), {"optimizer.lr": lr}, i)
        )
    fig = sweep_figure(jobs, "val_loss", searched=True)
    against, curves = fig.axes
    assert against.get_yscale() == "log" and curves.get_yscale() == "log"
    assert {line.get_linestyle() for line in against.get_lines()} == {"None"}  # the points (and error bar caps)
    assert [t.get_text() for t in curves.get_legend().get_texts()] == [
        "optimizer.lr=0.5489",
        "optimizer.lr=0.4237",
        "optimizer.lr=0.5449",
    ]
    grid = sweep_figure(jobs, "val_loss")  # a grid's values are joined in their order
    assert "-" in [line.get_linestyle() for line in grid.axes[0].get_lines()]
