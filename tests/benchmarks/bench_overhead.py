"""Runner overhead: dlfs's Trainer against a bare PyTorch loop over the same data path and model.

    python tests/benchmarks/bench_overhead.py [ROUNDS]

Both sides run in this one process, alternately, on the same batches (dlfs's data path) and the
same model: the bare loop is `zero_grad; loss(model(x), y).backward(); step` and nothing else.
dlfs's side is `Trainer.fit` writing a real run folder (metrics rows, last.pt every epoch, the
divergence watch, the progress logic), minus its one held-out evaluation at the end, timed alone.
Two workloads: the book's CNN on the offline digits (about 20 ms a step) and the Boston MLP (well
under a millisecond a step: where a runner's per-step costs would show). Target: <= 1.03x.
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

from dlfs_cli.config import TrainerConfig, conf_dir, register_configs  # noqa: E402
from dlfs_cli.data import build_data  # noqa: E402
from dlfs_cli.distributed import seed_everything  # noqa: E402
from dlfs_cli.models import build_model  # noqa: E402
from dlfs_cli.tracking import RunFolder  # noqa: E402
from dlfs_cli.train import build_optimizer  # noqa: E402
from dlfs_cli.trainer import Trainer, evaluate, make_loss, metric_names  # noqa: E402

register_configs()

WORKLOADS = {
    "digits CNN": (["model=mnist_cnn", "data=digits"], 3),  # (overrides, epochs)
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
    return {"ms_per_step": (time.perf_counter() - t0) / steps * 1e3, "steps": steps}


def runner(overrides: list[str], epochs: int, work: Path) -> dict[str, float]:
    cfg, data, model, optimizer = setup(overrides)
    run = RunFolder(work / f"run-{time.time_ns()}", live=False)
    run.start(cfg, {}, metric_names(cfg.loss.name))
    schedule = TrainerConfig(epochs=epochs, eval_every=epochs, log_every=100)
    trainer = Trainer(model, optimizer, None, schedule, cfg.loss.name, torch.device("cpu"), run, {})
    t0 = time.perf_counter()
    trainer.fit(data.train, None, data.test)  # no validation: the one evaluation is the test split, timed below
    total = time.perf_counter() - t0
    t1 = time.perf_counter()
    evaluate(model, data.test, cfg.loss.name, torch.device("cpu"))  # the fit's one evaluation, timed alone
    total -= time.perf_counter() - t1
    run.close()
    return {"ms_per_step": total / trainer.step * 1e3, "steps": trainer.step}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
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
                    ["ms_per_step", "steps"],
                    ratio_of="ms_per_step",
                    higher_is_better=False,
                    file=f"overhead_{name.split()[0].lower()}.md",
                )
            )
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
