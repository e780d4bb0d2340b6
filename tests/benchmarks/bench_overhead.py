"""Runner overhead: dlfs's Trainer against a bare PyTorch loop over the same data path and model.

    python tests/benchmarks/bench_overhead.py [ROUNDS]

Both sides run in this one process, alternately, on the same batches (dlfs's data path) and the
same model: the bare loop is `zero_grad; loss(model(x), y).backward(); step` and nothing else.
dlfs's side is `Trainer.fit` writing a real run folder (metrics rows, last.pt every epoch, the
divergence watch, the progress logic), minus its one held-out evaluation at the end, timed in place.
Two workloads: the book's CNN on the offline digits (about 10-20 ms a step; 10 epochs, so that one
round's 410 steps outlast the machine's second-to-second noise) and the Boston MLP (well under a
millisecond a step, 9 steps an epoch: where a runner's per-step and per-epoch costs would show).
save_ms_per_step: the part of dlfs's ms_per_step spent saving last.pt and summary.json at the epoch
ends (fsynced, with the RNG states). Target: <= 1.03x on the CNN.
Results: tests/benchmarks/results/overhead.md.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import ROOT, alternate, report

sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from dlfs_cli.config import TrainerConfig, conf_dir, metric_names, register_configs  # noqa: E402
from dlfs_cli.data import build_data  # noqa: E402
from dlfs_cli.distributed import seed_everything  # noqa: E402
from dlfs_cli.models import build_model  # noqa: E402
from dlfs_cli.tracking import RunFolder  # noqa: E402
from dlfs_cli.train import build_optimizer  # noqa: E402
from dlfs_cli.trainer import Trainer, make_loss  # noqa: E402

register_configs()

WORKLOADS = {
    "digits CNN": (["model=mnist_cnn", "data=digits"], 10),  # (overrides, epochs)
    "Boston MLP": (["model=boston"], 40),
}


def setup(overrides: list[str]):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, "device=cpu", "figures.enabled=false"])
    seed_everything(0)
    data = build_data(cfg.data, cfg.trainer.batch_size, 0, torch.device("cpu"))
    model = build_model(cfg.model, data.info)
    return cfg, data, model, build_optimizer(cfg.optimizer, model)


def bare(overrides: list[str], epochs: int) -> dict[str, float]:
    cfg, data, model, optimizer = setup(overrides)
    loss_fn = make_loss(cfg.loss.name)
    model.train()
    steps = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, y in data.train:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
            steps += 1
    return {"ms_per_step": (time.perf_counter() - t0) / steps * 1e3, "steps": steps, "save_ms_per_step": 0.0}


class Timed(Trainer):
    """The Trainer, adding up the time its checkpoint saves and its held-out evaluations take."""

    saving_s = evaluating_s = 0.0

    def _save(self, name: str) -> None:
        t0 = time.perf_counter()
        super()._save(name)
        self.saving_s += time.perf_counter() - t0

    def _evaluate_epoch(self, *args, **kwargs) -> dict[str, float]:
        t0 = time.perf_counter()
        try:
            return super()._evaluate_epoch(*args, **kwargs)
        finally:
            self.evaluating_s += time.perf_counter() - t0


def runner(overrides: list[str], epochs: int, work: Path) -> dict[str, float]:
    cfg, data, model, optimizer = setup(overrides)
    run = RunFolder(work / f"run-{time.time_ns()}", live=False)
    run.start(cfg, {}, metric_names(cfg.loss.name))
    schedule = TrainerConfig(epochs=epochs, eval_every=epochs, log_every=100)
    trainer = Timed(model, optimizer, None, schedule, cfg.loss.name, torch.device("cpu"), run, {})
    t0 = time.perf_counter()
    trainer.fit(data.train, None, data.test)  # no validation: the one evaluation is the test split's
    # the fit's time less its evaluation's, timed in place: a later re-run of the evaluation is warm (its
    # shapes' kernels and buffers ready) and takes less, which would be counted as the runner's own cost
    total = time.perf_counter() - t0 - trainer.evaluating_s
    run.close()
    per_step = 1e3 / trainer.step
    return {"ms_per_step": total * per_step, "steps": trainer.step, "save_ms_per_step": trainer.saving_s * per_step}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (overrides, epochs) in WORKLOADS.items():
            results = alternate(
                {
                    f"{name}: bare loop": lambda o=overrides, e=epochs: bare(o, e),
                    f"{name}: dlfs Trainer": lambda o=overrides, e=epochs: runner(o, e, Path(tmp)),
                },
                rounds,
            )
            tables.append(
                report(
                    f"Runner overhead, {name} ({epochs} epochs)",
                    results,
                    ["ms_per_step", "steps", "save_ms_per_step"],
                    ratio_of="ms_per_step",
                    higher_is_better=False,
                    file=f"overhead_{name.split()[0].lower()}.md",
                )
            )
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
