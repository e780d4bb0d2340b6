"""The one training loop: train, evaluate (validation; test at the end), record, checkpoint."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dlfs_cli.checkpoint import Checkpoint, capture_rng, load_weights, restore_rng, save_checkpoint
from dlfs_cli.config import TrainerConfig
from dlfs_cli.data import Batches
from dlfs_cli.distributed import SINGLE, World, sum_dtype
from dlfs_cli.errors import DlfsError
from dlfs_cli.tracking import ProgressDisplay, RunFolder, log

PENDING_STEPS = 256  # per-step losses kept on the device between folds into the running sums (RunningLoss)


class CarriedState:
    """A recurrent model's (h, c) from one batch to the next: detached (truncated backpropagation),
    on the model's device, None (zeros) at the start of every pass over the data.

    mode "rows": row r's final state starts row r of the next batch (contiguous streams);
    mode "mean": the batch mean of the final states starts every row (the book's notebook);
    mode "start": one given state starts every row of every batch (the book's evaluation, from the state
    carried out of training).
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.state: tuple[Tensor, Tensor] | None = None

    def take(self, batch_size: int) -> tuple[Tensor, Tensor] | None:
        if self.state is None:
            return None
        h, c = self.state
        if self.mode in ("mean", "start"):
            return h.expand(-1, batch_size, -1).contiguous(), c.expand(-1, batch_size, -1).contiguous()
        return (h, c) if h.shape[1] == batch_size else None

    def keep(self, state: tuple[Tensor, Tensor]) -> None:
        if self.mode == "start":
            return  # every batch starts from the given state
        h, c = (s.detach().float() for s in state)  # float32 also after a bf16 autocast step
        if self.mode == "mean":
            h, c = h.mean(dim=1, keepdim=True), c.mean(dim=1, keepdim=True)
        self.state = (h, c)


def carried_state(loader: Iterable, training_state: tuple[Tensor, Tensor] | None = None) -> CarriedState | None:
    """The state a loader's batches carry from one to the next (text batchings say how), or None. A held-out
    loader that asks to start from the training state (the book's LSTM evaluation) starts every batch from
    `training_state`, averaged over its rows (zeros when there is none yet)."""
    if getattr(loader, "from_training_state", False):
        start = CarriedState("start")
        if training_state is not None:
            start.state = tuple(s.mean(dim=1, keepdim=True) for s in training_state)  # type: ignore[assignment]
        return start
    mode = getattr(loader, "carry", None)
    return CarriedState(mode) if mode else None


class CrossEntropy(nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss on raw logits, classes on dim 1. A sequence's (batch, vocab, length) logits are
    laid out as (batch * length, vocab) rows first: CUDA's kernel for the 3-d form adds with atomics, so its
    loss differs in the last digits from run to run even with trainer.deterministic=true."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if input.dim() == 3:
            input, target = input.transpose(1, 2).reshape(-1, input.shape[1]), target.reshape(-1)
        return super().forward(input, target)


def make_loss(name: str, reduction: str = "mean") -> Callable[[Tensor, Tensor], Tensor]:
    return nn.MSELoss(reduction=reduction) if name == "mse" else CrossEntropy(reduction=reduction)


def model_output(model: nn.Module, x: Tensor, carried: CarriedState | None = None) -> Tensor:
    """The tensor the loss is computed on: the first output of a model that returns several
    (the autoencoder's (reconstruction, code)); a recurrent model also gets and gives its state."""
    if carried is not None:
        out, state = model(x, carried.take(len(x)))
        carried.keep(state)
        return out
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


def plain_module(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DistributedDataParallel's wrappers (same weights)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DistributedDataParallel


def autocast(device: torch.device, bf16: bool) -> AbstractContextManager:
    """trainer.precision=bf16: the forward pass and the loss under bfloat16 autocast (the loss itself and
    the reductions stay in float32: autocast's own lists). For fp32 nothing at all: a disabled autocast
    still costs ~3 us a step on the training loop's hot path."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def to_layout(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@torch.inference_mode()  # no autograd bookkeeping at all (stricter than no_grad)
def evaluate(
    model: nn.Module,
    loader: Iterable,
    loss_name: str,
    device: torch.device,
    limit_batches: int | None = None,
    world: World = SINGLE,
    bf16: bool = False,
    channels_last: bool = False,
    split: str = "test",
    training_state: tuple[Tensor, Tensor] | None = None,
) -> dict[str, float]:
    """Metrics of a held-out split, named <split>_<metric>, accumulated over the whole split (or limit_batches
    of it); under torchrun each rank measures its rows of every batch and the sums are added up over the
    ranks. training_state: a recurrent model's state at the end of training (see carried_state)."""
    model.eval()
    loss_fn = make_loss(loss_name)
    carried = carried_state(loader, training_state)  # its own: evaluation never changes the training state
    keys = ["loss", "se", "ae"] if loss_name == "mse" else ["loss", "correct"]
    sums = torch.zeros(len(keys), dtype=sum_dtype(device), device=device)
    elements, sequence = 0, False
    for x, y in islice(loader, limit_batches):
        x, y = world.shard(x).to(device, non_blocking=True), world.shard(y).to(device, non_blocking=True)
        sequence = y.dim() > 1
        if y.numel() == 0:
            continue  # a rank's empty share of a tiny last batch
        with autocast(device, bf16):
            out = model_output(model, to_layout(x, channels_last), carried)
            batch = [loss_fn(out, y) * y.numel()]  # the losses are means over the targets' elements
        out = out.float()
        if loss_name == "mse":
            batch += [(out - y).square().sum(), (out - y).abs().sum()]
        else:
            batch += [(out.argmax(dim=1) == y).sum()]
        sums += torch.stack([v.to(sums.dtype) for v in batch])
        elements += y.numel()
    totals = world.sum(torch.cat([sums, sums.new_tensor([elements])]))
    values = dict(zip([*keys, "elements"], totals.tolist(), strict=True))  # one host sync per evaluation
    elements = values["elements"]
    if elements == 0:
        raise DlfsError(f"the {split} split is empty: nothing to evaluate")
    metrics = {"loss": values["loss"] / elements}
    if loss_name == "mse":
        metrics["mse"] = values["se"] / elements
        metrics["rmse"] = math.sqrt(metrics["mse"])
        metrics["mae"] = values["ae"] / elements
    else:
        if sequence:  # a prediction at every position of a sequence: characters
            metrics["bpc"] = metrics["loss"] / math.log(2)  # nats per character -> bits per character
        metrics["accuracy"] = values["correct"] / elements
    return {f"{split}_{k}": v for k, v in metrics.items()}


class RunningLoss:
    """The training loss since the epoch began and since metrics.csv's last `train` row, and the first
    step whose loss was not finite: one mechanism on every device. Each step's loss (times its targets)
    goes into a small buffer on its device (one kernel, no wait for a GPU); `fold` adds the buffer up, at
    log, save and epoch points or when it is full, and only then is anything read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending = torch.zeros(PENDING_STEPS, dtype=torch.float32, device=device)
        self.n_pending, self.first_pending = 0, 0  # first_pending: the step whose loss is pending[0]
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # -1: no bad step yet
        self.start_epoch()

    def start_epoch(self) -> None:
        zero = torch.zeros((), dtype=sum_dtype(self.device), device=self.device)
        self.epoch, self.epoch_n, self.window, self.window_n = zero, 0, zero.clone(), 0

    def add(self, loss: Tensor, elements: int, step: int) -> None:
        if self.n_pending == 0:
            self.first_pending = step
        torch.mul(loss, elements, out=self.pending[self.n_pending])
        self.n_pending += 1
        self.epoch_n += elements
        self.window_n += elements
        if self.n_pending == len(self.pending):
            self.fold()

    def fold(self) -> None:
        """The pending losses into the sums and the divergence flag: a few kernels, no host sync."""
        n, self.n_pending = self.n_pending, 0
        if n == 0:
            return
        losses = self.pending[:n]
        total = losses.sum(dtype=self.epoch.dtype)
        self.epoch += total
        self.window += total
        bad = ~torch.isfinite(losses)
        at = torch.where(bad.any(), bad.int().argmax() + self.first_pending, -1)  # argmax: the first bad one
        self.first_bad = torch.where(self.first_bad < 0, at, self.first_bad)

    def diverged_at(self, world: World) -> int | None:
        """The first step of any rank whose loss was not finite; every rank asks at the same steps."""
        self.fold()
        return world.first_step(int(self.first_bad))  # a host sync

    def take_window(self, world: World) -> float:
        """The mean loss over every rank's targets since the last row, and a new window."""
        self.fold()
        mean = world.mean(self.window, self.window_n, self.device)
        self.window, self.window_n = torch.zeros_like(self.window), 0
        return mean

    def epoch_mean(self, world: World) -> float:
        self.fold()
        return world.mean(self.epoch, self.epoch_n, self.device)

    def state_dict(self, world: World) -> dict[str, float | int]:
        """The sums of the whole world (rank 0 takes them back on a resume)."""
        self.fold()
        values = world.sum_numbers([self.epoch, self.epoch_n, self.window, self.window_n], self.device)
        return {"epoch": values[0], "epoch_n": int(values[1]), "window": values[2], "window_n": int(values[3])}

    def load_state_dict(self, sums: dict[str, Any], world: World) -> None:
        self.start_epoch()  # this device's kind of sums, whichever device saved them
        if world.rank == 0 and sums:  # rank 0 holds the world's sums
            self.epoch += float(sums["epoch"])
            self.window += float(sums["window"])
            self.epoch_n, self.window_n = int(sums["epoch_n"]), int(sums["window_n"])


class StopAgreement:
    """When torchrun's ranks agree on a stop: at steps they all reach together, about every AGREE_S seconds
    of training and at each epoch's end, not after every step (an all_reduce per step held each step to a
    host round trip with every rank in lock-step). The interval in steps is itself agreed on: each rank
    proposes AGREE_S over its own seconds per step since the last agreement, at least 1 and at most
    log_every steps, and the smallest proposal is taken, so that the slowest rank still hears of a stop
    within about AGREE_S. A stop is never held back for long: torchrun (and SLURM) kill the ranks 30 s
    after passing on a SIGTERM, and the interrupted last.pt must be saved before that."""

    AGREE_S = 0.5

    def __init__(self, step: int, log_every: int) -> None:
        self.log_every = log_every
        self.last_step, self.last_time = step, time.monotonic()
        self.next_step = step + 1  # the first agreement measures one step

    def due(self, step: int, epoch_end: bool) -> bool:
        return step >= self.next_step or epoch_end

    def agree(self, world: World, step: int, signum: int | None) -> int | None:
        """The stop that any rank asked for (None: none), and the next agreement's step, on every rank."""
        now = time.monotonic()
        per_step = (now - self.last_time) / max(step - self.last_step, 1)
        proposal = self.log_every if per_step <= 0 else min(self.log_every, max(1, int(self.AGREE_S / per_step)))
        stop, negated = world.max_ints([signum or 0, -proposal])  # the largest signal; the smallest interval
        self.last_step, self.last_time, self.next_step = step, now, step - negated
        return stop or None


class Trainer:
    """Trains a model epoch by epoch, records metrics, and saves full-state checkpoints from which a run
    continues exactly: `state_dict` / `load_state_dict` are the checkpoint's only writer and reader."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        cfg: TrainerConfig | DictConfig,
        loss_name: str,
        device: torch.device,
        run: RunFolder,
        identity: dict[str, Any],
        world: World = SINGLE,
    ) -> None:
        self.model = model  # what trains: maybe wrapped by DistributedDataParallel and/or torch.compile
        self.net = plain_module(model)  # the plain module: evaluated, saved, restored
        self.optimizer, self.scheduler = optimizer, scheduler
        self.cfg, self.bf16 = cfg, cfg.precision == "bf16"
        self.loss_name = loss_name
        self.loss_fn = make_loss(loss_name, "sum" if world.distributed else "mean")  # torchrun: see _step
        self.device, self.run, self.world = device, run, world
        self.identity = identity  # config, its hash, version, vocabulary: in every checkpoint
        # Where the run stands: what state_dict saves and load_state_dict puts back.
        self.epoch, self.batch, self.step = 0, 0, 0  # epochs completed; batches done in the epoch under way
        self.best_loss = math.inf  # the lowest validation loss: best.pt's
        self.best_epoch: int | None = None
        self.evals_since_best = 0  # evaluations without an improvement of more than min_delta
        self.stopped_early: dict[str, Any] | None = None  # set when early stopping ends the run
        self.final: dict[str, float] = {}  # the latest validation metrics, and the test metrics once measured
        self.data_rng: Tensor | None = None  # the data order's generator at the start of the epoch under way
        self.carried: CarriedState | None = None
        self.running = RunningLoss(device)
        self.elapsed_before = 0.0  # seconds trained before a resume
        self.stop_signal: int | None = None  # set by a signal handler: stop after the current step
        self.agreement: StopAgreement | None = None  # torchrun: when the ranks agree on a stop (made each epoch)
        self.lr = optimizer.param_groups[0]["lr"]  # the rate of the epoch under way, for metrics.csv
        self._start = time.monotonic()

    def fit(self, train_loader: Batches, val_loader: Iterable | None, test_loader: Iterable) -> dict[str, float]:
        """Train up to cfg.epochs (or until early stopping), evaluating the validation split every
        cfg.eval_every epochs and after the last, and the test split after the last; returns the final
        metrics (val_* and test_*). Without a validation split the evaluations are of the test split."""
        self._start = time.monotonic() - self.elapsed_before
        epochs = self.cfg.epochs
        if epochs == 0:  # nothing to train: measure the initial model so the run still has its numbers
            self._evaluate_epoch(val_loader, test_loader, 0, last=True)
            self._save("last.pt")
            return self.final
        generator = getattr(train_loader, "generator", None)  # the data order's, if the loader shuffles
        with ProgressDisplay(epochs, self._batches(train_loader), self.run.live) as progress:
            for epoch in range(self.epoch + 1, epochs + 1):
                if self.stopped_early is not None:  # a resumed run that had stopped early, and respects it
                    break
                self.lr = self.optimizer.param_groups[0]["lr"]
                train_loss = self._train_epoch(train_loader, generator, progress, epoch)
                if self.scheduler is not None:
                    self.scheduler.step()  # after the optimizer's steps (the book had them the other way round)
                self.epoch, self.batch = epoch, 0
                self.data_rng = generator.get_state() if generator is not None else None  # the next epoch's
                shown = None
                if epoch % self.cfg.eval_every == 0 or epoch == epochs:
                    with progress.showing("evaluating"):  # the bar says so while the held-out splits run
                        shown = self._evaluate_epoch(val_loader, test_loader, epoch, last=epoch == epochs)
                self._save("last.pt")
                progress.epoch(epoch, train_loss, shown)
        return self.final

    def _evaluate_epoch(
        self, val_loader: Iterable | None, test_loader: Iterable, epoch: int, last: bool
    ) -> dict[str, float]:
        """The evaluations due at an epoch's end: the validation split, which decides best.pt and early
        stopping; the test split after the last epoch (also an early-stopped one), or at every evaluation
        with cfg.test_every_eval. Without a validation split: the test split, deciding nothing (the book's)."""
        if val_loader is None:
            return self._evaluate(test_loader, "test", epoch)
        val = self._evaluate(val_loader, "val", epoch)
        loss, stopping = val["val_loss"], self.cfg.early_stopping
        improved = loss < self.best_loss
        if loss < self.best_loss - stopping.min_delta:
            self.evals_since_best = 0
        else:
            self.evals_since_best += 1
        if improved:
            self.best_loss, self.best_epoch = loss, epoch
        if stopping.patience is not None and self.evals_since_best >= stopping.patience and not last:
            self.stopped_early = {
                "epoch": epoch,
                "best_epoch": self.best_epoch,
                "reason": f"val_loss did not improve by more than {stopping.min_delta:g} in {stopping.patience} "
                f"evaluations (best {self.best_loss:.6g} at epoch {self.best_epoch})",
            }
            log.info("early stopping at epoch %d: %s", epoch, self.stopped_early["reason"])
        test = {}
        if last or self.stopped_early is not None or self.cfg.test_every_eval:
            test = self._evaluate(test_loader, "test", epoch)
        if improved:  # after the test evaluation: best.pt records it when the last epoch is the best
            self._save("best.pt")
        return val | test

    def _train_epoch(
        self, loader: Batches, generator: torch.Generator | None, progress: ProgressDisplay, epoch: int
    ) -> float:
        """One pass over the training data (what is left of it after a mid-epoch resume); returns the mean
        loss per target. metrics.csv gets a `train` row every log_every steps and at the epoch's end."""
        self.model.train()  # every epoch: evaluation switched it to eval mode (the book forgot this)
        skip = self._start_epoch(loader, generator)
        last = self._batches(loader)
        if self.world.distributed:  # timed from here: the evaluation before this epoch is no step's time
            self.agreement = StopAgreement(self.step, self.cfg.log_every)
        for i, (x, y) in enumerate(islice(loader, self.cfg.limit_batches), start=1):
            if i <= skip:
                continue  # replaying the epoch's order up to where the checkpoint was taken
            loss, elements = self._step(x, y)
            self.step, self.batch = self.step + 1, i
            self.running.add(loss, elements, self.step)
            self._after_step(epoch, i == last, progress)
        return self._end_epoch(epoch)

    def _step(self, x: Tensor, y: Tensor) -> tuple[Tensor, int]:
        """One optimizer step on a batch; returns the (detached) mean loss and the targets it was over.

        Under torchrun this rank trains on its rows of the global batch, and its loss is their sum times
        world size / the global batch's targets: DistributedDataParallel's average of the ranks' gradients
        is then the gradient of the global batch's mean loss, even for uneven shares."""
        scale = self.world.size / y.numel() if self.world.distributed else None
        x, y = (self.world.shard(t).to(self.device, non_blocking=True) for t in (x, y))
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.bf16):
            loss = self.loss_fn(model_output(self.model, to_layout(x, self.cfg.channels_last), self.carried), y)
        (loss if scale is None else loss * scale).backward()
        if self.cfg.grad_clip_norm is not None:  # the gradients' global L2 norm (DDP: after their all-reduce)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip_norm)
        self.optimizer.step()
        n = y.numel()
        return (loss.detach() if scale is None else loss.detach() / max(n, 1)), n

    def _start_epoch(self, loader: Iterable, generator: torch.Generator | None) -> int:
        """The epoch's data order and fresh sums and carried state; returns the batches already trained on
        (a resume replays the interrupted epoch's order up to there)."""
        if generator is not None:
            if self.data_rng is not None:
                generator.set_state(self.data_rng)  # after a resume: the interrupted epoch's order again
            self.data_rng = generator.get_state()
        if self.batch == 0:
            self.carried = carried_state(loader)  # a recurrent model starts each epoch from zeros
            self.running.start_epoch()
        return self.batch

    def _after_step(self, epoch: int, epoch_end: bool, progress: ProgressDisplay) -> None:
        """What may follow a step: a row of metrics.csv, a mid-epoch checkpoint, a stop, the progress bar."""
        # A single process acts on a stop at once. Under torchrun only a stop that every rank agreed on counts
        # (a signal can land on one rank at any moment), at the steps of StopAgreement.
        stop = self.stop_signal
        if self.world.distributed:
            agreement = self.agreement
            assert agreement is not None  # made at the epoch's start
            stop = agreement.agree(self.world, self.step, stop) if agreement.due(self.step, epoch_end) else None
        if self.step % self.cfg.log_every == 0:
            self._record_train(epoch)
        every = self.cfg.checkpoint_every
        if stop is not None or (every and self.step % every == 0 and not epoch_end):  # epoch ends save anyway
            self._check_divergence(epoch)  # never save weights that went NaN
            self._save("last.pt")
        if stop is not None:
            raise Interrupted(stop, epoch, self.batch, self.step, self.run.path)
        if progress.due():  # a host sync, at most every ProgressDisplay.REFRESH_S
            progress.batch(self.batch, self.running.epoch_mean(SINGLE))  # this rank's own loss

    def _end_epoch(self, epoch: int) -> float:
        """The epoch's last row of metrics.csv; returns its mean training loss over every rank's targets."""
        self._check_divergence(epoch)
        if self.world.max_ints([self.running.window_n])[0]:  # any rank: the row is summed over the ranks
            self._record_train(epoch)
        return self.running.epoch_mean(self.world)

    def _check_divergence(self, epoch: int) -> None:
        bad = self.running.diverged_at(self.world)
        if bad is not None:
            raise Diverged(epoch, bad, self.lr)

    def _record_train(self, epoch: int) -> None:
        self._check_divergence(epoch)  # the row's read syncs anyway
        loss = self.running.take_window(self.world)
        elapsed = time.monotonic() - self._start
        row = {"epoch": epoch, "step": self.step, "split": "train", "lr": self.lr, "loss": loss}
        self.run.log_metrics(row | {"elapsed_s": elapsed})

    def _evaluate(self, loader: Iterable, split: str, epoch: int) -> dict[str, float]:
        """One split's metrics (<split>_loss, ...), recorded as a row of metrics.csv and kept in self.final."""
        metrics = evaluate(
            self.net,
            loader,
            self.loss_name,
            self.device,
            self.cfg.limit_batches,
            self.world,
            self.bf16,
            self.cfg.channels_last,
            split,
            self.carried.state if self.carried is not None else None,
        )
        if not math.isfinite(metrics[f"{split}_loss"]):  # weights went NaN in the last steps: save nothing
            raise Diverged(epoch, self.step, self.lr)
        self.final = self.final | metrics
        row = {"epoch": epoch, "step": self.step, "split": split, "lr": self.lr}
        row |= {k.removeprefix(f"{split}_"): v for k, v in metrics.items()}
        self.run.log_metrics(row | {"elapsed_s": time.monotonic() - self._start})
        return metrics

    def _batches(self, loader: Batches) -> int:
        return len(loader) if self.cfg.limit_batches is None else min(len(loader), self.cfg.limit_batches)

    def _save(self, name: str) -> None:
        """Every rank calls this at the same points (the state is gathered from them); rank 0 writes."""
        state = self.state_dict()
        if self.world.main:
            save_checkpoint(self.run.checkpoints / name, state)
            if name == "best.pt":
                self.run.update_summary(best={"epoch": self.best_epoch, "step": self.step, "val_loss": self.best_loss})
            early = {"stopped_early": self.stopped_early} if self.stopped_early is not None else {}
            self.run.update_summary(epochs_completed=self.epoch, step=self.step, **early)

    def state_dict(self) -> Checkpoint:
        """Everything an exact resume needs (see checkpoint.Checkpoint)."""
        carried = self._whole_carried_state()
        mode = self.carried.mode if self.carried is not None else None
        return Checkpoint(
            model=self.net.state_dict(),  # plain weights, also from a DistributedDataParallel run
            **self.identity,
            epoch=self.epoch,
            batch_in_epoch=self.batch,
            step=self.step,
            metrics=self.final,
            best_loss=self.best_loss,
            best_epoch=self.best_epoch,
            evals_since_best=self.evals_since_best,
            stopped_early=self.stopped_early,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            rng=capture_rng(self.device) if self.world.main else None,
            data_rng=self.data_rng,
            carried=None if carried is None else {"mode": mode, "h": carried[0], "c": carried[1]},
            sums=self.running.state_dict(self.world),
            elapsed_s=time.monotonic() - self._start,
        )

    def load_state_dict(self, state: Checkpoint) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, position, running sums, every RNG."""
        load_weights(self.net, state.model, self.run.checkpoints / "last.pt")
        assert state.optimizer is not None  # saved in every checkpoint of format 2 (resume.last_state checks)
        self.optimizer.load_state_dict(state.optimizer)
        if self.scheduler is not None and state.scheduler is not None:
            self.scheduler.load_state_dict(state.scheduler)
        self.epoch, self.batch, self.step = state.epoch, state.batch_in_epoch, state.step
        self.final, self.best_loss, self.data_rng = state.metrics, state.best_loss, state.data_rng
        self.best_epoch, self.evals_since_best = state.best_epoch, state.evals_since_best
        self.stopped_early = state.stopped_early
        if state.carried is not None:  # the whole batch's rows; under torchrun each rank takes its own
            self.carried = CarriedState(state.carried["mode"])
            h, c = (self.world.shard(state.carried[k], dim=1).to(self.device) for k in ("h", "c"))
            self.carried.state = (h, c)
        self.running.load_state_dict(state.sums, self.world)
        self.elapsed_before = state.elapsed_s
        assert state.rng is not None  # rank 0 wrote the checkpoint, with its generators
        restore_rng(state.rng, self.device)  # last: nothing may draw a random number between here and the next step
        if self.world.rank > 0:  # the checkpoint holds rank 0's generators: other ranks draw their own masks
            torch.manual_seed(self.step * 1009 + self.world.rank)

    def _whole_carried_state(self) -> tuple[Tensor, Tensor] | None:
        """The LSTM state of every row of the batch: under torchrun each rank carries its own rows."""
        state = self.carried.state if self.carried is not None else None
        if state is None or not self.world.distributed:
            return state
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world.size
        dist.all_gather_object(parts, tuple(s.cpu() for s in state))
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


class Diverged(DlfsError):
    def __init__(self, epoch: int, step: int, lr: float) -> None:
        super().__init__(
            f"training diverged: the loss became NaN or infinite at step {step} (epoch {epoch}); "
            f"try a lower optimizer.lr (it was {lr:g}); the last good checkpoint is kept"
        )


class Interrupted(DlfsError):
    """Stopped by a signal after finishing a step and saving last.pt; exits 128 + the signal's number."""

    def __init__(self, signum: int, epoch: int, batch: int, step: int, run_dir: Path) -> None:
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name} in epoch {epoch} after batch {batch} (step {step}); last.pt saved. "
            f"Resume with: dlfs train resume={run_dir}"
        )
