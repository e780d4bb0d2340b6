"""hydra/sweeper=optuna (conf/hydra/sweeper/optuna.yaml, pip install 'dlfs-cli[optuna]'): the preset, what a job
hands the sweeper (a number, or an exception that Optuna records as a FAILED trial), and a real study."""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import SMOKE, run_dlfs, wait_for
from hydra.types import RunMode
from omegaconf import OmegaConf

from dlfs_cli import cli, sweep
from dlfs_cli.errors import DlfsError
from dlfs_cli.tracking import MULTIRUN_FILE

OPTUNA = "hydra_plugins.dlfs_optuna_sweeper.DlfsOptunaSweeper"  # the plugin's, its study kept with the sweep
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def needs_the_plugin() -> None:
    pytest.importorskip("optuna", reason="hydra/sweeper=optuna needs pip install 'dlfs-cli[optuna]'")
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper", reason="hydra/sweeper=optuna needs pip install 'dlfs-cli[optuna]'"
    )


@pytest.fixture
def job_of(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Job 3 of a sweep under the given sweeper (Hydra's config, as sweep.py reads it)."""

    def job(sweeper: str) -> None:
        hydra = SimpleNamespace(
            mode=RunMode.MULTIRUN,
            sweeper=OmegaConf.create({"_target_": sweeper}),
            launcher=OmegaConf.create({"_target_": BASIC_LAUNCHER}),
            sweep=SimpleNamespace(dir=str(tmp_path)),
            job=SimpleNamespace(num=3),
        )
        monkeypatch.setattr(sweep, "HydraConfig", SimpleNamespace(initialized=lambda: True, get=lambda: hydra))

    return job


def test_under_optuna_a_job_that_did_not_complete_raises_after_recording_itself(job_of, make_cfg, tmp_path) -> None:
    cfg = make_cfg(*SMOKE)
    job_of(OPTUNA)
    assert sweep.under_optuna()
    with pytest.raises(sweep.TrialFailed, match=r"^job 3 failed: no data here$"):
        sweep.job_failed(tmp_path / "3", cfg, DlfsError("no data here"))
    assert '"status": "failed"' in (tmp_path / "3" / "summary.json").read_text()  # recorded as today
    with pytest.raises(sweep.TrialFailed, match="job 3 refused: busy"):
        sweep.job_refused(cfg, DlfsError("busy"))
    # any other sweeper is handed NaN, as before (Hydra's basic sweeper ignores it)
    job_of(BASIC_SWEEPER)
    assert not sweep.under_optuna()
    assert math.isnan(sweep.job_failed(tmp_path / "4", cfg, DlfsError("no data here")))
    assert math.isnan(sweep.job_refused(cfg, DlfsError("busy")))


def test_a_completed_job_hands_optuna_a_finite_metric_or_fails_the_trial(job_of, make_cfg) -> None:
    cfg = make_cfg(*SMOKE)
    job_of(OPTUNA)
    assert sweep.objective(cfg, {"val_loss": 1.5, "test_loss": 2.0}) == 1.5
    with pytest.raises(sweep.TrialFailed, match="sweep.metric=val_loss is nan"):
        sweep.objective(cfg, {"val_loss": math.nan})
    with pytest.raises(sweep.TrialFailed, match=r"val_accuracy is not a metric of this job \(it has: val_loss\)"):
        sweep.objective(make_cfg(*SMOKE, "sweep.metric=val_accuracy"), {"val_loss": 1.5})
    job_of(BASIC_SWEEPER)
    assert sweep.objective(make_cfg(*SMOKE, "sweep.metric=val_accuracy"), {"val_loss": 1.5}) is None


def test_a_diverging_job_raises_under_optuna_and_returns_nan_otherwise(job_of, make_cfg, tmp_path) -> None:
    """The job itself (cli._train_job), from its diverging training to what it hands the sweeper."""
    cfg = make_cfg(*SMOKE, "optimizer.lr=1e6", "figures.enabled=false")
    job_of(OPTUNA)
    with pytest.raises(sweep.TrialFailed, match="job 3 diverged: training diverged"):
        cli._train_job(cfg, tmp_path / "a", multirun=True)
    assert '"status": "diverged"' in (tmp_path / "a" / "summary.json").read_text()
    job_of(BASIC_SWEEPER)
    assert math.isnan(cli._train_job(cfg, tmp_path / "b", multirun=True))
    assert '"status": "diverged"' in (tmp_path / "b" / "summary.json").read_text()


def test_the_preset_takes_its_direction_storage_and_seed_from_the_sweep(make_cfg) -> None:
    needs_the_plugin()
    base = ["hydra/sweeper=optuna", "hydra.sweep.dir=/tmp/a sweep"]

    def sweeper(*overrides: str):
        from hydra import compose, initialize_config_dir

        from dlfs_cli.config import conf_dir

        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name="train", overrides=[*base, *overrides], return_hydra_config=True).hydra.sweeper

    s = sweeper()
    assert s._target_ == OPTUNA and s.sampler._target_ == "optuna.samplers.TPESampler" and s.sampler.seed == 0
    assert s.direction == "minimize" and s.storage == "sqlite:////tmp/a sweep/optuna.db" and s.study_name == "dlfs"
    assert s.n_trials == 20 and s.max_failure_rate == 1.0  # a failed trial never ends the study
    assert sweeper("sweep.metric=val_accuracy").direction == "maximize"  # auto, as the sweep's table ranks
    assert sweeper("sweep.metric=val_accuracy", "sweep.direction=minimize").direction == "minimize"
    assert sweeper("sweep.direction=maximize").direction == "maximize"
    assert sweeper("seed=7").sampler.seed == 7
    assert sweeper("hydra/sweeper/sampler=random").sampler._target_ == "optuna.samplers.RandomSampler"


def test_without_the_plugin_the_preset_says_what_to_install(dlfs, monkeypatch, tmp_path: Path) -> None:
    """What a user without the optuna extra sees: the plugin's configs and class are not there."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    monkeypatch.delitem(ConfigStore.instance().repo["hydra"]["sweeper"], "sampler", raising=False)
    monkeypatch.delitem(Plugins.instance().class_name_to_class, OPTUNA, raising=False)
    monkeypatch.setattr(sweep, "optuna_plugin", lambda: False)
    monkeypatch.chdir(tmp_path)
    out = dlfs("train", "-m", "hydra/sweeper=optuna", "optimizer.lr=interval(1e-3,1e-1)", "hydra.sweep.dir=s")
    assert out.code == 2 and "Traceback" not in out.err
    assert "hydra/sweeper=optuna needs hydra-optuna-sweeper: pip install 'dlfs-cli[optuna]'" in out.err
    assert not (tmp_path / "s").exists()


@pytest.mark.slow  # a real study: 6 trials, each a job of its own
def test_a_study_records_a_diverged_trial_as_failed_and_goes_on(tmp_path: Path) -> None:
    needs_the_plugin()
    import optuna

    # lr on a log scale over 8 decades: Boston's SGD diverges from about lr=1 (TPE, seed 0: trials 1 and 5 of 6)
    out = run_dlfs(
        "train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=6", "optimizer.lr=tag(log, interval(1e-4, 1e4))",
        "model=boston", "trainer.epochs=3", "device=cpu", "figures.enabled=false", "hydra.sweep.dir=sweep",
        cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    with open(tmp_path / "sweep" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    diverged = [r["job"] for r in rows if r["status"] == "diverged"]
    assert diverged and len(diverged) < 6, [(r["optimizer.lr"], r["status"]) for r in rows]
    assert {r["status"] for r in rows} <= {"completed", "diverged"}
    # the sweep ends as dlfs ends any sweep with a job that did not complete
    which = ", ".join(f"job {j} diverged" for j in diverged)
    assert out.returncode == 2
    assert f"{len(diverged)} of the sweep's jobs did not complete ({which})" in out.stderr

    study = optuna.load_study(study_name="dlfs", storage=f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}")
    assert len(study.trials) == 6  # the study went on to n_trials
    assert [r["job"] for r in rows] == [str(t.number) for t in study.trials]  # job n is trial n
    for trial, row in zip(study.trials, rows, strict=True):
        assert trial.params["optimizer.lr"] == float(row["optimizer.lr"])
        failed = row["status"] != "completed"
        assert trial.state == (optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.COMPLETE)
    # the study's best is the top of the sweep's table (summary.csv is in job order; the table ranks)
    best = min((r for r in rows if r["status"] == "completed"), key=lambda r: float(r["val_loss"]))
    assert study.best_trial.number == int(best["job"])
    assert study.best_value == pytest.approx(float(best["val_loss"]), rel=1e-5)
    assert study.best_params["optimizer.lr"] == float(best["optimizer.lr"])
    table = [line for line in out.stdout.splitlines() if re.match(r"│ +1 │", line)]
    assert table and table[0].split("│")[2].strip() == best["job"]
    assert (tmp_path / "sweep" / "optimization_results.yaml").exists()


@pytest.mark.slow  # a real study of 2 trials
def test_a_study_without_a_completed_trial_ends_as_a_sweep_does(tmp_path: Path) -> None:
    """The plugin asks its study for the best trial at the end ("Record does not exist" when none completed):
    the sweep ends with its summary and the jobs named, not with that error."""
    needs_the_plugin()
    out = run_dlfs(
        "train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "optimizer.lr=choice(1e6, 1e7)",
        "trainer.epochs=3", "device=cpu", "figures.enabled=false", "hydra.sweep.dir=sweep", cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2 and "Record does not exist" not in out.stderr + out.stdout
    assert "2 of the sweep's jobs did not complete (job 0 diverged, job 1 diverged)" in out.stderr
    assert (tmp_path / "sweep" / "summary.csv").exists()


@pytest.mark.slow  # a real study in another process, killed, then continued: about 20 s
def test_a_killed_study_continues_in_its_own_folder(run_here, tmp_path: Path) -> None:
    """SIGKILL while trial 2 trains (no handler runs: its trial is left RUNNING, the trials after it never
    asked). resume=<sweep folder> runs job 2 again, tells the study, and runs the trials not yet run as new
    jobs of the same folder: the study and summary.csv then agree on every job and on the best."""
    needs_the_plugin()
    import optuna

    n = 5
    sweep_dir = tmp_path / "a sweep"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "dlfs_cli", "train", "-m", "hydra/sweeper=optuna", f"hydra.sweeper.n_trials={n}",
            "optimizer.lr=tag(log, interval(1e-3, 1e-1))", "trainer.epochs=3", "device=cpu",
            "figures.enabled=false", f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: (sweep_dir / "2" / "config.yaml").exists(), proc)
    proc.kill()
    proc.wait()
    assert len(sweep.job_folders(sweep_dir)) < n  # stopped in the middle of the study

    out = run_here("train", f"resume={sweep_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    with open(sweep_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == [str(j) for j in range(n)]  # numbered on after the jobs already there
    assert {r["status"] for r in rows} == {"completed"}
    study = optuna.load_study(study_name="dlfs", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]  # the killed one failed
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    by_job = {t.user_attrs["dlfs_job"]: t for t in completed}
    assert sorted(by_job) == list(range(n)) and len(completed) == n
    for row in rows:
        trial = by_job[int(row["job"])]
        assert trial.params["optimizer.lr"] == float(row["optimizer.lr"])
        assert trial.value == pytest.approx(float(row["val_loss"]), rel=1e-5)  # csv: 6 digits
    assert len({r["optimizer.lr"] for r in rows}) == n  # the continued sampler proposed new values
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert study.best_trial.user_attrs["dlfs_job"] == int(best["job"])
    assert OmegaConf.load(sweep_dir / "optimization_results.yaml").best_value == study.best_value

    out = run_here("train", f"resume={sweep_dir}", cwd=tmp_path)  # the study is complete: nothing runs again
    assert out.returncode == 0 and len(optuna.load_study(study_name="dlfs", storage=study._storage).trials) == len(
        study.trials
    )


def test_a_resume_tells_the_study_what_its_jobs_did(tmp_path: Path) -> None:
    """The study's side of resume=<sweep folder> (optuna_study.tell_again, trials_left), on a study as a killed
    sweep of batches of 2 (n_jobs=2) leaves it: trial 0 completed; trials 1 and 2 a batch, whose job 1 failed
    and job 2 completed but was never told (the plugin tells a batch once it has all returned); trial 3 still
    RUNNING (its job killed); 6 trials asked for. The resume ran job 1 again (completed now) and job 3 (which
    diverged): jobs 1 and 2 are told, job 3's trial is failed."""
    needs_the_plugin()
    import optuna

    from dlfs_cli import optuna_study
    from dlfs_cli.summary import Summary

    folder = tmp_path / "a sweep"
    folder.mkdir()
    saved = OmegaConf.create(
        {
            "hydra": {
                "sweep": {"dir": str(folder)},
                "sweeper": {"storage": "sqlite:///${hydra.sweep.dir}/optuna.db", "study_name": "dlfs", "n_trials": 6},
            },
            "sweep": {"metric": "val_loss"},
        }
    )
    study = optuna.create_study(study_name="dlfs", storage=saved.hydra.sweeper.storage)
    lr = optuna.distributions.LogUniformDistribution(1e-3, 1e-1)
    sweep_id = optuna_study.folder_id(folder)
    # (state in the study, the job's status now, its val_loss now)
    jobs = [("COMPLETE", "completed", 5.0), ("FAIL", "completed", 2.5), ("RUNNING", "completed", 4.0)]
    jobs.append(("RUNNING", "diverged", None))
    for n, (state, status, val_loss) in enumerate(jobs):
        trial = study.ask({"optimizer.lr": lr})
        trial.set_user_attr(optuna_study.JOB, n)
        trial.set_user_attr(optuna_study.SWEEP, sweep_id)
        if state != "RUNNING":
            study.tell(trial, 5.0 if state == "COMPLETE" else None, state=optuna.trial.TrialState[state])
        hydra = folder / str(n) / ".hydra"  # the job folder, as Hydra and the job left it
        hydra.mkdir(parents=True)
        (hydra / "overrides.yaml").write_text(f"- optimizer.lr={trial.params['optimizer.lr']}\n")
        (hydra / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {n}\n    name: train\n")
        metrics = {} if val_loss is None else {"val_loss": val_loss}
        Summary(status=status, metrics=metrics).save(folder / str(n) / "summary.json")
    stranger = study.ask({"optimizer.lr": lr})  # a trial of another folder's sweep sharing this storage
    stranger.set_user_attr(optuna_study.JOB, 1)
    stranger.set_user_attr(optuna_study.SWEEP, "another sweep's id")
    assert optuna_study.trials_left(folder, saved, study) == 2 and sweep.next_job(folder) == 4

    optuna_study.tell_again(folder, saved, study)
    trials = optuna.load_study(study_name="dlfs", storage=saved.hydra.sweeper.storage).trials
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "FAIL", "FAIL", "FAIL", "RUNNING", "COMPLETE", "COMPLETE"]  # the stranger: left
    told = {t.user_attrs[optuna_study.JOB]: t for t in trials[5:]}
    assert sorted(told) == [1, 2] and (told[1].value, told[2].value) == (2.5, 4.0)
    assert told[1].params == trials[1].params and told[1].user_attrs[optuna_study.AGAIN] == 1
    best = OmegaConf.load(folder / optuna_study.RESULTS_FILE)
    assert best.best_value == 2.5 and best.best_params == trials[1].params
    assert optuna_study.trials_left(folder, saved, study) == 2  # the trials told again were not asked for
    optuna_study.tell_again(folder, saved, study)  # a second resume tells nothing twice
    assert len(optuna.load_study(study_name="dlfs", storage=saved.hydra.sweeper.storage).trials) == len(trials)


def test_a_study_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    needs_the_plugin()
    from dlfs_cli import optuna_study

    def saved(storage: str | None) -> OmegaConf:
        sweeper = {"storage": storage, "study_name": "dlfs", "n_trials": 6}
        return OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "sweeper": sweeper}})

    with pytest.raises(DlfsError, match=r"the sweep's Optuna study is not there: no file /nowhere/optuna.db$"):
        optuna_study.study_of(tmp_path, saved("sqlite:////nowhere/optuna.db"))
    (tmp_path / "junk.db").write_text("not a database")
    with pytest.raises(DlfsError, match=r"cannot open the sweep's Optuna study in sqlite:///.*junk.db: "):
        optuna_study.study_of(tmp_path, saved(f"sqlite:///{tmp_path / 'junk.db'}"))
    assert optuna_study.study_of(tmp_path, saved(None)) is None  # in memory: the jobs are resumed alone


def test_a_resume_runs_the_trials_left_with_the_sweeps_own_command(tmp_path: Path) -> None:
    """What multirun.yaml (saved by the sweeper) gives a resume: the study's storage where the folder is now,
    and the command that runs the trials left, into that folder."""
    needs_the_plugin()
    from dlfs_cli import sweep_resume

    folder = tmp_path / "moved sweep"
    folder.mkdir()
    overrides = {
        "hydra": [
            "hydra/sweeper=optuna",
            "hydra.sweeper.n_trials=6",
            "hydra.sweep.dir=old",
            "hydra.mode=MULTIRUN",
            "hydra.sweep.subdir=${hydra.job.num}_${hydra.job.override_dirname}",
        ],  # fmt: skip
        "task": ["optimizer.lr=tag(log, interval(1e-4, 1))", "model=boston"],
    }
    sweeper = {"_target_": "hydra_plugins.dlfs_optuna_sweeper.DlfsOptunaSweeper"}
    sweeper["storage"] = "sqlite:///${hydra.sweep.dir}/optuna.db"
    config = {"hydra": {"sweep": {"dir": "old"}, "sweeper": sweeper, "overrides": overrides}}
    OmegaConf.save(OmegaConf.create(config), folder / MULTIRUN_FILE)
    saved = sweep_resume.optuna_sweep(folder)
    assert saved is not None and saved.hydra.sweeper.storage == f"sqlite:///{folder.resolve()}/optuna.db"
    assert sweep_resume._command_of(folder, saved) == [
        "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=6",
        "hydra.sweep.subdir=${hydra.job.num}_${hydra.job.override_dirname}",  # the job's to resolve
        f"hydra.sweep.dir={folder.resolve()}",
        "optimizer.lr=tag(log, interval(1e-4, 1))", "model=boston",
    ]  # fmt: skip
    sweeper["_target_"] = BASIC_SWEEPER  # any other sweeper: its jobs are resumed, there is no study
    OmegaConf.save(OmegaConf.create(config), folder / MULTIRUN_FILE)
    assert sweep_resume.optuna_sweep(folder) is None
