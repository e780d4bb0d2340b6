"""The one training loop: train, evaluate on the held-out split, record, checkpoint."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from dlfs_cli.checkpoint import save_checkpoint
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
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_name = loss_name
        self.loss_fn = make_loss(loss_name)
        self.device = device
        self.run = run
        self.checkpoint_extra = checkpoint_extra  # config, versions: saved with every checkpoint
        self.limit_batches = limit_batches
        self.log_every = log_every
        self._start = time.monotonic()  # reset by fit(); elapsed_s in metrics.csv counts from there
        self.step = 0
        self.best_loss = math.inf
        self.carried: CarriedState | None = None

    def fit(self, train_loader: Iterable, test_loader: Iterable, epochs: int, eval_every: int) -> dict[str, float]:
        """Train for `epochs`, evaluating every `eval_every` epochs and after the last; returns final test metrics."""
        self._start = time.monotonic()
        batches = len(train_loader) if self.limit_batches is None else min(len(train_loader), self.limit_batches)
        if epochs == 0:  # nothing to train: measure the initial model so the run still has its numbers
            final = self._evaluate_and_record(test_loader, 0, self.optimizer.param_groups[0]["lr"])
            self._save("last.pt", 0, final)
            return final
        final: dict[str, float] = {}
        with ProgressDisplay(epochs, batches) as progress:
            for epoch in range(1, epochs + 1):
                lr = self.optimizer.param_groups[0]["lr"]  # the rate of this epoch, for metrics.csv
                train_loss = self._train_epoch(train_loader, progress, epoch, lr)
                if self.scheduler is not None:
                    self.scheduler.step()  # after the optimizer's steps (the book had them the other way round)
                test = None
                if epoch % eval_every == 0 or epoch == epochs:
                    test = final = self._evaluate_and_record(test_loader, epoch, lr)
                self._save("last.pt", epoch, final)
                progress.epoch(epoch, train_loss, test)
        return final

    def _train_epoch(self, loader: Iterable, progress: ProgressDisplay, epoch: int, lr: float) -> float:
        """One pass over the training data; returns the mean loss per sample.

        metrics.csv gets a `train` row every `log_every` steps and at the end of the epoch, holding the
        mean loss over the steps since the previous row.
        """
        self.model.train()  # every epoch: evaluation switched it to eval mode (the book forgot this)
        self.carried = carried_state(loader)  # a recurrent model starts each epoch from zeros
        # Summed on the device: reading a loss with .item() every step would stall a GPU.
        epoch_sum, window_sum = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        epoch_n = window_n = 0
        for i, (x, y) in enumerate(islice(loader, self.limit_batches), start=1):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(model_output(self.model, x, self.carried), y)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            weighted = loss.detach() * len(x)
            epoch_sum += weighted
            window_sum += weighted
            epoch_n += len(x)
            window_n += len(x)
            if self.step % self.log_every == 0:
                self._record_train(epoch, lr, window_sum, window_n)
                window_sum, window_n = torch.zeros((), device=self.device), 0
            if progress.due():
                progress.batch(i, (epoch_sum / epoch_n).item())
        if window_n:
            self._record_train(epoch, lr, window_sum, window_n)
        return (epoch_sum / max(epoch_n, 1)).item()

    def _record_train(self, epoch: int, lr: float, loss_sum: Tensor, n: int) -> None:
        loss = (loss_sum / n).item()  # the one host sync per log interval
        if not math.isfinite(loss):
            raise Diverged(epoch, self.step, loss, lr)
        self.run.log_metrics(
            {
                "epoch": epoch,
                "step": self.step,
                "split": "train",
                "lr": lr,
                "loss": loss,
                "elapsed_s": time.monotonic() - self._start,
            }
        )

    def evaluate(self, loader: Iterable) -> dict[str, float]:
        return evaluate(self.model, loader, self.loss_name, self.device, self.limit_batches)

    def _evaluate_and_record(self, loader: Iterable, epoch: int, lr: float) -> dict[str, float]:
        metrics = self.evaluate(loader)
        row = {k.removeprefix("test_"): v for k, v in metrics.items()}
        elapsed = time.monotonic() - self._start
        self.run.log_metrics(
            {"epoch": epoch, "step": self.step, "split": "test", "lr": lr, **row, "elapsed_s": elapsed}
        )
        if metrics["test_loss"] < self.best_loss:
            self.best_loss = metrics["test_loss"]
            self._save("best.pt", epoch, metrics)
        return metrics

    def _save(self, name: str, epoch: int, metrics: dict[str, float]) -> None:
        save_checkpoint(
            self.run.checkpoints / name,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "epoch": epoch,
                "step": self.step,
                "metrics": metrics,
                **self.checkpoint_extra,
            },
        )
        self.run.update_summary(epochs_completed=epoch)


class Diverged(DlfsError):
    def __init__(self, epoch: int, step: int, loss: float, lr: float) -> None:
        super().__init__(
            f"training diverged: the loss became {loss} in epoch {epoch} (by step {step}); "
            f"try a lower optimizer.lr (it was {lr:g})"
        )
