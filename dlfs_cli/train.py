"""train(cfg, run_dir): assemble data, model, optimizer, scheduler and trainer from a config, run, record.

A plain function: the `dlfs train` Hydra app calls it, and so do the tests. A resume is the same call
with the state that resume.prepare() read from the run's last.pt.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from dlfs_cli import __version__, distributed, layers, lifecycle, sweep
from dlfs_cli.checkpoint import Checkpoint, config_hash
from dlfs_cli.config import absolute_data_paths, metric_names, validate
from dlfs_cli.data import DataBundle, DataInfo, build_data
from dlfs_cli.distributed import World
from dlfs_cli.errors import DlfsError, exit_code_of, os_error_message
from dlfs_cli.models import RECONSTRUCTS, build_model
from dlfs_cli.tracking import RunFolder, log, phase, print_config_tree, versions
from dlfs_cli.trainer import Diverged, Trainer


def train(
    cfg: DictConfig,
    run_dir: Path,
    state: Checkpoint | None = None,
    threads: int | None = None,
    live: bool = True,
    from_run: Path | None = None,
) -> dict[str, float]:
    """Run one training run into `run_dir`, or continue it from `state`; returns the final metrics (val_*, test_*).

    threads: CPU threads for torch (a sweep's parallel jobs share the cores); live: a progress bar;
    from_run: the run whose config this one started from (dlfs train from=PATH), recorded in summary.json.
    SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 stop it at the next safe point in any phase (see lifecycle.py)."""
    with lifecycle.stop_signals():
        validate(cfg)
        if state is None:  # a new run's (a resume keeps the config its checkpoint was made with)
            absolute_data_paths(cfg)
        world, device = _set_up(cfg, threads)
        reconstruct = cfg.model.name in RECONSTRUCTS
        try:  # the data and the model take memory too, before the run's folder has its files
            data = build_data(cfg.data, cfg.trainer.batch_size, cfg.seed, device, reconstruct)
            model, trained = _build_model(cfg, data.info, device, world)
        except (MemoryError, RuntimeError) as ex:
            memory = _out_of_memory(ex, device)
            if memory is None:
                raise
            raise memory from None
        optimizer = build_optimizer(cfg.optimizer, model)
        scheduler = build_scheduler(cfg.scheduler, optimizer, cfg.trainer.epochs)
        plain_cfg = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        # saved with every checkpoint; the vocabulary travels with the weights (index i = vocab[i])
        identity: dict[str, Any] = {
            "config": plain_cfg,
            "config_hash": config_hash(plain_cfg),
            "dlfs_version": __version__,
        }
        identity["vocab"] = data.info.vocab

        # Everything above can refuse the config; only now does the run folder get its files.
        start = time.time()
        run = _open_run(cfg, run_dir, state, device, world, model, data.info, live)
        if cfg.trainer.precision == "bf16" and _has_lstm(model) and layers.lstm_leaves_cpu_bf16(device):
            log.info(
                "this CPU has no bfloat16 LSTM (oneDNN's needs AVX-512): the LSTM runs in float32, the rest in bf16"
            )
        if from_run is not None:
            run.update_summary(from_run=str(from_run))
        trainer = Trainer(trained, optimizer, scheduler, cfg.trainer, cfg.loss.name, device, run, identity, world)
        duration_before = (run.summary.duration_s or 0.0) if state is not None else 0.0
        status, hint = "failed", f". Resume with: dlfs train resume={run_dir}"
        stop_listening = lifecycle.on_request(lambda signum: setattr(trainer, "stop_signal", signum))
        try:
            lifecycle.check("while the run was being set up (nothing trained yet)", hint)
            if state is not None:
                trainer.load_state_dict(state)  # last before training: it also restores every generator
            metrics = trainer.fit(data.train, data.val, data.test)
            run.update_summary(metrics=metrics)
            # Only a run that did everything is completed: a stop asked for during the final evaluation
            # or the extras leaves it interrupted, and a resume does what is left (the extras are redone).
            lifecycle.check("after the last step; last.pt saved, the figures and sample not made yet", hint)
            if world.main:
                _extras(run, cfg, model, data, device, hint)
            status = "completed"
            log.info("completed: %s", " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            return metrics
        except BaseException as ex:
            memory = _out_of_memory(ex, device)
            with lifecycle.shielded():  # a second signal here would leave the status at "failed"
                status = _record_failure(run, memory or ex)
            if isinstance(ex, OSError):  # a write of the run's that is not ours (figures, tensorboard): one line
                raise DlfsError(os_error_message(ex, "could not write")) from None
            if memory is not None:
                raise memory from None
            raise
        finally:
            stop_listening()
            with lifecycle.shielded():
                run.update_summary_quietly(status=status, duration_s=round(duration_before + time.time() - start, 3))
                run.close()


def _out_of_memory(ex: BaseException, device: torch.device) -> DlfsError | None:
    """Running out of memory is the sizes' doing, not a bug: one line (torch's CPU allocator raises a
    RuntimeError, CUDA's an OutOfMemoryError, Python a MemoryError), not a traceback."""
    said = str(ex)
    if not isinstance(ex, MemoryError) and not (
        isinstance(ex, RuntimeError) and ("out of memory" in said.lower() or "can't allocate memory" in said)
    ):
        return None
    first = (said.splitlines() or [type(ex).__name__])[0][:200]
    return DlfsError(
        f"out of memory on {device} ({first}): try a smaller trainer.batch_size, model or data.sequence_length"
    )


def _set_up(cfg: DictConfig, threads: int | None) -> tuple[World, torch.device]:
    """This process's place among the ranks, its device, its process-wide switches and its seeds."""
    if cfg.logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise DlfsError("logger=tensorboard needs the tensorboard package: pip install 'dlfs-cli[tensorboard]'")
    if threads is not None:
        torch.set_num_threads(threads)
    world = distributed.world()
    if world.distributed and cfg.data.get("batching") == "book":
        raise DlfsError("data.batching=book carries the batch's mean state across ranks: use data.batching=streams")
    if world.distributed and cfg.trainer.batch_size < world.size:
        raise DlfsError(f"trainer.batch_size={cfg.trainer.batch_size} is the global batch: at least one row per rank")
    t = cfg.trainer
    device = distributed.sweep_device(
        distributed.resolve_device(cfg.device, world.local_rank if world.distributed else None)
    )
    if world.distributed and device.type == "cuda":
        distributed.check_distinct_gpus(device)
    if t.precision == "bf16":
        distributed.check_bf16(device)
    if t.compile and device.type == "cpu":  # CUDA's kernels are Triton's, built otherwise (not checked on a GPU)
        distributed.check_compile()
    distributed.set_kernels(t, device)
    # The data order's generator takes the seed itself (the same order on every rank); the global
    # generators (dropout) differ by rank. Rank 0's are a single process's, and its initial weights
    # are every rank's (DistributedDataParallel copies them).
    distributed.seed_everything(cfg.seed + world.rank)
    return world, device


def _build_model(
    cfg: DictConfig, info: DataInfo, device: torch.device, world: World
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model, what trains: the model maybe wrapped by DistributedDataParallel and torch.compile)."""
    try:
        model = build_model(cfg.model, info).to(device)
    except (RuntimeError, MemoryError) as ex:  # sizes that ask for more memory than there is
        first = (str(ex).splitlines() or [type(ex).__name__])[0][:200]
        raise DlfsError(f"cannot build model={cfg.model.name} with these sizes: {first}") from None
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)  # 4-d weights NHWC; the batches follow in the trainer
    trained: torch.nn.Module = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.trainer.compile:
        # what trains; `model` (the same weights) is evaluated and saved. torch.compile is annotated as
        # returning a Callable; given a Module it returns one (an OptimizedModule)
        trained = cast(torch.nn.Module, torch.compile(trained))
    return model, trained


def _has_lstm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.LSTM) for m in model.modules())


def _open_run(
    cfg: DictConfig,
    run_dir: Path,
    state: Checkpoint | None,
    device: torch.device,
    world: World,
    model: torch.nn.Module,
    info: DataInfo,
    live: bool,
) -> RunFolder:
    """The run folder, with its config and summary written (rank 0), and the run announced."""
    tensorboard = cfg.logger == "tensorboard" and world.main  # a str Enum
    run = RunFolder(run_dir, tensorboard=tensorboard, live=live and world.main, rank=world.rank)
    t = cfg.trainer
    fields: dict[str, Any] = {"model": cfg.model.name, "data": cfg.data.name, "epochs": t.epochs, "seed": cfg.seed}
    fields |= {"device": str(device), "deterministic": t.deterministic, "tf32": t.tf32, "world_size": world.size}
    fields |= {"threads": torch.get_num_threads(), "versions": versions()}
    if state is None:
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        fields |= {"metrics": {}, "epochs_completed": 0, "started_at": started, "duration_s": 0.0}
        fields["parameters"] = sum(p.numel() for p in model.parameters())
    else:  # the checkpoint is the truth: a run killed between saving last.pt and its summary is behind it
        fields |= {"epochs_completed": state.epoch, "step": state.step}
    columns = metric_names(cfg.loss.name, sequence=info.vocab is not None)
    run.start(cfg, fields, columns, resume_step=None if state is None else state.step)
    if world.main:
        if cfg.verbose and sweep.first_job():  # a sweep's jobs differ only by their overrides, which Hydra logs
            print_config_tree(cfg)
    else:
        for handler in logging.getLogger().handlers:  # the console: rank 0 speaks for the run
            handler.setLevel(logging.WARNING)
    where = "run folder" if state is None else f"resuming at epoch {state.epoch + 1}, step {state.step}:"
    rows = f"{info.n_train} train / {info.n_val} validation / {info.n_test} test rows from {info.source}"
    log.info("%s %s | %s on %s | %s", where, run_dir, cfg.model.name, device, rows)
    return run


def _extras(
    run: RunFolder, cfg: DictConfig, model: torch.nn.Module, data: DataBundle, device: torch.device, hint: str
) -> None:
    """What follows the training: the figures, and a text sample of a character model."""
    if cfg.figures.enabled:
        tsne = f", a t-SNE map of {cfg.figures.tsne_points:,} codes" if cfg.model.name == "autoencoder" else ""
        stop_here = functools.partial(lifecycle.check, "while the figures were drawn; last.pt saved", hint)
        with phase(f"drawing the figures{tsne}"):
            _figures(run, cfg, model, data, device, stop_here)
        stop_here()
    if data.info.vocab is not None:
        _sample(run, cfg, model, data.info.vocab, device)
        lifecycle.check("while the text sample was made; last.pt saved", hint)


def _record_failure(run: RunFolder, ex: BaseException) -> str:
    """The status a run that did not finish ends with; its error goes to summary.json and, once, the console."""
    if isinstance(ex, KeyboardInterrupt):
        run.note("aborted by a second signal")
        return "interrupted"
    if not isinstance(ex, DlfsError | OSError):  # a bug: its traceback goes to train.log
        run.update_summary_quietly(error=f"{type(ex).__name__}: {ex}")
        log.exception("failed")
        return "failed"
    message = os_error_message(ex, "could not write") if isinstance(ex, OSError) else str(ex)
    run.update_summary_quietly(error=message)
    run.note(message)  # the console gets it once, from the command line's error message
    if isinstance(ex, Diverged):
        return "diverged"
    return "interrupted" if exit_code_of(ex) > 128 else "failed"  # a stop signal honoured: 128 + N


def _figures(
    run: RunFolder, cfg: DictConfig, model: torch.nn.Module, data, device: torch.device, between: Callable[[], None]
) -> None:
    """Pictures are a by-product: one that fails is reported, and the trained run stays completed."""
    from dlfs_cli.figures import make_figures  # matplotlib: only runs that draw pay for it

    try:
        files = make_figures(run.path, model, data.test, data.test_labels, cfg.loss.name, cfg, device, between)
        run.update_summary(figures=[str(p.relative_to(run.path)) for p in files])
    except lifecycle.Stopped:  # a stop signal between two figures: the run is interrupted, not its figures failed
        raise
    except Exception as ex:  # noqa: BLE001
        log.warning("figures failed: %s: %s", type(ex).__name__, ex)
        run.update_summary(figures_error=f"{type(ex).__name__}: {ex}")


SAMPLE_FILE = "samples.txt"


def _sample(run: RunFolder, cfg: DictConfig, model: torch.nn.Module, vocab: str, device: torch.device) -> None:
    """A short sample of the trained character model, for a first look (dlfs generate makes more)."""
    from dlfs_cli.generate import sample

    text = sample(model, vocab, None, 300, 1.0, cfg.seed, device)
    (run.path / SAMPLE_FILE).write_text(text + "\n", encoding="utf-8")
    log.info("sample (%s):\n%s", SAMPLE_FILE, text)


def build_optimizer(cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise DlfsError(f"unknown optimizer '{cfg.name}'; valid choices: sgd, adam")


def build_scheduler(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-epoch scheduler, or None for a constant learning rate."""
    sched = torch.optim.lr_scheduler
    if cfg.name == "none":
        return None
    if cfg.name == "exponential":
        gamma = cfg.gamma
        if gamma is None:  # the book: from lr in the first epoch to final_lr in the last
            lr = optimizer.param_groups[0]["lr"]
            gamma = (cfg.final_lr / lr) ** (1 / (epochs - 1)) if epochs > 1 else 1.0
        return sched.ExponentialLR(optimizer, gamma=gamma)
    if cfg.name == "step":
        return sched.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.name == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=cfg.t_max or max(epochs, 1), eta_min=cfg.eta_min)
    raise DlfsError(f"unknown scheduler '{cfg.name}'; valid choices: none, exponential, step, cosine")
