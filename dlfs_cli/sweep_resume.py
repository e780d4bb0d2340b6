"""`dlfs train resume=<sweep folder>`: finish a sweep. Every job that did not complete runs again in its own
folder: from its last.pt where it has one (exactly where it stopped), else from the start with the overrides
Hydra recorded for it. Completed jobs are left alone; then summary.csv, the table and sweep.png are made
again over all the jobs.

A job that diverged is not re-run: from its last.pt it would diverge again at the same step.

A sweep of hydra/sweeper=optuna continues its study as well (dlfs_cli.optuna_study): the jobs that completed
now are told to it, then the trials it had not run yet are launched into the same folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from dlfs_cli import lifecycle, runlock
from dlfs_cli.config import optuna_plugin
from dlfs_cli.errors import DlfsError, exit_code_of
from dlfs_cli.runs import OVERRIDES_FILE, Run, read_run
from dlfs_cli.sweep import STOP_FILE, SweepFolder, is_optuna, job_folders, summarize
from dlfs_cli.tracking import CONFIG_FILE, MULTIRUN_FILE, SUMMARY_FILE, console_log_handler, log

NOT_AGAIN = ("completed", "diverged")


def is_sweep_folder(folder: Path) -> bool:
    """A sweep's root, as a sweep made it: Hydra's multirun.yaml there, no run of its own, and job folders (each
    with Hydra's overrides.yaml) under it. Any folder with runs somewhere below it was taken for one: resume=outputs
    (a completion one folder short) re-ran every unfinished run of every model, and resume=/ searched the whole
    file system; multirun.yaml is looked for first, so nothing else is searched."""
    return (folder / MULTIRUN_FILE).is_file() and not (folder / SUMMARY_FILE).exists() and bool(job_folders(folder))


def resume_sweep(folder: Path) -> tuple[list[Run], list[str] | None]:
    """Run the sweep's unfinished jobs again, then summarise the sweep. Returns the jobs still not completed,
    and for an Optuna study with trials still to run the command that runs them (`dlfs train` arguments:
    that sweep then summarises every job, in this process, which keeps the folder's lock for it)."""
    runlock.acquire(folder)  # one process finishes a sweep at a time
    # a stop file left by a sweep killed while it stopped (SIGTERM, then SIGKILL) would skip every job again;
    # the lock says no live sweep uses it
    (folder / STOP_FILE).unlink(missing_ok=True)
    saved = optuna_sweep(folder)
    study = None
    if saved is not None:
        from dlfs_cli import optuna_study

        study = optuna_study.study_of(folder, saved)  # before any job runs: a study that is gone is said first
    jobs = [r for r in (read_run(p) for p in job_folders(folder)) if r is not None]
    todo = [r for r in jobs if r.status not in NOT_AGAIN]
    with _console():
        log.info("resume: sweep %s: %d jobs, %d to run again", folder, len(jobs), len(todo))
        for job in todo:
            if lifecycle.requested() is not None:
                break  # a signal stopped the job before: the rest are left as they are
            _run_again(job)
        if saved is not None and study is not None:
            optuna_study.tell_again(folder, saved, study)
    if saved is not None and study is not None and lifecycle.requested() is None:
        left = optuna_study.trials_left(folder, saved, study)
        if left > 0:
            log.info("resume: the study runs its %d trials not yet run", left)
            runlock.CONTINUED.add(folder.resolve())
            return [], _command_of(folder, saved)
    sweep = SweepFolder()
    sweep.path, sweep.metric, sweep.direction = folder, *_ranking(jobs)
    sweep.optuna = saved is not None
    try:
        return summarize(sweep), None
    finally:
        runlock.release(folder)


@contextmanager
def _console() -> Iterator[None]:
    """The jobs' lines on the console, as under Hydra (conf/hydra/job_logging/dlfs.yaml), which configures no
    logging for this part of the command: else a resume trains in silence. Removed after: a study that goes on
    runs under Hydra again, with its own. In place of any handlers left by an earlier command in this process."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers, root.level = [console_log_handler()], logging.INFO
    try:
        yield
    finally:
        root.handlers, root.level = handlers, level


def optuna_sweep(folder: Path) -> DictConfig | None:
    """The config a sweep of hydra/sweeper=optuna saved in its folder, pointed at where the folder is now;
    None for any other sweep (or one from before dlfs saved it: its jobs are resumed, the study is not)."""
    if not (folder / MULTIRUN_FILE).is_file():
        return None
    try:
        saved = OmegaConf.load(folder / MULTIRUN_FILE)
    except (OSError, ValueError, yaml.YAMLError) as ex:
        raise DlfsError(f"resume={folder}: cannot read {MULTIRUN_FILE}: {ex}") from None
    if not isinstance(saved, DictConfig) or not is_optuna(OmegaConf.select(saved, "hydra.sweeper")):
        return None
    if not optuna_plugin():
        raise DlfsError(f"resume={folder} continues an Optuna study: pip install 'dlfs-cli[optuna]'")
    saved.hydra.sweep.dir = str(folder.resolve())
    return saved


def _command_of(folder: Path, saved: DictConfig) -> list[str]:
    """The sweep's own `dlfs train -m` arguments, as Hydra recorded them, into `folder` as it is now."""
    from dlfs_cli.cli import absolute_paths, prepare_overrides

    # as recorded: an interpolation in them (hydra.sweep.subdir=${hydra.job.num}) is the job's to resolve
    recorded = OmegaConf.to_container(saved.hydra.overrides, resolve=False)
    assert isinstance(recorded, dict)
    hydra = [o for o in recorded["hydra"] if o.partition("=")[0].lstrip("+~") not in ("hydra.sweep.dir", "hydra.mode")]
    here = prepare_overrides([f"hydra.sweep.dir={folder.resolve()}"], multirun=False)
    started = OmegaConf.select(saved, "hydra.runtime.cwd", default=None)
    return ["-m", *hydra, *here, *absolute_paths(recorded["task"], Path(started) if started else None)]


def _run_again(job: Run) -> None:
    """One job: resumed in place from its last.pt, or trained from its recorded overrides."""
    from dlfs_cli.api import compose_config, is_hydra_setting
    from dlfs_cli.cli import absolute_paths, started_in
    from dlfs_cli.config import load_saved_config
    from dlfs_cli.resume import prepare
    from dlfs_cli.train import train

    log.info("resume: job %s (%s) in %s", job.job, job.status, job.path)
    try:
        if (job.path / CONFIG_FILE).is_file():  # it began: its config and last.pt say where it was
            saved = load_saved_config(job.path / CONFIG_FILE)
            resumed = prepare(saved, [], job.path)
            if resumed is not None:  # None: it completed after all (its summary.json was behind)
                cfg, state = resumed
                train(cfg, job.path, state)
            return
        try:
            overrides = [str(o) for o in yaml.safe_load((job.path / OVERRIDES_FILE).read_text(encoding="utf-8")) or []]
        except (OSError, ValueError, TypeError, yaml.YAMLError) as ex:  # ValueError: not UTF-8
            raise DlfsError(f"cannot read {job.path / OVERRIDES_FILE}: {' '.join(str(ex).split())[:160]}") from None
        overrides = absolute_paths(overrides, started_in(job.path))  # run again from wherever resume= is given
        train(compose_config(*(o for o in overrides if not is_hydra_setting(o))), job.path)
    except Exception as ex:  # recorded in the job's summary.json by train(); the other jobs go on, as in a sweep
        # (a job that crashed again, with any error, ended the whole resume with a traceback: the jobs after it
        # never ran and summary.csv was not made again)
        if isinstance(ex, DlfsError) and exit_code_of(ex) != 2 and lifecycle.requested() is not None:
            return  # stopped by a signal: the loop ends
        said = str(ex) if isinstance(ex, DlfsError) else f"{type(ex).__name__}: {(str(ex).splitlines() or [''])[0]}"
        if not (job.path / CONFIG_FILE).is_file():  # refused before it began: say why where the job is
            from dlfs_cli.summary import Summary

            Summary.load(job.path / SUMMARY_FILE).update(status="failed", error=said).save(job.path / SUMMARY_FILE)
        log.error("job %s: %s", job.job, said)


def _ranking(jobs: list[Run]) -> tuple[str, str]:
    """The sweep's sweep.metric and sweep.direction, from a job's saved config (the same in every job)."""
    for job in jobs:
        try:
            ranking = (yaml.safe_load((job.path / CONFIG_FILE).read_text(encoding="utf-8")) or {}).get("sweep") or {}
            return str(ranking.get("metric", "val_loss")), str(ranking.get("direction", "auto"))
        except (OSError, ValueError, AttributeError, yaml.YAMLError):  # not there, or malformed: the next job's
            continue
    return "val_loss", "auto"
