"""hydra/sweeper=optuna with its study kept beside its jobs, so that `dlfs train resume=<sweep folder>` continues
a study that was interrupted, in the same folder (conf/hydra/sweeper/optuna.yaml; pip install 'dlfs-cli[optuna]').

FolderStudy is hydra-optuna-sweeper's sweeper with three changes:
- it saves the sweep's config as multirun.yaml, as Hydra's basic sweeper does (the plugin saves none): what a
  resume launches again;
- each trial records its job (user attributes `dlfs_job`, and `dlfs_sweep`: the id of the sweep folder, kept in
  its SWEEP_ID_FILE), so that a job whose value the study never got can be told to it later;
- hydra.sweeper.n_trials counts the trials this folder's sweep asked for before: a study continued there asks
  only for the ones it had not, as jobs numbered after the others.

A resume (dlfs_cli.sweep_resume) first runs again the jobs that did not complete, as for any sweep. Then every
completed job whose trial is not complete (failed, or left `RUNNING` by a killed process, which reports a batch
of trials only when the whole batch has returned) is told to the study as a new trial with the same parameters,
Optuna never changing a finished trial; trials left running are marked failed. Then the trials not yet asked
for are launched with the sweep's own command.
"""

from __future__ import annotations

import math
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from omegaconf import DictConfig, OmegaConf

from dlfs_cli.errors import DlfsError
from dlfs_cli.runs import read_run
from dlfs_cli.sweep import job_folders, next_job
from dlfs_cli.tracking import MULTIRUN_FILE, log

# Optuna's own lines ("A new study created in RDB ...") in dlfs's format, through the console's handler,
# not in its coloured one
optuna.logging.disable_default_handler()
optuna.logging.enable_propagation()

JOB, SWEEP, AGAIN = "dlfs_job", "dlfs_sweep", "dlfs_run_again_of"  # trial user attributes
RESULTS_FILE = "optimization_results.yaml"  # the plugin's record of the best trial, in the sweep folder
SWEEP_ID_FILE = ".sweep_id"  # in the sweep folder: what its trials are tagged with (a path moves, an id stays)


class FolderStudy(OptunaSweeperImpl):
    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None  # set by setup(), before any sweep
        folder = Path(str(self.config.hydra.sweep.dir))
        OmegaConf.save(self.config, folder / MULTIRUN_FILE)
        resumed = (folder / SWEEP_ID_FILE).is_file()  # else a new sweep folder: no trial of it can be stored
        asked = len(asked_for(existing_study(self.storage, self.study_name), folder)) if resumed else 0
        self.job_idx = next_job(folder)
        if asked:  # a resume: the rest of the study, its jobs numbered on
            log.info("study: %d of its %d trials ran before; %d to go", asked, self.n_trials, self.n_trials - asked)
            self._seed_on(asked)
        self.n_trials -= asked
        if self.n_trials > 0:
            super().sweep(arguments)

    def _seed_on(self, asked: int) -> None:
        """A study continued by a resume: its sampler seeded again with seed + the trials asked for so far. With
        the seed the study began with, TPE (whose first 10 trials are random) would propose its first trials
        again."""
        assert self.config is not None
        sampler = self.config.hydra.sweeper.sampler
        if OmegaConf.select(sampler, "seed") is not None:  # a sampler without a seed draws anew anyway
            self.sampler = instantiate(sampler, seed=int(sampler.seed) + asked)

    def _configure_trials(self, trials: list[Any], *space: Any) -> Sequence[Sequence[str]]:
        overrides = super()._configure_trials(trials, *space)
        sweep_id = folder_id(Path(str(self.sweep_dir)))
        for offset, trial in enumerate(trials):  # launched next as jobs job_idx, job_idx + 1, ...
            trial.set_user_attr(JOB, self.job_idx + offset)
            trial.set_user_attr(SWEEP, sweep_id)
        return overrides


def folder_id(folder: Path) -> str:
    """The sweep folder's id (SWEEP_ID_FILE), made by its first sweep."""
    path = folder / SWEEP_ID_FILE
    if not path.is_file():
        path.write_text(f"{uuid.uuid4()}\n")
    return path.read_text().strip()


def existing_study(storage: Any, name: Any) -> optuna.Study | None:
    """The study of that name in that storage, or None where there is none yet (a new study's first sweep)."""
    if storage is None:
        return None
    try:
        return optuna.load_study(study_name=str(name), storage=str(storage))
    except KeyError:
        return None


def asked_for(study: optuna.Study | None, folder: Path) -> list[optuna.trial.FrozenTrial]:
    """The trials this folder's sweep asked for (a resume's trials for jobs run again are not among them)."""
    if study is None or not (folder / SWEEP_ID_FILE).is_file():
        return []
    sweep_id = folder_id(folder)
    trials = study.get_trials(deepcopy=False)
    return [t for t in trials if t.user_attrs.get(SWEEP) == sweep_id and AGAIN not in t.user_attrs]


def study_of(folder: Path, saved: DictConfig) -> optuna.Study | None:
    """The sweep's study, from the storage its multirun.yaml names (the folder's own optuna.db by default);
    None, with a warning, for a study kept in memory (hydra.sweeper.storage=null): its jobs are resumed alone."""
    sweeper = saved.hydra.sweeper
    if sweeper.storage is None:
        log.warning("resume: the sweep's Optuna study was kept in memory (hydra.sweeper.storage=null): it ended with")
        return None
    storage = str(sweeper.storage)
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        raise DlfsError(f"resume={folder}: the sweep's Optuna study is not there: no file {storage[10:]}")
    try:
        study = existing_study(storage, sweeper.study_name)
    except (ImportError, sqlalchemy.exc.SQLAlchemyError) as ex:
        reason = " ".join(str(ex).split())[:200]
        raise DlfsError(f"resume={folder}: cannot open the sweep's Optuna study in {storage}: {reason}") from None
    if study is None:
        raise DlfsError(f"resume={folder}: no study '{sweeper.study_name}' in {storage}")
    return study


def tell_again(folder: Path, saved: DictConfig, study: optuna.Study) -> None:
    """After a resume ran the jobs that had not completed: the trials a killed sweep left running are failed,
    and each completed job whose trial is not complete is a new trial with the job's parameters and value;
    optimization_results.yaml follows."""
    mine = asked_for(study, folder)
    for trial in mine:
        if trial.state == optuna.trial.TrialState.RUNNING:  # its process is gone: this one holds the folder's lock
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    sweep_id = folder_id(folder)
    latest = {t.user_attrs[JOB]: t for t in study.get_trials() if t.user_attrs.get(SWEEP) == sweep_id}
    metric = str(saved.sweep.metric)
    for job in (r for r in (read_run(p) for p in job_folders(folder)) if r is not None):
        value, tried = job.metrics.get(metric), latest.get(job.job)
        if job.status != "completed" or tried is None or tried.state == optuna.trial.TrialState.COMPLETE:
            continue
        if value is None or not math.isfinite(value):
            continue
        with warnings.catch_warnings():  # "experimental" in optuna 2.10, which the optuna extra pins
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.add_trial(
                optuna.trial.create_trial(
                    params=tried.params,
                    distributions=tried.distributions,
                    value=value,
                    user_attrs={**tried.user_attrs, AGAIN: tried.number},
                )
            )
        log.info("study: job %s completed: told to the study (%s %.6g)", job.job, metric, value)
    try:
        best = study.best_trial
    except ValueError:  # no trial completed yet
        return
    OmegaConf.save(
        OmegaConf.create({"name": "optuna", "best_params": best.params, "best_value": best.value}),
        folder / RESULTS_FILE,
    )


def trials_left(folder: Path, saved: DictConfig, study: optuna.Study) -> int:
    """The trials of the sweep's hydra.sweeper.n_trials that it has not asked for yet."""
    return int(saved.hydra.sweeper.n_trials) - len(asked_for(study, folder))
