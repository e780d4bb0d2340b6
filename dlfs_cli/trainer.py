"""The one training loop: train, evaluate on the held-out split, record, checkpoint."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dlfs_cli.checkpoint import capture_rng, load_weights, restore_rng, save_checkpoint
from dlfs_cli.config import DlfsError
from dlfs_cli.tracking import ProgressDisplay, RunFolder

REGRESSION_METRICS = ["loss", "mse", "rmse", "mae"]
CLASSIFICATION_METRICS = ["loss", "accuracy"]
SEQUENCE_METRICS = ["loss", "bpc", "accuracy"]  # next-character prediction: loss in nats, bpc in bits


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
        h, c = (s.detach() for s in state)
        if self.mode == "mean":
            h, c = h.mean(dim=1, keepdim=True), c.mean(dim=1, keepdim=True)
        self.state = (h, c)


def carried_state(loader: Iterable) -> CarriedState | None:
    """The state a loader's batches carry from one to the next (text batchings say how), or None."""
    mode = getattr(loader, "carry", None)
    return CarriedState(mode) if mode else None


def make_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    return nn.MSELoss() if name == "mse" else nn.CrossEntropyLoss()  # CrossEntropyLoss takes raw logits


def model_output(model: nn.Module, x: Tensor, carried: CarriedState | None = None) -> Tensor:
    """The tensor the loss is computed on: the first output of a model that returns several
    (the autoencoder's (reconstruction, code)); a recurrent model also gets and gives its state."""
    if carried is not None:
        out, state = model(x, carried.take(len(x)))
        carried.keep(state)
        return out
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()  # no autograd bookkeeping at all (stricter than no_grad)
def evaluate(
    model: nn.Module, loader: Iterable, loss_name: str, device: torch.device, limit_batches: int | None = None
) -> dict[str, float]:
    """Held-out metrics, named test_<metric>, accumulated over the whole split (or limit_batches of it)."""
    model.eval()
    loss_fn = make_loss(loss_name)
    carried = carried_state(loader)  # its own: evaluation never touches the training state
    sums: dict[str, Tensor] = {}
    elements = 0
    for x, y in islice(loader, limit_batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model_output(model, x, carried)
        batch = {"loss": loss_fn(out, y) * y.numel()}  # the losses are means over the targets' elements
        if loss_name == "mse":
            batch["se"] = (out - y).square().sum()
            batch["ae"] = (out - y).abs().sum()
        else:
            batch["correct"] = (out.argmax(dim=1) == y).sum()
        for k, v in batch.items():
            sums[k] = sums.get(k, 0) + v.double()
        elements += y.numel()
    if elements == 0:
        raise DlfsError("the held-out split is empty: nothing to evaluate")
    values = {k: v.item() for k, v in sums.items()}  # one host sync per evaluation
    metrics = {"loss": values["loss"] / elements}
    if loss_name == "mse":
        metrics["mse"] = values["se"] / elements
        metrics["rmse"] = math.sqrt(metrics["mse"])
        metrics["mae"] = values["ae"] / elements
    else:
        if y.dim() > 1:  # a prediction at every position of a sequence: characters
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
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_name = loss_name
        self.loss_fn = make_loss(loss_name)
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
        self._start = time.monotonic()
        # Divergence, tracked on the device: the first step whose loss was not finite (-1: none yet).
        self._device_step = torch.zeros((), dtype=torch.int64, device=device)
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
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(model_output(self.model, x, self.carried), y)
            loss.backward()
            self.optimizer.step()
            self.step, self.batch = self.step + 1, i
            self._account(loss.detach(), y.numel(), epoch, lr)
            if self.step % self.log_every == 0:
                self._record_train(epoch, lr)
            if self.checkpoint_every and self.step % self.checkpoint_every == 0 and i < last:  # epoch end saves anyway
                self._stop_if_diverged(epoch, lr)  # never save weights that went NaN
                self._save("last.pt")
            if self.stop_signal is not None:
                self._stop_if_diverged(epoch, lr)
                self._save("last.pt")
                raise Interrupted(self.stop_signal, epoch, i, self.step, self.run.path)
            if progress.due():
                progress.batch(i, float(sums["epoch"] / sums["epoch_n"]))
        self._stop_if_diverged(epoch, lr)
        if sums["window_n"]:
            self._record_train(epoch, lr)
        return float(sums["epoch"] / max(sums["epoch_n"], 1))

    def _batches_per_epoch(self, loader: Iterable) -> int:
        return len(loader) if self.limit_batches is None else min(len(loader), self.limit_batches)

    def _zero_sums(self) -> dict[str, Any]:
        if self.device.type == "cpu":
            return {"epoch": 0.0, "epoch_n": 0, "window": 0.0, "window_n": 0}
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        return {"epoch": zero.clone(), "epoch_n": 0, "window": zero.clone(), "window_n": 0}

    def _account(self, loss: Tensor, elements: int, epoch: int, lr: float) -> None:
        """Add a step's loss (a mean over `elements` targets) to the running sums and watch for divergence.

        On a CPU reading the loss costs nothing, so every step is checked at once. On an accelerator a
        read would stall the pipeline: the sums stay on the device, and a device-side flag remembers the
        first step whose loss was NaN or infinite, read at log and save points."""
        sums = self.sums
        if self.device.type == "cpu":
            value = loss.item()
            if not math.isfinite(value):
                raise Diverged(epoch, self.step, lr)
            weighted = value * elements
        else:
            weighted = loss * elements
            self._device_step += 1
            first = (~torch.isfinite(loss)) & (self._first_bad < 0)
            self._first_bad = torch.where(first, self._device_step, self._first_bad)
        sums["epoch"] += weighted
        sums["window"] += weighted
        sums["epoch_n"] += elements
        sums["window_n"] += elements

    def _stop_if_diverged(self, epoch: int, lr: float) -> None:
        bad = int(self._first_bad)  # a host sync; on a CPU the flag is never set (_account checks every step)
        if bad >= 0:
            raise Diverged(epoch, bad, lr)

    def _record_train(self, epoch: int, lr: float) -> None:
        self._stop_if_diverged(epoch, lr)  # the row's read syncs anyway
        sums = self.sums
        loss = float(sums["window"] / sums["window_n"])  # the one host sync per log interval
        sums["window"], sums["window_n"] = sums["window"] * 0, 0
        elapsed = time.monotonic() - self._start
        self.run.log_metrics(
            {"epoch": epoch, "step": self.step, "split": "train", "lr": lr, "loss": loss, "elapsed_s": elapsed}
        )

    def _evaluate_and_record(self, loader: Iterable, epoch: int, lr: float) -> dict[str, float]:
        metrics = evaluate(self.model, loader, self.loss_name, self.device, self.limit_batches)
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
        carried = self.carried.state if self.carried is not None else None
        save_checkpoint(
            self.run.checkpoints / name,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch,
                "step": self.step,
                "metrics": self.final,
                "best_loss": self.best_loss,
                "rng": capture_rng(),
                "data_rng": self.data_rng,
                "carried": None if carried is None else {"mode": self.carried.mode, "h": carried[0], "c": carried[1]},
                "sums": self.sums,
                "elapsed_s": time.monotonic() - self._start,
                **self.checkpoint_extra,
            },
        )
        self.run.update_summary(epochs_completed=self.epoch, step=self.step)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, position, running sums, every RNG."""
        load_weights(self.model, state, self.run.checkpoints / "last.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.final, self.best_loss = state["metrics"], state["best_loss"]
        self.data_rng = state["data_rng"]
        carried = state["carried"]
        if carried is not None:
            self.carried = CarriedState(carried["mode"])
            self.carried.state = (carried["h"].to(self.device), carried["c"].to(self.device))
        sums = state["sums"]
        self.sums = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in sums.items()}
        self.elapsed_before = state["elapsed_s"]
        self._device_step.fill_(self.step)
        restore_rng(state["rng"])  # last: nothing may draw a random number between here and the next step


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
