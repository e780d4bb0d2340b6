"""`dlfs <command> [overrides]`: picks the Hydra app for the command.

Only hydra, omegaconf and the config schemas are imported here: `dlfs --help` and
`dlfs train --cfg job` never pay for torch. The training code is imported when a run starts.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from dlfs_cli import __version__, lifecycle, runlock, sweep
from dlfs_cli.config import (
    check_device,
    check_numbers,
    check_seed,
    check_sweep_metric,
    conf_dir,
    register_configs,
    reject_unknown_keys,
    validate,
)
from dlfs_cli.errors import DlfsError, exit_code_of, os_error_message
from dlfs_cli.system import check_run_environment, check_system

if TYPE_CHECKING:
    from hydra.core.override_parser.overrides_parser import OverridesParser

CONF_DIR = str(conf_dir())


# --- train -----------------------------------------------------------------------------------


def _one_line_task(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """A Hydra task whose errors leave it as a UserError (a SystemExit): Hydra would print "Error executing
    job with overrides: [...]" over any other exception, a second line before ours. A sweep's jobs record
    their own errors (sweep.job_failed) and keep them."""

    @functools.wraps(task)
    def one_line(cfg: DictConfig) -> Any:
        if sweep.in_sweep():
            return task(cfg)
        try:
            return task(cfg)
        except DlfsError as ex:
            raise UserError(str(ex), ex.exit_code) from None
        except (HydraException, OmegaConfBaseException) as ex:  # an interpolation that fails: ${nope}
            raise UserError(explain(ex)) from None
        except OSError as ex:  # a run folder that cannot be read
            raise UserError(os_error_message(ex)) from None

    return one_line


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@_one_line_task
def _train_app(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = sweep.in_sweep()
    if multirun:
        lifecycle.protect_console()  # a job in a launcher's worker process has its own console
        try:
            runlock.acquire(run_dir)  # held by this job until it ends (a single run's: since on_run_start)
            if (run_dir / "summary.json").exists():  # a hydra.sweep.subdir that two jobs share, or an old run
                raise DlfsError(f"{run_dir} already holds a run; each job needs a folder of its own")
        except DlfsError as ex:  # another process writes this folder, or it holds a run: write nothing there
            runlock.release(run_dir)
            return sweep.job_refused(cfg, ex)
    try:
        if not multirun:
            return _train_job(cfg, run_dir, multirun)
        with sweep.watch_for_stop():
            return _train_job(cfg, run_dir, multirun)
    finally:
        if multirun:
            runlock.release(run_dir)


def _train_job(cfg: DictConfig, run_dir: Path, multirun: bool) -> float | None:
    try:
        if multirun:
            sweep.check_not_stopped()
        validate(cfg)  # train() checks again; here it refuses a bad value before torch's ~2 s import
        if multirun:
            check_sweep_metric(cfg)  # a job of a sweep over the model, loss or data: before it trains
        if cfg.trainer.nproc > 1 and not _under_torchrun():
            if multirun:
                raise DlfsError("trainer.nproc > 1 runs dlfs under torchrun: not as a job of a sweep (-m)")
            _rerun_under_torchrun(cfg.trainer.nproc, run_dir)
        if cfg.resume is not None:
            if multirun:
                raise DlfsError("resume= continues one run; it cannot be part of a sweep (-m)")
            return _resume(cfg, Path(cfg.resume))
        from dlfs_cli.train import train

        threads, live = (sweep.job_threads(), sweep.in_process()) if multirun else (None, True)
        # the job's own setting: never a stale variable of the environment
        handed = HydraConfig.get().job.env_set.get(FROM_ENV) if HydraConfig.initialized() else None
        source = Path(handed) if handed else None
        if source is not None:
            _check_from_run(cfg, source)
        metrics = train(cfg, run_dir, threads=threads, live=live, from_run=source)
    except (DlfsError, OSError) as ex:
        if isinstance(ex, OSError):  # a file the run could not read or write: one line naming it
            ex = DlfsError(os_error_message(ex))
        if multirun:  # recorded in the job's folder; the other jobs go on
            return sweep.job_failed(run_dir, cfg, ex)
        runlock.drop_refused(run_dir)  # only if this process holds it, and nothing but Hydra's files are there
        raise UserError(str(ex), ex.exit_code) from None
    except Exception as ex:  # a crash (train() has logged its traceback): in a sweep, one job's alone
        if multirun:
            return sweep.job_failed(run_dir, cfg, ex)
        raise
    # what Hydra's sweepers optimise: the validation metric by default (under Optuna a finite one, or the job raises)
    return sweep.objective(cfg, metrics)


def _resume(composed: DictConfig, run_dir: Path) -> float | None:
    from dlfs_cli.resume import prepare

    resumed = prepare(composed, list(HydraConfig.get().overrides.task), run_dir)
    if resumed is None:
        runlock.release(run_dir)
        print(f"dlfs: {run_dir} is already completed; nothing to do (raise trainer.epochs to train on)")
        return None
    from dlfs_cli.train import train

    cfg, state = resumed
    return train(cfg, run_dir, state).get(cfg.sweep.metric)


def _under_torchrun() -> bool:
    """torchrun's environment (read here without importing torch, which dlfs_cli.distributed needs)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank() -> int:
    return runlock.torchrun_rank()


def _rerun_under_torchrun(nproc: int, run_dir: Path) -> NoReturn:
    """trainer.nproc=N: the same command again as N processes started by torchrun's own launcher (run
    here, in this process), into the folder Hydra has just made for it."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    lifecycle.check("before torchrun started the ranks; nothing was trained")
    args = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    if not any(a.lstrip("+").startswith("resume=") for a in args):  # a resume's ranks find the folder themselves
        args.append(f"hydra.run.dir={run_dir}")
    argv = ["--standalone", f"--nproc_per_node={nproc}", "-m", "dlfs_cli", "train", *args]
    print(f"dlfs: trainer.nproc={nproc}: torchrun {' '.join(argv)}", flush=True)
    os.environ[runlock.PARENT_ENV] = str(run_dir.resolve())  # this process holds the lock for the ranks
    try:
        torchrun.run(torchrun.parse_args(argv))
    except SignalException as ex:  # the ranks got the signal too: they stop, save and say so
        raise SystemExit(128 + int(ex.sigval)) from None
    except ChildFailedError as ex:  # a rank's own exit code (a rank stopped by torchrun itself has none)
        codes = [f.exitcode for _, f in sorted(ex.failures.items()) if f.exitcode > 0]
        raise SystemExit(codes[0] if codes else 1) from None
    raise SystemExit(lifecycle.exit_code() or 0)  # a signal to this process after the ranks had finished


class UserError(SystemExit):
    """A DlfsError leaving a Hydra task. As a SystemExit it passes through Hydra's job runner, which
    would otherwise print its own "Error executing job" report before ours."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(code)
        self.message = message


# --- eval ------------------------------------------------------------------------------------


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
@_one_line_task
def _eval_app(cfg: DictConfig) -> None:
    reject_unknown_keys(cfg)  # a +key=value, which nothing would read
    if OmegaConf.is_missing(cfg, "run"):
        raise DlfsError("dlfs eval needs a run folder: dlfs eval run=outputs/<model>/<timestamp>")
    check_numbers(cfg)
    if cfg.device is not None:
        check_device(cfg.device)
    _note_if_being_written(Path(cfg.run))
    from dlfs_cli.evaluate import run_eval

    run_eval(cfg.run, cfg.checkpoint.value, cfg.device)


# --- generate --------------------------------------------------------------------------------


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
@_one_line_task
def _generate_app(cfg: DictConfig) -> None:
    reject_unknown_keys(cfg)  # a +key=value, which nothing would read
    if OmegaConf.is_missing(cfg, "run"):
        raise DlfsError("dlfs generate needs a run folder: dlfs generate run=outputs/lstm_charmodel/<timestamp>")
    check_numbers(cfg)
    check_seed("seed", cfg.seed)
    from dlfs_cli.generate import check_length, load_char_model, sample  # torch: loaded for the model anyway

    check_length(cfg.length)  # before the checkpoint loads
    if cfg.temperature < 0:
        raise DlfsError(f"invalid value for temperature: {cfg.temperature} (must be >= 0; near 0 is greedy)")
    check_device(cfg.device)
    from dlfs_cli.distributed import resolve_device

    device = resolve_device(cfg.device)
    _note_if_being_written(Path(cfg.run))
    model, vocab = load_char_model(Path(cfg.run).expanduser(), cfg.checkpoint.value, device)
    print(sample(model, vocab, cfg.prime, cfg.length, cfg.temperature, cfg.seed, device))


def _note_if_being_written(run: Path) -> None:
    """Readers need no lock; they say when what they read may change under them."""
    who = runlock.holder(run) if run.is_dir() else None
    if who is not None:
        print(f"dlfs: note: {run} is still being written ({who}); reading its latest saved checkpoint", file=sys.stderr)


# --- reproduce -------------------------------------------------------------------------------


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="reproduce")
@_one_line_task
def _reproduce_app(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        reject_unknown_keys(cfg)  # a +key=value, which nothing would read
        check_device(cfg.device)
        check_numbers(cfg)
        for seed in cfg.seeds:
            check_seed("seeds", seed)
        from dlfs_cli.reproduce import reproduce

        code = reproduce(cfg, out)
    except DlfsError as ex:
        runlock.drop_refused(out)
        raise UserError(str(ex), ex.exit_code) from None
    if code:
        raise UserError(f"the reproduction did not hold: see {out / 'REPORT.md'}", code)


# --- runs ------------------------------------------------------------------------------------


def _runs_app() -> None:
    from dlfs_cli.runs import list_runs

    list_runs(sys.argv[1:])


# --- each command, from its arguments to its exit ----------------------------------------------


def _train_command(args: list[str]) -> None:
    """dlfs train, start to end: resume= and torchrun's ranks are set up before Hydra; a sweep's summary
    follows its jobs, also when the sweep ends early; under torchrun the ranks' group is closed at the end."""
    lifecycle.install_for_process()  # SIGINT, SIGTERM, SIGHUP, SIGUSR1/2: stop at a safe point, from here to the exit
    register_configs()  # the Hydra commands' schemas (not at import: dlfs runs, diff and completion need none)
    multirun = _is_multirun(args)
    with _one_line_errors():  # the folders from= and resume= name: one that cannot be read is one line
        args = _from_run(args)
        args = prepare_overrides(args, multirun=multirun)
        if multirun and any(a in args for a in ("--cfg", "-c", "--info", "-i")):
            _fail("--cfg and --info show one job's config: use them without -m")
        study = _resume_a_sweep(args)
        if study is not None:  # resume=<sweep folder> of an Optuna study: the trials it has not run yet
            args, multirun = study, True
        args = _run_dir_for_resume(args)
    if _under_torchrun():
        args = _join_the_world(args)
    try:
        with _one_line_errors(on_abort=_finish_sweep_quietly if multirun else None):
            _start("train", _sweep_app if multirun else _train_app, args)
            if _under_torchrun():
                from dlfs_cli import distributed

                distributed.finish()
    except Exception as ex:  # e.g. joblib losing a worker process that was killed
        folder = sweep.SweepFolder.current
        if not multirun or folder is None:
            raise
        if folder.optuna and "Record does not exist" in str(ex):
            # Optuna's sweeper asks its study for the best trial at the end, and no trial completed: the jobs
            # say why, as any sweep's end does
            _finish_sweep()
            return
        _finish_sweep_quietly()
        if folder.path is not None:
            runlock.drop_refused(folder.path)  # a sweep whose launcher never ran a job
        _fail(f"the sweep ended early: {type(ex).__name__}: {explain(ex)}")
    finally:
        if multirun:
            sweep.release_workers()


def _sweep_app() -> None:
    """dlfs train -m: Hydra's launcher runs the jobs; then summary.csv, the ranked table and the exit code."""
    _train_app()
    _finish_sweep()


def _eval_command(args: list[str]) -> None:
    _run_hydra_app("eval", _eval_app, args)


def _generate_command(args: list[str]) -> None:
    _run_hydra_app("generate", _generate_app, args)


def _reproduce_command(args: list[str]) -> None:
    lifecycle.install_for_process()  # it trains: SIGINT, SIGTERM, SIGHUP, SIGUSR1/2 stop it at a safe point
    _run_hydra_app("reproduce", _reproduce_app, args)


def _runs_command(args: list[str]) -> None:
    with _one_line_errors():  # argparse's arguments: taken as given
        _start("runs", _runs_app, args)


def _completion_command(args: list[str]) -> None:
    from dlfs_cli.completion import completion  # no torch: it answers every Tab

    with _one_line_errors():
        completion(args, list(COMMANDS))


def _diff_command(args: list[str]) -> None:
    from dlfs_cli.diff import diff  # not a Hydra app: argparse's arguments, and no torch

    with _one_line_errors():
        diff(args)


def _run_hydra_app(command: str, app: Callable[[], object], args: list[str]) -> None:
    """dlfs eval, generate and reproduce: one job each."""
    if _is_multirun(args):
        _fail(f"dlfs {command} takes no -m: a sweep is dlfs train -m")
    register_configs()
    args = prepare_overrides(args, multirun=_is_multirun(args))
    with _one_line_errors():
        _start(command, app, args)


def _start(command: str, app: Callable[[], object], args: list[str]) -> None:
    """Run `app` on `args`; then the folders it made but never wrote to go, and it releases its locks."""
    # Hydra reads its arguments from sys.argv. HYDRA_FULL_ERROR makes it raise instead of printing
    # a multi-line report, so that we can print one line that names the key or the option.
    sys.argv = [f"dlfs {command}", *args]
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        app()
    except OSError as ex:
        if ex.filename is None and runlock.writing() is not None:  # a write of Hydra's own files, unnamed
            ex.filename = f"{runlock.writing()}{os.sep}"
        raise
    finally:
        for folder in list(runlock.MADE):  # one this command made but never wrote to: refused, leave nothing
            runlock.drop_refused(folder)
        runlock.MADE.clear()
        runlock.release_all()  # the folders are finished with (the process ending would release them too)


@contextmanager
def _one_line_errors(on_abort: Callable[[], None] | None = None) -> Iterator[None]:
    """What a command raises, as one line on stderr and the exit code (a bug keeps its traceback).
    on_abort: what still has to be done when a second signal (or Ctrl-C in a plain Python) aborts."""
    try:
        yield
    except UserError as ex:
        if _rank() == 0:  # under torchrun rank 0 says it (each rank's log has it too)
            what = "error: " if ex.code in (1, 2) else ""  # otherwise an interruption: not an error, a stop
            print(f"dlfs: {what}{ex.message}", file=sys.stderr)
        sys.exit(ex.code)
    except DlfsError as ex:  # from a command that is not a Hydra app (dlfs runs)
        _fail(str(ex), ex.exit_code)
    except (HydraException, OmegaConfBaseException) as ex:  # before OSError: MissingConfigException is both
        _fail(explain(ex))
    except OSError as ex:  # a folder Hydra could not make, a file it could not write: one line naming it
        _fail(os_error_message(ex))
    except KeyboardInterrupt as ex:
        print("dlfs: aborted", file=sys.stderr)
        if on_abort is not None:
            on_abort()
        sys.exit(exit_code_of(ex, 130))


# --- the command table -------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "train": (_train_command, "train a model (a Hydra app: KEY=VALUE overrides, -m, --cfg job, --help)"),
    "eval": (_eval_command, "recompute a run's held-out metrics from its checkpoint: dlfs eval run=<folder>"),
    "generate": (_generate_command, "sample text from a trained lstm_charmodel run: dlfs generate run=<folder>"),
    "reproduce": (_reproduce_command, "re-run the book's chapter-7 table and compare: dlfs reproduce [quick=true]"),
    "runs": (_runs_command, "list past runs and sweep jobs as a table: dlfs runs [PATH] [--model M] [--sort KEY]"),
    "diff": (_diff_command, "compare two run folders (config, metrics): dlfs diff RUN_A RUN_B [--plot FILE.png]"),
    "completion": (_completion_command, 'tab completion for your shell: eval "$(dlfs completion bash)" (zsh, fish)'),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"dlfs {__version__}: run, sweep and reproduce the models of 'Deep Learning from Scratch' (ch. 7)",
        "",
        "usage: dlfs <command> [KEY=VALUE ...] [options]",
        "",
        "commands:",
        *(f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()),
        "",
        "Run 'dlfs <command> --help' for a command's config groups and options.",
    ]
    return "\n".join(lines)


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"dlfs: error: {message}", file=sys.stderr)
    sys.exit(code)


def explain(ex: BaseException) -> str:
    """One line that names the problem, from Hydra's and OmegaConf's multi-line errors."""
    if isinstance(ex, OverrideParseException):
        return f"cannot parse override '{ex.override}': {ex.message.splitlines()[0]}"
    if isinstance(ex, MissingConfigException) and "submitit" in str(ex.missing_cfg_file):
        return "hydra/launcher=slurm (and submitit_local) needs hydra-submitit-launcher: pip install 'dlfs-cli[slurm]'"
    if isinstance(ex, MissingConfigException) and ex.options is not None and ex.missing_cfg_file:
        group, _, option = ex.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(option, ex.options, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown option {group}={option}{hint}; valid choices: {', '.join(sorted(ex.options))}"
    cause = ex.__cause__ if isinstance(ex.__cause__, OmegaConfBaseException) else ex
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = cause.full_key
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            return f"unknown key '{key}'{_did_you_mean(cause)}"
        first = str(cause).splitlines()[0]
        return f"invalid value for {key}: {first}"
    if "Ambiguous value for argument" in str(ex):  # a,b without -m
        arg = str(ex).split("'")[1] if str(ex).count("'") >= 2 else "KEY=a,b"
        return f"{arg} is a list of values: add -m to sweep over them, or write KEY=[a,b] for a list"
    lines = [line.strip() for line in str(ex).splitlines() if line.strip()] or [type(ex).__name__]
    if lines[0].endswith(":") and len(lines) > 1:  # "... raised while composing config:" then the reason
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def _did_you_mean(ex: OmegaConfBaseException) -> str:
    parent = getattr(ex, "parent_node", None)
    key = str(getattr(ex, "key", ""))
    if parent is None or not key:
        return ""
    close = difflib.get_close_matches(key, [str(k) for k in parent.keys()], n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(map(str, parent.keys()))})"


# dlfs train from=PATH: the run this one starts from, recorded by train(). Handed to the job in its Hydra config
# (hydra.job.env_set, which Hydra also sets in the environment while the job runs), so that the jobs a launcher
# runs in processes of its own (hydra/launcher=joblib) have it, and only those jobs
FROM_ENV = "DLFS_FROM_RUN"


def _from_run(args: list[str]) -> list[str]:
    """from=PATH: a new run, in a folder of its own, from an earlier run's config. Hydra composes the config
    as it did for that run, from its recorded command-line overrides, then the ones given now (later wins)."""
    values = [a.partition("=")[2] for a in args if a.startswith("from=")]
    if not values:
        return args
    rest = [a for a in args if not a.startswith("from=")]
    raw = values[-1]
    path = Path(raw[1:-1] if raw[:1] in ("'", '"') and raw[-1:] == raw[:1] else raw)
    recorded = path / ".hydra" / "overrides.yaml"
    if not raw:
        _fail("from is empty: give the run folder to start from, e.g. from=outputs/boston/<timestamp>")
    if not path.is_dir():
        _fail(f"from={path}: no such folder")
    if not (path / "config.yaml").is_file() or not recorded.is_file():
        _fail(f"from={path}: not a dlfs run folder (it needs config.yaml and .hydra/overrides.yaml)")
    if any(a.lstrip("+").startswith("resume=") for a in rest):
        _fail("from= starts a new run from another's config, resume= continues a run: give one of them")
    import yaml

    try:
        overrides = [str(o) for o in yaml.safe_load(recorded.read_text(encoding="utf-8")) or []]
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as ex:
        _fail(f"from={path}: cannot read {recorded}: {' '.join(str(ex).split())[:160]}")
    # where that run was written, and how it was continued, are not part of what it was; a key given now
    # replaces its recorded value (Hydra would take the later one too, but overrides.yaml stays readable)
    given = {a.lstrip("+~").partition("=")[0] for a in rest if "=" in a and not a.startswith("-")}
    kept = [
        o
        for o in overrides
        if not o.lstrip("+~").startswith(("hydra.", "resume=", "from="))
        and o.lstrip("+~").partition("=")[0] not in given
    ]
    kept = absolute_paths(kept, started_in(path))
    from hydra.core.override_parser.overrides_parser import OverridesParser

    handed = _quoted(OverridesParser.create(), f"+hydra.job.env_set.{FROM_ENV}", str(path.resolve()))
    at = args.index(next(a for a in args if a.startswith("from=")))  # among the overrides, after any option
    return [*rest[:at], *kept, *rest[at:], handed]


# The keys that name files: a relative value is relative to the folder the command was given in
PATH_KEYS = ("data.path", "data.root")


def started_in(run: Path) -> Path | None:
    """The folder a run's command was given in (Hydra's hydra.runtime.cwd), or None where it is not recorded."""
    import yaml

    from dlfs_cli.runs import YAML_LOADER

    try:
        tree = yaml.load((run / ".hydra" / "hydra.yaml").read_text(encoding="utf-8"), Loader=YAML_LOADER)
        cwd = tree["hydra"]["runtime"]["cwd"]
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):  # ValueError: not UTF-8
        return None
    return Path(cwd) if isinstance(cwd, str) and cwd else None


def absolute_paths(overrides: list[str], started: Path | None) -> list[str]:
    """A run's recorded overrides, to be composed again from another folder (from=, a sweep's resume): a
    relative data.path or data.root made absolute against the folder the run was started in, as its
    config.yaml holds it (composed as recorded, it named another file, or none)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if started is None:
        return overrides
    parser, out = OverridesParser.create(), []
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") in PATH_KEYS and "${" not in value:
            try:
                text = parser.parse_override(override).value()
            except HydraException:
                text = None
            if isinstance(text, str) and text and not Path(os.path.expanduser(text)).is_absolute():
                override = _quoted(parser, key, str(started / text))
        out.append(override)
    return out


def _check_from_run(cfg: DictConfig, source: Path) -> None:
    """Keys this run takes from today's defaults where the source run had other values (the defaults moved
    since it ran): said, not silently changed."""
    from dlfs_cli.config import load_saved_config
    from dlfs_cli.diff import flatten

    def plain(config: DictConfig) -> dict[str, Any]:
        return flatten(cast(dict[str, Any], OmegaConf.to_container(config, resolve=True, enum_to_str=True)))

    try:
        saved, now = plain(load_saved_config(source / "config.yaml")), plain(cfg)
    except DlfsError as ex:
        raise DlfsError(f"from={source}: {ex}") from None
    from dlfs_cli.tracking import log

    given = [o.lstrip("+~").partition("=")[0] for o in HydraConfig.get().overrides.task]  # recorded and new
    if "experiment" in given:
        return  # a preset sets many keys at once: every difference may be asked for
    moved = [
        k
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k) and not any(k == c or k.startswith(f"{c}.") for c in given)
    ]
    if moved:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in moved[:5])
        more = f" and {len(moved) - 5} more" if len(moved) > 5 else ""
        log.warning("from=%s: the defaults changed since that run; today's are used for %s%s", source, shown, more)


def _resume_a_sweep(args: list[str]) -> list[str] | None:
    """resume=<sweep folder>: its unfinished jobs run again, then its summary; the command ends here, or for
    an Optuna study with trials to go returns the sweep's own arguments, which run them and then summarise."""
    from dlfs_cli import sweep_resume

    values = [a.partition("=")[2].strip("'\"") for a in args if a.lstrip("+").startswith("resume=")]
    if not values or not values[-1] or not sweep_resume.is_sweep_folder(Path(values[-1])):  # "": not "."
        return None
    folder = Path(values[-1])
    if len(args) > 1:
        _fail(f"resume={folder} finishes a sweep with its jobs' own settings: give no other arguments")
    with _one_line_errors():
        incomplete, study = sweep_resume.resume_sweep(folder)
    if study is not None:
        return study
    _exit_with(incomplete, folder, stopped=lifecycle.exit_code() is not None)
    sys.exit(0)


def _run_dir_for_resume(args: list[str]) -> list[str]:
    """resume=PATH continues that folder in place: Hydra is pointed at it and writes nothing of its own."""
    values = [a.partition("=")[2] for a in args if a.lstrip("+").startswith("resume=")]
    if not values or values[-1] == "null":
        return args
    if _is_multirun(args):
        _fail("resume= continues one run; it cannot be part of a sweep (-m)")
    path = values[-1].strip("'\"") if values[-1][:1] in ("'", '"') else values[-1]  # prepare_overrides quoted it
    if not path:
        _fail("resume is empty: give the run folder to continue, e.g. resume=outputs/boston/<timestamp>")
    if not Path(path).is_dir():  # checked before Hydra makes the folder
        _fail(f"resume={path}: no such folder")
    if any(a.lstrip("+").startswith(("hydra.run.dir=", "hydra.output_subdir=")) for a in args):
        _fail("resume= continues a run in its own folder: leave hydra.run.dir and hydra.output_subdir out")
    return [*args, f"hydra.run.dir={values[-1]}", "hydra.output_subdir=null"]


def _join_the_world(args: list[str]) -> list[str]:
    """Under torchrun: every rank takes rank 0's run folder; only rank 0 writes Hydra's files."""
    if _is_multirun(args):
        _fail("a sweep (-m) cannot run under torchrun; run each job with torchrun, or trainer.nproc=N")
    from dlfs_cli import distributed  # torch: only processes that will train get here

    distributed.agree_on_run_stamp()
    return args if distributed.world().main else [*args, "hydra.output_subdir=null"]


def _is_multirun(args: list[str]) -> bool:
    return "-m" in args or "--multirun" in args


def _finish_sweep() -> None:
    """After every job of a sweep: summary.csv and the ranked table; a non-zero exit when a job did not complete."""
    folder = sweep.SweepFolder.current
    if folder is None or folder.path is None or not folder.path.is_dir():
        return
    incomplete = sweep.summarize(folder)
    refused = sweep.refused_jobs(folder.path)
    stopped = folder.stopped()
    if stopped:
        (folder.path / sweep.STOP_FILE).unlink()
    if refused:
        _fail(f"{len(refused)} of the sweep's jobs were refused their folder ({'; '.join(refused)})")
    _exit_with(incomplete, folder.path, stopped)


def _exit_with(incomplete: list[sweep.Run], folder: Path, stopped: bool) -> None:
    """A sweep's end with jobs that did not complete: exit 2 naming them, or the signal's code after a stop."""
    if not incomplete:
        return
    which = ", ".join(f"job {r.job} {r.status}" for r in incomplete)
    message = f"{len(incomplete)} of the sweep's jobs did not complete ({which}); see {folder / sweep.SUMMARY_CSV}"
    if stopped:  # a stop asked for, not an error
        print(f"dlfs: sweep interrupted: {message}", file=sys.stderr)
        sys.exit(lifecycle.exit_code() or 130)
    _fail(message)


def main(argv: list[str] | None = None) -> None:
    if argv is not None:  # a call from Python (the tests, a script): its exit is the caller's
        _main(argv)
        return
    try:
        _main(None)
        code: object = 0
    except SystemExit as ex:
        code = ex.code
    if not isinstance(code, int):  # sys.exit(None) or sys.exit("message"), as Python ends them
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    # The process's own command (`dlfs`, `python -m dlfs_cli`), everything written and closed: it exits
    # without Python's finalization (lifecycle.exit_process), so a signal until the very end still gets
    # its exit code and line, and the last garbage collection over every object torch made (1.0-1.1 s
    # for a 1-epoch dlfs train, measured) is not paid.
    lifecycle.exit_process(code)


def _main(argv: list[str] | None) -> None:
    lifecycle.protect_console()  # a console that goes away (| head, a closed terminal) loses only its lines
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    if args[0] == "--version":
        print(f"dlfs {__version__}")
        return
    command, rest = args[0], args[1:]
    try:
        check_system()
        if command in ("train", "reproduce"):  # they write runs (their configs read these variables)
            check_run_environment()
    except DlfsError as ex:
        _fail(str(ex))
    if command in ("-sc", "--shell-completion") and rest[:1] and rest[0].startswith("query="):
        command, rest = "completion", ["query"]  # Hydra's completion, installed with dlfs train -sc install=...
    if command not in COMMANDS:
        if command.startswith("-") and any(a in COMMANDS for a in rest):
            _fail(f"put the command first, then its options: dlfs <command> {command} ...")
        _fail(f"unknown command '{command}'; valid commands: {', '.join(COMMANDS)}")
    run, _ = COMMANDS[command]
    run(rest)
    code = lifecycle.exit_code()
    if code is not None:  # a stop asked for after the last step of the last run (its summary is written)
        lifecycle.say_stopped(code)
        sys.exit(code)


# --- overrides, before Hydra sees them ----------------------------------------------------------

# Keys whose values are free text (paths, a prime): taken as typed, spaces, commas and any letter included.
FREE_TEXT = ("hydra.run.dir", "hydra.sweep.dir", "data.path", "data.root", "resume", "run", "prime")
# Hydra's options that take the next argument as their value (never an override).
_OPTIONS_WITH_VALUE = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name"}
_OPTIONS_WITH_VALUE |= {"-cd", "--config-dir", "--experimental-rerun"}
_GROUPS = {"model", "data", "optimizer", "scheduler", "loss", "trainer", "experiment"}  # conf/<group>/
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}  # --info [CHOICE]


def prepare_overrides(args: list[str], multirun: bool) -> list[str]:
    """Check every KEY=VALUE before Hydra parses it: a missing key is an error, and a free-text value is
    quoted for Hydra when it needs to be (a space, a comma, a letter beyond ASCII), so that it is taken as
    typed; one that cannot be quoted is an error showing the form that works."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Override

    parser = OverridesParser.create()
    options: list[str] = []  # first: Hydra's parser takes no option after an override (`a=1 -m b=2`)
    out: list[str] = []
    takes_value = False
    takes_info_value = False
    _check_options(args)
    for arg in args:
        if takes_value or arg.startswith("-"):
            takes_value = arg in _OPTIONS_WITH_VALUE
            takes_info_value = arg in ("-i", "--info")
            options.append(arg)
            continue
        if takes_info_value and arg in _INFO_CHOICES:
            options.append(arg)
            continue
        key, eq, value = arg.partition("=")
        bare = key.lstrip("+~").strip()
        if value.strip() == "null" and (bare in _GROUPS or "/" in bare):
            _fail(f"{bare}=null: a config group takes one of its options; to choose none, leave {bare} out")
        if key.startswith("~") or value.strip() == "null":  # a deletion, or null: Hydra's own
            out.append(arg)
            continue
        if not eq:
            _fail(f"cannot parse '{arg}': overrides are KEY=VALUE (e.g. trainer.epochs=3)")
        if not bare:
            _fail(f"cannot parse override '{arg}': no key before '=' (write KEY=VALUE, e.g. seed=3)")
        _check_hydra_key(bare, value.strip().strip("'\""))
        if bare not in FREE_TEXT:
            out.append(arg)
            continue
        if value.strip() == "" and bare != "resume":
            _fail(f"{bare} is empty: give a value, e.g. {bare}={'outputs/my_run' if 'dir' in bare else '...'}")
        try:
            parsed: Override | None = parser.parse_override(arg)
        except HydraException:
            parsed = None
        plain = parsed is not None and isinstance(parsed.value(), str) and not parsed.is_sweep_override()
        if plain or (multirun and parsed is not None):  # as Hydra reads it (a sweep of paths under -m)
            out.append(arg)
            continue
        out.append(_quoted(parser, key, value))
    return [*options, *out]


_CFG_CHOICES = ("job", "hydra", "all")  # --cfg / -c
_SHELLS = ("bash", "fish", "zsh")  # -sc install=SHELL


def _check_options(args: list[str]) -> None:
    """Hydra's options that would print a usage page or a traceback, or write where dlfs does not."""
    for arg, following in zip(args, [*args[1:], ""], strict=False):
        if arg == "--experimental-rerun":  # it would train into the pickled job's folder again
            _fail("--experimental-rerun is not supported (it writes into the old run's folder): dlfs train from=RUN")
        if arg in ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir"):
            _fail(f"{arg}: each dlfs command has its own config; choose presets with experiment=NAME or from=RUN")
        if arg in ("-c", "--cfg") and following not in _CFG_CHOICES:
            _fail(f"{arg} {following}: invalid choice; valid choices: {', '.join(_CFG_CHOICES)}")
        if arg in ("-sc", "--shell-completion") and following.partition("=")[0] in ("install", "uninstall"):
            if following.partition("=")[2] not in _SHELLS:
                _fail(f"{arg} {following}: completion is for {', '.join(_SHELLS)} (or: dlfs completion bash)")


def _check_hydra_key(key: str, value: str) -> None:
    """Hydra's keys that would write outside the run's own folder, or not as dlfs says it does."""
    if key == "hydra.mode":
        _fail("hydra.mode: for a sweep use -m, e.g. dlfs train -m seed=1,2,3")
    if key == "hydra.job.chdir" and value.lower() != "false":
        _fail("hydra.job.chdir: dlfs never changes the working folder (relative paths are read from where you run it)")
    if key == "hydra.sweep.subdir":
        # Hydra writes a job's .hydra/ files before any check of the job's own: a subdir that two jobs resolve
        # alike, or that leads out of the sweep's folder, would write over another run's
        per_job = any(f"${{hydra{sep}job.{k}" in value for sep in ".:" for k in ("num", "id", "override_dirname"))
        if not per_job or ".." in Path(value).parts or Path(value).is_absolute():
            _fail(
                f"hydra.sweep.subdir={value}: each job needs a folder of its own inside hydra.sweep.dir; "
                "include ${hydra.job.num} (the default), ${hydra.job.id} or ${hydra.job.override_dirname}, without '..'"
            )
    if key == "hydra.output_subdir" and value != "null" and (Path(value).is_absolute() or ".." in Path(value).parts):
        _fail(f"hydra.output_subdir={value}: a folder inside the run's own (default .hydra), or null for none")


def _quoted(parser: OverridesParser, key: str, value: str) -> str:
    """key="value" in Hydra's quoting, checked to read back as `value`."""
    for quote in ("'", '"'):
        candidate = f"{key}={quote}{value}{quote}"
        try:
            if value.count(quote) == 0 and parser.parse_override(candidate).value() == value:
                return candidate
        except HydraException:
            continue
    _fail(f"cannot read {key}={value} as text (it holds both kinds of quote): escape them as Hydra asks, \\' or \\\"")


def _finish_sweep_quietly() -> None:
    """A sweep stopped at once still gets its summary.csv: what ran is kept."""
    try:
        _finish_sweep()
    except SystemExit:
        pass


if __name__ == "__main__":
    main()
