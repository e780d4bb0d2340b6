"""hydra/sweeper=optuna with its study kept beside its jobs, so that `dlfs train resume=<sweep folder>` continues
a study that was interrupted, in the same folder (conf/hydra/sweeper/optuna.yaml; pip install 'dlfs-cli[optuna]').

FolderStudy is hydra-optuna-sweeper's sweeper with three changes:
- it saves the sweep's config as multirun.yaml, as Hydra's basic sweeper does (the plugin saves none): what a
  resume launches again;
- each trial records its job (user attributes `dlfs_job` and `dlfs_sweep`), so that a job a resume ran again
  can be told to the study;
- hydra.sweeper.n_trials counts the jobs already in the folder: a study continued there runs only the trials
  it had not run, numbered after the others.

A resume (dlfs_cli.sweep_resume) first runs again the jobs that did not complete, as for any sweep. Optuna
never changes a finished trial, so each job that now completed is told to the study as a new trial with the
same parameters; the trials of a process that was killed (left `RUNNING`) are marked failed. Then the trials
not yet run are launched with the sweep's own command.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from omegaconf import DictConfig, OmegaConf

from dlfs_cli.errors import DlfsError
from dlfs_cli.runs import Run
from dlfs_cli.sweep import MULTIRUN_FILE, job_folders
from dlfs_cli.tracking import log

# Optuna's own lines ("A new study created in RDB ...") in dlfs's format, through the console's handler,
# not in its coloured one
optuna.logging.disable_default_handler()
optuna.logging.enable_propagation()

JOB, SWEEP, AGAIN = "dlfs_job", "dlfs_sweep", "dlfs_run_again_of"  # trial user attributes
RESULTS_FILE = "optimization_results.yaml"  # the plugin's record of the best trial, in the sweep folder


class FolderStudy(OptunaSweeperImpl):
    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None  # set by setup(), before any sweep
        folder = Path(str(self.config.hydra.sweep.dir))
        OmegaConf.save(self.config, folder / MULTIRUN_FILE)
        self.job_idx = len(job_folders(folder))  # jobs of this study that ran here before (a resume)
        if self.job_idx:
            left = self.n_trials - self.job_idx
            log.info("study: %d of its %d trials ran before; %d to go", self.job_idx, self.n_trials, left)
            self._seed_on()
        self.n_trials -= self.job_idx
        if self.n_trials > 0:
            super().sweep(arguments)

    def _seed_on(self) -> None:
        """A study continued by a resume: its sampler seeded again with seed + the trials run so far. With the
        seed the study began with, TPE (whose first 10 trials are random) would propose its first trials again."""
        assert self.config is not None
        sampler = self.config.hydra.sweeper.sampler
        if isinstance(self.sampler, functools.partial) or OmegaConf.select(sampler, "seed") is None:
            return  # the grid sampler takes the grid's points not yet run; a sampler without a seed draws anew
        self.sampler = instantiate(sampler, seed=int(sampler.seed) + self.job_idx)

    def _configure_trials(self, trials: list[Any], *space: Any) -> Sequence[Sequence[str]]:
        overrides = super()._configure_trials(trials, *space)
        for offset, trial in enumerate(trials):  # launched next as jobs job_idx, job_idx + 1, ...
            trial.set_user_attr(JOB, self.job_idx + offset)
            trial.set_user_attr(SWEEP, str(Path(str(self.sweep_dir)).resolve()))
        return overrides


def study_of(folder: Path, saved: DictConfig) -> optuna.Study:
    """The sweep's study, from the storage its multirun.yaml names (the folder's own optuna.db by default)."""
    sweeper = saved.hydra.sweeper
    if sweeper.storage is None:
        raise DlfsError(
            f"resume={folder}: its Optuna study was kept in memory (hydra.sweeper.storage=null): it ended with it"
        )
    try:
        return optuna.load_study(study_name=str(sweeper.study_name), storage=str(sweeper.storage))
    except KeyError:
        raise DlfsError(f"resume={folder}: no study '{sweeper.study_name}' in {sweeper.storage}") from None


def tell_again(folder: Path, saved: DictConfig, study: optuna.Study, jobs: list[Run]) -> None:
    """After a resume ran `jobs` again: trials left running by a killed sweep are failed, and each job that
    completed now is a new trial with its job's parameters and value; optimization_results.yaml follows."""
    mine = [t for t in study.get_trials(deepcopy=False) if _of_folder(t, folder, saved)]
    for trial in mine:
        if trial.state == optuna.trial.TrialState.RUNNING:  # its process is gone: this one holds the folder's lock
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    trial_of = {t.user_attrs[JOB]: t for t in mine}  # the latest trial of each job
    metric = str(saved.sweep.metric)
    for job in jobs:
        value, tried = job.metrics.get(metric), trial_of.get(job.job)
        if job.status != "completed" or tried is None or value is None or not math.isfinite(value):
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
        log.info("study: job %s completed when run again: trial %d", job.job, len(study.trials) - 1)
    try:
        best = study.best_trial
    except ValueError:  # no trial completed yet
        return
    OmegaConf.save(
        OmegaConf.create({"name": "optuna", "best_params": best.params, "best_value": best.value}),
        folder / RESULTS_FILE,
    )


def trials_left(folder: Path, saved: DictConfig) -> int:
    """The trials of the sweep's hydra.sweeper.n_trials that have no job in the folder yet."""
    return int(saved.hydra.sweeper.n_trials) - len(job_folders(folder))


def _of_folder(trial: optuna.trial.FrozenTrial, folder: Path, saved: DictConfig) -> bool:
    """A trial of this folder's jobs: tagged with it, or (a folder moved since) tagged with a folder that is
    gone while the study is the folder's own optuna.db."""
    tag = trial.user_attrs.get(SWEEP)
    if tag is None or JOB not in trial.user_attrs:
        return False
    if Path(tag) == folder.resolve():
        return True
    return not Path(tag).exists() and str(saved.hydra.sweeper.storage) == f"sqlite:///{folder.resolve()}/optuna.db"
