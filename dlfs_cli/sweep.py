"""`dlfs train -m`: what a sweep adds to single runs.

- Each job's outcome lives in its own run folder; a job that fails, diverges or is interrupted
  is recorded there and the sweep goes on (`job_failed`).
- Parallel jobs share the cores: each job gets cores / (jobs at a time) threads (`job_threads`),
  and with device=cuda the visible GPUs, one job after another (`job_gpu`).
- Under hydra/sweeper=optuna (conf/hydra/sweeper/optuna.yaml) a job that did not complete raises after
  recording itself, so that Optuna records a FAILED trial and its study goes on (`under_optuna`).
- When the sweep ends, summary.csv at the sweep folder's root has one row per job, and the same
  table is printed ranked by `sweep.metric`, with the seeds of one setting aggregated (`summarize`);
  sweep.png beside it draws the metric against each swept parameter and the jobs' curves.

No torch here: the sweep's own process only reads the jobs' files.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import signal
import statistics
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from dlfs_cli import lifecycle
from dlfs_cli.config import check_sweep_metric, check_train_keys, optuna_plugin
from dlfs_cli.errors import DlfsError, exit_code_of
from dlfs_cli.runs import SEED_KEYS, Run, fmt, metric_keys, read_run, table_console, varying_keys
from dlfs_cli.summary import Summary
from dlfs_cli.tracking import SUMMARY_FILE, csv_cell, write_atomic

log = logging.getLogger("dlfs")

SUMMARY_CSV = "summary.csv"
SEEDS_CSV = "summary_seeds.csv"
SWEEP_PNG = "sweep.png"  # sweep_figure.py
STOP_FILE = ".stop"  # in the sweep folder while a signal stops the sweep: jobs that see it do not start


class SweepFolder(Callback):
    """Hydra callback (conf/train.yaml, hydra.callbacks): remembers the sweep's folder and ranking as
    Hydra resolves them, so that the command can summarise the jobs once they have all ended, even when
    the sweep itself ends with an error (Hydra calls no callback then)."""

    current: SweepFolder | None = None

    def __init__(self) -> None:
        self.path: Path | None = None
        self.metric = "val_loss"
        self.direction = "auto"
        self.optuna = False  # hydra/sweeper=optuna
        self.first_job = 0  # the number of this command's first job (a continued Optuna study's is not 0)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "Joblib" in str(config.hydra.launcher.get("_target_", "")):
            _start_loky_tracker()
        self.optuna = is_optuna(config.hydra.sweeper)
        if self.optuna and not optuna_plugin():
            from dlfs_cli.cli import UserError  # a SystemExit: Hydra's callbacks turn any Exception into a warning

            raise UserError("hydra/sweeper=optuna needs hydra-optuna-sweeper: pip install 'dlfs-cli[optuna]'")
        try:
            check_settings(config)
        except DlfsError as ex:
            from dlfs_cli.cli import UserError

            raise UserError(str(ex), ex.exit_code) from None
        self.path = Path(str(config.hydra.sweep.dir))  # resolved once: ${now:} is cached by Hydra
        self.first_job = next_job(self.path)
        self.metric = str(config.sweep.metric)
        self.direction = _value(config.sweep.direction)
        SweepFolder.current = self
        lifecycle.on_request(self._stop)

    def _stop(self, signum: int) -> None:
        """The first stop signal (SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2) to the sweep's process (lifecycle.py)
        stops the sweep: jobs not yet started are skipped (they look for STOP_FILE, also in a launcher's other
        processes); a job in this process stops at its next safe point; jobs in other processes stop and save when the
        signal reaches them too (Ctrl-C reaches every process of the terminal's group) or they see STOP_FILE
        (`watch_for_stop`: a `kill PID` or a scheduler's timeout reaches this process alone). A second signal
        aborts at once."""
        assert self.path is not None
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / STOP_FILE).write_text(str(signum))  # which signal: the jobs that watch it stop as by it
        log.warning("%s: stopping the sweep; jobs not started are skipped", signal.Signals(signum).name)

    def stopped(self) -> bool:
        return self.path is not None and (self.path / STOP_FILE).exists()


# The keys that decide which metrics a job reports (config.reported_metrics): with one of them swept, each job
# checks sweep.metric against its own config
METRIC_KEYS = ("model", "loss", "data", "experiment")


def check_settings(config: DictConfig) -> None:
    """Before the first job: the sweep's own settings that cannot mean anything, refused in one line naming the
    keys (each job's config is checked by the job). Under Optuna the study follows sweep.metric and
    sweep.direction, as summary.csv does: a hydra.sweeper.direction of its own would optimise one way and rank
    the other."""
    check_train_keys(config)  # ~verbose: every job would fail on it
    swept = swept_keys(config)
    ranking = sorted(key for key in swept if key.split(".")[0] == "sweep")
    if ranking:  # every job would rank by the first's: summary.csv ranks by one metric, in one direction
        raise DlfsError(f"{ranking[0]} is how the sweep ranks its jobs: give it one value, not a sweep over values")
    if not any(key.split(".")[0] in METRIC_KEYS for key in swept):
        check_sweep_metric(config)
    sweeper, launcher = config.hydra.sweeper, config.hydra.launcher
    if is_optuna(sweeper):
        wanted = _direction(str(config.sweep.metric), _value(config.sweep.direction))
        given = sweeper.get("direction")
        if isinstance(given, ListConfig) or str(given) != wanted:
            shown = OmegaConf.to_container(given) if isinstance(given, ListConfig) else given
            raise DlfsError(
                f"hydra.sweeper.direction={shown} contradicts sweep.direction={_value(config.sweep.direction)} "
                f"({wanted} {config.sweep.metric}): the study and summary.csv both follow sweep.metric and "
                "sweep.direction; set those instead"
            )
        _count("hydra.sweeper.n_trials", sweeper.get("n_trials"), "the trials of the study")
        _count("hydra.sweeper.n_jobs", sweeper.get("n_jobs"), "trials proposed at once")
        rate = sweeper.get("max_failure_rate")
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate <= 1:
            raise DlfsError(f"invalid value for hydra.sweeper.max_failure_rate: {rate!r} (a fraction in [0, 1])")
    elif "BasicSweeper" in str(sweeper.get("_target_", "")) and sweeper.get("max_batch_size") is not None:
        _count("hydra.sweeper.max_batch_size", sweeper.max_batch_size, "jobs launched at once, or null: all")
    if "Joblib" in str(launcher.get("_target_", "")) and launcher.get("n_jobs") == 0:
        raise DlfsError("invalid value for hydra.launcher.n_jobs: 0 (jobs at a time: >= 1, or -1 for one per core)")


def _value(option: Any) -> str:
    return str(getattr(option, "value", option))  # an Enum's value, as the config file spells it


def _count(key: str, value: Any, meaning: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DlfsError(f"invalid value for {key}: {value!r} (must be >= 1: {meaning})")


def swept_keys(config: DictConfig) -> set[str]:
    """The keys a sweep varies: its command line's sweep overrides (a,b,c, choice(...), interval(...)) and
    those of hydra.sweeper.params (a search space in a config file)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = {o.key_or_group for o in parsed if o.is_sweep_override()}
    params = config.hydra.sweeper.get("params")  # the basic sweeper's too (Hydra 1.2+)
    return keys | {str(k) for k in (params or {})}


def _start_loky_tracker() -> None:
    """joblib's resource tracker (a process loky starts once, in this one) ignores SIGINT and SIGTERM but
    not SIGHUP, SIGUSR1 or SIGUSR2: a closed terminal (or a scheduler's warning to every process of the job)
    killed it, and the workers printed its tracebacks. Started here with those ignored, which it keeps;
    the workers honour them as any job does."""
    from joblib.externals.loky.backend import resource_tracker

    untouched = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in lifecycle.STOP_SIGNALS if s not in untouched}
    try:
        resource_tracker.ensure_running()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# --- inside a job ----------------------------------------------------------------------------


def in_sweep() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def first_job() -> bool:
    """True outside a sweep, and in a sweep's first job (job 0, or the first of a study continued by a resume):
    what is shown once per sweep, not once per job."""
    if not in_sweep():
        return True
    first = SweepFolder.current.first_job if SweepFolder.current is not None else 0
    return int(HydraConfig.get().job.num) == first


def release_workers() -> None:
    """The end of a sweep's command: hydra/launcher=joblib's worker processes (loky's, which outlive a sweep to
    be reused) go. They keep the working folder and environment they started with, so a later sweep in the
    same process (a script, the tests) would write its relative hydra.sweep.dir under the old folder."""
    loky = sys.modules.get("joblib.externals.loky")
    if loky is not None:
        loky.get_reusable_executor().shutdown(wait=True)


def _launcher() -> tuple[str, DictConfig]:
    launcher = HydraConfig.get().launcher
    return str(launcher.get("_target_", "")), launcher


def under_optuna() -> bool:
    """True in a job of hydra/sweeper=optuna (hydra-optuna-sweeper), which needs a number from every job."""
    return in_sweep() and is_optuna(HydraConfig.get().sweeper)


def is_optuna(sweeper: Any) -> bool:
    """Whether a config's hydra.sweeper is hydra/sweeper=optuna's (dlfs's sweeper or the plugin's own)."""
    target = sweeper.get("_target_") if isinstance(sweeper, DictConfig) else None
    return str(target or "").endswith("OptunaSweeper")


class TrialFailed(DlfsError):
    """What a job that did not complete raises under Optuna's sweeper, after recording itself in its folder:
    the sweeper records a FAILED trial and the study goes on (hydra.sweeper.max_failure_rate). Other sweepers
    are handed NaN: the basic sweeper ignores what a job returns, and Optuna's ends the study on a NaN."""


def _not_completed(what: str) -> float:
    if under_optuna():
        raise TrialFailed(what)
    return math.nan


def objective(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    """What a completed job hands Hydra's sweeper: `sweep.metric` (the validation loss by default). Under
    Optuna a job without a finite value for it is a failed trial."""
    value = metrics.get(cfg.sweep.metric)
    if under_optuna() and not _finite(value):
        known = ", ".join(sorted(k for k in metrics if _finite(metrics[k]))) or "none"
        why = f"is {value}" if cfg.sweep.metric in metrics else f"is not a metric of this job (it has: {known})"
        raise TrialFailed(f"job {HydraConfig.get().job.num}: sweep.metric={cfg.sweep.metric} {why}")
    return value


def in_process() -> bool:
    """True for Hydra's basic launcher, which runs the jobs one after another in this process."""
    return _launcher()[0].endswith("BasicLauncher")


def job_threads(cores: int | None = None) -> int | None:
    """Threads for one job so that parallel jobs do not oversubscribe the cores; None: torch's default.

    joblib runs n_jobs at a time (-1: one per core, -2: all but one, ...); a submitit job gets its
    cpus_per_task."""
    target, launcher = _launcher()
    cores = cores or _cores()
    if "Joblib" in target:
        n_jobs = int(launcher.get("n_jobs") or 1)
        at_once = n_jobs if n_jobs > 0 else max(cores + 1 + n_jobs, 1)
        return max(1, cores // at_once)
    if "submitit" in target and launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    return None


def job_gpu(device_count: int) -> int | None:
    """The GPU of this job when a joblib sweep trains on CUDA: job number modulo the visible GPUs, so the
    jobs running at once spread over them (every one took GPU 0); None outside a joblib sweep (the basic
    launcher runs one job at a time; SLURM gives each job GPUs of its own: gpus_per_task)."""
    if device_count < 1 or not in_sweep() or "Joblib" not in _launcher()[0]:
        return None
    return int(HydraConfig.get().job.num) % device_count


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (a container, taskset)
    except AttributeError:
        return os.cpu_count() or 1


@contextmanager
def watch_for_stop() -> Iterator[None]:
    """A job in a launcher's own process (joblib's workers, submitit's): its stop signals are honoured for
    the process's whole life (a worker waiting for its next job is not killed by one: loky would call that
    a crashed worker), and it stops when the sweep's process does, which a signal sent to the sweep's
    process alone (`kill PID`, a scheduler's timeout) never reached."""
    if in_process():
        yield
        return
    lifecycle.install_for_process()
    with relay_stop(Path(HydraConfig.get().sweep.dir) / STOP_FILE):
        yield


@contextmanager
def relay_stop(stop: Path) -> Iterator[None]:
    """Inside the block, a stop file written by the sweep's process (`SweepFolder._stop`: the signal's
    number) asks this process to stop as that signal would; watched 5 times a second, in a thread."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            try:
                text = stop.read_text().strip()
            except OSError:  # not there: the sweep goes on
                continue
            lifecycle.request(int(text) if text.isdigit() else signal.SIGTERM)
            return

    watcher = threading.Thread(target=watch, name="dlfs-stop-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def check_not_stopped() -> None:
    if lifecycle.requested() is not None or (Path(HydraConfig.get().sweep.dir) / STOP_FILE).exists():
        raise Skipped("not started: the sweep was interrupted")


class Skipped(DlfsError):
    pass


REFUSED_FILE = ".refused"  # in the sweep folder: one line per job refused its folder (any launcher's process)


def job_refused(cfg: DictConfig, ex: Exception) -> float:
    """A job whose folder another process writes, or that holds a run already: nothing is written there;
    the sweep goes on, and its end says so."""
    num = HydraConfig.get().job.num
    log.error("job %s: %s", num, ex)
    with open(Path(HydraConfig.get().sweep.dir) / REFUSED_FILE, "a", encoding="utf-8") as f:
        f.write(f"job {num} refused: {ex}\n")
    return _not_completed(f"job {num} refused: {ex}")


def refused_jobs(folder: Path) -> list[str]:
    """The refusals job_refused recorded (the file is removed: the sweep's end has reported them)."""
    path = folder / REFUSED_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    path.unlink()
    return lines


def job_failed(run_dir: Path, cfg: DictConfig, ex: Exception) -> float:
    """Record a job that did not complete and let the sweep go on.

    train() has written the run's status (failed, diverged, interrupted) into summary.json; a job
    refused before training began gets a summary.json saying why. Hydra's sweepers are handed NaN instead of
    an exception; Optuna's sweeper gets TrialFailed, a FAILED trial of its study (`_not_completed`)."""
    if not (run_dir / SUMMARY_FILE).exists():
        status = "skipped" if isinstance(ex, Skipped) else "failed"
        error = str(ex) if isinstance(ex, DlfsError) else f"{type(ex).__name__}: {ex}"
        run_dir.mkdir(parents=True, exist_ok=True)
        Summary().update(status=status, error=error, model=cfg.model.name, data=cfg.data.name).save(
            run_dir / SUMMARY_FILE
        )
    if exit_code_of(ex) != 2 and in_process():  # a signal to this process, which runs the next jobs
        (Path(HydraConfig.get().sweep.dir) / STOP_FILE).touch()
    num = HydraConfig.get().job.num
    log.error("job %s: %s", num, ex)
    return _not_completed(f"job {num} {_status(run_dir)}: {ex}")


def _status(run_dir: Path) -> str:
    try:
        return Summary.load(run_dir / SUMMARY_FILE).status or "failed"
    except (OSError, ValueError):
        return "failed"


# --- when the sweep ends ---------------------------------------------------------------------


def _direction(metric: str, direction: str) -> str:
    if direction == "auto":
        return "maximize" if "accuracy" in metric else "minimize"
    return direction


# --- hydra/sweeper=optuna: conf/hydra/sweeper/optuna.yaml ----------------------------------------

# ${dlfs_direction:${sweep.metric},${sweep.direction}}: the study's direction, as the sweep's table ranks
OmegaConf.register_new_resolver(
    "dlfs_direction",
    lambda metric, direction: _direction(str(metric), _value(direction)),
    replace=True,
)


def summarize(sweep: SweepFolder, print_tables: bool = True) -> list[Run]:
    """Write summary.csv (and summary_seeds.csv when seeds were swept), print them ranked; returns
    the jobs that did not complete."""
    assert sweep.path is not None
    jobs = [r for r in (read_run(p) for p in job_folders(sweep.path)) if r is not None]
    jobs.sort(key=lambda r: (r.job if r.job is not None else 1 << 30, str(r.path)))
    if not jobs:
        return []
    override_keys = list(dict.fromkeys(k for r in jobs for k in r.overrides if not k.startswith("hydra.")))
    metrics = metric_keys(jobs)
    header = ["job", *override_keys, "status", *metrics, "epochs", "duration_s", "run_dir", "error"]
    rows = [
        [
            r.job if r.job is not None else "",
            *(r.overrides.get(k, "") for k in override_keys),
            r.status,
            *(csv_cell(r.metrics.get(k)) for k in metrics),
            r.summary.epochs_completed,  # None: an empty cell
            r.summary.duration_s,
            str(r.path.resolve()),
            r.summary.error,
        ]
        for r in jobs
    ]
    _write_csv(sweep.path / SUMMARY_CSV, header, rows)

    direction = _direction(sweep.metric, sweep.direction)
    ranked = rank(jobs, sweep.metric, direction)
    groups = seed_groups(jobs, metrics)
    if groups:
        seed_header = [*groups[0]["setting"].keys(), "seeds", *(f"{m}_{s}" for m in metrics for s in ("mean", "std"))]
        seed_rows = [
            [*g["setting"].values(), g["n"], *(csv_cell(g[m][i]) for m in metrics for i in (0, 1))] for g in groups
        ]
        _write_csv(sweep.path / SEEDS_CSV, seed_header, seed_rows)
    picture = _draw(jobs, sweep.metric, sweep.path / SWEEP_PNG, sweep.optuna)
    if print_tables:
        _print(sweep, ranked, groups, metrics, direction)
        if picture is not None:
            table_console().print(f"picture: {picture}", highlight=False)
    return [r for r in jobs if r.status != "completed"]


def _draw(jobs: list[Run], metric: str, path: Path, searched: bool) -> Path | None:
    """sweep.png: a by-product, like a run's figures: one that fails is reported and the sweep goes on."""
    from dlfs_cli.sweep_figure import draw_sweep  # matplotlib: only when the sweep has ended

    try:
        return draw_sweep(jobs, metric, path, searched)
    except Exception as ex:  # noqa: BLE001
        log.warning("%s could not be drawn: %s: %s", path.name, type(ex).__name__, ex)
        return None


def job_folders(root: Path) -> list[Path]:
    """The folders Hydra made for the jobs: each holds .hydra/overrides.yaml (any hydra.sweep.subdir)."""
    return sorted(p.parent.parent for p in root.glob("**/.hydra/overrides.yaml"))


def next_job(root: Path) -> int:
    """The number of a sweep folder's next job: after the highest one there (a folder deleted leaves a gap)."""
    numbers = [r.job for r in (read_run(p) for p in job_folders(root)) if r is not None and r.job is not None]
    return max(numbers, default=-1) + 1


def rank(jobs: list[Run], metric: str, direction: str) -> list[Run]:
    """Completed jobs best first by `metric`; then the others in job order."""
    scored = [r for r in jobs if r.status == "completed" and _finite(r.metrics.get(metric))]
    scored.sort(key=lambda r: r.metrics[metric], reverse=direction == "maximize")
    return scored + [r for r in jobs if r not in scored]


def seed_groups(jobs: list[Run], metrics: list[str]) -> list[dict[str, Any]]:
    """Completed jobs that differ only by seed, as groups with mean and std (n-1) per metric;
    empty unless the seed was swept."""
    varying = varying_keys(jobs)
    if not SEED_KEYS & set(varying):
        return []
    setting_keys = [k for k in varying if k not in SEED_KEYS]
    groups: dict[tuple, list[Run]] = {}
    for r in jobs:
        if r.status == "completed":
            groups.setdefault(tuple(r.overrides.get(k, "") for k in setting_keys), []).append(r)
    out = []
    for values, members in groups.items():
        group: dict[str, Any] = {"setting": dict(zip(setting_keys, values, strict=True)), "n": len(members)}
        for m in metrics:
            xs = [r.metrics[m] for r in members if _finite(r.metrics.get(m))]
            group[m] = (statistics.fmean(xs) if xs else None, statistics.stdev(xs) if len(xs) > 1 else None)
        out.append(group)
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    write_atomic(path, buffer.getvalue())


def _print(sweep: SweepFolder, ranked: list[Run], groups: list[dict], metrics: list[str], direction: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    assert sweep.path is not None
    console = table_console()
    keys = varying_keys(ranked)
    best = "highest" if direction == "maximize" else "lowest"
    console.print(f"sweep {sweep.path}: {len(ranked)} jobs, best first by {sweep.metric} ({best})", highlight=False)
    table = Table()
    for name in ["#", "job", *keys, "status", *metrics, "epochs", "duration_s"]:
        table.add_column(name, justify="right" if name in metrics or name in ("#", "job", "epochs") else "left")
    for place, r in enumerate(ranked, 1):
        ok = r.status == "completed"
        status = "[green]completed[/green]" if ok else f"[red]{r.status}[/red]"
        table.add_row(
            str(place) if ok else "",
            fmt(r.job),
            *(escape(r.overrides.get(k, "")) for k in keys),
            status,
            *(fmt(r.metrics.get(m)) for m in metrics),
            fmt(r.summary.epochs_completed),
            fmt(r.summary.duration_s),
        )
    console.print(table)
    for r in ranked:
        if r.status != "completed" and r.summary.error:
            console.print(f"  job {fmt(r.job)} {r.status}: {r.summary.error}", markup=False, highlight=False)
    if not any(sweep.metric in r.metrics for r in ranked):
        known = ", ".join(metric_keys(ranked)) or "none"
        console.print(f"  sweep.metric={sweep.metric}: no job has this metric (they have: {known})", markup=False)
    if groups:
        console.print("the same settings over seeds: mean +- std (n-1)")
        seeds = Table()
        for name in [*groups[0]["setting"], "seeds", *metrics]:
            seeds.add_column(name, justify="right" if name in metrics or name == "seeds" else "left")
        for g in groups:
            cells = [fmt(*g[m]) for m in metrics]  # mean +- std
            seeds.add_row(*(escape(v) for v in g["setting"].values()), str(g["n"]), *cells)
        console.print(seeds)
    console.print(f"summary: {sweep.path / SUMMARY_CSV}", highlight=False)
