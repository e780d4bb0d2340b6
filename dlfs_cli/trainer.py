"""The one training loop: train, evaluate on the held-out split, record, checkpoint."""

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
from torch import Tensor, nn

from dlfs_cli.checkpoint import capture_rng, load_weights, restore_rng, save_checkpoint
from dlfs_cli.config import DlfsError
from dlfs_cli.distributed import SINGLE, World
from dlfs_cli.tracking import ProgressDisplay, RunFolder

REGRESSION_METRICS = ["loss", "mse", "rmse", "mae"]
CLASSIFICATION_METRICS = ["loss", "accuracy"]
SEQUENCE_METRICS = ["loss", "bpc", "accuracy"]  # next-character prediction: loss in nats, bpc in bits
PENDING_STEPS = 256  # on an accelerator: per-step losses kept on the device between folds into the running sums


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of running sums kept on `device`: float64 where the device has it; Apple's MPS has no
    float64 (a float64 tensor there is an error), so float32."""
    return torch.float32 if device.type == "mps" else torch.float64


def metric_names(loss_name: str, sequence: bool = False) -> list[str]:
    if loss_name == "mse":
        return REGRESSION_METRICS
    return SEQUENCE_METRICS if sequence else CLASSIFICATION_METRICS


class CarriedState:
    """A recurrent model's (h, c) from one batch to the next: detached (truncated backpropagation),
    on the model's device, None (zeros) at the start of every pass over the data.

    mode "rows": row r's final state starts row r of the next batch (contiguous streams);
    mode "mean": the batch mean of the final states starts every row (the book's notebook).
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.state: tuple[Tensor, Tensor] | None = None

    def take(self, batch_size: int) -> tuple[Tensor, Tensor] | None:
        if self.state is None:
            return None
        h, c = self.state
        if self.mode == "mean":
            return h.expand(-1, batch_size, -1).contiguous(), c.expand(-1, batch_size, -1).contiguous()
        return (h, c) if h.shape[1] == batch_size else None

    def keep(self, state: tuple[Tensor, Tensor]) -> None:
        h, c = (s.detach().float() for s in state)  # float32 also after a bf16 autocast step
        if self.mode == "mean":
            h, c = h.mean(dim=1, keepdim=True), c.mean(dim=1, keepdim=True)
        self.state = (h, c)


def carried_state(loader: Iterable) -> CarriedState | None:
    """The state a loader's batches carry from one to the next (text batchings say how), or None."""
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
) -> dict[str, float]:
    """Held-out metrics, named test_<metric>, accumulated over the whole split (or limit_batches of it);
    under torchrun each rank measures its rows of every batch and the sums are added up over the ranks."""
    model.eval()
    loss_fn = make_loss(loss_name)
    carried = carried_state(loader)  # its own: evaluation never touches the training state
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
        raise DlfsError("the held-out split is empty: nothing to evaluate")
    metrics = {"loss": values["loss"] / elements}
    if loss_name == "mse":
        metrics["mse"] = values["se"] / elements
        metrics["rmse"] = math.sqrt(metrics["mse"])
        metrics["mae"] = values["ae"] / elements
    else:
        if sequence:  # a prediction at every position of a sequence: characters
            metrics["bpc"] = metrics["loss"] / math.log(2)  # nats per character -> bits per character
        metrics["accuracy"] = values["correct"] / elements
    return {f"test_{k}": v for k, v in metrics.items()}


class Trainer:
    """Trains a model epoch by epoch, records metrics, and saves full-state checkpoints from which a
    run continues exactly (see checkpoint.py); `restore` puts such a state back."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        loss_name: str,
        device: torch.device,
        run: RunFolder,
        checkpoint_extra: dict[str, Any],
        limit_batches: int | None = None,
        log_every: int = 100,
        checkpoint_every: int = 0,
        world: World = SINGLE,
        bf16: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.model = model  # what trains: maybe wrapped by DistributedDataParallel and/or torch.compile
        self.net = plain_module(model)  # the plain module: evaluated, saved, restored
        self.world = world
        self.bf16, self.channels_last = bf16, channels_last
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_name = loss_name
        self.loss_fn = make_loss(loss_name)
        self.loss_sum_fn = make_loss(loss_name, reduction="sum")  # under torchrun: see _step
        self.device = device
        self.run = run
        self.checkpoint_extra = checkpoint_extra  # config, its hash, vocabulary: saved with every checkpoint
        self.limit_batches = limit_batches
        self.log_every = log_every
        self.checkpoint_every = checkpoint_every
        # Where the run stands: what a checkpoint saves and `restore` puts back.
        self.epoch = 0  # epochs completed
        self.batch = 0  # batches done in the epoch under way (0 between epochs)
        self.step = 0
        self.best_loss = math.inf
        self.final: dict[str, float] = {}  # the latest held-out metrics
        self.data_rng: Tensor | None = None  # the data order's generator at the start of the epoch under way
        self.carried: CarriedState | None = None
        self.sums = self._zero_sums()
        self.elapsed_before = 0.0  # seconds trained before a resume
        self.stop_signal: int | None = None  # set by a signal handler: stop after the current step
        self._bad_here = False  # under torchrun on a CPU: this rank saw a NaN loss (all ranks stop together)
        self._start = time.monotonic()
        # On an accelerator each step's loss (times its targets) waits in a device buffer, folded into the
        # sums at log, save and epoch points or when full: one kernel a step instead of about eight.
        on_host = device.type == "cpu"
        self._pending = None if on_host else torch.zeros(PENDING_STEPS, dtype=torch.float32, device=device)
        self._n_pending = 0
        # Divergence, tracked on the device: the first step whose loss was not finite (-1: none yet).
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def fit(self, train_loader: Iterable, test_loader: Iterable, epochs: int, eval_every: int) -> dict[str, float]:
        """Train up to `epochs`, evaluating every `eval_every` epochs and after the last; returns final test metrics."""
        self._start = time.monotonic() - self.elapsed_before
        lr = self.optimizer.param_groups[0]["lr"]
        if epochs == 0:  # nothing to train: measure the initial model so the run still has its numbers
            self._evaluate_and_record(test_loader, 0, lr)
            self._save("last.pt")
            return self.final
        batches = self._batches_per_epoch(train_loader)
        generator = getattr(train_loader, "generator", None)  # the data order's, if the loader shuffles
        with ProgressDisplay(epochs, batches, self.run.live) as progress:
            for epoch in range(self.epoch + 1, epochs + 1):
                lr = self.optimizer.param_groups[0]["lr"]  # the rate of this epoch, for metrics.csv
                train_loss = self._train_epoch(train_loader, generator, progress, epoch, lr)
                if self.scheduler is not None:
                    self.scheduler.step()  # after the optimizer's steps (the book had them the other way round)
                self.epoch, self.batch = epoch, 0
                self.data_rng = generator.get_state() if generator is not None else None  # the next epoch's
                test = None
                if epoch % eval_every == 0 or epoch == epochs:
                    test = self._evaluate_and_record(test_loader, epoch, lr)
                self._save("last.pt")
                progress.epoch(epoch, train_loss, test)
        return self.final

    def _train_epoch(
        self, loader: Iterable, generator: torch.Generator | None, progress: ProgressDisplay, epoch: int, lr: float
    ) -> float:
        """One pass over the training data (the rest of it, after a mid-epoch resume); returns the mean loss
        per sample. metrics.csv gets a `train` row every `log_every` steps and at the end of the epoch, with
        the mean loss over the steps since the previous row."""
        self.model.train()  # every epoch: evaluation switched it to eval mode (the book forgot this)
        if generator is not None:
            if self.data_rng is not None:
                generator.set_state(self.data_rng)  # after a resume: the interrupted epoch's order again
            self.data_rng = generator.get_state()
        skip = self.batch  # batches this epoch already trained on before a resume
        if skip == 0:
            self.carried = carried_state(loader)  # a recurrent model starts each epoch from zeros
            self.sums = self._zero_sums()
        sums = self.sums
        last = self._batches_per_epoch(loader)
        for i, (x, y) in enumerate(islice(loader, self.limit_batches), start=1):
            if i <= skip:
                continue  # replaying the epoch's order up to where the checkpoint was taken
            loss, elements = self._step(x, y)
            self.step, self.batch = self.step + 1, i
            self._account(loss, elements, epoch, lr)
            # under torchrun only a stop that every rank agreed on counts (a signal can land on one rank
            # at any moment); a single process acts on its own at once
            stop = self._agree(epoch, lr) if self.world.distributed else self.stop_signal
            if self.step % self.log_every == 0:
                self._record_train(epoch, lr)
            if self.checkpoint_every and self.step % self.checkpoint_every == 0 and i < last:  # epoch end saves anyway
                self._stop_if_diverged(epoch, lr)  # never save weights that went NaN
                self._save("last.pt")
            if stop is not None:
                self._stop_if_diverged(epoch, lr)
                self._save("last.pt")
                raise Interrupted(stop, epoch, i, self.step, self.run.path)
            if progress.due():
                self._fold()  # a host sync, at most every ProgressDisplay.REFRESH_S
                progress.batch(i, float(sums["epoch"] / sums["epoch_n"]))
        self._stop_if_diverged(epoch, lr)
        if self.world.max_ints([sums["window_n"]])[0]:  # any rank: the row's numbers are summed over ranks
            self._record_train(epoch, lr)
        return self._mean_over_ranks(sums["epoch"], sums["epoch_n"])

    def _step(self, x: Tensor, y: Tensor) -> tuple[Tensor, int]:
        """One optimizer step on a batch; returns the (detached) mean loss and the targets it was over.

        Under torchrun this rank trains on its rows of the global batch. DistributedDataParallel averages
        the ranks' gradients, so each rank's loss is its sum over the global batch's size times the world
        size: the average is then the gradient of the global batch's mean loss, even for uneven shares."""
        if self.world.distributed:
            global_elements = y.numel()
            x, y = self.world.shard(x), self.world.shard(y)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.bf16):
            out = model_output(self.model, to_layout(x, self.channels_last), self.carried)
            loss = (self.loss_sum_fn if self.world.distributed else self.loss_fn)(out, y)
        if self.world.distributed:
            (loss * (self.world.size / global_elements)).backward()
            loss = loss.detach() / max(y.numel(), 1)
        else:
            loss.backward()
            loss = loss.detach()
        self.optimizer.step()
        return loss, y.numel()

    def _agree(self, epoch: int, lr: float) -> int | None:
        """Under torchrun, after every step: a stop asked of any rank (a signal) or a NaN loss seen by any
        rank (on a CPU) stops every rank at this same step; a rank stopping alone would leave the others
        waiting in the next gradient exchange. Returns the agreed stop's signal (None: go on). Two
        integers over gloo: no wait for a GPU."""
        signum, bad = self.world.max_ints([self.stop_signal or 0, int(self._bad_here)])
        if bad:
            raise Diverged(epoch, self.step, lr)
        return signum or None

    def _batches_per_epoch(self, loader: Iterable) -> int:
        return len(loader) if self.limit_batches is None else min(len(loader), self.limit_batches)

    def _zero_sums(self) -> dict[str, Any]:
        """Loss sums (on an accelerator: device tensors, read only at log points) and target counts (host ints)."""
        if self.device.type == "cpu":
            return {"epoch": 0.0, "epoch_n": 0, "window": 0.0, "window_n": 0}
        zero = torch.zeros((), dtype=sum_dtype(self.device), device=self.device)
        return {"epoch": zero.clone(), "epoch_n": 0, "window": zero.clone(), "window_n": 0}

    def _account(self, loss: Tensor, elements: int, epoch: int, lr: float) -> None:
        """Add a step's loss (a mean over `elements` targets) to the running sums and watch for divergence.

        On a CPU reading the loss costs nothing, so every step is checked at once. On an accelerator a
        read would stall the pipeline: the loss goes into a device buffer (one kernel), and `_fold` adds
        the buffer to the sums and notes the first step whose loss was NaN or infinite, read at log and
        save points."""
        sums = self.sums
        if self._pending is not None:
            torch.mul(loss, elements, out=self._pending[self._n_pending])
            self._n_pending += 1
            if self._n_pending == len(self._pending):
                self._fold()
        else:
            value = loss.item()
            if not math.isfinite(value):
                if not self.world.distributed:
                    raise Diverged(epoch, self.step, lr)
                self._bad_here = True  # _agree stops every rank
            sums["epoch"] += value * elements
            sums["window"] += value * elements
        sums["epoch_n"] += elements
        sums["window_n"] += elements

    def _fold(self) -> None:
        """The losses waiting in the device buffer into the running sums and the divergence flag; a few
        kernels and no host sync. Called before the sums or the flag are read."""
        n, self._n_pending = self._n_pending, 0
        if n == 0:
            return
        losses = self._pending[:n]  # the losses of steps self.step - n + 1 ... self.step
        total = losses.sum(dtype=sum_dtype(self.device))
        self.sums["epoch"] += total
        self.sums["window"] += total
        bad = ~torch.isfinite(losses)
        at = torch.where(bad.any(), bad.int().argmax() + (self.step - n + 1), -1)  # argmax: the first bad one
        self._first_bad = torch.where(self._first_bad < 0, at, self._first_bad)

    def _stop_if_diverged(self, epoch: int, lr: float) -> None:
        """Every rank calls this at the same steps (log, save and epoch points), so under torchrun the
        ranks agree here on the first bad step any of them saw."""
        self._fold()
        bad = int(self._first_bad)  # a host sync; on a CPU the flag is never set (_account checks every step)
        if self.world.distributed:
            never = 1 << 62
            bad = -self.world.max_ints([-(bad if bad >= 0 else never)])[0]  # the minimum over the ranks
            bad = -1 if bad == never else bad
        if bad >= 0:
            raise Diverged(epoch, bad, lr)

    def _record_train(self, epoch: int, lr: float) -> None:
        self._stop_if_diverged(epoch, lr)  # the row's read syncs anyway
        sums = self.sums
        loss = self._mean_over_ranks(sums["window"], sums["window_n"])  # the one host sync per log interval
        sums["window"], sums["window_n"] = sums["window"] * 0, 0
        elapsed = time.monotonic() - self._start
        self.run.log_metrics(
            {"epoch": epoch, "step": self.step, "split": "train", "lr": lr, "loss": loss, "elapsed_s": elapsed}
        )

    def _mean_over_ranks(self, total: Tensor | float, n: int) -> float:
        """A loss summed over n targets, as the mean over every rank's targets."""
        if not self.world.distributed:
            return float(total / max(n, 1))
        total, n = self._sum_over_ranks([total, n])
        return total / max(n, 1)

    def _sum_over_ranks(self, values: list[Tensor | float]) -> list[float]:
        """Element-wise sums over the ranks of a few numbers, some on this rank's device (the loss sums on an
        accelerator) and some on the host (the counts): all are put on the device first, one dtype for all,
        since a collective takes one tensor and the process group carries device tensors over NCCL."""
        dtype = sum_dtype(self.device)
        both = torch.stack([torch.as_tensor(v, dtype=dtype, device=self.device) for v in values])
        return self.world.sum(both).tolist()

    def _evaluate_and_record(self, loader: Iterable, epoch: int, lr: float) -> dict[str, float]:
        metrics = evaluate(
            self.net, loader, self.loss_name, self.device, self.limit_batches, self.world, self.bf16, self.channels_last
        )
        if not math.isfinite(metrics["test_loss"]):  # weights went NaN in the last steps: save nothing
            raise Diverged(epoch, self.step, lr)
        self.final = metrics
        row = {k.removeprefix("test_"): v for k, v in metrics.items()}
        elapsed = time.monotonic() - self._start
        self.run.log_metrics(
            {"epoch": epoch, "step": self.step, "split": "test", "lr": lr, **row, "elapsed_s": elapsed}
        )
        if metrics["test_loss"] < self.best_loss:
            self.best_loss = metrics["test_loss"]
            self._save("best.pt")
        return metrics

    def _save(self, name: str) -> None:
        """Every rank calls this at the same points (the state is gathered from them); rank 0 writes."""
        carried = self._whole_carried_state()
        sums = self._sums_over_ranks()
        if not self.world.main:
            return
        save_checkpoint(
            self.run.checkpoints / name,
            {
                "model": self.net.state_dict(),  # plain weights, also from a DistributedDataParallel run
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch,
                "step": self.step,
                "metrics": self.final,
                "best_loss": self.best_loss,
                "rng": capture_rng(self.device),
                "data_rng": self.data_rng,
                "carried": None if carried is None else {"mode": self.carried.mode, "h": carried[0], "c": carried[1]},
                "sums": sums,
                "elapsed_s": time.monotonic() - self._start,
                **self.checkpoint_extra,
            },
        )
        self.run.update_summary(epochs_completed=self.epoch, step=self.step)

    def _whole_carried_state(self) -> tuple[Tensor, Tensor] | None:
        """The LSTM state of every row of the batch: under torchrun each rank carries its own rows."""
        state = self.carried.state if self.carried is not None else None
        if state is None or not self.world.distributed:
            return state
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world.size
        dist.all_gather_object(parts, tuple(s.cpu() for s in state))
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)

    def _sums_over_ranks(self) -> dict[str, Any]:
        """The running loss sums of the whole world (rank 0 takes them back on a resume)."""
        self._fold()
        if not self.world.distributed:
            return self.sums
        keys = ["epoch", "epoch_n", "window", "window_n"]
        total = self._sum_over_ranks([self.sums[k] for k in keys])
        return {k: int(v) if k.endswith("_n") else v for k, v in zip(keys, total, strict=True)}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, position, running sums, every RNG."""
        load_weights(self.net, state, self.run.checkpoints / "last.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.final, self.best_loss = state["metrics"], state["best_loss"]
        self.data_rng = state["data_rng"]
        carried = state["carried"]
        if carried is not None:  # the whole batch's rows; under torchrun each rank takes its own
            self.carried = CarriedState(carried["mode"])
            h, c = (self.world.shard(s, dim=1).to(self.device) for s in (carried["h"], carried["c"]))
            self.carried.state = (h, c)
        # this device's kind of sums, whichever device saved them (a CUDA run's float64 sums resume on MPS too)
        self.sums = self._zero_sums()
        if self.world.rank == 0:  # rank 0 holds the world's sums
            for k, v in state["sums"].items():
                self.sums[k] += int(v) if k.endswith("_n") else float(v)
        self.elapsed_before = state["elapsed_s"]
        restore_rng(state["rng"])  # last: nothing may draw a random number between here and the next step
        if self.world.rank > 0:  # the checkpoint holds rank 0's generators: other ranks draw their own masks
            torch.manual_seed(self.step * 1009 + self.world.rank)


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
