"""train(cfg, run_dir): assemble data, model, optimizer, scheduler and trainer from a config, run, record.

A plain function: the `dlfs train` Hydra app calls it, and so do the tests.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dlfs_cli import __version__, distributed, lifecycle
from dlfs_cli.checkpoint import FORMAT_VERSION, config_hash, describe, load_run_checkpoint
from dlfs_cli.config import validate
from dlfs_cli.data import build_data
from dlfs_cli.errors import DlfsError, os_error_message
from dlfs_cli.models import RECONSTRUCTS, build_model
from dlfs_cli.tracking import CHECKPOINT_DIR, SUMMARY_FILE, RunFolder, log, print_config_tree, versions
from dlfs_cli.trainer import Diverged, Trainer, metric_names


def train(
    cfg: DictConfig, run_dir: Path, resume: bool = False, threads: int | None = None, live: bool = True
) -> dict[str, float]:
    """Run one training run into `run_dir` (or continue it from its last.pt); returns the final held-out metrics.

    threads: CPU threads for torch (a sweep's parallel jobs share the cores); live: a progress bar.
    SIGINT, SIGTERM and SIGHUP stop it at the next safe point in any phase (see lifecycle.py)."""
    with lifecycle.stop_signals():
        return _train(cfg, run_dir, resume, threads, live)


def _train(cfg: DictConfig, run_dir: Path, resume: bool, threads: int | None, live: bool) -> dict[str, float]:
    validate(cfg)
    tensorboard = cfg.logger == "tensorboard"  # a str Enum
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise DlfsError("logger=tensorboard needs the tensorboard package: pip install 'dlfs-cli[tensorboard]'")
    if threads is not None:
        torch.set_num_threads(threads)
    world = distributed.world()
    if world.distributed and cfg.data.get("batching") == "book":
        raise DlfsError("data.batching=book carries the batch's mean state across ranks: use data.batching=streams")
    if world.distributed and cfg.trainer.batch_size < world.size:
        raise DlfsError(f"trainer.batch_size={cfg.trainer.batch_size} is the global batch: at least one row per rank")
    device = sweep_device(resolve_device(cfg.device, world.local_rank if world.distributed else None))
    set_deterministic(cfg.trainer.deterministic, device)
    set_tf32(cfg.trainer.tf32)
    if device.type == "cuda":  # set either way: the flag is process-wide (an in-process sweep's next job)
        torch.backends.cudnn.benchmark = cfg.trainer.cudnn_benchmark and not cfg.trainer.deterministic
    # The data order's generator takes the seed itself (the same order on every rank); the global
    # generators (dropout) differ by rank. Rank 0's are a single process's, and its initial weights
    # are every rank's (DistributedDataParallel copies them).
    seed_everything(cfg.trainer.seed + world.rank)
    reconstruct = cfg.model.name in RECONSTRUCTS
    data = build_data(cfg.data, cfg.trainer.batch_size, cfg.trainer.seed, device, reconstruct)
    try:
        model = build_model(cfg.model, data.info).to(device)
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
        trained = torch.compile(trained)  # what trains; `model` (the same weights) is evaluated and saved
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_scheduler(cfg.scheduler, optimizer, cfg.trainer.epochs)
    plain_cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    state = _resume_state(run_dir, plain_cfg) if resume else None
    if state is not None and state["epoch"] > cfg.trainer.epochs:
        raise DlfsError(
            f"resume: trainer.epochs={cfg.trainer.epochs} is below the {state['epoch']} epochs already trained"
        )

    # Everything above can refuse the config; only now does the run folder get its files.
    start = time.time()
    run = RunFolder(run_dir, tensorboard=tensorboard and world.main, live=live and world.main, rank=world.rank)
    fields = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "epochs": cfg.trainer.epochs,
        "seed": cfg.trainer.seed,
        "device": str(device),
        "deterministic": cfg.trainer.deterministic,
        "tf32": cfg.trainer.tf32,
        "world_size": world.size,
        "threads": torch.get_num_threads(),
        "versions": versions(),
    }
    if state is None:
        fields |= {
            "metrics": {},
            "epochs_completed": 0,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start)),
            "duration_s": 0.0,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
    else:  # the checkpoint is the truth: a run killed between saving last.pt and its summary is behind it
        fields |= {"epochs_completed": state["epoch"], "step": state["step"]}
    metric_columns = metric_names(cfg.loss.name, sequence=data.info.vocab is not None)
    run.start(cfg, fields, metric_columns, resume_step=None if state is None else state["step"])
    duration_before = run.summary.get("duration_s", 0.0) if state is not None else 0.0
    if world.main:
        print_config_tree(cfg)
    else:
        for handler in logging.getLogger().handlers:  # the console: rank 0 speaks for the run
            handler.setLevel(logging.WARNING)
    log.info(
        "%s %s | %s on %s | %d train / %d test rows from %s",
        "run folder" if state is None else f"resuming at epoch {state['epoch'] + 1}, step {state['step']}:",
        run_dir,
        cfg.model.name,
        device,
        data.info.n_train,
        data.info.n_test,
        data.info.source,
    )
    trainer = Trainer(
        trained,
        optimizer,
        scheduler,
        cfg.loss.name,
        device,
        run,
        # saved with every checkpoint; the vocabulary travels with the weights (index i = vocab[i])
        checkpoint_extra={
            "config": plain_cfg,
            "config_hash": config_hash(plain_cfg),
            "dlfs_version": __version__,
            "vocab": data.info.vocab,
        },
        limit_batches=cfg.trainer.limit_batches,
        log_every=cfg.trainer.log_every,
        checkpoint_every=cfg.trainer.checkpoint_every,
        world=world,
        bf16=cfg.trainer.precision == "bf16",
        channels_last=cfg.trainer.channels_last,
    )
    status = "failed"
    resume_hint = f". Resume with: dlfs train resume={run_dir}"
    stop_listening = lifecycle.on_request(lambda signum: setattr(trainer, "stop_signal", signum))
    try:
        lifecycle.check("while the run was being set up (nothing trained yet)", resume_hint)
        if state is not None:
            trainer.restore(state)  # last before training: it also restores every random number generator
        metrics = trainer.fit(data.train, data.test, cfg.trainer.epochs, cfg.trainer.eval_every)
        run.update_summary(metrics=metrics)
        # Only a run that did everything is completed: a stop asked for during the final evaluation or
        # the extras leaves it interrupted, and a resume does what is left (the extras are redone).
        lifecycle.check("after the last step; last.pt saved, the figures and sample not made yet", resume_hint)
        if world.main:
            if cfg.figures.enabled:
                _figures(run, cfg, model, data, device)
                lifecycle.check("while the figures were drawn; last.pt saved", resume_hint)
            if data.info.vocab is not None:
                _sample(run, cfg, model, data.info.vocab, device)
                lifecycle.check("while the text sample was made; last.pt saved", resume_hint)
        status = "completed"
        log.info("completed: %s", " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    except DlfsError as ex:
        status = "diverged" if isinstance(ex, Diverged) else "interrupted" if _is_stop(ex) else "failed"
        run.update_summary_quietly(error=str(ex))
        run.note(str(ex))  # the console gets it once, from the command line's error message
        raise
    except KeyboardInterrupt:
        status = "interrupted"
        run.note("aborted by a second signal")
        raise
    except OSError as ex:  # a write of the run's that is not ours (figures, tensorboard): one line
        message = os_error_message(ex, "could not write")
        run.update_summary_quietly(error=message)
        run.note(message)
        raise DlfsError(message) from None
    except BaseException as ex:
        run.update_summary_quietly(error=f"{type(ex).__name__}: {ex}")
        log.exception("failed")
        raise
    finally:
        stop_listening()
        run.update_summary_quietly(status=status, duration_s=round(duration_before + time.time() - start, 3))
        run.close()
    return metrics


def _is_stop(ex: BaseException) -> bool:
    """A stop signal honoured (exit 128 + its number), in the loop or between phases."""
    return getattr(ex, "exit_code", 2) > 128


def _resume_state(run_dir: Path, plain_cfg: dict) -> dict | None:
    """The run's last.pt, checked to belong to this model and data; None for a run stopped before its first
    step (it has no last.pt yet: it starts from the beginning)."""
    if not (run_dir / CHECKPOINT_DIR / "last.pt").exists() and not _trained_any(run_dir):
        return None
    state = load_run_checkpoint(run_dir, "last")  # on the CPU: the RNG states must stay there
    if state.get("format_version", 1) < FORMAT_VERSION:
        raise DlfsError(
            f"{run_dir / CHECKPOINT_DIR / 'last.pt'} was written by an older dlfs (checkpoint format "
            f"{state.get('format_version', 1)}) that did not save what an exact resume needs; start a new run"
        )
    if state.get("config_hash") != config_hash(plain_cfg):
        raise DlfsError(
            f"{run_dir / CHECKPOINT_DIR / 'last.pt'} holds {describe(state['config'])}, but the run's config is "
            f"{describe(plain_cfg)} (or differs in the model or data settings); refusing to mix them"
        )
    return state


def _trained_any(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / SUMMARY_FILE).read_text()).get("step"))
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: let load_run_checkpoint say what is missing


def set_deterministic(on: bool, device: torch.device) -> None:
    """PyTorch's deterministic algorithms, and what CUDA needs for them (cuBLAS workspace, no cuDNN autotune)."""
    # CUBLAS_WORKSPACE_CONFIG, which CUDA needs for them, is set when dlfs_cli is imported (before torch)
    # warn_only: an operation with no deterministic kernel (some CUDA losses) warns instead of ending the run
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    if on:
        torch.backends.cudnn.benchmark = False


def set_tf32(on: bool) -> None:
    """trainer.tf32: TensorFloat32 (10-bit mantissa) in CUDA's float32 matmuls and cuDNN convolutions, or true
    float32. Set either way: the flags are process-wide (an in-process sweep's next job), and torch's own
    defaults mix them (TF32 convolutions, float32 matmuls). The CPU has no TF32: nothing changes there."""
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def _figures(run: RunFolder, cfg: DictConfig, model: torch.nn.Module, data, device: torch.device) -> None:
    """Pictures are a by-product: one that fails is reported, and the trained run stays completed."""
    from dlfs_cli.figures import make_figures  # matplotlib: only runs that draw pay for it

    try:
        files = make_figures(run.path, model, data.test, data.test_labels, cfg.loss.name, cfg, device)
        run.update_summary(figures=[str(p.relative_to(run.path)) for p in files])
    except Exception as ex:  # noqa: BLE001
        log.warning("figures failed: %s: %s", type(ex).__name__, ex)
        run.update_summary(figures_error=f"{type(ex).__name__}: {ex}")


SAMPLE_FILE = "samples.txt"


def _sample(run: RunFolder, cfg: DictConfig, model: torch.nn.Module, vocab: str, device: torch.device) -> None:
    """A short sample of the trained character model, for a first look (dlfs generate makes more)."""
    from dlfs_cli.generate import sample

    text = sample(model, vocab, None, 300, 1.0, cfg.trainer.seed, device)
    (run.path / SAMPLE_FILE).write_text(text + "\n", encoding="utf-8")
    log.info("sample (%s):\n%s", SAMPLE_FILE, text)


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """auto picks CUDA, then MPS, then the CPU; asking for one that is not there is an error.
    Under torchrun, `cuda` (or auto) is the local rank's GPU."""
    if local_rank is not None and name.startswith("cuda") and name != "cuda":
        raise DlfsError(f"device={name}: under torchrun each rank takes its own GPU; use device=cuda or device=auto")
    if local_rank is not None and (name == "cuda" or (name == "auto" and torch.cuda.is_available())):
        if torch.cuda.is_available() and local_rank >= torch.cuda.device_count():
            raise DlfsError(
                f"local rank {local_rank} has no GPU of its own: this machine has {torch.cuda.device_count()}; "
                "start at most that many processes per machine (trainer.nproc, --nproc_per_node)"
            )
        name = f"cuda:{local_rank}"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DlfsError(f"device={name}: CUDA is not available on this machine; use device=cpu or device=auto")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DlfsError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DlfsError("device=mps: MPS (Apple GPU) is not available on this machine; use device=cpu or device=auto")
    return torch.device(name)


def sweep_device(device: torch.device) -> torch.device:
    """`device`, or for device=cuda (or auto on CUDA: no index) the GPU that sweep.job_gpu gives this job of
    a joblib sweep: parallel jobs all took GPU 0."""
    if device != torch.device("cuda"):
        return device
    from dlfs_cli import sweep

    index = sweep.job_gpu(torch.cuda.device_count())
    if index is None:
        return device
    torch.cuda.set_device(index)  # the job's own GPU also for calls that take the current one
    return torch.device("cuda", index)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


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
