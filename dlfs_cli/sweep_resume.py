"""`dlfs train resume=<sweep folder>`: finish a sweep. Every job that did not complete runs again in its own
folder: from its last.pt where it has one (exactly where it stopped), else from the start with the overrides
Hydra recorded for it. Completed jobs are left alone; then summary.csv, the table and sweep.png are made
again over all the jobs.

A job that diverged is not re-run: from its last.pt it would diverge again at the same step.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import OmegaConf

from dlfs_cli import lifecycle, runlock
from dlfs_cli.errors import DlfsError, exit_code_of
from dlfs_cli.runs import OVERRIDES_FILE, Run, read_run
from dlfs_cli.sweep import SweepFolder, job_folders, summarize
from dlfs_cli.tracking import CONFIG_FILE, SUMMARY_FILE, log

NOT_AGAIN = ("completed", "diverged")


def is_sweep_folder(folder: Path) -> bool:
    """A sweep's root: no run of its own, and job folders (each with Hydra's overrides.yaml) under it."""
    return folder.is_dir() and not (folder / SUMMARY_FILE).exists() and bool(job_folders(folder))


def resume_sweep(folder: Path) -> list[Run]:
    """Run the sweep's unfinished jobs again, then summarise the sweep; returns the jobs still not completed."""
    runlock.acquire(folder)  # one process finishes a sweep at a time
    jobs = [r for r in (read_run(p) for p in job_folders(folder)) if r is not None]
    todo = [r for r in jobs if r.status not in NOT_AGAIN]
    log.info("resume: sweep %s: %d jobs, %d to run again", folder, len(jobs), len(todo))
    for job in todo:
        if lifecycle.requested() is not None:
            break  # a signal stopped the job before: the rest are left as they are
        _run_again(job)
    sweep = SweepFolder()
    sweep.path, sweep.metric, sweep.direction = folder, *_ranking(jobs)
    return summarize(sweep)


def _run_again(job: Run) -> None:
    """One job: resumed in place from its last.pt, or trained from its recorded overrides."""
    from dlfs_cli.api import compose_config
    from dlfs_cli.config import typed_config
    from dlfs_cli.resume import prepare
    from dlfs_cli.train import train

    log.info("resume: job %s (%s) in %s", job.job, job.status, job.path)
    try:
        if (job.path / CONFIG_FILE).is_file():  # it began: its config and last.pt say where it was
            saved = typed_config(OmegaConf.load(job.path / CONFIG_FILE))
            resumed = prepare(saved, [], job.path)
            if resumed is not None:  # None: it completed after all (its summary.json was behind)
                cfg, state = resumed
                train(cfg, job.path, state)
            return
        overrides = [str(o) for o in yaml.safe_load((job.path / OVERRIDES_FILE).read_text()) or []]
        train(compose_config(*(o for o in overrides if not o.startswith("hydra."))), job.path)
    except DlfsError as ex:  # recorded in the job's summary.json by train(); the other jobs go on
        if exit_code_of(ex) != 2 and lifecycle.requested() is not None:
            return  # stopped by a signal: the loop ends
        if not (job.path / CONFIG_FILE).is_file():  # refused before it began: say why where the job is
            from dlfs_cli.summary import Summary

            Summary.load(job.path / SUMMARY_FILE).update(status="failed", error=str(ex)).save(job.path / SUMMARY_FILE)
        log.error("job %s: %s", job.job, ex)


def _ranking(jobs: list[Run]) -> tuple[str, str]:
    """The sweep's sweep.metric and sweep.direction, from a job's saved config (the same in every job)."""
    for job in jobs:
        if (job.path / CONFIG_FILE).is_file():
            ranking = (yaml.safe_load((job.path / CONFIG_FILE).read_text()) or {}).get("sweep") or {}
            return str(ranking.get("metric", "val_loss")), str(ranking.get("direction", "auto"))
    return "val_loss", "auto"
